"""`rayexit.load`, `predict` and `tag`: the README's example runs, policies mean what they say.

Small random models with the packaged MiniLM tokenizer, written to tmp_path.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_backbone, tiny_sequence_model

import rayexit
from rayexit.errors import RayexitError
from rayexit.model_dir import ModelDir
from rayexit.models import ExitConfig
from rayexit.models.token import MultiExitForTokenClassification
from rayexit.policy import ExitPolicy

README = Path(__file__).resolve().parents[1] / "README.md"
TEXTS = [
    "show me flights from boston to denver",
    "what is fare code h",
    "hi",
    "a much longer question " * 5,
    "cheapest fare to dallas",
    "ground transportation in denver",
]


def write_sequence_dir(directory: Path, tokenizer) -> Path:
    model = tiny_sequence_model(layers=3, labels=("atis_flight", "atis_abbreviation", "atis_airfare"), seed=1)
    with torch.no_grad():  # random heads answer near-uniformly; sharper ones make confidences differ by text
        for exit_head in model.heads.exits:
            exit_head.classifier.weight.mul_(300)
    model.save_pretrained(directory, tokenizer)
    return directory


def write_token_dir(directory: Path, tokenizer) -> Path:
    config = ExitConfig(task="token", labels=["O", "B-PER", "B-LOC"], head="linear", pooling="token", dropout=0.0)
    model = MultiExitForTokenClassification(tiny_backbone(layers=2, seed=2), config)
    model.eval().save_pretrained(directory, tokenizer)
    return directory


@pytest.fixture
def sequence_dir(tmp_path, minilm_tokenizer):
    return write_sequence_dir(tmp_path / "seq", minilm_tokenizer)


@pytest.fixture
def token_dir(tmp_path, minilm_tokenizer):
    return write_token_dir(tmp_path / "tok", minilm_tokenizer)


def readme_python_block() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section should hold one python example"
    return blocks[0]


def test_the_readme_example_runs(tmp_path, minilm_tokenizer, monkeypatch, capsys):
    code = readme_python_block()
    write_sequence_dir(tmp_path / "runs" / "atis-romebert", minilm_tokenizer)
    write_token_dir(tmp_path / "runs" / "ner-ss", minilm_tokenizer)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    answers = namespace["answers"]
    assert len(answers) == 2 and all({"label", "probability", "exit_layer"} <= set(a) for a in answers)
    assert namespace["full_depth"][0]["exit_layer"] == 3
    assert isinstance(namespace["model"], rayexit.LoadedModel)
    assert namespace["same"].labels == ["atis_flight", "atis_abbreviation", "atis_airfare"]
    assert namespace["config"].model_type == "rayexit-multi-exit"
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4  # two answers, two tagged sentences
    assert printed[3].startswith("[('Paris', ")


def reference(model, texts, layer: int, tokenizer):
    """Labels and probabilities of exit `layer` (1-based) at full depth, straight from the model's forward."""
    from rayexit.data.encode import pad_batch

    ids, mask = pad_batch(tokenizer(texts, truncation=True, max_length=128)["input_ids"], 0)
    with torch.no_grad():
        probs = torch.softmax(model(ids, mask)[layer - 1], dim=-1)
    confidence, index = probs.max(-1)
    return [model.labels[i] for i in index.tolist()], confidence.tolist()


