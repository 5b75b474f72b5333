"""Adaptive batching and load relief for one replica, as plain Python that a test can drive.

The replica reports what it sees (each request's latency, each batch's size, compute time and
the backlog it left behind); once per window the controller compares the window's p99 latency
with the target and moves three knobs:

- `max_batch_size`: halved when one batch alone eats half the latency budget; doubled when
  batches run full with work still queued and there is headroom, since on a busy replica a
  larger batch is the cheapest throughput there is.
- `batch_wait_timeout_s`: waiting only pays when the replica is busy running small batches
  back to back; over target, or idle, it shrinks.
- `relax_level`: while p99 stays above target the exit thresholds relax one step at a time
  (and an optional layer cap applies), so traffic crafted to defeat early exit cannot push
  every request to full depth; it steps back down once latency is comfortably below target.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rayexit.config import ExitPolicy
from rayexit.errors import RayexitError
from rayexit.policy import relax


@dataclass
class ControllerConfig:
    target_p99_s: float = 0.25
    min_batch_size: int = 1
    max_batch_size: int = 64
    initial_batch_size: int = 8
    min_wait_s: float = 0.0
    max_wait_s: float = 0.02
    initial_wait_s: float = 0.002
    window_s: float = 1.0
    min_window_requests: int = 20
    relax: bool = False
    max_relax_level: int = 3
    windows_to_relax: int = 2  # consecutive windows over target before relaxing one step
    windows_to_tighten: int = 3  # consecutive calm windows before stepping back

    def __post_init__(self) -> None:
        if self.target_p99_s <= 0:
            raise RayexitError(f"target_p99_ms: got {self.target_p99_s * 1000:g}, expected a number > 0")
        if not 1 <= self.min_batch_size <= self.initial_batch_size <= self.max_batch_size:
            raise RayexitError(
                "batch sizes: expected 1 <= min_batch_size <= initial_batch_size <= max_batch_size, got "
                f"{self.min_batch_size}, {self.initial_batch_size}, {self.max_batch_size}"
            )
        if not 0 <= self.min_wait_s <= self.initial_wait_s <= self.max_wait_s:
            raise RayexitError(
                "batch waits: expected 0 <= min_wait_ms <= initial_wait_ms <= max_wait_ms, got "
                f"{self.min_wait_s * 1000:g}, {self.initial_wait_s * 1000:g}, {self.max_wait_s * 1000:g}"
            )
        if self.max_relax_level < 0:
            raise RayexitError(f"max_relax_level: got {self.max_relax_level}, expected >= 0")


@dataclass
class Decision:
    """What the controller set at the end of a window, and the evidence it used."""

    max_batch_size: int
    batch_wait_timeout_s: float
    relax_level: int
    p99_s: float
    mean_fill: float
    busy: float
    reasons: list[str] = field(default_factory=list)


@dataclass
class _Batch:
    size: int
    compute_s: float
    backlog: int


class AdaptiveBatchController:
    def __init__(self, config: ControllerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.max_batch_size = config.initial_batch_size
        self.batch_wait_timeout_s = config.initial_wait_s
        self.relax_level = 0
        self._latencies: deque[float] = deque()
        self._batches: deque[_Batch] = deque()
        self._window_start = clock()
        self._over = 0
        self._calm = 0
        self.history: list[Decision] = []

    def record_request(self, latency_s: float) -> None:
        self._latencies.append(latency_s)

    def record_batch(self, size: int, compute_s: float, backlog: int) -> None:
        """`backlog`: items still queued when the batch finished (work the batch left behind)."""
        self._batches.append(_Batch(size, compute_s, backlog))

    def maybe_update(self) -> Decision | None:
        """Close the window if it is long and full enough; returns the decision when it changed anything."""
        now = self.clock()
        elapsed = now - self._window_start
        if elapsed < self.config.window_s or len(self._latencies) < self.config.min_window_requests:
            return None
        decision = self._decide(elapsed)
        self._latencies.clear()
        self._batches.clear()
        self._window_start = now
        self.history.append(decision)
        return decision

    def _decide(self, elapsed: float) -> Decision:
        cfg = self.config
        target = cfg.target_p99_s
        p99 = quantile(list(self._latencies), 0.99)
        batches = list(self._batches)
        mean_fill = sum(b.size for b in batches) / (len(batches) * self.max_batch_size) if batches else 0.0
        busy = min(1.0, sum(b.compute_s for b in batches) / elapsed)
        compute_p90 = quantile([b.compute_s for b in batches], 0.9) if batches else 0.0
        queued = bool(batches) and sum(b.backlog > 0 for b in batches) >= len(batches) / 2
        reasons: list[str] = []

        if compute_p90 > 0.5 * target and self.max_batch_size > cfg.min_batch_size:
            self.max_batch_size = max(cfg.min_batch_size, self.max_batch_size // 2)
            reasons.append("one batch takes over half the latency budget: smaller batches")
        elif mean_fill >= 0.75 and (queued or busy > 0.7) and p99 < target and compute_p90 < 0.2 * target:
            if self.max_batch_size < cfg.max_batch_size:
                self.max_batch_size = min(cfg.max_batch_size, self.max_batch_size * 2)
                reasons.append("full batches with work queued and latency headroom: larger batches")

        if p99 > target:
            new_wait = _floor_wait(self.batch_wait_timeout_s / 2, cfg.min_wait_s)
            if new_wait != self.batch_wait_timeout_s:
                reasons.append("over target: wait less for batches to fill")
            self.batch_wait_timeout_s = new_wait
        elif mean_fill < 0.5 and busy > 0.8 and p99 < 0.5 * target:
            new_wait = min(cfg.max_wait_s, max(self.batch_wait_timeout_s * 2, 0.001))
            if new_wait != self.batch_wait_timeout_s:
                reasons.append("busy with small batches: wait a little longer to fill them")
            self.batch_wait_timeout_s = new_wait
        elif mean_fill < 0.5 and busy < 0.5:
            new_wait = _floor_wait(self.batch_wait_timeout_s / 2, cfg.min_wait_s)
            if new_wait != self.batch_wait_timeout_s:
                reasons.append("idle: waiting only adds latency")
            self.batch_wait_timeout_s = new_wait

        if cfg.relax:
            self._step_relaxation(p99, target, reasons)
        return Decision(self.max_batch_size, self.batch_wait_timeout_s, self.relax_level, p99, mean_fill, busy, reasons)

    def _step_relaxation(self, p99: float, target: float, reasons: list[str]) -> None:
        cfg = self.config
        if p99 > target:
            self._over, self._calm = self._over + 1, 0
            if self._over >= cfg.windows_to_relax and self.relax_level < cfg.max_relax_level:
                self.relax_level += 1
                self._over = 0
                reasons.append(f"p99 over target for {cfg.windows_to_relax} windows: relax exits")
        elif p99 < 0.6 * target:
            self._calm, self._over = self._calm + 1, 0
            if self._calm >= cfg.windows_to_tighten and self.relax_level > 0:
                self.relax_level -= 1
                self._calm = 0
                reasons.append("latency well under target: tighten exits again")
        else:
            self._over = self._calm = 0


def _floor_wait(wait: float, floor: float) -> float:
    """Halving never reaches zero by itself; under 0.1 ms a wait is noise, so drop to the floor."""
    return floor if wait < max(floor, 1e-4) else wait


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation: a p99 is a latency someone actually saw)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def relax_policy(policy: ExitPolicy, level: int, num_labels: int) -> ExitPolicy:
    """The policy loosened `level` steps: each step halves the distance to always-exit."""
    return relax(policy, level, num_labels)
