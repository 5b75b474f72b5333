"""Accuracy and speed-up figures, and picking the fastest point within an accuracy budget."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions == labels).double().mean().item()


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def best_within(
    points: list[dict], reference: float, max_drop: float, key: str, score: str = "accuracy"
) -> dict | None:
    """The point with the largest `key` whose `score` is at most `max_drop` below `reference`."""
    eligible = [p for p in points if p[score] >= reference - max_drop - 1e-12]
    return max(eligible, key=lambda p: p[key]) if eligible else None
