"""The batched early-exit runner for sentence classification, and its replay on cached logits.

The runner removes exited samples from the working batch after every layer and trims the
padding columns nobody needs any more, so later layers compute only on what is left.
Replaying on cached per-exit logits gives the same decisions without running the model
(both apply `rayexit.policy.passes`), which is what threshold sweeps and tuning use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayexit.flops import full_sentence_flops, sentence_batch_flops
from rayexit.policy import ExitPolicy, entropy, passes, sentence_statistic

__all__ = ["ExitCache", "ExitResult", "collect_exit_logits", "entropy", "first_true", "run_early_exit"]


@dataclass
class ExitResult:
    predictions: torch.Tensor  # [N] label index
    confidences: torch.Tensor  # [N] softmax probability of the prediction
    exit_layers: torch.Tensor  # [N] 1-based layer each sample left at
    flops: int = 0  # what the runner computed, every exit it ran included (0 for a replay)
    full_flops: int = 0  # a plain forward of the same batches: every layer, the final exit only

    def layer_speedup(self, num_layers: int) -> float:
        return num_layers / self.exit_layers.double().mean().item()


@torch.no_grad()
def run_early_exit(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    policy: ExitPolicy,
    layer_cap: int | None = None,
) -> ExitResult:
    """Early-exit inference on a right-padded batch; `layer_cap` bounds depth for every sample."""
    num_layers = model.num_layers
    last = num_layers if layer_cap is None else max(1, min(layer_cap, num_layers))
    thresholds = policy.per_layer(num_layers)
    size = input_ids.shape[0]
    device = input_ids.device
    predictions = torch.zeros(size, dtype=torch.long, device=device)
    confidences = torch.zeros(size, device=device)
    exit_layers = torch.full((size,), last, dtype=torch.long, device=device)
    full_flops = full_sentence_flops(model, input_ids.shape[1], size)
    flops = 0

    active = torch.arange(size, device=device)
    hidden = model.embed(input_ids)
    mask = attention_mask
    previous = torch.full((size,), -1, dtype=torch.long, device=device)
    agree = torch.zeros(size, dtype=torch.long, device=device)
    for layer in range(last):
        flops += sentence_batch_flops(model, hidden.shape[1], hidden.shape[0])
        additive = model.additive_mask(mask, hidden.dtype)
        hidden = model.run_layer(layer, hidden, additive)
        probs = torch.softmax(model.exit_logits(layer, hidden, mask).float(), dim=-1)
        confidence, predicted = probs.max(-1)
        agree = torch.where(predicted == previous, agree + 1, torch.zeros_like(agree))
        previous = predicted
        if layer == last - 1:
            leaving = torch.ones_like(predicted, dtype=torch.bool)
        else:
            leaving = passes(policy.kind, sentence_statistic(policy.kind, probs, agree), thresholds[layer])
        if leaving.any():
            rows = active[leaving]
            predictions[rows] = predicted[leaving]
            confidences[rows] = confidence[leaving]
            exit_layers[rows] = layer + 1
            staying = ~leaving
            if not staying.any():
                break
            active, hidden, mask = active[staying], hidden[staying], mask[staying]
            previous, agree = previous[staying], agree[staying]
            width = int(mask.sum(1).max())  # right padding: columns past the longest left are dead
            hidden, mask = hidden[:, :width], mask[:, :width]
    return ExitResult(predictions, confidences, exit_layers, flops, full_flops)


class ExitCache:
    """Every exit's logits for a data set, computed once; policies replayed without the model."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits.float()  # [N, L, C]
        probs = torch.softmax(self.logits, dim=-1)
        self.probs = probs
        self.entropy = entropy(probs)  # [N, L]
        self.confidence, self.argmax = probs.max(-1)  # [N, L]
        agree = torch.zeros_like(self.argmax)
        for layer in range(1, self.num_layers):
            same = self.argmax[:, layer] == self.argmax[:, layer - 1]
            agree[:, layer] = torch.where(same, agree[:, layer - 1] + 1, torch.zeros_like(agree[:, layer]))
        self.agree = agree  # consecutive agreeing layers before and at each layer

    @property
    def num_layers(self) -> int:
        return self.logits.shape[1]

    def statistic(self, kind: str) -> torch.Tensor:
        """[N, L]: what `kind` compares with its threshold, at every exit."""
        return sentence_statistic(kind, self.probs, self.agree)

    def exit_accuracies(self, labels: torch.Tensor) -> list[float]:
        return (self.argmax == labels[:, None]).double().mean(0).tolist()

    def oracle_exit_layers(self) -> torch.Tensor:
        """Earliest layer whose prediction already equals the final layer's."""
        same = self.argmax == self.argmax[:, -1:]
        return first_true(same) + 1

    def simulate(self, policy: ExitPolicy, layer_cap: int | None = None) -> ExitResult:
        thresholds = torch.tensor(policy.per_layer(self.num_layers))
        leave = passes(policy.kind, self.statistic(policy.kind), thresholds)
        last = self.num_layers if layer_cap is None else max(1, min(layer_cap, self.num_layers))
        leave = leave.clone()
        leave[:, last - 1] = True
        layer = first_true(leave)
        rows = torch.arange(len(layer))
        return ExitResult(self.argmax[rows, layer], self.confidence[rows, layer], layer + 1)


def first_true(matrix: torch.Tensor) -> torch.Tensor:
    """Index of the first True per row (rows are guaranteed to have one)."""
    positions = torch.arange(matrix.shape[1], 0, -1, device=matrix.device)
    return (matrix.int() * positions).argmax(1)


@torch.no_grad()
def collect_exit_logits(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every batch at full depth; returns logits [N, L, C] and labels [N]."""
    all_logits, all_labels = [], []
    for input_ids, attention_mask, labels in batches:
        all_logits.append(torch.stack(model(input_ids, attention_mask), dim=1).float())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)
