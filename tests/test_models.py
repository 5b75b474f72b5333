import json

import pytest
import torch
from conftest import tiny_sequence_model

from rayexit.config import ExitPolicy
from rayexit.data.encode import pad_batch
from rayexit.errors import RayexitError
from rayexit.models import MultiExitForSequenceClassification, load_tokenizer


@pytest.mark.parametrize(
    "kind,head,pooling",
    [("bert", "pooler", "cls"), ("roberta", "shared-pooler", "mean"), ("bert", "shared-pooler", "cls")],
)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, kind, head, pooling):
    model = tiny_sequence_model(kind, layers=3, labels=["neg", "pos", "mixed"], head=head, pooling=pooling)
    model.exit_config.policy = ExitPolicy("maxprob", [0.9, 0.8])
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".m.*")), "no staging folder may be left behind"
    loaded = MultiExitForSequenceClassification.from_pretrained(tmp_path / "m")
    ids, mask = pad_batch([[0, 5, 6, 7, 2], [0, 9, 2]], 1)
    for before, after in zip(model(ids, mask), loaded(ids, mask)):
        assert torch.equal(before, after)
    assert loaded.labels == ["neg", "pos", "mixed"]
    assert loaded.exit_config.policy.kind == "maxprob"
    assert json.loads((tmp_path / "m" / "rayexit.json").read_text())["policy"]["thresholds"] == [0.9, 0.8]


def test_saving_over_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(RayexitError, match="not a rayexit model directory"):
        tiny_sequence_model(layers=2).save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_unreadable_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(RayexitError, match="not a rayexit model directory"):
        MultiExitForSequenceClassification.from_pretrained(tmp_path)
    tiny_sequence_model(layers=2).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(RayexitError, match="unreadable weights"):
        MultiExitForSequenceClassification.from_pretrained(tmp_path / "m")


def test_packaged_minilm_heads_start_from_its_pooler():
    from rayexit.models.encoder import ExitConfig

    model = MultiExitForSequenceClassification.from_backbone("minilm", ExitConfig(task="sequence", labels=["a", "b"]))
    assert model.num_layers == 6
    pooler = model.backbone.pooler.dense.weight
    assert all(torch.equal(e.pooler.weight, pooler) for e in model.heads.exits)
    tokenizer = load_tokenizer("minilm")
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id
