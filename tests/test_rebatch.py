"""Layer-level rebatching without Ray: the scheduler's answers equal the batched runner's, row for row."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from conftest import tiny_sequence_model

from rayexit.data.encode import pad_batch
from rayexit.exits import ExitCache, run_early_exit
from rayexit.policy import ExitPolicy, relax
from rayexit.serve.rebatch import STARVING_HOLDS, Exited, LayerScheduler, Rebatcher


def varied_model(layers: int = 6, seed: int = 3, pooling: str = "mean"):
    """A tiny random model whose exits disagree with each other, so rows leave at many different layers."""
    model = tiny_sequence_model(layers=layers, labels=("a", "b", "c"), seed=seed, pooling=pooling)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.heads.exits:
            head.pooler.weight.copy_(torch.randn(head.pooler.weight.shape, generator=generator) * 0.5)
            head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=generator))
        if pooling == "attention":  # scorers off their zero start, so weight on padding would show
            for scorer in model.heads.scorers:
                scorer.weight.copy_(torch.randn(scorer.weight.shape, generator=generator))
    return model


def request_batches(seed: int = 0, count: int = 6) -> list[list[list[int]]]:
    """Request batches of 1-9 texts, 2-40 tokens each: a mix of lengths inside and across batches."""
    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        size = rng.randint(1, 9)
        batches.append([[101] + [rng.randint(1000, 20000) for _ in range(rng.randint(0, 38))] + [102]
                        for _ in range(size)])
    return batches


def middle_thresholds(model, sequences, kind: str, never: float) -> list[float]:
    """Per exit, a threshold midway between two rows' statistics, so rows split there and none sits on it;
    exit 1 gets `never` (this random model is sure of itself at layer 1, and a split needs rows to go on)."""
    ids, mask = pad_batch(sequences, 0)
    with torch.no_grad():
        cache = ExitCache(torch.stack(model(ids, mask), dim=1))
    values = cache.statistic(kind).sort(0).values
    middle = len(values) // 2
    return [never] + [float(values[middle - 1, k] + values[middle, k]) / 2 for k in range(1, model.num_layers - 1)]


def policies(model, sequences) -> dict[str, ExitPolicy]:
    entropy = middle_thresholds(model, sequences, "entropy", never=0.0)
    return {
        "entropy": ExitPolicy("entropy", entropy),
        "maxprob": ExitPolicy("maxprob", middle_thresholds(model, sequences, "maxprob", never=2.0)),
        "patience": ExitPolicy("patience", 2),
        "none": ExitPolicy("none", 0.0),
    }


def reference(model, batch, caps, policy) -> list[tuple[int, int, float]]:
    """What today's runner answers: each request batch alone, one call per depth cap."""
    out: list = [None] * len(batch)
    for cap in set(caps):
        rows = [i for i, c in enumerate(caps) if c == cap]
        ids, mask = pad_batch([batch[i] for i in rows], 0)
        result = run_early_exit(model, ids, mask, policy, layer_cap=cap)
        for j, i in enumerate(rows):
            out[i] = (int(result.predictions[j]), int(result.exit_layers[j]), float(result.confidences[j]))
    return out


def assert_same(futures, expected) -> None:
    for future, (label, layer, confidence) in zip(futures, expected, strict=True):
        got = future.result(timeout=0)
        assert isinstance(got, Exited)
        assert (got.prediction, got.exit_layer) == (label, layer)
        assert got.confidence == pytest.approx(confidence, abs=1e-5)


MODEL = varied_model()
BATCHES = request_batches()
POLICIES = policies(MODEL, [s for b in BATCHES for s in b])
SCHEDULES = {  # (full_rows, max_hold_s, pad_slack): different orders and mergings of the same work
    "fullest-deepest": (1, 1e9, 1.25),
    "shallowest-first": (10_000, 1e9, 100.0),
    "hold-every-step": (10_000, 0.0, 100.0),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(POLICIES))
