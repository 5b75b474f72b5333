import pytest
import torch
from conftest import tiny_sequence_model

from rayexit.config import TrainSettings
from rayexit.data import encode_examples, load_text_classification
from rayexit.data.encode import EncodedSet
from rayexit.train import train_model
from rayexit.train.steps import build_stages


def toy_data(size=64, seed=0):
    """Label = whether token 2000 appears: learnable in a few steps by a tiny model."""
    generator = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(size):
        body = torch.randint(3000, 4000, (6,), generator=generator).tolist()
        label = int(torch.rand(1, generator=generator) < 0.5)
        if label:
            body[2] = 2000
        ids.append([101] + body + [102])
        labels.append(label)
    return EncodedSet(ids, labels, 0)


@pytest.mark.parametrize("method", ["romebert", "joint", "pabee", "deebert"])
def test_every_method_trains_and_lowers_its_loss(method):
    model = tiny_sequence_model(layers=3, pooling="mean")
    settings = TrainSettings(method=method, epochs=4, batch_size=16, lr=1e-3, warmup_ratio=0.0)
    result = train_model(model, toy_data(), settings, show_progress=False)
    first_stage = [h for h in result.history if h["stage"] == result.history[0]["stage"]]
    assert first_stage[-1]["loss"] < first_stage[0]["loss"]
    if method == "romebert":  # one conflict flag per step: a fraction with the step count as denominator
        conflicts = result.conflict_rate * result.steps
        assert 0.0 <= result.conflict_rate <= 1.0 and conflicts == pytest.approx(round(conflicts), abs=1e-9)
    else:
        assert result.conflict_rate is None


def test_deebert_second_stage_freezes_backbone_and_final_head():
    model = tiny_sequence_model(layers=3)
    stages = build_stages(model, TrainSettings(method="deebert"))
    trained = {id(p) for p in stages[1].params}
    assert not trained & {id(p) for p in model.backbone.parameters()}
    assert not trained & {id(p) for p in model.heads.exits[-1].parameters()}
    assert {id(p) for p in model.heads.exits[0].parameters()} <= trained


def test_romebert_without_projection_equals_plain_sum_gradient():
    """gr_direction 'none' must give exactly the gradient of final_weight * final + exits."""
    from rayexit.losses import romebert_losses
    from rayexit.train.steps import romebert_step

    model = tiny_sequence_model(layers=3)
    data = toy_data(8)
    ids = torch.tensor(data.input_ids)
    mask = torch.ones_like(ids)
    labels = torch.tensor(data.labels)
    params = list(model.parameters())
    settings = TrainSettings(gr_direction="none", exit_grad_scale=1.0)  # the scale: test_romebert_recipe.py
    flat, _, combine = romebert_step(model, (ids, mask, labels), params, settings, 0)
    grads, _ = combine(flat)
    final, exits = romebert_losses(model(ids, mask), labels, settings.gamma, settings.temperature)
    expected = torch.autograd.grad(settings.final_weight * final + exits, params, allow_unused=True)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, torch.zeros_like(got) if want is None else want, atol=1e-6)


def test_short_run_on_real_sst2_slice_beats_chance(datasets_dir, minilm_tokenizer):
    from rayexit.models import ExitConfig, MultiExitForSequenceClassification
    from rayexit.tasks import task_named

    train = load_text_classification(str(datasets_dir / "sst2" / "train.tsv"), max_examples=640)
    dev = load_text_classification(str(datasets_dir / "sst2" / "dev.tsv"), max_examples=200)
    settings = TrainSettings(method="romebert", epochs=1, lr=1e-4, head_lr=1e-3, pooling="mean", max_length=64)
    model = MultiExitForSequenceClassification.from_backbone(
        "minilm", ExitConfig(task="sequence", labels=["0", "1"], pooling="mean")
    )
    train_data = encode_examples(minilm_tokenizer, train, ["0", "1"], 64)
    dev_data = encode_examples(minilm_tokenizer, dev, ["0", "1"], 64)
    train_model(model, train_data, settings, show_progress=False)
    accuracies = task_named("sequence").exit_scores(model, dev_data, 64)
    majority = max(dev.labels.count("0"), dev.labels.count("1")) / len(dev)
    assert accuracies[-1] > majority + 0.15, accuracies
