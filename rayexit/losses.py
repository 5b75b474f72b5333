"""Training losses over a list of exit logits (exit 1 first); CE means are over the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def exit_cross_entropies(logits: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
    return [F.cross_entropy(z, labels) for z in logits]


def joint_loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Plain sum of every exit's cross-entropy."""
    return torch.stack(exit_cross_entropies(logits, labels)).sum()


def pabee_loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """PABEE: sum_i i * CE_i / sum_i i, deeper exits weigh more."""
    weights = torch.arange(1, len(logits) + 1, dtype=logits[0].dtype, device=logits[0].device)
    return (weights * torch.stack(exit_cross_entropies(logits, labels))).sum() / weights.sum()


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed per example, mean over batch.

    RomeBERT's code uses KLDivLoss's default mean over batch x classes, which shrinks the term by
    the number of classes; we use the per-example sum ('batchmean'), the proper KL.
    """
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.detach() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def romebert_losses(
    logits: list[torch.Tensor], labels: torch.Tensor, gamma: float, temperature: float, exit_weights: str = "uniform"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(final-exit CE, the inner exits' self-distillation loss); their sum is RomeBERT's L.

    Kept apart because gradient regularization projects one's gradient against the other's.
    `exit_weights: depth` weighs inner exit i by i, as PABEE's loss does, scaled to a mean of 1 so
    the inner exits' total keeps the paper's size (`inner_exit_weights`).
    """
    final = F.cross_entropy(logits[-1], labels)
    teacher = logits[-1]
    inner = [
        (1.0 - gamma) * F.cross_entropy(z, labels) + gamma * distillation_kl(z, teacher, temperature)
        for z in logits[:-1]
    ]
    if not inner:
        return final, final.new_zeros(())
    weights = torch.tensor(inner_exit_weights(len(inner), exit_weights), dtype=final.dtype, device=final.device)
    return final, (weights * torch.stack(inner)).sum()


def inner_exit_weights(count: int, kind: str) -> list[float]:
    """Weights of inner exits 1..count: all 1 (`uniform`, the paper's), or i * count / sum(1..count) (`depth`)."""
    if kind == "uniform":
        return [1.0] * count
    if kind == "depth":
        total = count * (count + 1) / 2
        return [i * count / total for i in range(1, count + 1)]
    raise ValueError(f"exit_weights: got {kind!r}, expected uniform or depth")


def weighted_token_loss(
    word_logits: list[torch.Tensor],
    labels: torch.Tensor,
    halt_layers: torch.Tensor | None = None,
    *,
    exit_words: torch.Tensor | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """Token stage 1 (Li et al., 2021): sum_i i * CE_i / sum_i i over the words' first pieces.

    `word_logits[i]` is [B, W, T], `labels` [B, W] with IGNORE (-100) where there is no word.
    With `halt_layers` [B, W] (self-sampling), exit i scores only the words still live at i:
    a halted word's prediction is read at its halting layer only.

    Data-parallel, `exit_words` [L] holds the live words at each exit over the whole global batch
    (`rayexit.data.conll.GlobalBatch`): CE_i is then this slice's summed CE over that count, times
    `world_size`, which the workers' mean all-reduce turns into the global batch's mean. A plain
    per-slice mean would not average to it: slices hold unequal numbers of (live) words.
    """
    if exit_words is None:
        return _token_loss_of_batch(word_logits, labels, halt_layers)
    total = word_logits[0].new_zeros(())
    weight_sum = 0.0
    for index, logits in enumerate(word_logits, start=1):
        count = int(exit_words[index - 1])
        if count == 0:  # no live word at this exit in the global batch: skipped, as in one process
            continue
        live = _live_labels(labels, halt_layers, index)
        summed = F.cross_entropy(logits.flatten(0, 1), live.flatten(), ignore_index=-100, reduction="sum")
        total = total + index * summed * (world_size / count)
        weight_sum += index
    return total / max(weight_sum, 1.0)


def _token_loss_of_batch(
    word_logits: list[torch.Tensor], labels: torch.Tensor, halt_layers: torch.Tensor | None
) -> torch.Tensor:
    total = word_logits[0].new_zeros(())
    weight_sum = 0.0
    for index, logits in enumerate(word_logits, start=1):
        live = _live_labels(labels, halt_layers, index)
        if not (live != -100).any():
            continue
        total = total + index * F.cross_entropy(logits.flatten(0, 1), live.flatten(), ignore_index=-100)
        weight_sum += index
    return total / max(weight_sum, 1.0)


def _live_labels(labels: torch.Tensor, halt_layers: torch.Tensor | None, index: int) -> torch.Tensor:
    if halt_layers is None:
        return labels
    return torch.where(halt_layers >= index, labels, torch.full_like(labels, -100))


def live_word_counts(halt_layers: torch.Tensor, num_exits: int) -> torch.Tensor:
    """[L] words still live at each exit (1-based halting layers; 0 marks no word)."""
    exits = torch.arange(1, num_exits + 1, device=halt_layers.device)
    return (halt_layers[None, :, :] >= exits[:, None, None]).sum((1, 2))
