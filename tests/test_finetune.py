"""The single-exit fine-tune (`--method finetune`): final-exit CE only, intermediate heads untouched,
saved at full depth, and said so by `rayexit eval`."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_backbone, tiny_sequence_model

from rayexit.cli import main
from rayexit.config import TrainSettings
from rayexit.tasks import task_named
from rayexit.train.loop import train_model
from rayexit.train.steps import build_stages


def batch(seed: int = 0, size: int = 6, length: int = 9):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (size, length), generator=generator)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, 6:] = 0  # one padded row: pooling must respect the mask
    labels = torch.tensor([0, 1, 1, 0, 1, 0])[:size]
    return ids, mask, labels


@pytest.mark.parametrize("head", ["pooler", "shared-pooler"])
def test_loss_is_exactly_the_final_exit_cross_entropy(head):
    model = tiny_sequence_model(layers=3, head=head, pooling="mean")
    torch.manual_seed(7)
    with torch.no_grad():  # heads far from their near-uniform start, so every exit's CE differs
        for p in model.heads.parameters():
            p.normal_(0.0, 0.5)
    settings = TrainSettings(method="finetune", head=head)
    (stage,) = build_stages(model, settings)
    ids, mask, labels = batch()
    grads, loss, _ = stage.step(model, (ids, mask, labels), stage.params, settings, 0)
    with torch.no_grad():
        logits = model(ids, mask)
        final = logits[-1]
        by_hand = -torch.log_softmax(final, -1)[torch.arange(len(labels)), labels].mean()
        others = [float(F.cross_entropy(z, labels)) for z in logits[:-1]]
    assert loss == pytest.approx(float(by_hand), rel=1e-6)
    assert all(abs(other - loss) > 1e-3 for other in others)  # so the check above could fail
    assert any(g.abs().sum() > 0 for g in grads)
    # the intermediate heads do not enter the loss at all
    with torch.no_grad():
        for p in model.heads.exits[0].parameters():
            p.add_(1.0)
    _, again, _ = stage.step(model, (ids, mask, labels), stage.params, settings, 0)
    assert again == loss


@pytest.mark.parametrize("head,pooling", [("pooler", "mean"), ("shared-pooler", "mean"), ("pooler", "attention")])
def test_intermediate_heads_get_no_gradient_and_do_not_move(head, pooling):
    model = tiny_sequence_model(layers=3, head=head, pooling=pooling)
    settings = TrainSettings(method="finetune", head=head, pooling=pooling, epochs=2, batch_size=4, lr=1e-3,
                             head_lr=1e-2, warmup_ratio=0.0)
    (stage,) = build_stages(model, settings)
    trained_ids = {id(p) for p in stage.params}
    inner = [p for layer in range(2) for p in model.heads.exit_parameters(layer)]
    final = model.heads.exit_parameters(2)
    if pooling == "attention":  # the final exit's scorer trains with it, the inner exits' stay put
        assert len(final) == len(list(model.heads.exits[-1].parameters())) + 2
        assert {id(p) for p in model.heads.scorers.parameters()} <= {id(p) for p in inner + final}
    assert not trained_ids & {id(p) for p in inner}
    assert {id(p) for p in final} <= trained_ids
    assert {id(p) for p in model.backbone_parameters()} <= trained_ids
    # the step's gradient w.r.t. an intermediate head is exactly zero (the loss never reaches it)
    ids, mask, labels = batch()
    logits = model(ids, mask)
    loss = F.cross_entropy(logits[-1], labels)
    assert all(g is None for g in torch.autograd.grad(loss, inner, allow_unused=True))

    before_inner = [p.detach().clone() for p in inner]
    before_final = [p.detach().clone() for p in final]
    before_body = [p.detach().clone() for p in model.backbone_parameters()]
    data = encoded_pairs()
    train_model(model, data, settings, show_progress=False)
    assert all(torch.equal(a, p) for a, p in zip(before_inner, inner))
    assert any(not torch.equal(a, p) for a, p in zip(before_final, final))
    if pooling == "attention":
        assert final[-2].abs().sum() > 0, "the final exit's scorer left its zero start"
    assert any(not torch.equal(a, p) for a, p in zip(before_body, model.backbone_parameters()))


def test_deebert_stages_split_the_attention_scorers_by_exit():
    model = tiny_sequence_model(layers=3, pooling="attention")
    stage1, stage2 = build_stages(model, TrainSettings(method="deebert", pooling="attention"))
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    final = ids(model.heads.exit_parameters(2))
    inner = ids(p for layer in range(2) for p in model.heads.exit_parameters(layer))
    assert ids(model.heads.scorers[2].parameters()) <= final <= ids(stage1.params)
    assert ids(stage2.params) == inner
    assert ids(model.heads.scorers[0].parameters()) | ids(model.heads.scorers[1].parameters()) <= inner
    assert not ids(stage1.params) & inner


def encoded_pairs(n: int = 12):
    from rayexit.data.encode import EncodedSet

    generator = torch.Generator().manual_seed(1)
    ids = [torch.randint(1000, 2000, (int(torch.randint(4, 9, (1,), generator=generator)),),
                         generator=generator).tolist() for _ in range(n)]
    return EncodedSet(ids, [i % 2 for i in range(n)], 0)


def test_deebert_stage_one_is_the_fine_tune_step_for_step():
    """What lets the benchmark start DeeBERT's stage 2 from the fine-tune of the same seed."""
    data = encoded_pairs()
    common = dict(epochs=1, batch_size=4, lr=1e-3, head_lr=1e-2, seed=3, pooling="mean")
    finetune = tiny_sequence_model(layers=3, pooling="mean", seed=5)
    deebert = tiny_sequence_model(layers=3, pooling="mean", seed=5)
    train_model(finetune, data, TrainSettings(method="finetune", **common), show_progress=False)
    train_model(deebert, data, TrainSettings(method="deebert", **common), show_progress=False)
    # DeeBERT's stage 2 trains only the intermediate heads, so its backbone and final head are stage 1's
    for (name, a), b in zip(finetune.named_parameters(), deebert.parameters()):
        if ".exits.0." in name or ".exits.1." in name:
            continue
        assert torch.equal(a, b), name


