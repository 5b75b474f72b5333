import torch

from rayexit.gradreg import combine_with_projection, project_conflicting


def dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b)).item()


def test_conflicting_gradient_is_projected_to_non_negative_inner_product():
    torch.manual_seed(0)
    leader = [torch.randn(5, 3), torch.randn(4)]
    other = [-2 * leader[0] + 0.1 * torch.randn(5, 3), -leader[1]]
    assert dot(other, leader) < 0
    projected, conflict = project_conflicting(other, leader)
    assert conflict
    assert abs(dot(projected, leader)) < 1e-4  # exactly orthogonal up to rounding
    assert dot(projected, leader) >= -1e-4


def test_no_conflict_leaves_gradient_unchanged():
    leader = [torch.tensor([1.0, 0.0])]
    other = [torch.tensor([0.5, 2.0])]
    projected, conflict = project_conflicting(other, leader)
    assert not conflict
    assert torch.equal(projected[0], other[0])


def test_combine_by_hand():
    leader = [torch.tensor([1.0, 0.0])]
    other = [torch.tensor([-1.0, 1.0])]
    combined, conflict = combine_with_projection(leader, other)
    assert conflict
    # other minus its component along leader is [0, 1]; plus leader gives [1, 1]
    assert torch.allclose(combined[0], torch.tensor([1.0, 1.0]))


def test_per_tensor_projects_each_tensor_on_its_own():
    leader = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    other = [torch.tensor([-1.0, 1.0]), torch.tensor([3.0, 1.0])]
    projected, conflict = project_conflicting(other, leader, per_tensor=True)
    assert conflict
    assert torch.allclose(projected[0], torch.tensor([0.0, 1.0]))
    assert torch.equal(projected[1], other[1])  # this tensor did not conflict