def test_policies_none_dict_object_and_saved(sequence_dir, tmp_path, minilm_tokenizer):
    model = rayexit.load(sequence_dir)
    assert model.task == "sequence" and model.num_layers == 3

    full = model.predict(TEXTS, policy="none")
    labels, probabilities = reference(model.model, TEXTS, 3, minilm_tokenizer)
    assert [a["label"] for a in full] == labels
    assert [a["probability"] for a in full] == pytest.approx(probabilities, abs=1e-5)
    assert [a["exit_layer"] for a in full] == [3] * len(TEXTS)

    # An entropy above log(3) lets everything leave at exit 1; the same as a dict and as an object.
    first_labels, _ = reference(model.model, TEXTS, 1, minilm_tokenizer)
    for policy in ({"kind": "entropy", "thresholds": 5.0}, ExitPolicy("entropy", 5.0)):
        early = model.predict(TEXTS, policy=policy)
        assert [a["exit_layer"] for a in early] == [1] * len(TEXTS)
        assert [a["label"] for a in early] == first_labels

    # None is the saved policy: export one that exits at once and load it back.
    exported = ModelDir(sequence_dir).with_policy(ExitPolicy("maxprob", 0.0), tmp_path / "exported").path
    saved = rayexit.load(exported)
    assert saved.policy == ExitPolicy("maxprob", 0.0)
    assert [a["exit_layer"] for a in saved.predict(TEXTS)] == [1] * len(TEXTS)
    assert [a["exit_layer"] for a in model.predict(TEXTS)] == [
        a["exit_layer"] for a in model.predict(TEXTS, policy=model.policy)
    ]