def test_rebatched_answers_equal_the_runner_per_batch(name, schedule):
    full_rows, hold, slack = SCHEDULES[schedule]
    policy = POLICIES[name]
    scheduler = LayerScheduler(MODEL, full_rows=full_rows, max_hold_s=hold, token_budget=10_000, pad_slack=slack)
    rng = random.Random(1)
    submitted = []
    runs_alone = 0
    for n, batch in enumerate(BATCHES):
        caps = [rng.choice([None, None, 2, 4]) for _ in batch]
        # Alternate relax levels: rows admitted under different thresholds share working batches.
        row_policy = relax(policy, n % 2, len(MODEL.labels))
        expected = reference(MODEL, batch, caps, row_policy)
        submitted.append((scheduler.add(batch, caps, row_policy), expected))
        runs_alone += sum(max(layer for _, layer, _ in [expected[i] for i, c in enumerate(caps) if c == cap])
                          for cap in set(caps))
        for _ in range(rng.randint(0, 3)):  # new batches arrive while others are mid-way
            scheduler.step()
    scheduler.run_until_idle()
    assert scheduler.pending() == 0
    for futures, expected in submitted:
        assert_same(futures, expected)
    layers = [layer for _, expected in submitted for _, layer, _ in expected]
    if name != "none":
        assert len(set(layers)) >= 3, "the test needs rows leaving at several layers"
    # Merged working batches: fewer layer executions than the batches run alone, the same rows computed.
    assert scheduler.layer_runs < runs_alone
    assert scheduler.layer_rows == sum(layers)


def test_roberta_padding_merges_exactly():
    """RoBERTa counts positions from its pad id: merged entry rows must be padded with it."""
    model = tiny_sequence_model("roberta", layers=4, labels=("a", "b", "c"), pooling="mean")
    batches = request_batches(seed=4, count=4)
    policy = ExitPolicy("entropy", middle_thresholds(model, [s for b in batches for s in b], "entropy", 0.0))
    scheduler = LayerScheduler(model, pad_id=1, full_rows=10_000)
    submitted = []
    for batch in batches:
        ids, mask = pad_batch(batch, 1)
        result = run_early_exit(model, ids, mask, policy)
        expected = list(zip(result.predictions.tolist(), result.exit_layers.tolist(), result.confidences.tolist(),
                            strict=True))
        submitted.append((scheduler.add(batch, [None] * len(batch), policy), expected))
    scheduler.run_until_idle()
    for futures, expected in submitted:
        assert_same(futures, expected)


def test_attention_pooling_merges_exactly():
    """Merged working batches re-pad rows to a shared width: an attention exit must weigh that padding zero."""
    model = varied_model(pooling="attention")
    batches = request_batches(seed=5, count=4)
    policy = ExitPolicy("entropy", middle_thresholds(model, [s for b in batches for s in b], "entropy", 0.0))
    scheduler = LayerScheduler(model, full_rows=1, max_hold_s=1e9, token_budget=10_000, pad_slack=100.0)
    submitted = []
    for batch in batches:
        expected = reference(model, batch, [None] * len(batch), policy)
        submitted.append((scheduler.add(batch, [None] * len(batch), policy), expected))
    scheduler.run_until_idle()
    for futures, expected in submitted:
        assert_same(futures, expected)
    layers = [layer for _, expected in submitted for _, layer, _ in expected]
    assert len(set(layers)) >= 3, "the test needs rows leaving at several layers"
    assert scheduler.layer_runs < sum(max(layer for _, layer, _ in expected) for _, expected in submitted), \
        "the test needs rows of different requests merged"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_new_requests_start_at_once_and_stragglers_are_not_starved():
    clock = Clock()
    policy = ExitPolicy("none", 0.0)  # nobody exits: rows stay where the steps put them
    scheduler = LayerScheduler(MODEL, full_rows=8, max_hold_s=0.05, clock=clock)
    scheduler.add([[101, 2000, 102]] * 2, [None, None], policy)
    scheduler.step()
    scheduler.step()  # two rows now wait for layer 3
    assert scheduler.waiting()[2] == 2
    scheduler.add([[101, 3000, 102]] * 3, [None] * 3, policy)
    assert scheduler.pick() == 0  # new work starts at layer 1 rather than waiting for the deep stragglers
    scheduler.step()
    assert scheduler.pick() == 1  # then catches up with the rows ahead of it
    scheduler.add([[101, 4000, 102]] * 8, [None] * 8, policy)
    assert scheduler.pick() == 0  # a full queue goes first
    clock.now += 0.06  # everything has waited past the hold; 13 rows are under two full batches: deepest first
    assert scheduler.waiting()[:3] == [8, 3, 2]
    assert scheduler.pick() == 2


