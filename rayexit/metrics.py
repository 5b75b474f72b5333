"""Accuracy and speed-up figures, and picking the fastest point within an accuracy budget."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions == labels).double().mean().item()


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def side_by_side(baseline: Callable[[], object], candidate: Callable[[], T], repeats: int) -> tuple[float, float, T]:
    """Median seconds of `baseline` and `candidate`, run alternately so load changes hit both.

    Returns (baseline seconds, candidate seconds, the candidate's last result).
    """
    base_times, cand_times = [], []
    result = None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        baseline()
        base_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = candidate()
        cand_times.append(time.perf_counter() - start)
    return statistics.median(base_times), statistics.median(cand_times), result


def best_within(
    points: list[dict], reference: float, max_drop: float, key: str, score: str = "accuracy"
) -> dict | None:
    """The point with the largest `key` whose `score` is at most `max_drop` below `reference`."""
    eligible = [p for p in points if p[score] >= reference - max_drop - 1e-12]
    return max(eligible, key=lambda p: p[key]) if eligible else None
