"""Threshold search on cached exit logits: thousands of policies evaluated at once, no model.

`evaluate_many` replays K threshold settings over a cache in one tensor operation (the same
decisions as `ExitCache.simulate` and the batched runner, for each setting). The search then
covers, per policy kind, one global threshold at every place where it changes a decision, and
random per-layer thresholds refined around the best points found.

Candidate thresholds are midpoints between neighbouring observed values of the exit
statistic, never the values themselves: a threshold sitting exactly on a sample's entropy
would make the decision depend on the last bit of a float, which the runner (smaller batches,
trimmed padding) need not reproduce.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from rayexit.config import ExitPolicy
from rayexit.exits import ExitCache
from rayexit.policy import passes
from rayexit.tune.pareto import pareto_front

CUTS_PER_LAYER = 512  # distinct thresholds kept per layer; finer grids change decisions for a handful of samples
CHUNK = 512  # settings per tensor operation: bounds memory at a few CHUNK x N tensors


@dataclass
class Point:
    """One exit policy and what it gives on the set it was measured on."""

    policy: str
    thresholds: float | list[float]
    accuracy: float
    layer_speedup: float

    def to_policy(self) -> ExitPolicy:
        return ExitPolicy(self.policy, self.thresholds)

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "thresholds": self.thresholds,
            "accuracy": self.accuracy,
            "layer_speedup": self.layer_speedup,
        }


@dataclass
class SearchResult:
    points: list[Point]  # the Pareto front over every setting tried
    full_accuracy: float
    settings: int = 0
    seconds: float = 0.0
    per_kind: dict[str, int] = field(default_factory=dict)

    @property
    def settings_per_second(self) -> float:
        return self.settings / self.seconds if self.seconds > 0 else float("inf")


def statistic(cache: ExitCache, kind: str) -> torch.Tensor:
    """The per-sample, per-layer number each policy compares with its threshold."""
    if kind not in ("entropy", "maxprob", "patience"):
        raise ValueError(f"no threshold statistic for policy {kind!r}")
    return cache.statistic(kind)


def evaluate_many(
    cache: ExitCache, labels: torch.Tensor, kind: str, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy [K] and mean exit layer [K] of K settings; `thresholds` is [K, L] (or [K, L-1]).

    Walks the layers once with a [K, N] "still running" mask instead of building [K, N, L]:
    a handful of elementwise operations per layer, whatever K is.
    """
    with one_thread():
        return _evaluate_many(cache, labels, kind, thresholds)


def _evaluate_many(cache: ExitCache, labels: torch.Tensor, kind: str, thresholds: torch.Tensor):
    stat = statistic(cache, kind)  # [N, L]
    num_layers, size = cache.num_layers, stat.shape[0]
    thresholds = thresholds.to(stat.dtype)
    correct = (cache.argmax == labels[:, None]).double()  # [N, L]; double: accuracies are exact fractions
    accuracies, exits = [], []
    for start in range(0, thresholds.shape[0], CHUNK):
        chunk = thresholds[start : start + CHUNK]
        running = torch.ones(chunk.shape[0], size, dtype=torch.bool)
        right = torch.zeros(chunk.shape[0], dtype=torch.float64)
        layer_sum = torch.zeros(chunk.shape[0], dtype=torch.float64)
        for layer in range(num_layers - 1):
            column = stat[None, :, layer]
            wants = passes(kind, column, chunk[:, layer, None])
            leaving = (wants & running).double()
            right += leaving @ correct[:, layer]
            layer_sum += leaving.sum(1) * (layer + 1)
            running &= ~wants
        rest = running.double()
        right += rest @ correct[:, -1]
        layer_sum += rest.sum(1) * num_layers
        accuracies.append(right / size)
        exits.append(layer_sum / size)
    return torch.cat(accuracies), torch.cat(exits)