def test_under_light_load_overdue_stragglers_go_first():
    clock = Clock()
    policy = ExitPolicy("none", 0.0)
    scheduler = LayerScheduler(MODEL, full_rows=100, max_hold_s=0.01, clock=clock)
    scheduler.add([[101, 2000, 102]], [None], policy)
    scheduler.step()
    scheduler.add([[101, 3000, 102]] * 6, [None] * 6, policy)
    clock.now += 0.015  # both overdue, neither full: the deeper finishes its request first
    assert scheduler.pick() == 1


def test_under_a_backlog_the_fullest_overdue_queue_runs_and_a_straggler_still_gets_its_turn():
    clock = Clock()
    policy = ExitPolicy("none", 0.0)
    scheduler = LayerScheduler(MODEL, full_rows=5, max_hold_s=0.01, clock=clock)  # a backlog: 10 rows or more
    scheduler.add([[101, 2000, 102]], [None], policy)
    scheduler.step()  # one straggler waits for layer 2
    clock.now += 0.001
    scheduler.add([[101, 3000, 102]] * 10, [None] * 10, policy)
    clock.now += 0.015  # both queues overdue, neither starving: the ten rows go before the one
    assert scheduler.pick() == 0
    scheduler.step()
    assert scheduler.waiting()[:2] == [0, 11]  # and the ten now share layer 2 with the straggler
    scheduler.step()
    scheduler.add([[101, 4000, 102]] * 12, [None] * 12, policy)
    clock.now += 0.02
    assert scheduler.waiting()[:3] == [12, 0, 11]
    assert scheduler.pick() == 0  # both overdue: the 12 rows at layer 1 before the 11 at layer 3
    scheduler.step()
    scheduler.add([[101, 5000, 102]] * 9, [None] * 9, policy)
    clock.now += STARVING_HOLDS * 0.01 + 0.001
    assert scheduler.waiting()[:3] == [9, 12, 11]
    assert scheduler.pick() == 2  # every queue starving now: the 11 rows waited longest, so they run first


def test_each_row_is_charged_its_share_of_every_layer_it_ran_in(monkeypatch):
    """The replica's controller reads a batch's cost as the sum over its rows, so the shares must add up to the
    model time spent: here every layer execution costs exactly one clock second."""
    clock = Clock()
    scheduler = LayerScheduler(MODEL, full_rows=4, max_hold_s=10.0, clock=clock)
    compute = scheduler._compute

    def one_second(layer, group):
        clock.now += 1.0
        return compute(layer, group)

    monkeypatch.setattr(scheduler, "_compute", one_second)
    capped = scheduler.add([[101, 2000, 102]] * 2, [2, 2], ExitPolicy("none", 0.0))
    deep = scheduler.add([[101, 3000, 102]] * 2, [None, None], ExitPolicy("none", 0.0))
    scheduler.run_until_idle()
    charged = [f.result(timeout=0).model_s for f in capped + deep]
    assert sum(charged) == pytest.approx(scheduler.layer_runs)  # nothing lost, nothing counted twice
    # Layers 1-2 ran on the four rows merged (a quarter second each), layers 3-6 on the two uncapped rows alone.
    assert charged == pytest.approx([0.5, 0.5, 0.5 + 4 * 0.5, 0.5 + 4 * 0.5])


def test_a_failed_attempt_is_charged_to_the_rows_that_shared_it(monkeypatch):
    """Each attempt costs one clock second; the four rows fail together, then the poisoned half, then the
    poisoned row alone. Its companions carry their shares of every failed attempt they were in."""
    clock = Clock()
    scheduler = LayerScheduler(MODEL, full_rows=1, max_hold_s=10.0, clock=clock)
    compute = scheduler._compute

    def costly(layer, group):
        clock.now += 1.0
        if (group.states == 7777).any():
            raise RuntimeError("poisoned")
        return compute(layer, group)

    monkeypatch.setattr(scheduler, "_compute", costly)
    futures = scheduler.add([[101, 7777, 102]] + [[101, 2000, 102]] * 3, [1] * 4, ExitPolicy("none", 0.0))
    scheduler.run_until_idle()
    assert isinstance(futures[0].exception(timeout=0), RuntimeError)
    # 4 rows fail (1/4 s each); rows 0-1 fail (1/2 s each); row 0 fails alone, row 1 runs alone (1 s);
    # rows 2-3 run together (1/2 s each).
    assert [f.result(timeout=0).model_s for f in futures[1:]] == pytest.approx([1.75, 0.75, 0.75])