def test_a_fine_tune_saves_full_depth_as_its_policy():
    task = task_named("sequence")
    config = task.exit_config(["0", "1"], TrainSettings(method="finetune", pooling="mean"))
    assert config.policy.kind == "none" and config.method == "finetune"
    assert task.exit_config(["0", "1"], TrainSettings(method="joint", pooling="mean")).policy.kind == "entropy"


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, minilm_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-encoder")
    tiny_backbone(layers=3).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


def test_cli_trains_a_fine_tune_and_eval_reports_full_depth_only(tmp_path, encoder_dir, datasets_dir, capsys):
    lines = (datasets_dir / "sst2" / "dev.tsv").read_text().splitlines()
    (tmp_path / "train.tsv").write_text("\n".join(lines[:65]) + "\n")
    (tmp_path / "valid.tsv").write_text("\n".join([lines[0]] + lines[65:105]) + "\n")
    (tmp_path / "test.tsv").write_text("\n".join([lines[0]] + lines[105:145]) + "\n")
    model_dir = tmp_path / "model"
    assert main(["train", "--model", str(encoder_dir), "--train", str(tmp_path / "train.tsv"), "--method", "finetune",
                 "--epochs", "1", "--batch-size", "16", "--max-length", "32", "--output", str(model_dir)]) == 0
    saved = json.loads((model_dir / "rayexit.json").read_text())
    assert saved["method"] == "finetune" and saved["policy"]["kind"] == "none"
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "test.tsv"), "--json",
                 str(tmp_path / "r.json"), "--select-on", str(tmp_path / "valid.tsv"), "--repeats", "1",
                 "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "note: a single-exit fine-tune" in printed and "untrained" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["selected"]["policy"]["kind"] == "none" and report["selected"]["layer_speedup"] == 1.0
    assert report["selected"]["accuracy"] == pytest.approx(report["full"])
    assert "validation" not in report["selected"]  # nothing was chosen among untrained heads
    assert [p["policy"]["kind"] for p in report["timed"]] == ["none"]
    assert "note" in report