@contextmanager
def one_thread() -> Iterator[None]:
    """The search's operations are small; on a busy machine, waking a second thread per
    operation costs more than the operation itself (measured: 15 ms against 0.3 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cut_points(values: torch.Tensor, limit: int = CUTS_PER_LAYER) -> torch.Tensor:
    """Thresholds between neighbouring distinct values, plus one below all and one above all."""
    distinct = torch.unique(values.float())
    if len(distinct) > limit:
        picks = torch.linspace(0, len(distinct) - 1, limit).round().long().unique()
        distinct = distinct[picks]
    middles = (distinct[1:] + distinct[:-1]) / 2
    below = distinct[:1] - 1.0
    above = distinct[-1:] + 1.0
    return torch.cat([below.clamp_min(0.0), middles, above])


def _points(
    kind: str, thresholds: torch.Tensor, accuracy: torch.Tensor, exit_layer: torch.Tensor, layers: int, scalar: bool
) -> list[Point]:
    speedup = (layers / exit_layer).tolist()
    rows = thresholds.tolist()
    if kind == "patience":
        rows = [[int(v) for v in row] for row in rows]
    return [
        Point(kind, row[0] if scalar else row[: layers - 1], acc, sp)
        for row, acc, sp in zip(rows, accuracy.tolist(), speedup, strict=True)
    ]


def search_thresholds(
    cache: ExitCache,
    labels: torch.Tensor,
    kinds: list[str] | tuple[str, ...] = ("entropy", "maxprob", "patience"),
    per_layer: bool = True,
    samples: int = 4000,
    seed: int = 0,
    refine_rounds: int = 2,
) -> SearchResult:
    """Pareto front of (accuracy, layer speed-up) over every policy and threshold setting tried."""
    with one_thread():
        return _search(cache, labels, kinds, per_layer, samples, seed, refine_rounds)


def _search(cache, labels, kinds, per_layer, samples, seed, refine_rounds) -> SearchResult:
    start = time.perf_counter()
    layers = cache.num_layers
    generator = torch.Generator().manual_seed(seed)
    candidates: list[Point] = []
    per_kind: dict[str, int] = {}
    for kind in kinds:
        if kind == "patience":
            grid = torch.arange(1, layers, dtype=torch.float32)[:, None]
            acc, exit_layer = evaluate_many(cache, labels, kind, grid.expand(-1, layers))
            candidates += _points(kind, grid.int().float(), acc, exit_layer, layers, scalar=True)
            per_kind[kind] = len(grid)
            continue
        stat = statistic(cache, kind)
        # One global threshold: every cut of the statistic pooled over the exits that can stop early.
        grid = cut_points(stat[:, :-1].reshape(-1), CUTS_PER_LAYER * 2)[:, None]
        acc, exit_layer = evaluate_many(cache, labels, kind, grid.expand(-1, layers))
        candidates += _points(kind, grid, acc, exit_layer, layers, scalar=True)
        count = len(grid)
        if per_layer and layers > 2 and samples > 0:
            found, tried = _search_per_layer(cache, labels, kind, stat, samples, refine_rounds, generator)
            candidates += found
            count += tried
        per_kind[kind] = count
    full = cache.exit_accuracies(labels)[-1]
    front = pareto_front(candidates, key=lambda p: (p.accuracy, p.layer_speedup))
    seconds = time.perf_counter() - start
    return SearchResult(front, full, sum(per_kind.values()), seconds, per_kind)


def _search_per_layer(cache, labels, kind, stat, samples, refine_rounds, generator) -> tuple[list[Point], int]:
    """Random per-layer cuts, then jittered copies of the front found so far."""
    layers = cache.num_layers
    cuts = [cut_points(stat[:, layer]) for layer in range(layers - 1)]
    sizes = torch.tensor([len(c) for c in cuts], dtype=torch.float32)

    def thresholds_at(positions: torch.Tensor) -> torch.Tensor:  # positions in [0, 1], [K, L-1]
        index = (positions * (sizes - 1)).round().long()
        return torch.stack([cuts[layer][index[:, layer]] for layer in range(layers - 1)], dim=1)

    first = max(1, samples // (refine_rounds + 1))
    positions = torch.rand(first, layers - 1, generator=generator)
    found: list[Point] = []
    tried = 0
    for round_index in range(refine_rounds + 1):
        thresholds = thresholds_at(positions)
        acc, exit_layer = evaluate_many(cache, labels, kind, thresholds)
        points = _points(kind, thresholds, acc, exit_layer, layers, scalar=False)
        for point, pos in zip(points, positions.tolist(), strict=True):
            point.position = pos  # type: ignore[attr-defined]  # kept only for the next round
        found = pareto_front(found + points, key=lambda p: (p.accuracy, p.layer_speedup))
        tried += len(points)
        if round_index == refine_rounds or not found:
            break
        count = max(1, (samples - first) // max(refine_rounds, 1))
        parents = torch.tensor([p.position for p in found])  # type: ignore[attr-defined]
        picks = torch.randint(0, len(parents), (count,), generator=generator)
        noise = torch.randn(count, layers - 1, generator=generator) * 0.05
        positions = (parents[picks] + noise).clamp(0, 1)
    for point in found:
        point.__dict__.pop("position", None)
    return found, tried


def evaluate_points(cache: ExitCache, labels: torch.Tensor, points: list[Point]) -> list[Point]:
    """The same policies measured on another cache (e.g. chosen on validation, reported on eval)."""
    layers = cache.num_layers
    out: list[Point | None] = [None] * len(points)
    for kind in {p.policy for p in points}:
        rows = [i for i, p in enumerate(points) if p.policy == kind]
        grid = torch.tensor([ExitPolicy(kind, points[i].thresholds).per_layer(layers) for i in rows])
        accuracy, exit_layer = evaluate_many(cache, labels, kind, grid)
        for i, acc, mean_exit in zip(rows, accuracy.tolist(), exit_layer.tolist(), strict=True):
            out[i] = Point(kind, points[i].thresholds, acc, layers / mean_exit)
    return out  # type: ignore[return-value]
