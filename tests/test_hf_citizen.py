"""A model directory is a transformers citizen: it loads as what it is, or transformers refuses it.

Before, config.json was the backbone's own config, so `AutoModel.from_pretrained(model_dir)` built a
randomly initialised BERT and dropped every `backbone.`-prefixed tensor, and `rayexit train --model
<model dir>` trained from that random encoder. Small random models and the packaged tokenizer, in tmp_path.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_backbone, tiny_sequence_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from rayexit.config import TrainSettings
from rayexit.data.encode import pad_batch
from rayexit.errors import RayexitError
from rayexit.integrity import file_digest
from rayexit.model_dir import ModelDir
from rayexit.models import ExitConfig, MultiExitConfig, MultiExitForSequenceClassification
from rayexit.models.token import MultiExitForTokenClassification
from rayexit.train.recipe import prepare

IDS, MASK = pad_batch([[101, 2023, 2003, 102], [101, 7592, 102]], 0)


@pytest.fixture
def sequence_dir(tmp_path, minilm_tokenizer):
    directory = tmp_path / "seq"
    tiny_sequence_model(layers=3, labels=("neg", "pos", "mixed"), seed=3).save_pretrained(directory, minilm_tokenizer)
    return directory


@pytest.fixture
def token_dir(tmp_path, minilm_tokenizer):
    directory = tmp_path / "tok"
    config = ExitConfig(task="token", labels=["O", "B-PER", "I-PER"], head="linear", pooling="token", dropout=0.0)
    model = MultiExitForTokenClassification(tiny_backbone(layers=2, seed=4), config)
    model.save_pretrained(directory, minilm_tokenizer)
    return directory


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_json_names_the_multi_exit_model_with_labels_and_nested_backbone(sequence_dir):
    data = json.loads((sequence_dir / "config.json").read_text())
    assert data["model_type"] == "rayexit-multi-exit"
    assert data["id2label"] == {"0": "neg", "1": "pos", "2": "mixed"}
    assert data["label2id"] == {"neg": 0, "pos": 1, "mixed": 2}
    assert data["architectures"] == ["MultiExitForSequenceClassification"]
    assert data["backbone"]["model_type"] == "bert" and data["backbone"]["num_hidden_layers"] == 3
    config = AutoConfig.from_pretrained(sequence_dir)
    assert isinstance(config, MultiExitConfig)
    assert config.backbone.num_hidden_layers == 3 and config.backbone.hidden_size == 32
    assert config.labels() == ["neg", "pos", "mixed"]


def test_auto_model_gives_the_trained_multi_exit_model(sequence_dir, token_dir):
    saved = ModelDir(sequence_dir).load_model()
    for auto in (AutoModel, AutoModelForSequenceClassification):
        model = auto.from_pretrained(sequence_dir)
        assert isinstance(model, MultiExitForSequenceClassification)
        assert same_weights(model, saved)
        assert model.config.id2label == {0: "neg", 1: "pos", 2: "mixed"}
        with torch.no_grad():
            assert torch.equal(model(IDS, MASK)[-1], saved(IDS, MASK)[-1])
    tagger = AutoModel.from_pretrained(token_dir)
    assert isinstance(tagger, MultiExitForTokenClassification)
    assert same_weights(tagger, AutoModelForTokenClassification.from_pretrained(token_dir))
    with pytest.raises(RayexitError, match=r"holds a 'token' model, expected 'sequence'"):
        AutoModelForSequenceClassification.from_pretrained(token_dir)


def test_auto_model_reads_through_the_digest_checks(sequence_dir):
    weights = sequence_dir / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(RayexitError, match=r"model\.safetensors: sha256 differs"):
        AutoModel.from_pretrained(sequence_dir)


def test_auto_model_from_config_builds_the_same_shape(sequence_dir):
    model = AutoModel.from_config(AutoConfig.from_pretrained(sequence_dir))
    assert isinstance(model, MultiExitForSequenceClassification)
    assert model.labels == ["neg", "pos", "mixed"] and model.num_layers == 3
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in ModelDir(sequence_dir).load_model().state_dict().items()
    }


def test_without_rayexit_transformers_refuses_the_folder(sequence_dir):
    script = (
        "import sys\nfrom transformers import AutoModel\n"
        "try:\n    AutoModel.from_pretrained(sys.argv[1])\nexcept ValueError as exc:\n    print(exc); sys.exit(3)\n"
        "sys.exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(sequence_dir)], capture_output=True, text=True)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "rayexit-multi-exit" in done.stdout


def as_old_folder(directory, version: int) -> None:
    """What a directory written before config.json named the multi-exit model looks like."""
    backbone = json.loads((directory / "config.json").read_text())["backbone"]
    (directory / "config.json").write_text(json.dumps(backbone))
    record = json.loads((directory / "rayexit.json").read_text())
    if version == 1:
        record.pop("sha256")
    else:
        record["sha256"]["config.json"] = file_digest(directory / "config.json")
    record["format_version"] = version
    (directory / "rayexit.json").write_text(json.dumps(record))


@pytest.mark.parametrize("version", [1, 2])
def test_folders_written_before_still_load(sequence_dir, token_dir, version):
    expected = ModelDir(sequence_dir).load_model()
    expected_tags = ModelDir(token_dir).load_model()
    as_old_folder(sequence_dir, version)
    as_old_folder(token_dir, version)
    assert "model_type" in json.loads((sequence_dir / "config.json").read_text())  # bert's, as before
    assert same_weights(ModelDir(sequence_dir).load_model(), expected)
    assert same_weights(ModelDir(token_dir).load_model(), expected_tags)
    assert same_weights(MultiExitForSequenceClassification.from_pretrained(sequence_dir), expected)


def test_config_json_that_disagrees_with_rayexit_json_is_refused(sequence_dir):
    data = json.loads((sequence_dir / "config.json").read_text())
    data["task"] = "token"
    (sequence_dir / "config.json").write_text(json.dumps(data))
    record = json.loads((sequence_dir / "rayexit.json").read_text())
    record["sha256"]["config.json"] = file_digest(sequence_dir / "config.json")  # an edit with a fixed-up digest
    (sequence_dir / "rayexit.json").write_text(json.dumps(record))
    with pytest.raises(RayexitError, match=r"config\.json: task 'token', but rayexit\.json says 'sequence'"):
        ModelDir(sequence_dir).load_model()


@pytest.mark.parametrize("version", [None, 1, 2])
def test_train_from_a_model_directory_starts_from_its_trained_backbone(sequence_dir, tmp_path, version):
    if version is not None:
        as_old_folder(sequence_dir, version)
    saved = ModelDir(sequence_dir).load_model()
    data = tmp_path / "t.tsv"
    data.write_text("sentence\tlabel\nfine film\tgood\nawful film\tbad\ndull plot\tbad\n")
    run = prepare(str(sequence_dir), str(data), None, TrainSettings(epochs=1, max_length=16))
    assert run.model.labels == ["bad", "good"]  # the new run's labels, with new heads
    backbone = run.model.backbone.state_dict()
    assert backbone.keys() == saved.backbone.state_dict().keys()
    assert all(torch.equal(backbone[k], v) for k, v in saved.backbone.state_dict().items())


def test_auto_model_options_dtype_taken_others_refused(sequence_dir):
    half = AutoModel.from_pretrained(sequence_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(RayexitError, match=r"unsupported option\(s\) device_map for a rayexit model"):
        AutoModel.from_pretrained(sequence_dir, device_map="cpu")
    with pytest.raises(RayexitError, match=r"not-here: not a local folder"):
        MultiExitForSequenceClassification.from_pretrained("not-here")
