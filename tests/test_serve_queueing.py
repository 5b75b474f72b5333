"""Admission, load shedding, waves and batch-failure isolation as plain Python (no Ray, fake clock)."""

from __future__ import annotations

import asyncio

import pytest

from rayexit.serve.queueing import Admission, ItemFailed, Overloaded, run_isolated, waves


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_empty_queue_admits_and_a_full_one_sheds_with_retry_after():
    admission = Admission(max_wait_s=0.1, max_queued_texts=8, clock=Clock())
    admission.admit(8, 800)  # empty queue: always admitted, even past the token estimate
    with pytest.raises(Overloaded) as info:
        admission.admit(1, 10)
    assert info.value.retry_after_s >= 1 and "limit 8" in str(info.value)
    admission.release(8, 800)
    admission.admit(1, 10)
    assert (admission.queued_texts, admission.queued_tokens) == (1, 10)


def test_a_long_wait_at_the_head_sheds_until_a_batch_sees_a_short_one():
    admission = Admission(max_wait_s=0.1, max_queued_texts=10_000)
    admission.admit(4, 40)
    admission.record_wait(0.25)  # a (cold, slow) batch found its oldest text 250 ms old
    with pytest.raises(Overloaded) as info:
        admission.admit(1, 10)
    assert "250 ms" in str(info.value) and "100 ms" in str(info.value)
    admission.record_wait(0.02)  # the next batch: the queue drained while new work was refused
    admission.admit(1, 10)
    admission.record_wait(0.5)
    admission.release(5, 50)  # the queue emptied: nothing waits, so the next request is admitted
    admission.admit(2, 20)
    assert (admission.queued_texts, admission.queued_tokens) == (2, 20)


def test_retry_after_follows_the_drain_rate():
    admission = Admission(max_wait_s=0.1, max_queued_texts=10)
    assert admission.retry_after_s() == 1  # no rate learnt yet
    admission.record_batch(tokens=1000, seconds=1.0)
    admission.record_batch(tokens=100, seconds=1.0)  # slower now: the estimate follows (moving average)
    assert admission.tokens_per_s == pytest.approx(820.0)
    admission.queued_tokens = 4100
    assert admission.retry_after_s() == 5


def test_releasing_never_goes_negative_and_the_deadline_is_twice_the_wait():
    clock = Clock()
    admission = Admission(max_wait_s=0.1, max_queued_texts=4, clock=clock)
    admission.release(3, 30)
    assert (admission.queued_texts, admission.queued_tokens) == (0, 0)
    assert not admission.expired(enqueued=0.0, now=0.2)
    assert admission.expired(enqueued=0.0, now=0.21)
    clock.now = 0.3
    assert admission.expired(enqueued=0.0)


def test_waves_bound_the_cost_and_keep_the_order():
    costs = [100, 300, 200, 600, 50, 50]
    cut = waves(costs, budget=500)
    assert cut == [[0, 1], [2], [3], [4, 5]]  # an item over the budget goes alone
    assert [i for wave in cut for i in wave] == list(range(len(costs)))
    assert waves([], 10) == []


def test_a_failing_item_fails_alone_and_the_rest_are_answered():
    calls = []

    async def run(items):
        calls.append(list(items))
        if "poison" in items:
            raise TypeError("cannot encode")
        return [item.upper() for item in items]

    items = ["a", "b", "poison", "c", "d", "e", "f", "g"]
    answers = asyncio.run(run_isolated(run, items))
    assert [a for a in answers if not isinstance(a, ItemFailed)] == ["A", "B", "C", "D", "E", "F", "G"]
    assert isinstance(answers[2], ItemFailed) and "cannot encode" in str(answers[2])
    assert len(calls) <= 2 * 3 + 1  # bisection: a few re-runs, not one per item
    assert asyncio.run(run_isolated(run, [])) == []


def test_two_poisoned_items_in_different_halves_are_both_pinned():
    async def run(items):
        if any(item < 0 for item in items):
            raise ValueError("negative")
        return [item * 2 for item in items]

    answers = asyncio.run(run_isolated(run, [1, -1, 2, 3, 4, -5, 6, 7]))
    failed = [i for i, a in enumerate(answers) if isinstance(a, ItemFailed)]
    assert failed == [1, 5] and answers[0] == 2 and answers[7] == 14


def test_a_big_request_in_waves_lets_a_small_one_through_first():
    """A FIFO batcher like @serve.batch: a small request sent after a big one starts is answered
    before the big one finishes, because the big one holds only one wave in the queue at a time."""

    async def scenario() -> list[str]:
        queue: asyncio.Queue = asyncio.Queue()
        finished: list[str] = []

        async def worker():
            while True:
                name, done = await queue.get()
                await asyncio.sleep(0.01)  # one "batch" of compute
                done.set_result(name)

        async def submit(name: str, costs: list[int]):
            loop = asyncio.get_running_loop()
            for wave in waves(costs, budget=100):
                futures = []
                for _ in wave:
                    future = loop.create_future()
                    await queue.put((name, future))
                    futures.append(future)
                await asyncio.gather(*futures)
            finished.append(name)

        task = asyncio.create_task(worker())
        big = asyncio.create_task(submit("big", [100] * 10))
        await asyncio.sleep(0.015)
        await submit("small", [10])
        await big
        task.cancel()
        return finished

    assert asyncio.run(scenario()) == ["small", "big"]


class FakeMetric:
    def __init__(self, name, description="", boundaries=None, tag_keys=()):
        self.name, self.tag_keys = name, tuple(tag_keys)


class FakeMetrics:
    Counter = Gauge = Histogram = FakeMetric


def test_metric_names_units_and_labels_are_fixed():
    from rayexit.serve.metrics import ServeMetrics
    from rayexit.serve.validation import REASONS

    metrics = ServeMetrics(num_layers=4, metrics=FakeMetrics)
    declared = {name: m for name, m in vars(metrics).items() if isinstance(m, FakeMetric)}
    assert all(m.name.startswith("rayexit_") for m in declared.values())  # Prometheus: ray_rayexit_*
    assert all(m.name.endswith("_ms") for m in (metrics.latency, metrics.queue_wait, metrics.batch_wait))
    labels = {m.name: m.tag_keys for m in declared.values() if m.tag_keys}
    assert labels == {
        "rayexit_request_latency_ms": ("route",),
        "rayexit_rejected_requests": ("status", "reason"),
        "rayexit_failed_requests": ("reason",),
        "rayexit_guard_layer_agreement": ("layer",),  # exit numbers 1 .. L-1: bounded by the model's depth
        "rayexit_guard_threshold": ("layer",),
    }
    assert "model_error" in REASONS and "internal" in REASONS and len(REASONS) < 20  # a small closed set
