"""Damaged model directories are refused with one line naming the file, never served as something else.

Each test saves a small random model with the packaged tokenizer, damages one thing the way a
disk, an editor or a careless copy would, and checks the refusal (and, for the CLI, exit 2 and
a one-line message).
"""

from __future__ import annotations

import json
import logging
import os
import pickle

import pytest
import torch
from conftest import tiny_backbone, tiny_sequence_model
from safetensors.torch import load_file, save_file

from rayexit.cli import main
from rayexit.data.encode import pad_batch
from rayexit.errors import RayexitError
from rayexit.integrity import file_digest
from rayexit.models import MultiExitForSequenceClassification, load_model_dir, load_tokenizer, read_exit_config

IDS, MASK = pad_batch([[101, 2023, 2003, 102], [101, 7592, 102]], 0)


@pytest.fixture
def model_dir(tmp_path, minilm_tokenizer):
    directory = tmp_path / "m"
    tiny_sequence_model(layers=3, labels=("neg", "pos")).save_pretrained(directory, minilm_tokenizer)
    return directory


def load(directory):
    model = MultiExitForSequenceClassification.from_pretrained(directory)
    load_tokenizer(directory)
    return model


def record(directory) -> dict:
    return json.loads((directory / "rayexit.json").read_text())


def rewrite_record(directory, change) -> None:
    data = record(directory)
    change(data)
    (directory / "rayexit.json").write_text(json.dumps(data))


def make_legacy(directory) -> None:
    """What a model directory written before digests looks like."""

    def strip(data):
        data.pop("sha256")
        data["format_version"] = 1

    rewrite_record(directory, strip)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: ")
    return err


def test_digests_of_every_file_are_recorded_and_an_intact_directory_loads(model_dir):
    data = record(model_dir)
    assert data["format_version"] == 2
    names = sorted(p.name for p in model_dir.iterdir() if p.name != "rayexit.json")
    assert sorted(data["sha256"]) == names
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    assert all(data["sha256"][n] == file_digest(model_dir / n) for n in names)
    model = load(model_dir)
    assert model.num_layers == 3 and model.labels == ["neg", "pos"]


def test_flipped_byte_inside_tensor_data_is_refused(model_dir):
    weights = model_dir / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside the data, past the header: still a valid safetensors file
    weights.write_bytes(bytes(raw))
    load_file(str(weights))  # proves the damage alone would load
    with pytest.raises(RayexitError, match=r"model\.safetensors: sha256 differs from the one rayexit\.json recorded"):
        load(model_dir)


@pytest.mark.parametrize("legacy", [False, True])
def test_fewer_layers_in_config_json_is_refused_not_served_shorter(model_dir, legacy):
    if legacy:
        make_legacy(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["backbone"]["num_hidden_layers"] = 2  # the encoder's config, nested in the multi-exit one
    (model_dir / "config.json").write_text(json.dumps(config))
    message = (
        r"model\.safetensors: tensors the model lacks: backbone\.encoder\.layer\.2\..*num_hidden_layers 2"
        if legacy
        else r"config\.json: sha256 differs"
    )
    with pytest.raises(RayexitError, match=message):
        load(model_dir)


@pytest.mark.parametrize("legacy", [False, True])
def test_nan_weights_fail_loudly(tmp_path, minilm_tokenizer, legacy):
    model = tiny_sequence_model(layers=2)
    with torch.no_grad():
        model.backbone.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "m", minilm_tokenizer)  # digests match: the file is as written
    if legacy:
        make_legacy(tmp_path / "m")
    with pytest.raises(RayexitError, match=r"layer\.1\.output\.dense\.weight holds 1 non-finite value"):
        load(tmp_path / "m")


@pytest.mark.parametrize("legacy", [False, True])
def test_deleted_tokenizer_is_refused_not_rebuilt_from_special_tokens(model_dir, legacy):
    if legacy:
        make_legacy(model_dir)
    (model_dir / "tokenizer.json").unlink()
    message = r"tokenizer\.json: missing; rayexit\.json lists it" if legacy is False else r"no tokenizer"
    with pytest.raises(RayexitError, match=message):
        load_tokenizer(model_dir)


def test_replaced_tokenizer_is_refused(model_dir):
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["hello"], tokenizer["model"]["vocab"]["world"] = (
        tokenizer["model"]["vocab"]["world"],
        tokenizer["model"]["vocab"]["hello"],
    )
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(RayexitError, match=r"tokenizer\.json: sha256 differs"):
        load_tokenizer(model_dir)


def test_tokenizer_larger_than_the_embeddings_is_refused(tmp_path, minilm_tokenizer):
    folder = tmp_path / "encoder"
    tiny_backbone(layers=2, vocab=1000).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    with pytest.raises(RayexitError, match=r"tokenizer has 30522 tokens but config\.json has vocab_size 1000"):
        load_tokenizer(folder)


def test_max_length_beyond_the_position_embeddings_is_refused(model_dir):
    rewrite_record(model_dir, lambda d: d.update(max_length=100000))
    with pytest.raises(RayexitError, match=r"max_length 100000 is more than the 130 positions"):
        load(model_dir)


def test_roberta_position_limit_counts_its_padding_offset(tmp_path):
    model = tiny_sequence_model("roberta", layers=2)
    model.exit_config.max_length = 129  # 130 positions, numbered from padding_idx + 1 = 2
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(RayexitError, match=r"max_length 129 is more than the 128 positions"):
        MultiExitForSequenceClassification.from_pretrained(tmp_path / "m")


