"""The adaptive batching controller's decisions on simulated latency traces (no Ray, fake clock)."""

from __future__ import annotations

import math

import pytest

from rayexit.config import ExitPolicy
from rayexit.errors import RayexitError
from rayexit.serve.controller import AdaptiveBatchController, ControllerConfig, quantile, relax_policy


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(controller: AdaptiveBatchController, clock: FakeClock, windows: int, latency_s: float,
          batch_fill: float, compute_s: float, backlog: int, batches_per_window: int = 20) -> list:
    """Feed `windows` one-second windows of identical observations; returns the decisions taken."""
    decisions = []
    for _ in range(windows):
        for _ in range(batches_per_window):
            size = max(1, round(batch_fill * controller.max_batch_size))
            controller.record_batch(size, compute_s, backlog)
            for _ in range(size):
                controller.record_request(latency_s)
        clock.now += 1.0
        decision = controller.maybe_update()
        assert decision is not None
        decisions.append(decision)
    return decisions


def make(**overrides) -> tuple[AdaptiveBatchController, FakeClock]:
    clock = FakeClock()
    config = ControllerConfig(**{"target_p99_s": 0.2, "initial_batch_size": 8, "max_batch_size": 64, **overrides})
    return AdaptiveBatchController(config, clock=clock), clock


def test_no_decision_before_the_window_is_long_and_full_enough():
    controller, clock = make()
    for _ in range(50):
        controller.record_request(0.01)
    clock.now = 0.5
    assert controller.maybe_update() is None  # too short
    clock.now = 1.5
    assert controller.maybe_update() is not None
    clock.now = 3.0
    controller.record_request(0.01)
    assert controller.maybe_update() is None  # long enough but only one request


def test_full_batches_with_a_queue_and_headroom_grow_the_batch_up_to_the_limit():
    controller, clock = make()
    decisions = drive(controller, clock, windows=6, latency_s=0.05, batch_fill=1.0, compute_s=0.01, backlog=5)
    sizes = [d.max_batch_size for d in decisions]
    assert sizes[:3] == [16, 32, 64]
    assert sizes[-1] == 64  # never past max_batch_size
    assert controller.relax_level == 0


def test_a_batch_that_eats_half_the_budget_shrinks_the_batch_down_to_the_floor():
    controller, clock = make(min_batch_size=2)
    decisions = drive(controller, clock, windows=4, latency_s=0.5, batch_fill=1.0, compute_s=0.15, backlog=10)
    assert [d.max_batch_size for d in decisions] == [4, 2, 2, 2]
    assert decisions[0].batch_wait_timeout_s < 0.002  # over target: waits shrink too
    assert "smaller batches" in decisions[0].reasons[0]


def test_busy_with_small_batches_waits_longer_and_idle_waits_less():
    controller, clock = make(max_wait_s=0.01)
    busy = drive(controller, clock, windows=4, latency_s=0.02, batch_fill=0.25, compute_s=0.045, backlog=0)
    waits = [d.batch_wait_timeout_s for d in busy]
    assert waits == sorted(waits) and waits[0] > 0.002 and waits[-1] == pytest.approx(0.01)
    idle = drive(controller, clock, windows=3, latency_s=0.02, batch_fill=0.1, compute_s=0.002, backlog=0)
    assert idle[-1].batch_wait_timeout_s < waits[-1] / 4


def test_relaxation_steps_up_under_sustained_overload_and_back_down_when_calm():
    controller, clock = make(relax=True, max_relax_level=2)
    over = drive(controller, clock, windows=6, latency_s=0.4, batch_fill=1.0, compute_s=0.05, backlog=20)
    assert [d.relax_level for d in over] == [0, 1, 1, 2, 2, 2]  # one step per two windows, capped at 2
    calm = drive(controller, clock, windows=6, latency_s=0.05, batch_fill=0.5, compute_s=0.01, backlog=0)
    assert [d.relax_level for d in calm] == [2, 2, 1, 1, 1, 0]


def test_relaxation_stays_off_unless_configured():
    controller, clock = make(relax=False)
    drive(controller, clock, windows=6, latency_s=0.4, batch_fill=1.0, compute_s=0.05, backlog=20)
    assert controller.relax_level == 0


def test_a_fixed_controller_never_moves_the_batch_knobs():
    controller, clock = make(min_batch_size=8, max_batch_size=8, min_wait_s=0.002, max_wait_s=0.002)
    drive(controller, clock, windows=3, latency_s=0.05, batch_fill=1.0, compute_s=0.01, backlog=5)
    drive(controller, clock, windows=3, latency_s=0.5, batch_fill=1.0, compute_s=0.15, backlog=5)
    assert (controller.max_batch_size, controller.batch_wait_timeout_s) == (8, 0.002)


def test_bad_controller_config_is_refused_with_the_field_named():
    with pytest.raises(RayexitError, match="min_batch_size <= initial_batch_size"):
        ControllerConfig(initial_batch_size=128, max_batch_size=64)
    with pytest.raises(RayexitError, match="target_p99_ms"):
        ControllerConfig(target_p99_s=0)


def test_quantile_is_nearest_rank():
    values = [float(i) for i in range(1, 101)]
    assert quantile(values, 0.99) == 99.0
    assert quantile(values, 0.5) == 50.0
    assert quantile([3.0], 0.99) == 3.0
    assert quantile([], 0.99) == 0.0


def test_relax_policy_moves_each_kind_toward_always_exit():
    entropy = relax_policy(ExitPolicy("entropy", 0.2), 1, num_labels=4)
    assert entropy.thresholds == pytest.approx(math.log(4) - (math.log(4) - 0.2) / 2)
    assert relax_policy(ExitPolicy("entropy", 0.2), 0, 4).thresholds == 0.2
    maxprob = relax_policy(ExitPolicy("maxprob", [0.9, 0.8]), 2, num_labels=2)
    assert maxprob.thresholds == pytest.approx([0.5 + 0.4 / 4, 0.5 + 0.3 / 4])
    assert relax_policy(ExitPolicy("patience", 3), 5, 2).thresholds == 1.0
    assert relax_policy(ExitPolicy("none", 0.1), 3, 2).kind == "none"


def test_waits_halve_down_to_the_floor_not_toward_zero():
    controller, clock = make(min_wait_s=0.0, initial_wait_s=0.002)
    decisions = drive(controller, clock, windows=6, latency_s=0.5, batch_fill=0.5, compute_s=0.01, backlog=3)
    waits = [d.batch_wait_timeout_s for d in decisions]
    assert waits[:4] == pytest.approx([0.001, 0.0005, 0.00025, 0.000125])
    assert waits[4:] == [0.0, 0.0]
