"""`gr_scope: hidden`: RomeBERT's projection on each layer's output, inside one backward pass."""

import math

import pytest
import torch
from conftest import tiny_sequence_model
from test_romebert_recipe import batch_of

from rayexit.config import TrainSettings
from rayexit.gradreg import ProjectingFork
from rayexit.losses import romebert_losses
from rayexit.train.steps import build_stages


def fork_gradient(through_pull: torch.Tensor, branch_pull: torch.Tensor, branch_leads: bool, per_example=False):
    hidden = torch.zeros_like(through_pull, requires_grad=True)
    conflicts: list[bool] = []
    through, branch = ProjectingFork.apply(hidden, branch_leads, conflicts, per_example)
    ((through * through_pull).sum() + (branch * branch_pull).sum()).backward()
    return hidden.grad, conflicts


def test_fork_projects_the_branch_against_the_layers_above_when_they_conflict():
    above = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    branch = torch.tensor([[-1.0, 1.0], [0.0, 3.0]])  # <branch, above> = -2 < 0
    grad, conflicts = fork_gradient(above, branch, branch_leads=False)
    # branch minus its part along `above`: [[0, 1], [0, 3]]; plus `above`
    assert torch.allclose(grad, torch.tensor([[2.0, 1.0], [0.0, 3.0]]))
    assert conflicts == [True]


def test_fork_with_the_branch_leading_projects_the_layers_above_instead():
    above = torch.tensor([[-1.0, 1.0]])
    branch = torch.tensor([[2.0, 0.0]])
    grad, conflicts = fork_gradient(above, branch, branch_leads=True)
    assert torch.allclose(grad, torch.tensor([[2.0, 1.0]]))
    assert conflicts == [True]


def test_fork_adds_gradients_that_agree():
    above = torch.tensor([1.0, 2.0])
    branch = torch.tensor([3.0, -1.0])  # dot = 1 > 0
    grad, conflicts = fork_gradient(above, branch, branch_leads=False)
    assert torch.equal(grad, above + branch)
    assert conflicts == [False]


def test_fork_per_example_projects_only_the_examples_that_conflict():
    # example 0 conflicts (dot -2), example 1 agrees (dot +3); over the whole batch the dot is +1
    above = torch.tensor([[[2.0, 0.0]], [[1.0, 1.0]]])
    branch = torch.tensor([[[-1.0, 1.0]], [[1.0, 2.0]]])
    grad, conflicts = fork_gradient(above, branch, branch_leads=False, per_example=True)
    assert torch.allclose(grad, torch.tensor([[[2.0, 1.0]], [[2.0, 3.0]]]))
    assert conflicts == [True]
    whole, conflicts = fork_gradient(above, branch, branch_leads=False)
    assert torch.equal(whole, above + branch) and conflicts == [False]  # the batch-wide rule sees no conflict


def test_fork_per_example_leaves_an_example_with_a_zero_leader_alone():
    above = torch.zeros(2, 1, 2)
    branch = torch.tensor([[[1.0, -1.0]], [[0.5, 0.5]]])
    grad, conflicts = fork_gradient(above, branch, branch_leads=False, per_example=True)
    assert torch.equal(grad, branch) and conflicts == [False]


def hidden_settings(direction: str = "final", scope: str = "hidden") -> TrainSettings:
    # the paper's whole inner-exit gradient at the fork; the scale's own effect: test_romebert_recipe.py
    return TrainSettings(method="romebert", gr_scope=scope, gr_direction=direction, final_weight=3.0,
                         gamma=0.9, temperature=3.0, dropout=0.0, exit_grad_scale=1.0)


