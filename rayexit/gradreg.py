"""RomeBERT's gradient regularization: a PCGrad-style projection between two gradients.

    if <g_m, g_l> < 0:  g_m <- g_m - (<g_m, g_l> / ||g_l||^2) g_l,  update with g_l + g_m

Pure functions over lists of tensors, so the same arithmetic runs on every data-parallel worker
after the gradients were averaged: identical inputs give identical weights everywhere.
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
