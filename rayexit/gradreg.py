"""RomeBERT's gradient regularization: a PCGrad-style projection between two gradients.

    if <g_m, g_l> < 0:  g_m <- g_m - (<g_m, g_l> / ||g_l||^2) g_l,  update with g_l + g_m

Pure functions over lists of tensors, so the same arithmetic runs on every data-parallel worker
after the gradients were averaged: identical inputs give identical weights everywhere.
`ProjectingFork` applies the same rule to hidden states inside the backward pass (`gr_scope: hidden`).
"""

from __future__ import annotations

import torch


def project_conflicting(
    other: list[torch.Tensor], leader: list[torch.Tensor], per_tensor: bool = False
) -> tuple[list[torch.Tensor], bool]:
    """Return `other` with its component against `leader` removed, and whether it conflicted.

    Over all tensors as one flattened vector (RomeBERT's choice), or each tensor on its own.
    """
    if per_tensor:
        projected, any_conflict = [], False
        for g_m, g_l in zip(other, leader):
            (new,), conflict = project_conflicting([g_m], [g_l])
            projected.append(new)
            any_conflict |= conflict
        return projected, any_conflict
    dot = sum((m.double() * l.double()).sum() for m, l in zip(other, leader))
    if dot >= 0:
        return list(other), False
    norm_sq = sum((l.double() ** 2).sum() for l in leader)
    if norm_sq == 0:
        return list(other), False
    scale = (dot / norm_sq).to(other[0].dtype)
    return [m - scale * l for m, l in zip(other, leader)], True


def combine_with_projection(
    leader: list[torch.Tensor], other: list[torch.Tensor], per_tensor: bool = False
) -> tuple[list[torch.Tensor], bool]:
    """g_l + projected g_m, the update RomeBERT applies to the shared parameters."""
    projected, conflict = project_conflicting(other, leader, per_tensor)
    return [l + m for l, m in zip(leader, projected)], conflict


class ProjectingFork(torch.autograd.Function):
    """A layer's output, handed out twice: to the layers above (`through`) and to its exit (`branch`).

    Forward is the identity. Backward receives the two gradients of that hidden state separately
    (the layers above carry the final exit's and the deeper exits' pull; the branch carries this
    exit's own) and combines them with the projection above, over the whole [B, S, H] tensor. It
    is `gr_scope: hidden`: the conflict is judged on the activations, layer by layer, during one
    backward pass, instead of on the parameters after two.

    `branch_scale` (`exit_grad_scale`) multiplies the exit's gradient before the two meet; a
    positive factor does not change whether they conflict, only how hard the exit pulls.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden: torch.Tensor, branch_leads: bool, conflicts: list[bool], per_example: bool = False,
        branch_scale: float = 1.0,
    ):
        ctx.branch_leads = branch_leads
        ctx.conflicts = conflicts  # backward appends whether this layer's two gradients conflicted
        ctx.per_example = per_example
        ctx.branch_scale = branch_scale
        return hidden.view_as(hidden), hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, through: torch.Tensor | None, branch: torch.Tensor | None):  # type: ignore[override]
        unused = None, None, None, None
        if branch is not None and ctx.branch_scale != 1.0:
            branch = branch * ctx.branch_scale
        if through is None or branch is None:  # one side unused: nothing to weigh against
            return (branch if through is None else through), *unused
        leader, other = (branch, through) if ctx.branch_leads else (through, branch)
        if ctx.per_example:
            return _project_per_example(leader, other, ctx.conflicts), *unused
        sums = torch.stack([(other.double() * leader.double()).sum(), (leader.double() ** 2).sum()])
        _sum_over_workers(sums)
        dot, norm_sq = sums.tolist()
        conflict = dot < 0 and norm_sq > 0
        ctx.conflicts.append(conflict)
        if not conflict:
            return leader + other, *unused
        return leader + other - (dot / norm_sq) * leader, *unused


class ScaledBranch(torch.autograd.Function):
    """A layer's output handed to the layers above as is and to its exit with its gradient scaled.

    `exit_grad_scale` where no projection runs at the hidden states (the parameter scopes, or
    `gr_direction: none`): forward is the identity on both sides, backward adds the exit's
    gradient times `scale` to the layers above's.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, scale: float):  # type: ignore[override]
        ctx.scale = scale
        return hidden.view_as(hidden), hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, through: torch.Tensor | None, branch: torch.Tensor | None):  # type: ignore[override]
        if branch is None:
            return through, None
        branch = branch * ctx.scale
        return (branch if through is None else through + branch), None


def _project_per_example(leader: torch.Tensor, other: torch.Tensor, conflicts: list[bool]) -> torch.Tensor:
    """`gr_scope: hidden_per_example`: the rule applied to each example's [S, H] slice on its own.

    An example's hidden-state gradient depends on that example's losses alone (nothing in the
    encoder mixes examples), so this is the projection of per-example gradients at no extra pass.
    It needs no sums over workers: data-parallel slices scale every example's two gradients by
    the same positive factor, which the rule ignores.
    """
    dims = tuple(range(1, leader.dim()))
    dot = (other.double() * leader.double()).sum(dims)
    norm_sq = (leader.double() ** 2).sum(dims)
    conflict = (dot < 0) & (norm_sq > 0)
    conflicts.append(bool(conflict.any()))
    scale = torch.where(conflict, dot / norm_sq.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    shape = (-1,) + (1,) * (leader.dim() - 1)
    return leader + other - scale.to(leader.dtype).view(shape) * leader


def _sum_over_workers(sums: torch.Tensor) -> None:
    """Data-parallel: the inner product and norm of the whole global batch, not of this slice.

    Each slice's hidden-state gradients are its rows of the global batch's (times the number of
    workers, the same for both sums), so summing the two scalars over workers gives every worker
    the projection one process would compute; the gradient average that follows then equals it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