def test_label_count_that_does_not_fit_the_heads_is_refused(model_dir):
    rewrite_record(model_dir, lambda d: d.update(labels=["neg", "pos", "mixed"]))
    # config.json's id2label catches it first; a directory from before config.json had labels, at the weights
    with pytest.raises(RayexitError, match=r"config\.json: id2label \[.*\] differs from the labels in rayexit"):
        load(model_dir)
    backbone = json.loads((model_dir / "config.json").read_text())["backbone"]
    (model_dir / "config.json").write_text(json.dumps(backbone))
    make_legacy(model_dir)
    with pytest.raises(RayexitError, match=r"heads\..*has shape \[2\], expected \[3\].*3 labels in rayexit\.json"):
        load(model_dir)


def test_extra_tensor_in_the_weights_is_refused(model_dir):
    make_legacy(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    state["heads.extra.weight"] = torch.zeros(2)
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(RayexitError, match=r"tensors the model lacks: heads\.extra\.weight"):
        load(model_dir)


def test_legacy_directory_loads_with_a_warning_and_the_same_outputs(model_dir, caplog):
    before = load(model_dir)
    make_legacy(model_dir)
    with caplog.at_level(logging.WARNING, logger="rayexit.integrity"):
        after = load(model_dir)
    assert "written before rayexit recorded file digests" in caplog.text
    for a, b in zip(before(IDS, MASK), after(IDS, MASK)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x01binary\xff" * 50, "binary data"),
        (b'{"task": "sequence", "labels": ["a", "\xff\xfe"]}', "not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'["a", "b"]', "expected a JSON object"),
        (b'{"task": "sequence", "labels": ["a", "b"], "format_version": 7}', "format_version 7"),
        (b'{"format_version": 2, "task": "sequence", "labels": ["a", "b"], "sha256": {}}', "must map each file"),
        (b'{"format_version": 1, "task": "sequence", "labels": ["a", "b"], "bogus": 1}', "unreadable exit config"),
        (b'{"format_version": 1, "task": "sequence", "labels": "ab"}', "labels must be a non-empty list"),
        (b'{"format_version": 1, "task": "sequence", "labels": ["a", "a"]}', "labels must be distinct"),
        (b'{"format_version": 1, "task": "vision", "labels": ["a", "b"]}', "task 'vision'"),
        (b'{"format_version": 1, "task": "sequence", "labels": ["a", "b"], "max_length": "x"}', "max_length 'x'"),
        (b'{"format_version": 1, "task": "sequence", "labels": ["a", "b"], "dropout": 3}', "dropout 3"),
        (b'{"format_version": 1, "task": "sequence", "labels": ["a", "b"], "policy": {"kind": "entropy", '
         b'"thresholds": "0.3"}}', "policy.thresholds: got '0.3'"),  # a hand edit, named with its file
    ],
)
def test_binary_or_mismatched_rayexit_json_is_one_line(model_dir, content, message):
    (model_dir / "rayexit.json").write_bytes(content)
    with pytest.raises(RayexitError, match=message) as info:
        read_exit_config(model_dir)
    assert "rayexit.json" in str(info.value) and "\n" not in str(info.value)


def test_wrong_digest_entries_are_refused(model_dir):
    rewrite_record(model_dir, lambda d: d["sha256"].update({"model.safetensors": "abc"}))
    with pytest.raises(RayexitError, match="expected a file name and 64 hex digits"):
        load(model_dir)


def test_cli_eval_on_damaged_model_is_one_line_exit_2(model_dir, tmp_path, capsys):
    (tmp_path / "d.tsv").write_text("sentence\tlabel\ngood\tpos\n")
    weights = model_dir / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x10
    weights.write_bytes(bytes(raw))
    code = main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "d.tsv"), "--json", str(tmp_path / "r")])
    assert code == 2
    assert "model.safetensors: sha256 differs" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_cli_refuses_a_pickled_encoder_without_unpickling_it(tmp_path, minilm_tokenizer, monkeypatch, capsys):
    folder = tmp_path / "pickled"
    backbone = tiny_backbone(layers=2)
    backbone.config.save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    marker = tmp_path / "unpickled"

    class Trap:  # unpickling this file, by any loader that runs its code, creates `marker`
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    (tmp_path / "t.tsv").write_text("sentence\tlabel\nyes\t1\nno\t0\n")
    for model in (folder, folder / "pytorch_model.bin"):
        args = ["train", "--model", str(model), "--train", str(tmp_path / "t.tsv"), "--output", str(tmp_path / "o")]
        assert main(args) == 2
        err = one_line_error(capsys)
        assert str(model) in err
        assert "pickled weights" in err or "is a file" in err
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_token_model_directory_round_trips_with_its_own_head_fields(tmp_path, minilm_tokenizer):
    from rayexit.models import ExitConfig
    from rayexit.models.token import MultiExitForTokenClassification

    config = ExitConfig(task="token", labels=["O", "B-PER"], head="linear", pooling="token", dropout=0.0)
    MultiExitForTokenClassification(tiny_backbone(layers=2), config).save_pretrained(tmp_path / "t", minilm_tokenizer)
    assert load_model_dir(tmp_path / "t").labels == ["O", "B-PER"]
