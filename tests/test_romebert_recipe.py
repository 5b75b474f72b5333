"""RomeBERT's recipe knobs: the gamma warm-up (schedule, loss at step 0, the loop driving it), the
final exit's warm-up alone, the final exit's weight."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_sequence_model
from test_train import toy_data

from rayexit.config import TrainSettings
from rayexit.errors import RayexitError
from rayexit.train import train_model
from rayexit.train.steps import build_stages, distillation_weight


def batch_of(size=8):
    data = toy_data(size)
    ids = torch.tensor(data.input_ids)
    return ids, torch.ones_like(ids), torch.tensor(data.labels)


@pytest.mark.parametrize(
    ("progress", "expected"),
    [(0.0, 0.0), (0.1, 0.3), (0.15, 0.45), (0.3, 0.9), (0.31, 0.9), (0.99, 0.9)],
)
def test_gamma_ramps_linearly_over_the_warmup(progress, expected):
    assert distillation_weight(0.9, 0.3, progress) == pytest.approx(expected)


def test_no_warmup_distils_at_full_weight_from_the_start():
    assert distillation_weight(0.7, 0.0, 0.0) == 0.7


def test_loss_at_step_zero_has_no_distillation_term():
    model = tiny_sequence_model(layers=3)
    ids, mask, labels = batch_of()
    settings = TrainSettings(gamma=0.9, temperature=3.0, gamma_warmup=0.3, final_weight=1.0)
    stage = build_stages(model, settings)[0]
    stage.progress = 0.0
    _, loss, _ = stage.step(model, (ids, mask, labels), stage.params, settings, 0)
    with torch.no_grad():
        logits = model(ids, mask)
    plain_ce = sum(F.cross_entropy(z, labels).item() for z in logits)  # every exit on the labels alone
    assert math.isclose(loss, plain_ce, rel_tol=1e-5)
    stage.progress = 0.5  # past the warm-up: the KL term is back, at gamma 0.9
    _, later, _ = stage.step(model, (ids, mask, labels), stage.params, settings, 0)
    assert not math.isclose(later, plain_ce, rel_tol=1e-3)


def test_the_loop_drives_the_warmup_step_by_step(monkeypatch):
    import rayexit.train.steps as steps

    seen = []
    original = steps.romebert_losses

    def spy(logits, labels, gamma, temperature, exit_weights="uniform"):
        seen.append(gamma)
        return original(logits, labels, gamma, temperature, exit_weights)

    monkeypatch.setattr(steps, "romebert_losses", spy)
    model = tiny_sequence_model(layers=3)
    # 16 examples, batch 4: 4 steps, progress 0, 1/4, 2/4, 3/4 against a warm-up of half the run
    settings = TrainSettings(epochs=1, batch_size=4, lr=1e-3, gamma=0.8, gamma_warmup=0.5, warmup_ratio=0.0)
    train_model(model, toy_data(16), settings, show_progress=False)
    assert seen == pytest.approx([0.0, 0.4, 0.8, 0.8])


@pytest.mark.parametrize("bad", [-0.1, 1.5, "x", True])
def test_gamma_warmup_must_be_a_fraction(bad):
    with pytest.raises(RayexitError, match="gamma_warmup"):
        TrainSettings(gamma_warmup=bad)


def test_final_weight_scales_the_final_exit_loss_only():
    model = tiny_sequence_model(layers=3)
    model.eval()  # dropout off: both calls see the same forward
    ids, mask, labels = batch_of()
    base = TrainSettings(gamma=0.9, temperature=3.0, final_weight=1.0)
    heavy = TrainSettings(gamma=0.9, temperature=3.0, final_weight=3.0)
    with torch.no_grad():
        final_ce = F.cross_entropy(model(ids, mask)[-1], labels).item()
    stage = build_stages(model, base)[0]
    _, plain, _ = stage.step(model, (ids, mask, labels), stage.params, base, 0)
    _, weighted, _ = stage.step(model, (ids, mask, labels), stage.params, heavy, 0)
    assert weighted == pytest.approx(plain + 2.0 * final_ce, rel=1e-5)


def test_final_weight_leaves_the_projection_of_the_exits_gradient_unchanged():
    """Final leading: update = w * g_final + proj(g_exits); proj depends on g_final's direction only.

    A property of the projection on the parameters (`gr_scope: encoder`); on the hidden states the
    leader at a lower layer also carries the deeper exits' pull, so the weight moves the projection.
    """
    model = tiny_sequence_model(layers=3)
    model.eval()
    batch = batch_of()
    updates = {}
    for weight in (1.0, 3.0):
        settings = TrainSettings(gamma=0.9, temperature=3.0, gr_direction="final", gr_scope="encoder",
                                 final_weight=weight)
        stage = build_stages(model, settings)[0]
        flat, _, combine = stage.step(model, batch, stage.params, settings, 0)
        updates[weight] = (combine(flat)[0], flat[: len(stage.params)])
    (one, g_final), (three, _) = updates[1.0], updates[3.0]
    for a, b, g in zip(one, three, g_final):
        assert torch.allclose(b - a, 2.0 * g, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in g_final)


@pytest.mark.parametrize("bad", [0, -1.0, "x", True])
def test_final_weight_must_be_positive(bad):
    with pytest.raises(RayexitError, match="final_weight"):
        TrainSettings(final_weight=bad)


def test_final_only_warmup_steps_as_a_fine_tune_then_joins_the_exits():
    model = tiny_sequence_model(layers=3)
    model.eval()  # dropout off: every call sees the same forward
    ids, mask, labels = batch_of()
    settings = TrainSettings(gamma=0.9, temperature=3.0, final_weight=3.0, final_only_warmup=0.25)
    stage = build_stages(model, settings)[0]
    inner_heads = [id(p) for head in model.heads.exits[:-1] for p in head.parameters()]
    with torch.no_grad():
        final_ce = F.cross_entropy(model(ids, mask)[-1], labels).item()
    stage.progress = 0.2  # inside the warm-up: the final exit's cross-entropy alone, at weight 1
    grads, loss, combine = stage.step(model, (ids, mask, labels), stage.params, settings, 0)
    assert loss == pytest.approx(final_ce, rel=1e-5)
    by_param = {id(p): g for p, g in zip(stage.params, combine(grads)[0])}
    assert all(by_param[i].abs().sum() == 0 for i in inner_heads)  # the inner exits do not train yet
    assert combine(grads)[1] is None  # no projection, so no conflict to count
    backbone = [by_param[id(p)] for p in model.backbone_parameters()]
    assert any(g.abs().sum() > 0 for g in backbone)
    stage.progress = 0.25  # the warm-up is over: every exit, distillation and the projection
    grads, later, combine = stage.step(model, (ids, mask, labels), stage.params, settings, 0)
    assert later > 3.0 * final_ce
    by_param = {id(p): g for p, g in zip(stage.params, combine(grads)[0])}
    assert all(by_param[i].abs().sum() > 0 for i in inner_heads)


def test_the_loop_runs_the_final_only_warmup_for_its_fraction(monkeypatch):
    import rayexit.train.steps as steps

    calls = []
    original = steps.final_only_step

    def spy(*args):
        calls.append("final")
        return original(*args)

    monkeypatch.setattr(steps, "final_only_step", spy)
    model = tiny_sequence_model(layers=3)
    # 16 examples, batch 4: 4 steps at progress 0, 1/4, 2/4, 3/4; the first two alone
    settings = TrainSettings(epochs=1, batch_size=4, lr=1e-3, final_only_warmup=0.5, warmup_ratio=0.0)
    result = train_model(model, toy_data(16), settings, show_progress=False)
    assert calls == ["final", "final"]
    assert result.conflict_rate is not None  # the two one-stage steps still count their conflicts


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), "x", True])
def test_final_only_warmup_must_be_a_fraction_below_one(bad):
    with pytest.raises(RayexitError, match="final_only_warmup"):
        TrainSettings(final_only_warmup=bad)


def romebert_update(model, batch, **overrides) -> dict[int, torch.Tensor]:
    """The combined (applied) gradient of one RomeBERT step, by parameter id."""
    settings = TrainSettings(gamma=0.9, temperature=3.0, final_weight=3.0, **overrides)
    stage = build_stages(model, settings)[0]
    grads, _, combine = stage.step(model, batch, stage.params, settings, 0)
    return {id(p): g for p, g in zip(stage.params, combine(grads)[0])}


@pytest.mark.parametrize(
    "path",
    [{"gr_scope": "hidden"}, {"gr_scope": "hidden_per_example"}, {"gr_scope": "encoder"},
     {"gr_scope": "encoder", "gr_direction": "none"}],
)
def test_exit_grad_scale_zero_leaves_the_encoder_to_the_final_exit(path):
    model = tiny_sequence_model(layers=3)
    model.eval()  # dropout off: every call sees the same forward
    batch = batch_of()
    ids, mask, labels = batch
    update = romebert_update(model, batch, exit_grad_scale=0.0, **path)
    final_alone = torch.autograd.grad(3.0 * F.cross_entropy(model(ids, mask)[-1], labels),
                                      model.backbone_parameters(), allow_unused=True)
    for p, expected in zip(model.backbone_parameters(), final_alone):
        expected = torch.zeros_like(p) if expected is None else expected
        assert torch.allclose(update[id(p)], expected, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in final_alone if g is not None)
    # the inner heads still learn, exactly as they do at the paper's scale of 1
    whole = romebert_update(model, batch, exit_grad_scale=1.0, **path)
    inner_heads = [p for head in model.heads.exits[:-1] for p in head.parameters()]
    for p in inner_heads:
        assert torch.allclose(update[id(p)], whole[id(p)], atol=1e-6)
    assert all(update[id(p)].abs().sum() > 0 for p in inner_heads[:2])


def test_exit_grad_scale_weighs_the_inner_exits_pull_linearly_without_projection():
    """No projection: the encoder's update is w * g_final + scale * g_exits, so scale 0.25 lies a
    quarter of the way from scale 0 to scale 1."""
    model = tiny_sequence_model(layers=3)
    model.eval()
    batch = batch_of()
    updates = {scale: romebert_update(model, batch, exit_grad_scale=scale, gr_scope="encoder", gr_direction="none")
               for scale in (0.0, 0.25, 1.0)}
    moved = False
    for p in model.backbone_parameters():
        low, quarter, high = (updates[s][id(p)] for s in (0.0, 0.25, 1.0))
        assert torch.allclose(quarter, low + 0.25 * (high - low), atol=1e-6)
        moved |= bool((high - low).abs().sum() > 0)
    assert moved  # the inner exits do pull on the encoder at scale 1


def test_exit_grad_scale_scales_the_branch_before_the_projection():
    """`ProjectingFork` on one hidden state: the exit's gradient enters at `scale` times its size."""
    from rayexit.gradreg import ProjectingFork

    hidden = torch.randn(2, 3, 4, requires_grad=True)
    # all-positive gradients agree (positive inner product): no projection, a plain sum
    up, down = torch.rand(2, 3, 4), torch.rand(2, 3, 4)
    through, branch = ProjectingFork.apply(hidden, False, [], False, 0.5)
    (through * up + branch * down).sum().backward()
    assert torch.allclose(hidden.grad, up + 0.5 * down)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "x", True])
def test_exit_grad_scale_must_lie_in_zero_one(bad):
    with pytest.raises(RayexitError, match="exit_grad_scale"):
        TrainSettings(exit_grad_scale=bad)
