"""Exit policies for both tasks, and the one criterion every runner, replay and search applies.

A policy compares a per-example (or per-word) statistic with a threshold at every layer:

    kind       statistic                               leaves when
    entropy    softmax entropy (nats)                  statistic <  threshold
    maxprob    top softmax probability                 statistic >= threshold
    patience   layers in a row with the same argmax    statistic >= threshold
    tokee      max word uncertainty over a window      statistic <  threshold   (token task)
    sentee     max (or mean) word uncertainty          statistic <  threshold   (token task)
    none       -                                       never (full depth)

`passes` is that table's last column. The live runners (`rayexit.exits`, `rayexit.token_exits`),
the cached replays, the vectorised threshold search and Serve's load relief all call it, so a
threshold means the same thing everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from rayexit.errors import RayexitError

SENTENCE_KINDS = ("entropy", "maxprob", "patience")
TOKEN_KINDS = ("tokee", "sentee")
POLICIES = (*SENTENCE_KINDS, *TOKEN_KINDS, "none")
HIGHER_IS_SURER = ("maxprob", "patience")  # the others are uncertainties: lower is surer
REDUCES = ("max", "mean")


@dataclass
class ExitPolicy:
    """How an example (sentence task) or a word (token task) decides to leave the network.

    `thresholds` is one number for every layer or a list with one per exit (the last exit
    always answers, so a list of L-1 or L values is accepted). For `patience` it is the number
    of consecutive layers whose argmax must agree. `window` (tokee) is the number of words
    whose uncertainty a word's score takes the max over; `reduce` (sentee) is how a
    sentence's word uncertainties become one number.
    """

    kind: str = "entropy"
    thresholds: float | list[float] = 0.1
    window: int = 3
    reduce: str = "max"

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise RayexitError(f"policy.kind: got {self.kind!r}, expected one of {', '.join(POLICIES)}")
        values = self.thresholds if isinstance(self.thresholds, list) else [self.thresholds]
        for value in values:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise RayexitError(f"policy.thresholds: got {value!r}, expected finite numbers")
            if value < 0:
                raise RayexitError(f"policy.thresholds: got {value}, expected values >= 0")
        if self.kind == "patience" and any(float(v) != int(v) for v in values):
            raise RayexitError("policy.thresholds: patience takes whole numbers of layers")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise RayexitError(f"policy.window: got {self.window!r}, expected a whole number >= 1")
        if self.reduce not in REDUCES:
            raise RayexitError(f"policy.reduce: got {self.reduce!r}, expected max or mean")

    @property
    def threshold(self) -> float:
        """The single threshold of a global policy (the first one of a per-layer list)."""
        return float(self.thresholds[0] if isinstance(self.thresholds, list) else self.thresholds)

    def per_layer(self, num_layers: int) -> list[float]:
        """One threshold per exit; the final exit's entry is never used but kept for shape."""
        if not isinstance(self.thresholds, list):
            return [float(self.thresholds)] * num_layers
        values = [float(v) for v in self.thresholds]
        if len(values) == num_layers - 1:
            values.append(values[-1] if values else 0.0)
        if len(values) != num_layers:
            raise RayexitError(
                f"policy.thresholds: got {len(self.thresholds)} values, expected 1, "
                f"{num_layers - 1} or {num_layers} for a {num_layers}-layer model"
            )
        return values

    def check_task(self, task: str) -> ExitPolicy:
        """Refuse a policy the task's runner cannot apply (e.g. tokee on a sentence model)."""
        allowed = TOKEN_KINDS if task == "token" else SENTENCE_KINDS
        if self.kind != "none" and self.kind not in allowed:
            raise RayexitError(
                f"policy.kind: {self.kind!r} is not a {task} policy; expected one of {', '.join(allowed)} or none"
            )
        return self

    def describe(self) -> str:
        if self.kind == "none":
            return "full depth"
        values = self.thresholds if isinstance(self.thresholds, list) else [self.thresholds]
        shown = "/".join(f"{v:.4g}" for v in values)
        extra = f" w={self.window}" if self.kind == "tokee" else ""
        return f"{self.kind}{extra} {shown}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "thresholds": self.thresholds}
        if self.kind == "tokee":
            data["window"] = self.window
        if self.kind == "sentee":
            data["reduce"] = self.reduce
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExitPolicy:
        if not isinstance(data, dict):
            raise RayexitError(f"policy: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        # The token task's first format: {"policy": "tokee", "threshold": 0.1, "window": 3, "reduce": "max"}
        if "policy" in data and "kind" not in data:
            data["kind"] = data.pop("policy")
        if "threshold" in data and "thresholds" not in data:
            data["thresholds"] = data.pop("threshold")
        known = {"kind", "thresholds", "window", "reduce"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RayexitError(f"policy: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


FULL_DEPTH = ExitPolicy("none", 0.0)


def passes(kind: str, statistic: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """The exit criterion: which entries of `statistic` are sure enough to leave at `threshold`."""
    if kind == "none":
        return torch.zeros_like(statistic, dtype=torch.bool)
    if kind in HIGHER_IS_SURER:
        return statistic >= threshold
    return statistic < threshold


# -- sentence statistics ---------------------------------------------------------------------


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)


def sentence_statistic(kind: str, probs: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """The number `kind` compares with its threshold, from softmax `probs` [..., C] and `agree` [...]."""
    if kind == "entropy":
        return entropy(probs)
    if kind == "maxprob":
        return probs.max(-1).values
    if kind == "patience":
        return agree.to(probs.dtype)
    return torch.zeros(probs.shape[:-1], dtype=probs.dtype, device=probs.device)


# A maxprob threshold no softmax reaches: the exit never answers early (finite, as policies must be).
NEVER_SURE = 1.001


def precision_thresholds(confidence: torch.Tensor, correct: torch.Tensor, precision: float) -> list[float]:
    """Per inner exit, the lowest maxprob threshold at which the exit is still right `precision` of the time.

    `confidence` and `correct` are [N, L] over a validation set (top softmax probability, and
    whether that exit's answer is right). For exit i the examples are ranked by confidence; the
    threshold is the confidence of the longest top run whose accuracy is at least `precision`
    (cut only between distinct confidences, since a threshold cannot split a tie). An exit that
    never reaches the precision gets `NEVER_SURE`. One global threshold asks the same confidence
    of a shallow exit and a deep one though the shallow one is wrong more often at any given
    confidence; this asks each for the same precision instead. The final exit's entry is omitted.
    """
    thresholds = []
    for layer in range(confidence.shape[1] - 1):
        order = torch.argsort(confidence[:, layer], descending=True, stable=True)
        ranked, right = confidence[order, layer], correct[order, layer].double()
        running = right.cumsum(0) / torch.arange(1, len(right) + 1, dtype=torch.float64)
        tie_end = torch.ones_like(ranked, dtype=torch.bool)
        tie_end[:-1] = ranked[:-1] > ranked[1:]
        cuts = ((running >= precision) & tie_end).nonzero()
        thresholds.append(float(ranked[int(cuts.max())]) if len(cuts) else NEVER_SURE)
    return thresholds


# -- token statistics ------------------------------------------------------------------------


def token_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the tag distribution divided by log(number of tags): 0 sure, 1 uniform."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    value = -(log_probs.exp() * log_probs).sum(-1)
    return value / math.log(max(logits.shape[-1], 2))


def window_scores(uncertainty: torch.Tensor, word_mask: torch.Tensor, window: int) -> torch.Tensor:
    """Max of u over a window of `window` words centred on each word (same padding) -> [B, W].

    Slots past a sentence's end count as 0, which for a max over values >= 0 is the same as
    cutting the window at the sentence boundary.
    """
    u = torch.where(word_mask, uncertainty, torch.zeros_like(uncertainty))
    if window <= 1:
        return u
    padded = F.pad(u[:, None, :], ((window - 1) // 2, window // 2), value=0.0)
    return F.max_pool1d(padded, kernel_size=window, stride=1)[:, 0, :]


def sentence_scores(uncertainty: torch.Tensor, word_mask: torch.Tensor, reduce: str) -> torch.Tensor:
    u = torch.where(word_mask, uncertainty, torch.zeros_like(uncertainty))
    if reduce == "mean":
        return u.sum(1) / word_mask.sum(1).clamp_min(1)
    return u.max(1).values


def token_statistic(policy: ExitPolicy, uncertainty: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """Per word [B, W], the number the token policy compares with its threshold.

    SENTEE's sentence score is spread over the sentence's words, so one comparison decides
    every word of the sentence together.
    """
    if policy.kind == "tokee":
        return window_scores(uncertainty, word_mask, policy.window)
    if policy.kind == "sentee":
        return sentence_scores(uncertainty, word_mask, policy.reduce)[:, None].expand_as(uncertainty)
    return torch.ones_like(uncertainty)


def token_halts(
    policy: ExitPolicy, uncertainty: torch.Tensor, word_mask: torch.Tensor, threshold: torch.Tensor | float
) -> torch.Tensor:
    """Which words [B, W] may halt now; `threshold` is a number or one per sentence [B, 1]."""
    return passes(policy.kind, token_statistic(policy, uncertainty, word_mask), threshold) & word_mask


def relax(policy: ExitPolicy, level: int, num_labels: int) -> ExitPolicy:
    """The policy loosened `level` steps (Serve under load): each step halves the distance to
    always-exit, on the criterion's own scale."""
    if level <= 0 or policy.kind == "none":
        return policy
    values = policy.thresholds if isinstance(policy.thresholds, list) else [policy.thresholds]
    if policy.kind == "entropy":
        ceiling = math.log(max(num_labels, 2))  # the largest entropy a softmax can have
        relaxed = [ceiling - (ceiling - min(t, ceiling)) / 2**level for t in values]
    elif policy.kind == "maxprob":
        floor = 1.0 / max(num_labels, 2)
        relaxed = [floor + (max(t, floor) - floor) / 2**level for t in values]
    elif policy.kind == "patience":  # fewer agreeing layers needed, never fewer than one
        relaxed = [float(max(1, int(t) - level)) for t in values]
    else:  # token uncertainties are normalised to [0, 1]
        relaxed = [1.0 - (1.0 - min(t, 1.0)) / 2**level for t in values]
    thresholds = relaxed if isinstance(policy.thresholds, list) else relaxed[0]
    return replace(policy, thresholds=thresholds)