def test_groups_merge_only_when_padding_stays_bounded():
    policy = ExitPolicy("none", 0.0)
    scheduler = LayerScheduler(MODEL, full_rows=1, pad_slack=1.25)
    short = scheduler.add([[101] + [2000] * 8 + [102]] * 2, [None] * 2, policy)  # width 10
    scheduler.add([[101] + [2000] * 38 + [102]], [None], policy)  # width 40: would quadruple the short rows' cost
    similar = scheduler.add([[101] + [2000] * 9 + [102]] * 2, [None] * 2, policy)  # width 11
    scheduler.step()
    assert scheduler.layer_rows == 4 and scheduler.waiting()[0] == 1  # the two narrow groups merged, the wide waits
    scheduler.run_until_idle()
    assert all(f.result(timeout=0).exit_layer == MODEL.num_layers for f in short + similar)


def test_a_failing_row_fails_alone_at_entry_and_deep_layers(monkeypatch):
    poison_token = 7777
    poison_length = 33  # no other row is this long: marks a row deep inside the network
    batches = request_batches(seed=2, count=4)
    batches[1] = batches[1] + [[101, poison_token, 102]]
    batches[2] = batches[2] + [[101] + [1500] * (poison_length - 2) + [102]]
    assert sum(len(s) == poison_length for b in batches for s in b) == 1
    policy = ExitPolicy("none", 0.0)
    expected = [reference(MODEL, b, [None] * len(b), policy) for b in batches]

    embed, run_layer = MODEL.embed, MODEL.run_layer

    def fragile_embed(ids):
        if (ids == poison_token).any():
            raise RuntimeError("simulated failure on a token")
        return embed(ids)

    def fragile_layer(index, hidden, mask):
        lengths = (mask[:, 0, 0, :] == 0).sum(-1)
        if index == 3 and (lengths == poison_length).any():
            raise RuntimeError("simulated failure deep in the network")
        return run_layer(index, hidden, mask)

    monkeypatch.setattr(MODEL, "embed", fragile_embed)
    monkeypatch.setattr(MODEL, "run_layer", fragile_layer)
    scheduler = LayerScheduler(MODEL, full_rows=1, token_budget=10_000)
    submitted = [scheduler.add(b, [None] * len(b), policy) for b in batches]
    scheduler.run_until_idle()
    for n, futures in enumerate(submitted):
        for row, future in enumerate(futures):
            poisoned = poison_token in batches[n][row] or len(batches[n][row]) == poison_length
            if poisoned:
                assert isinstance(future.exception(timeout=0), RuntimeError)
            else:
                assert_same([future], [expected[n][row]])


def test_rebatcher_thread_answers_concurrent_callers():
    batches = request_batches(seed=5, count=5)
    policy = POLICIES["patience"]
    rebatcher = Rebatcher(LayerScheduler(MODEL, full_rows=16, max_hold_s=0.002))

    async def everyone():
        return await asyncio.gather(*(rebatcher.run(b, [None] * len(b), policy) for b in batches))

    try:
        answers = asyncio.run(asyncio.wait_for(everyone(), timeout=60))
    finally:
        rebatcher.close()
    for batch, got in zip(batches, answers, strict=True):
        expected = reference(MODEL, batch, [None] * len(batch), policy)
        assert [(a.prediction, a.exit_layer) for a in got] == [(e[0], e[1]) for e in expected]
        assert [a.confidence for a in got] == pytest.approx([e[2] for e in expected], abs=1e-5)


def test_rows_of_an_abandoned_request_stop_computing():
    policy = ExitPolicy("none", 0.0)
    scheduler = LayerScheduler(MODEL, full_rows=1)
    kept = scheduler.add([[101, 2000, 102]], [None], policy)
    dropped = scheduler.add([[101, 3000, 3001, 102]] * 2, [None, None], policy)
    scheduler.step()  # layer 1 for all three rows
    for future in dropped:
        future.cancel()
    scheduler.run_until_idle()
    assert kept[0].result(timeout=0).exit_layer == MODEL.num_layers
    assert scheduler.layer_rows == 3 + (MODEL.num_layers - 1)


