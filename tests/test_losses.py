import math

import pytest
import torch

from rayexit.config import TrainSettings
from rayexit.errors import RayexitError
from rayexit.losses import distillation_kl, inner_exit_weights, joint_loss, pabee_loss, romebert_losses


def ce(logits, label):
    return -math.log(math.exp(logits[label]) / sum(math.exp(v) for v in logits))


LOGITS = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 3.0]])]
LABELS = torch.tensor([1])


def test_joint_is_plain_sum_of_exit_ces():
    expected = ce([2, 0], 1) + ce([0, 1], 1) + ce([1, 3], 1)
    assert math.isclose(joint_loss(LOGITS, LABELS).item(), expected, rel_tol=1e-6)


def test_pabee_weights_deeper_exits_more():
    expected = (1 * ce([2, 0], 1) + 2 * ce([0, 1], 1) + 3 * ce([1, 3], 1)) / 6
    assert math.isclose(pabee_loss(LOGITS, LABELS).item(), expected, rel_tol=1e-6)


def test_distillation_kl_is_per_example_sum_times_t_squared():
    student, teacher, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[1.0, 0.0, 0.5]]), 2.0

    def softmax(v):
        e = [math.exp(x / t) for x in v]
        return [x / sum(e) for x in e]

    p, q = softmax([1.0, 0.0, 0.5]), softmax([0.0, 1.0, 2.0])
    expected = t * t * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert math.isclose(distillation_kl(student, teacher, t).item(), expected, rel_tol=1e-5)


def test_distillation_kl_averages_over_batch_not_classes():
    one = distillation_kl(torch.tensor([[0.0, 2.0]]), torch.tensor([[2.0, 0.0]]), 1.0)
    two = distillation_kl(torch.tensor([[0.0, 2.0], [0.0, 2.0]]), torch.tensor([[2.0, 0.0], [2.0, 0.0]]), 1.0)
    assert math.isclose(one.item(), two.item(), rel_tol=1e-6)


def test_romebert_losses_by_hand():
    gamma, t = 0.9, 3.0
    final, exits = romebert_losses(LOGITS, LABELS, gamma, t)
    assert math.isclose(final.item(), ce([1, 3], 1), rel_tol=1e-6)
    expected = sum(
        (1 - gamma) * ce(z[0].tolist(), 1) + gamma * distillation_kl(z, LOGITS[-1], t).item() for z in LOGITS[:-1]
    )
    assert math.isclose(exits.item(), expected, rel_tol=1e-6)


def test_romebert_teacher_is_detached():
    logits = [torch.tensor([[2.0, -0.5]], requires_grad=True), torch.tensor([[1.0, 0.0]], requires_grad=True)]
    _, exits = romebert_losses(logits, torch.tensor([0]), gamma=1.0, temperature=2.0)
    exits.backward()
    assert logits[1].grad is None or torch.all(logits[1].grad == 0)
    assert logits[0].grad.abs().sum() > 0


def test_depth_weights_grow_with_the_exit_and_keep_a_mean_of_one():
    assert inner_exit_weights(3, "uniform") == [1.0, 1.0, 1.0]
    assert inner_exit_weights(5, "depth") == pytest.approx([1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3])  # i * 5 / 15


def test_romebert_losses_with_depth_weights_by_hand():
    gamma, t = 0.5, 2.0
    final, exits = romebert_losses(LOGITS, LABELS, gamma, t, exit_weights="depth")
    per_exit = [(1 - gamma) * ce(z[0].tolist(), 1) + gamma * distillation_kl(z, LOGITS[-1], t).item()
                for z in LOGITS[:-1]]
    assert math.isclose(exits.item(), (2 / 3) * per_exit[0] + (4 / 3) * per_exit[1], rel_tol=1e-6)
    assert math.isclose(final.item(), ce([1, 3], 1), rel_tol=1e-6)  # the final exit's loss is not reweighted


def test_exit_weights_setting_names_its_choices():
    with pytest.raises(RayexitError, match="exit_weights"):
        TrainSettings(exit_weights="linear")