def reference_gradients(model, batch, settings: TrainSettings):
    """The update written out for a 2-layer model: one fork, at layer 1's output.

    Layer 1's output is handed to the two paths as two separate leaves, so each path's gradient
    of it comes out alone; they are combined by the rule, then pushed into what lies below.
    """
    ids, mask, labels = batch
    hidden = model.embed(ids)
    additive = model.additive_mask(mask, hidden.dtype)
    first = model.run_layer(0, hidden, additive)
    to_layer2 = first.detach().requires_grad_()
    to_exit1 = first.detach().requires_grad_()
    logits = [model.exit_logits(0, to_exit1, mask),
              model.exit_logits(1, model.run_layer(1, to_layer2, additive), mask)]
    final, exits = romebert_losses(logits, labels, settings.gamma, settings.temperature)
    loss = settings.final_weight * final + exits
    names, params = zip(*model.named_parameters())
    above, branch = torch.autograd.grad(loss, [to_layer2, to_exit1], retain_graph=True)
    leader, other = (branch, above) if settings.gr_direction == "reverse" else (above, branch)
    if settings.gr_scope == "hidden_per_example":  # the rule on each example's [S, H] slice, one by one
        rows = [_rule(leader[b], other[b]) for b in range(len(leader))]
        combined = torch.stack([row for row, _ in rows])
        conflict = any(hit for _, hit in rows)
    else:
        combined, conflict = _rule(leader, other)
    upper = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)  # heads and layer 2
    lower = torch.autograd.grad(first, params, grad_outputs=combined, allow_unused=True)  # layer 1, embeddings
    add = [
        sum(g for g in pair if g is not None) if any(g is not None for g in pair) else torch.zeros_like(p)
        for pair, p in zip(zip(upper, lower), params)
    ]
    return dict(zip(names, add)), conflict, loss.item()


def _rule(leader: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, bool]:
    dot = float((leader * other).sum())
    if dot < 0:
        return leader + other - (dot / float((leader**2).sum())) * leader, True
    return leader + other, False


@pytest.mark.parametrize("scope", ["hidden", "hidden_per_example"])
@pytest.mark.parametrize("direction", ["final", "reverse"])
def test_hidden_step_applies_the_rule_at_the_fork_and_nothing_else(direction, scope):
    torch.manual_seed(0)
    settings = hidden_settings(direction, scope)
    seen = set()
    for seed in range(6):  # toy batches whose two gradients conflict, and ones whose do not
        model = tiny_sequence_model(layers=2, seed=seed)
        batch = batch_of(8)
        want, conflict, want_loss = reference_gradients(model, batch, settings)
        stage = build_stages(model, settings)[0]
        names = {id(p): n for n, p in model.named_parameters()}
        flat, loss, combine = stage.step(model, batch, stage.params, settings, 0)
        grads, flagged = combine(flat)
        assert flagged == conflict
        assert math.isclose(loss, want_loss, rel_tol=1e-6)
        for p, g in zip(stage.params, grads):
            name = names[id(p)]
            assert torch.allclose(g, want[name], rtol=1e-4, atol=1e-7), name
        seen.add(conflict)
    assert seen == {True, False}, "the toy batches must cover both cases, or one rule goes untested"


def test_hidden_scope_is_one_backward_pass():
    """The point of the scope: a single autograd.grad call per step, where `encoder` makes two."""
    calls = []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model = tiny_sequence_model(layers=3)
    batch = batch_of(8)
    for scope, expected in (("hidden", 1), ("hidden_per_example", 1), ("encoder", 2)):
        settings = TrainSettings(method="romebert", gr_scope=scope, gr_direction="final", dropout=0.0)
        stage = build_stages(model, settings)[0]
        calls.clear()
        torch.autograd.grad = counting
        try:
            stage.step(model, batch, stage.params, settings, 0)
        finally:
            torch.autograd.grad = original
        assert len(calls) == expected, scope


@pytest.mark.parametrize("scope", ["encoder", "hidden"])
def test_the_step_weighs_inner_exits_as_exit_weights_says(scope):
    model = tiny_sequence_model(layers=3, seed=1)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = batch_of(8)
    ids, mask, labels = batch
    losses = {}
    for weights in ("uniform", "depth"):
        settings = TrainSettings(method="romebert", gr_scope=scope, gr_direction="final", final_weight=3.0,
                                 dropout=0.0, exit_weights=weights)
        stage = build_stages(model, settings)[0]
        _, losses[weights], _ = stage.step(model, batch, stage.params, settings, 0)
        final, exits = romebert_losses(model(ids, mask), labels, settings.gamma, settings.temperature, weights)
        assert math.isclose(losses[weights], (3.0 * final + exits).item(), rel_tol=1e-5)
    assert not math.isclose(losses["uniform"], losses["depth"], rel_tol=1e-4)
