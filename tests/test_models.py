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
    [
        ("bert", "pooler", "cls"), ("roberta", "shared-pooler", "mean"), ("bert", "shared-pooler", "cls"),
        ("bert", "pooler", "attention"),
    ],
)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, kind, head, pooling):
    model = tiny_sequence_model(kind, layers=3, labels=["neg", "pos", "mixed"], head=head, pooling=pooling)
    if pooling == "attention":  # scorers off their zero start, so losing or swapping one would show
        with torch.no_grad():
            for scorer in model.heads.scorers:
                scorer.weight.normal_()
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


def test_attention_pooling_starts_as_the_mean_and_never_reads_padding():
    from rayexit.models.heads import ExitHeads

    torch.manual_seed(0)
    attention = ExitHeads("pooler", 2, 8, 3, 0.0, "attention")
    mean = ExitHeads("pooler", 2, 8, 3, 0.0, "mean")
    mean.load_state_dict({k: v for k, v in attention.state_dict().items() if not k.startswith("scorers.")})
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for layer in range(2):
        assert torch.allclose(attention(layer, hidden, mask), mean(layer, hidden, mask), atol=1e-6)
    with torch.no_grad():
        attention.scorers[1].weight.normal_()
    changed = hidden.clone()
    changed[0, 3:] = 1e4  # padding of the first sentence: any weight on it would show
    assert torch.allclose(attention(1, hidden, mask)[0], attention(1, changed, mask)[0])
    assert not torch.allclose(attention(1, hidden, mask), mean(1, hidden, mask), atol=1e-4)
    assert torch.allclose(attention(0, hidden, mask), mean(0, hidden, mask), atol=1e-6), "one scorer per exit"


def _label_in_one_token(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token carries a sign on feature 0, a random one except token 2's, which is the label's;
    feature 1 marks token 2. Only a pooling that finds token 2 (not the mean) reads the label."""
    labels = torch.randint(0, 2, (count,), generator=generator)
    signs = torch.randint(0, 2, (count, 6), generator=generator).float() * 2 - 1
    signs[:, 2] = labels.float() * 2 - 1
    hidden = torch.zeros(count, 6, 8)
    hidden[:, :, 0] = signs
    hidden[:, 2, 1] = 1.0
    return hidden, labels


def _fit(heads, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
    optimizer = torch.optim.Adam(heads.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(heads(0, hidden, mask), labels).backward()
        optimizer.step()


def test_attention_pooling_learns_to_read_the_token_that_decides():
    from rayexit.models.heads import ExitHeads

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    hidden, labels = _label_in_one_token(512, generator)
    unseen, unseen_labels = _label_in_one_token(512, generator)
    mask = torch.ones(512, 6, dtype=torch.long)
    accuracy = {}
    for pooling in ("attention", "mean"):
        heads = ExitHeads("pooler", 1, 8, 2, 0.0, pooling)
        _fit(heads, hidden, labels, mask)
        with torch.no_grad():
            accuracy[pooling] = (heads(0, unseen, mask).argmax(-1) == unseen_labels).float().mean().item()
            if pooling == "attention":
                weights = heads.scorers[0](unseen).squeeze(-1).softmax(-1).mean(0)
    assert accuracy["attention"] == 1.0
    assert accuracy["mean"] < 0.75, "the mean dilutes token 2 among five random signs"
    others = torch.cat([weights[:2], weights[3:]])
    assert weights[2] > 2 * others.max(), weights


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