def test_rebatch_setting_must_be_a_boolean():
    from rayexit.errors import RayexitError
    from rayexit.serve.settings import ServeSettings

    assert ServeSettings.from_args({"model_dir": "m", "rebatch": True}).rebatch is True
    with pytest.raises(RayexitError, match="serve args.rebatch: got 'yes', expected true or false"):
        ServeSettings.from_args({"model_dir": "m", "rebatch": "yes"})


def test_rows_per_layer_execution_are_counted_as_computed(monkeypatch, minilm_tokenizer):
    """The metric both ways: the runner's pass statistics and the scheduler's callback see what run_layer saw."""
    from rayexit.serve.engine import ServedClassifier

    computed: list[int] = []
    run_layer = MODEL.run_layer

    def counting(index, hidden, mask):
        computed.append(hidden.shape[0])
        return run_layer(index, hidden, mask)

    monkeypatch.setattr(MODEL, "run_layer", counting)
    engine = ServedClassifier(MODEL, minilm_tokenizer, POLICIES["entropy"], token_budget=64)
    sequences = [s for b in BATCHES for s in b]
    _, stats = engine.classify_encoded(sequences)
    assert stats.passes > 1 and stats.layer_rows == computed
    computed.clear()
    seen: list[int] = []
    scheduler = LayerScheduler(MODEL, full_rows=4, on_layer=lambda layer, rows: seen.append(rows))
    for batch in BATCHES:
        scheduler.add(batch, [None] * len(batch), POLICIES["entropy"])
    scheduler.run_until_idle()
    assert seen == computed and scheduler.layer_rows == sum(computed) and scheduler.layer_runs == len(computed)


@pytest.mark.parametrize("flags, expected", [([], False), (["--rebatch"], True)])
def test_serve_command_flag_reaches_the_settings(monkeypatch, tmp_path, flags, expected):
    import rayexit.cluster
    import rayexit.serve.run as serve_run
    from rayexit.cli import build_parser

    class Started(Exception):
        pass

    seen = {}

    def fake_start(settings, **kwargs):
        seen["rebatch"] = settings.rebatch
        raise Started

    class Cluster:
        started, metrics_export_port, metrics_url = True, 1, None

        def shutdown(self):
            pass

    monkeypatch.setattr(serve_run, "start_serving", fake_start)
    monkeypatch.setattr(rayexit.cluster, "connect", lambda *a, **k: Cluster())  # no real Ray
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "rayexit.json").write_text("{}")
    args = build_parser().parse_args(["serve", str(tmp_path / "model"), "--port", str(serve_run.free_port()), *flags])
    with pytest.raises(Started):
        args.func(args)
    assert seen == {"rebatch": expected}


def test_bench_summary_takes_medians_per_side_and_level():
    from rayexit.bench.serve_rebatch import format_summary, summarize

    def sample(side, rate, p99, rows, repeat):
        return {"side": side, "concurrency": 16, "repeat": repeat, "requests_per_s": rate, "p50_ms": p99 / 2,
                "p99_ms": p99, "rows_per_layer_run": rows, "server_errors_5xx": 0, "requests": 100}

    samples = [sample("off", 10.0, 200.0, 3.0, 0), sample("on", 13.0, 150.0, 9.0, 0),
               sample("off", 12.0, 220.0, 3.5, 1), sample("on", 12.0, 170.0, 8.0, 1),
               sample("off", 11.0, 210.0, 3.2, 2), sample("on", 14.0, 160.0, 10.0, 2)]
    (row,) = summarize(samples, [16])
    assert row["off"]["requests_per_s"] == 11.0 and row["on"]["requests_per_s"] == 13.0
    assert row["on"]["requests_per_s_spread"] == 2.0 and row["on"]["rows_per_layer_run"] == 9.0
    assert row["ratio"] == round(13 / 11, 3) and row["p99_ratio"] == round(160 / 210, 3)
    assert "(1.182)" in format_summary([row])