def test_answers_keep_the_order_of_the_texts_whatever_the_batch_size(sequence_dir):
    model = rayexit.load(sequence_dir)
    first = [a["probability"] for a in model.predict(TEXTS, policy={"kind": "entropy", "thresholds": 5.0})]
    policy = {"kind": "maxprob", "thresholds": sorted(first)[len(first) // 2]}  # about half leave at exit 1
    one_by_one = [model.predict([t], policy=policy)[0] for t in TEXTS]
    assert {a["exit_layer"] for a in one_by_one} == {1, 3}  # both kinds of answer are in the batch
    for size in (1, 2, 32):
        batched = model.predict(TEXTS, policy=policy, batch_size=size)
        assert [a["label"] for a in batched] == [a["label"] for a in one_by_one]
        assert [a["exit_layer"] for a in batched] == [a["exit_layer"] for a in one_by_one]
        assert [a["probability"] for a in batched] == pytest.approx([a["probability"] for a in one_by_one], abs=1e-5)
    assert model.predict([]) == []


def test_tag_takes_strings_or_word_lists(token_dir):
    tagger = rayexit.load(token_dir)
    assert tagger.task == "token" and tagger.policy.kind == "tokee"
    from_text = tagger.tag(["John lives in Berlin", "", "Paris"])
    from_words = tagger.tag([["John", "lives", "in", "Berlin"], [], ["Paris"]])
    assert from_text == from_words
    assert from_text[0]["words"] == ["John", "lives", "in", "Berlin"]
    assert len(from_text[0]["tags"]) == 4 and set(from_text[0]["tags"]) <= {"O", "B-PER", "B-LOC"}
    assert from_text[1] == {"words": [], "tags": [], "exit_layers": []}
    full = tagger.tag(["John lives in Berlin"], policy="none")
    assert full[0]["exit_layers"] == [2, 2, 2, 2]
    at_once = tagger.tag(["John lives in Berlin"], policy={"kind": "sentee", "thresholds": 1.5})
    assert at_once[0]["exit_layers"] == [1, 1, 1, 1]  # normalised uncertainty is at most 1


def test_the_wrong_call_or_policy_is_one_clear_line(sequence_dir, token_dir):
    model, tagger = rayexit.load(sequence_dir), rayexit.load(token_dir)
    with pytest.raises(RayexitError, match=r"predict: .*tok is a token model .*use tag\(\)"):
        tagger.predict(["John lives in Berlin"])
    with pytest.raises(RayexitError, match=r"tag: .*seq is a sequence model .*use predict\(\)"):
        model.tag(["good film"])
    with pytest.raises(RayexitError, match=r"policy.kind: 'tokee' is not a sequence policy"):
        model.predict(["good film"], policy={"kind": "tokee", "thresholds": 0.1})
    with pytest.raises(RayexitError, match=r"policy: got 'entropy'; expected None"):
        model.predict(["good film"], policy="entropy")
    with pytest.raises(RayexitError, match=r"policy: unknown setting\(s\) threshold_list"):
        model.predict(["good film"], policy={"kind": "entropy", "threshold_list": [0.1]})
    with pytest.raises(RayexitError, match=r"texts: expected a list of strings, got str"):
        model.predict("good film")
    with pytest.raises(RayexitError, match=r"batch_size: got 0"):
        model.predict(["good film"], batch_size=0)
    with pytest.raises(RayexitError, match=r"texts\[1\]: expected a string or a list of non-empty word strings"):
        tagger.tag(["fine", 3])
    with pytest.raises(RayexitError, match=r"holds a 'token' model, expected 'sequence'"):
        rayexit.load(token_dir, task="sequence")


def test_serve_engines_load_through_the_api_and_answer_alike(sequence_dir, token_dir):
    from rayexit.serve.engine import ServedClassifier
    from rayexit.serve.tagging import ServedTagger

    served = ServedClassifier.from_model_dir(sequence_dir, device="cpu", dtype="float32")
    answers, _ = served.classify(TEXTS)
    direct = rayexit.load(sequence_dir).predict(TEXTS)
    assert [(a.label, a.exit_layer) for a in answers] == [(d["label"], d["exit_layer"]) for d in direct]
    assert [a.probability for a in answers] == pytest.approx([d["probability"] for d in direct], abs=1e-5)
    tagged = ServedTagger.from_model_dir(token_dir).tag(["John lives in Berlin"])
    assert tagged == rayexit.load(token_dir).tag(["John lives in Berlin"])
    with pytest.raises(RayexitError, match=r"holds a 'token' model, expected 'sequence'"):
        ServedClassifier.from_model_dir(token_dir)
    with pytest.raises(RayexitError, match=r"holds a 'sequence' model, expected 'token'"):
        ServedTagger.from_model_dir(sequence_dir)


def test_device_auto_places_both_tasks_and_a_missing_gpu_is_named(sequence_dir, token_dir):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(rayexit.load(sequence_dir, device="auto").model.parameters()).device.type == expected
    tagger = rayexit.load(token_dir, device="auto")
    assert next(tagger.model.parameters()).device.type == expected
    assert tagger.tag(["John lives in Berlin"]) == rayexit.load(token_dir).tag(["John lives in Berlin"])
    if not torch.cuda.is_available():
        for directory in (sequence_dir, token_dir):
            with pytest.raises(RayexitError, match=r"device: could not use 'cuda'"):
                rayexit.load(directory, device="cuda")


def test_load_runs_in_the_dtype_asked_for_and_names_a_bad_one_or_task(sequence_dir, token_dir):
    full = rayexit.load(sequence_dir).predict(TEXTS)
    half = rayexit.load(sequence_dir, dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    answers = half.predict(TEXTS)
    assert [a["label"] for a in answers] == [d["label"] for d in full]
    assert [a["probability"] for a in answers] == pytest.approx([d["probability"] for d in full], abs=0.05)
    tagger = rayexit.load(token_dir, dtype=torch.bfloat16)
    assert next(tagger.model.parameters()).dtype == torch.bfloat16
    assert tagger.tag(["John lives in Berlin"])[0]["words"] == ["John", "lives", "in", "Berlin"]
    assert next(rayexit.load(sequence_dir, dtype="auto").model.parameters()).dtype == torch.float32
    for bad in ("int8", "half", torch.int64, 16):
        with pytest.raises(RayexitError, match=r"dtype: got .*expected \"auto\", one of float32, float16, bfloat16"):
            rayexit.load(sequence_dir, dtype=bad)
    with pytest.raises(RayexitError, match=r"task: got 'sequnce', expected one of sequence, token"):
        rayexit.load(sequence_dir, task="sequnce")


def test_a_model_saved_in_bfloat16_comes_back_in_it_with_auto(sequence_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    half = rayexit.load(sequence_dir, dtype="bfloat16")
    half.model.save_pretrained(tmp_path / "half", half.tokenizer)
    assert {p.dtype for p in rayexit.load(tmp_path / "half").model.parameters()} == {torch.float32}
    again = rayexit.load(tmp_path / "half", dtype="auto")
    assert {p.dtype for p in again.model.parameters()} == {torch.bfloat16}
    assert [a["label"] for a in again.predict(TEXTS)] == [a["label"] for a in half.predict(TEXTS)]
    auto = AutoModelForSequenceClassification.from_pretrained(tmp_path / "half", dtype="auto")
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}


def test_hf_style_calls_sequences_and_max_layers(sequence_dir, token_dir, minilm_tokenizer):
    from transformers import AutoModelForSequenceClassification

    loaded = rayexit.load(sequence_dir)
    # model(**tokenizer(...)): token_type_ids (all zero) and a left-out mask are taken, as transformers does
    auto = AutoModelForSequenceClassification.from_pretrained(sequence_dir).eval()
    inputs = minilm_tokenizer(["good film", "a dull and tired plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = auto(**inputs)
        alone = auto(inputs["input_ids"][1:])
    assert len(logits) == auto.num_layers and logits[-1].shape == (2, len(auto.labels))
    assert torch.allclose(alone[-1], logits[-1][1:], atol=1e-5)  # row 1, the longer, has no padding: all ones
    with pytest.raises(RayexitError, match="token_type_ids: a second segment is not supported"):
        auto(inputs["input_ids"], inputs["attention_mask"], torch.ones_like(inputs["input_ids"]))
    with pytest.raises(RayexitError, match=r"forward: unsupported argument\(s\) labels"):
        auto(**inputs, labels=torch.tensor([0, 1]))
    # any sequence of texts, not only a list; one string is still refused
    assert loaded.predict(("good film", "bad film")) == loaded.predict(["good film", "bad film"])
    tagger = rayexit.load(token_dir)
    assert tagger.tag(("John lives in Berlin",)) == tagger.tag(["John lives in Berlin"])
    # max_layers bounds every answer's depth, as the server's does
    capped = loaded.predict(TEXTS, policy="none", max_layers=1)
    assert {a["exit_layer"] for a in capped} == {1}
    tagged = tagger.tag(["John lives in Berlin"], policy="none", max_layers=1)
    assert tagged[0]["exit_layers"] == [1, 1, 1, 1]
    for bad in (0, loaded.model.num_layers + 1, 1.5, True):
        with pytest.raises(RayexitError, match=r"max_layers: got .*expected a whole number from 1 to"):
            loaded.predict(["good film"], max_layers=bad)


def test_save_pretrained_keeps_the_tokenizer_and_takes_safe_serialization(sequence_dir, tmp_path, minilm_tokenizer):
    loaded = rayexit.load(sequence_dir)
    loaded.model.save_pretrained(sequence_dir, safe_serialization=True, max_shard_size="5GB")  # back where it was
    again = rayexit.load(sequence_dir)  # its tokenizer was kept: loading needs it
    assert again.predict(["good film"]) == loaded.predict(["good film"])
    with pytest.raises(RayexitError, match="safe_serialization=False"):
        loaded.model.save_pretrained(tmp_path / "x", safe_serialization=False)
    # transformers' order: the tokenizer first, then the model, into one folder
    both = tmp_path / "both"
    minilm_tokenizer.save_pretrained(both)
    loaded.model.save_pretrained(both)
    assert rayexit.load(both).predict(["good film"]) == loaded.predict(["good film"])
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(RayexitError, match=r"not a rayexit model directory \(it holds notes.txt\)"):
        loaded.model.save_pretrained(stranger)


def test_a_dtype_that_is_not_one_is_named(sequence_dir):
    from transformers import AutoModelForSequenceClassification

    from rayexit.models.sequence import MultiExitForSequenceClassification

    # (through AutoModel, transformers itself resolves the name first and raises its own error)
    with pytest.raises(RayexitError, match=r"dtype: got 'fp16', expected \"auto\", one of float32"):
        MultiExitForSequenceClassification.from_pretrained(sequence_dir, dtype="fp16")
    half = AutoModelForSequenceClassification.from_pretrained(sequence_dir, dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
