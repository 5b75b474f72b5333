"""The accuracy guard's rule on constructed agreement streams (serve/guard.py, no Ray, no model).

Rows are built by hand: a 3-exit entropy policy tuned at 0.3 everywhere, with "easy" rows (entropy 0.05 at
exit 1, always right) and "shaky" rows (entropy 0.2 at exit 1, wrong there a given share of the time).
At 0.3 both leave at exit 1; one tightening step (0.15) keeps the shaky ones for deeper exits.
"""

from __future__ import annotations

import random

import pytest
import torch

from rayexit.config import ExitPolicy
from rayexit.errors import RayexitError
from rayexit.policy import relax
from rayexit.serve.guard import AccuracyGuard, CheckBudget, GuardConfig, replay, sentence_units, stepped

LAYERS = 3
TUNED = 0.3


def rows(count: int, shaky_share: float, wrong_share: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[count, 3] statistics and predictions; the final exit always says label 1."""
    rng = random.Random(seed)
    stats = torch.full((count, LAYERS), 0.01)
    preds = torch.ones((count, LAYERS), dtype=torch.long)
    for i in range(count):
        if rng.random() < shaky_share:
            stats[i, 0] = 0.2
            if rng.random() < wrong_share:
                preds[i, 0] = 0
        else:
            stats[i, 0] = 0.05
    return stats, preds


def make_guard(**overrides) -> AccuracyGuard:
    # relax_wait None (min_samples) unless a test is about it: the rules below are each shown on their own.
    config = GuardConfig(**{"target": 0.99, "sample": 1.0, "window": 200, "min_samples": 20, "relax_wait": None,
                            **overrides})
    return AccuracyGuard(config, ExitPolicy("entropy", TUNED), LAYERS, num_labels=2)


def feed(guard: AccuracyGuard, stats: torch.Tensor, preds: torch.Tensor, per_call: int = 4) -> int | None:
    """Record rows a few at a time, as checks arrive; returns the row count at the first move (None if none)."""
    first = None
    for start in range(0, stats.shape[0], per_call):
        moves = guard.record(stats[start:start + per_call], preds[start:start + per_call])
        if moves and first is None:
            first = start + per_call
    return first


def test_agreement_under_target_tightens_the_exit_until_the_window_meets_it():
    guard = make_guard()
    stats, preds = rows(200, shaky_share=0.5, wrong_share=0.2)  # ~10% of exit-1 answers wrong at 0.3
    assert guard.layer_agreement(0, window=(stats, preds))[1] < 0.99  # the tuned threshold misses the target
    first = feed(guard, stats, preds)
    assert first is not None and first <= 60  # reacts within a few dozen checked rows
    assert guard.levels[0] >= 1 and guard.thresholds()[0] < TUNED
    assert guard.moves[0]["direction"] == "tighten" and guard.moves[0]["layer"] == 1
    count, agreement = guard.layer_agreement(0)
    assert count >= 20 and agreement >= 0.99  # the easy rows still leave at exit 1, now all correct
    assert guard.state()["agreement"] >= 0.99


def test_in_distribution_traffic_leaves_the_tuned_thresholds_alone():
    guard = make_guard()
    feed(guard, *rows(400, shaky_share=0.5, wrong_share=0.0))
    assert guard.levels == [0, 0] and guard.thresholds() == [TUNED] * LAYERS and guard.moves == []


def test_after_the_shift_ends_thresholds_relax_back_to_tuned_and_never_past():
    guard = make_guard()
    feed(guard, *rows(200, shaky_share=0.5, wrong_share=0.3, seed=1))
    assert guard.levels[0] >= 1
    feed(guard, *rows(600, shaky_share=0.5, wrong_share=0.0, seed=2))  # clean traffic again
    assert guard.levels[0] == 0 and guard.thresholds()[0] == pytest.approx(TUNED)
    assert [m["direction"] for m in guard.moves][-1] == "relax"
    assert all(level >= 0 for level in guard.levels)  # never past tuned without the operator's flag


def test_relaxing_is_one_step_per_min_samples_new_rows():
    guard = make_guard(min_samples=20)
    guard.levels[0] = 3  # as if an earlier shift had tightened it three steps
    feed(guard, *rows(60, shaky_share=0.5, wrong_share=0.0), per_call=1)
    relaxes = [m for m in guard.moves if m["direction"] == "relax"]
    assert len(relaxes) == 3 - guard.levels[0]
    gaps = [b["samples"] - a["samples"] for a, b in zip(relaxes, relaxes[1:], strict=False)]
    assert relaxes and all(gap >= 20 for gap in gaps)


def test_a_tighten_margin_moves_an_exit_that_agrees_at_the_target_but_without_headroom():
    stats, preds = rows(200, shaky_share=0.5, wrong_share=0.0)
    stats[-2:, 0] = 0.2
    preds[-2:, 0] = 0  # the last two rows leave at exit 1 wrongly: exit 1 agrees 198/200, exactly the target
    plain, aimed = make_guard(recent=0), make_guard(recent=0, tighten_margin=0.25)
    feed(plain, stats, preds)
    feed(aimed, stats, preds)
    assert plain.layer_agreement(0)[1] == pytest.approx(0.99) and plain.levels[0] == 0
    assert aimed.levels[0] == 1 and aimed.moves[0]["agreement"] == pytest.approx(0.99)
    assert aimed.layer_agreement(0)[1] == 1.0  # one step keeps the shaky rows for deeper exits


def test_relax_wait_holds_a_tightened_exit_for_that_many_checked_rows():
    quick, patient = make_guard(), make_guard(relax_wait=150)
    for guard in (quick, patient):
        guard.levels[0] = 1
        feed(guard, *rows(140, shaky_share=0.5, wrong_share=0.0), per_call=1)
    assert quick.levels[0] == 0 and patient.levels[0] == 1
    feed(patient, *rows(20, shaky_share=0.5, wrong_share=0.0, seed=4), per_call=1)
    relax = [m for m in patient.moves if m["direction"] == "relax"]
    assert patient.levels[0] == 0 and relax[0]["samples"] == 150
    assert GuardConfig(0.99).relax_after == 500 and GuardConfig(0.99, relax_wait=None).relax_after == 20


def test_a_tightening_moves_the_exits_too_thin_to_judge_with_it():
    # 6% of rows are shaky (half of them wrong at exit 1): exit 1 tightens; the few shaky rows it then
    # passes on are all exit 2 sees, under min_samples, so exit 2 cannot be judged on its own.
    stats, preds = rows(200, shaky_share=0.06, wrong_share=0.5, seed=5)
    moved = make_guard(recent=0, relax_wait=500)
    waiting = make_guard(recent=0, relax_wait=500, shift_moves_thin_exits=False)
    feed(moved, stats, preds)
    feed(waiting, stats, preds)
    assert waiting.levels == [1, 0]
    assert moved.levels == [1, 1]
    shift = [m for m in moved.moves if m["evidence"] == "shift"]
    assert [(m["layer"], m["direction"]) for m in shift] == [(2, "tighten")] and shift[0]["rows"] < 20
    assert moved.moves.index(shift[0]) > 0  # moved with exit 1's tightening, not before it


def test_an_exit_moved_with_a_shift_returns_to_tuned_with_the_last_exit_moved_on_evidence():
    guard = make_guard(relax_wait=500)
    guard.levels = [1, 1]
    guard._shifted = {1}  # exit 2 moved with a shift, later than exit 1: its own relax wait has barely begun
    guard._since_move = [1000, 0]
    feed(guard, *rows(40, shaky_share=0.5, wrong_share=0.0), per_call=40)
    assert guard.levels == [0, 0]
    assert [(m["layer"], m["direction"], m["evidence"]) for m in guard.moves] == [
        (1, "relax", "exit"), (2, "relax", "shift")]


def test_the_operator_may_allow_relaxing_past_tuned():
    guard = make_guard(allow_past_tuned=True, max_steps=2)
    feed(guard, *rows(400, shaky_share=0.5, wrong_share=0.0))
    assert guard.levels[0] < 0 and guard.thresholds()[0] > TUNED
    assert guard.thresholds()[0] == pytest.approx(relax(ExitPolicy("entropy", TUNED), -guard.levels[0], 2).thresholds)


def test_only_the_exit_that_disagrees_is_tightened():
    guard = make_guard(shift_moves_thin_exits=False)  # the per-exit rule alone
    stats, preds = rows(200, shaky_share=0.0, wrong_share=0.0)  # exit 1: easy rows only, always right
    hard = torch.arange(200) % 2 == 0  # half the rows pass exit 1 and leave at exit 2, wrong there 1 in 5
    stats[hard, 0], stats[hard, 1] = 0.6, 0.1
    preds[torch.arange(200) % 10 == 0, 1] = 0
    feed(guard, stats, preds)
    assert guard.levels[0] == 0 and guard.levels[1] >= 1
    assert {m["layer"] for m in guard.moves} == {2}


def thin_exits(wrong_at_exit1: int = 2, wrong_at_exit2: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """36 rows: 12 leave at exit 1, 12 at exit 2, 12 go to full depth; the first rows of each early
    group answer wrong. One tightening step (0.15) sends exit 1's rows to full depth."""
    stats = torch.full((36, LAYERS), 0.01)
    preds = torch.ones((36, LAYERS), dtype=torch.long)
    stats[:12, 0] = 0.2  # exit 1 at the tuned 0.3, not one step tighter (0.15); then full depth
    stats[:12, 1] = 0.6
    preds[:wrong_at_exit1, 0] = 0
    stats[12:24, 0], stats[12:24, 1] = 0.6, 0.2  # exit 2 at 0.3
    stats[12:24, 2] = 0.6
    preds[12:12 + wrong_at_exit2, 1] = 0
    stats[24:, :2] = 0.6
    return stats, preds


def test_a_deficit_spread_thinly_over_exits_is_caught_on_the_pooled_rows():
    stats, preds = thin_exits()
    guard = make_guard(min_samples=20, shift_moves_thin_exits=False)  # the pooled rule alone
    # No exit has the 20 rows the per-exit rule asks for, yet the 24 early answers together agree 0.875.
    assert [guard.layer_agreement(k, window=(stats, preds))[0] for k in (0, 1)] == [12, 12]
    assert guard.pooled_agreement(window=(stats, preds))[:2] == (24, pytest.approx(21 / 24))
    feed(guard, stats, preds, per_call=36)
    assert guard.moves[0]["layer"] == 1 and guard.moves[0]["evidence"] == "pooled"  # most disagreeing rows
    # Exit 1's rows now go to full depth; the 12 early rows left (exit 2's) are too few to judge: wait.
    assert guard.levels == [1, 0]
    assert guard.pooled_agreement()[:2] == (12, pytest.approx(11 / 12))


def test_a_thin_exit_tightened_on_pooled_rows_relaxes_back_on_them():
    guard = make_guard(min_samples=20, window=36)
    feed(guard, *thin_exits(), per_call=36)
    assert guard.levels == [1, 1]  # exit 1 on the pooled rows, exit 2 (12 rows of its own) with it
    assert [m["evidence"] for m in guard.moves] == ["pooled", "shift"]
    clean = thin_exits(wrong_at_exit1=0, wrong_at_exit2=0)
    for _ in range(3):
        feed(guard, *clean, per_call=36)
    # Neither exit ever holds 20 rows of its own, yet both are back at tuned: exit 1 on the pooled rows, judged
    # with exit 2 at its tuned value (exit 2 has no evidence of its own); without that, exit 2's tighter
    # threshold left exit 1 only 12 early rows to relax on, and the two stayed tightened for good.
    assert guard.levels == [0, 0]
    assert [(m["layer"], m["direction"], m["evidence"]) for m in guard.moves[-2:]][0] == (1, "relax", "pooled")
    assert guard.moves[-1]["layer"] == 2 and guard.moves[-1]["direction"] == "relax"


def test_relaxing_waits_while_all_early_rows_together_disagree():
    guard = make_guard(min_samples=20, window=200)
    guard.levels[0] = 1  # as after a shift
    guard._since_move[0] = 100
    # 24 rows that would leave at exit 1 when it relaxes, all right; 100 at exit 2, 1 wrong (0.99: no
    # tightening there); 76 at full depth. Exit 1's own rows agree fully, all early rows 123/124 < 0.995.
    stats = torch.full((200, LAYERS), 0.6)
    preds = torch.ones((200, LAYERS), dtype=torch.long)
    stats[:24, 0] = 0.2
    stats[24:124, 1] = 0.1
    preds[24, 1] = 0
    moves = guard.record(stats, preds)
    assert moves == [] and guard.levels == [1, 0]
    assert guard.layer_agreement(0, [0, 0])[1] == 1.0 and guard.pooled_agreement([0, 0])[1] == pytest.approx(123 / 124)


def test_steps_move_toward_never_exiting_on_each_criterion():
    assert stepped("entropy", 0.4, 1, 2) == pytest.approx(0.2)
    assert stepped("maxprob", 0.9, 1, 2) == pytest.approx(0.95)
    assert stepped("patience", 2.0, 2, 2) == 4.0
    assert stepped("tokee", 0.2, 2, 9) == pytest.approx(0.05)
    assert stepped("maxprob", 0.9, -1, 2) == pytest.approx(relax(ExitPolicy("maxprob", 0.9), 1, 2).thresholds)
    assert stepped("entropy", 0.4, 0, 2) == 0.4


def test_replay_matches_the_live_runner_on_the_same_logits():
    from rayexit.exits import ExitCache

    torch.manual_seed(0)
    logits = torch.randn(50, 4, 3) * 2
    policy = ExitPolicy("entropy", [0.5, 0.6, 0.7])
    stats, preds = sentence_units(logits, "entropy")
    expected = ExitCache(logits).simulate(policy).exit_layers - 1
    assert torch.equal(replay("entropy", stats, preds, policy.per_layer(4)), expected)


def test_sampling_keeps_about_the_configured_share_and_is_seeded():
    first, second = make_guard(sample=0.05, max_pending=10_000), make_guard(sample=0.05, max_pending=10_000)
    kept = first.offer(list(range(4000)))
    assert 140 <= kept <= 260
    assert second.offer(list(range(4000))) == kept and list(first.pending) == list(second.pending)
    assert len(first.take()) == first.config.rows_per_check


def test_checks_take_at_most_their_share_of_model_time_on_a_busy_replica():
    now = [0.0]
    budget = CheckBudget(0.05, clock=lambda: now[0])
    now[0] = 1.0
    budget.served(0.9)  # the model thread ran 90% of the last second: busy even with nothing queued
    assert budget.allows(queued=False)
    budget.checked(0.2)
    assert not budget.allows(queued=False) and not budget.allows(queued=True)  # 0.2 of 1.1 s is over 5%
    now[0] = 100.0  # a long idle spell: spare capacity, checks are free again
    assert budget.utilisation() < 0.5 and budget.allows(queued=False)
    assert not budget.allows(queued=True)  # queued requests still come first
    budget.served(5.0)
    assert budget.allows(queued=True)


def test_a_model_thread_busy_a_third_of_the_time_is_not_idle():
    now = [0.0]
    budget = CheckBudget(0.05, clock=lambda: now[0])
    now[0] = 1.0
    budget.served(0.3)  # a closed loop that keeps the model thread a third busy: the CPUs are not idle
    budget.checked(0.1)
    assert budget.utilisation() == pytest.approx(0.4)
    assert not budget.allows(queued=False)  # 0.1 of 0.4 s is over the 5% share


def test_a_tightening_boosts_sampling_and_the_check_budget_for_one_window():
    guard = make_guard(sample=0.05, boost=4.0, window=100)
    assert guard.sample_rate() == 0.05 and guard.budget.share == pytest.approx(0.04)
    feed(guard, *rows(40, shaky_share=0.5, wrong_share=0.0))
    assert guard.sample_rate() == 0.05  # clean rows move nothing: the configured rate holds
    moves = guard.record(*rows(40, shaky_share=1.0, wrong_share=0.5, seed=3))
    assert any(m["direction"] == "tighten" for m in moves)
    assert guard.sample_rate() == pytest.approx(0.2) and guard.budget.share == pytest.approx(0.16)
    assert guard.state()["sample_rate"] == pytest.approx(0.2)
    kept = guard.offer(list(range(2000)))
    assert 300 <= kept <= 500  # about 20% of what was served, not 5%
    clean = rows(100, shaky_share=0.0, wrong_share=0.0, seed=4)  # one window of rows with nothing to tighten
    guard.record(clean[0][:99], clean[1][:99])
    assert guard.sample_rate() == pytest.approx(0.2)  # one row short of a window
    guard.record(clean[0][99:], clean[1][99:])
    assert guard.sample_rate() == 0.05 and guard.budget.share == pytest.approx(0.04)


def test_a_shift_in_the_newest_rows_tightens_before_it_fills_the_window():
    """The whole window agrees at the target exactly (2 wrong of 200 early rows), the newest 100 do not (2 of 100)."""
    stats = torch.full((200, LAYERS), 0.01)
    stats[:, 0] = 0.05
    preds = torch.ones((200, LAYERS), dtype=torch.long)
    preds[[150, 190], 0] = 0
    windowed = make_guard(recent=0)
    assert windowed.record(stats, preds) == [] and windowed.levels == [0, 0]
    guard = make_guard(recent=100)
    moves = guard.record(stats, preds)
    assert moves and {m["direction"] for m in moves} == {"tighten"} and moves[0]["rows"] == 100
    assert guard.thresholds()[0] < 0.05  # every row is 0.05 sure at exit 1: only never-exiting there fixes it


def test_a_relax_waits_while_the_newest_rows_of_that_exit_disagree():
    """At the tuned 0.3, exit 1 would take 125 of 200 rows with 2 wrong (0.984, above relax_at 0.95 for
    target 0.9), and all early rows agree at 0.99; but both wrong answers are among the 25 exit-1 rows of the
    newest 100, where the exit agrees at 0.92. Those rows would tighten it again at the next check."""
    stats = torch.full((200, LAYERS), 0.01)
    preds = torch.ones((200, LAYERS), dtype=torch.long)
    stats[:100, 0] = 0.05  # leave at exit 1 at any level, right
    stats[100:125, 0] = 0.2  # leave at exit 1 only at the tuned threshold
    preds[[110, 120], 0] = 0
    stats[125:, 0] = 0.9  # sure only at exit 2, right there
    for recent, relaxes in ((0, True), (100, False)):
        guard = make_guard(target=0.9, recent=recent)
        guard.levels[0] = 1
        moves = guard.record(stats, preds)
        assert [m["direction"] for m in moves] == (["relax"] if relaxes else []), recent
        assert guard.levels[0] == (0 if relaxes else 1)


def test_a_boosted_check_budget_never_passes_all_of_the_model_time():
    guard = make_guard(max_overhead=0.5, boost=4.0)
    assert guard.budget.share == pytest.approx(0.5)
    moves = guard.record(*rows(40, shaky_share=1.0, wrong_share=0.5, seed=3))
    assert any(m["direction"] == "tighten" for m in moves)
    assert guard.budget.share == 1.0  # not 2.0


def test_a_new_guard_starts_from_the_tuned_thresholds():
    guard = make_guard()
    assert guard.thresholds() == [TUNED] * LAYERS and guard.policy().thresholds == [TUNED] * LAYERS
    state = guard.state()
    assert state["samples"] == 0 and state["agreement"] is None and state["target"] == 0.99


@pytest.mark.parametrize("bad, field", [
    ({"target": 1.5}, "guard_target"), ({"target": 1.0}, "guard_target"), ({"sample": 0}, "guard_sample"),
    ({"window": 0}, "guard_window"), ({"min_samples": 500}, "guard_min_samples"),
    ({"max_overhead": -1}, "guard_max_overhead"), ({"recent": -1}, "guard_recent"), ({"boost": 0.5}, "guard_boost"),
    ({"tighten_margin": 0.5}, "guard_tighten_margin"), ({"tighten_margin": -0.1}, "guard_tighten_margin"),
    ({"relax_wait": 0}, "guard_relax_wait"),
])
def test_bad_settings_name_the_field(bad, field):
    with pytest.raises(RayexitError, match=field):
        GuardConfig(**{"target": 0.99, **bad})


def test_full_depth_policy_cannot_be_guarded():
    with pytest.raises(RayexitError, match="guard_target"):
        AccuracyGuard(GuardConfig(0.99), ExitPolicy("none", 0.0), 3, 2)


def test_serve_command_and_yaml_keys_reach_the_guard(monkeypatch, tmp_path):
    from test_serve_command import FakeCluster

    import rayexit.cluster
    import rayexit.serve.run as serve_run
    from rayexit.cli import build_parser
    from rayexit.serve.run import free_port
    from rayexit.serve.settings import ServeSettings

    class Started(Exception):
        pass

    seen = {}

    def fake_start(settings, **kwargs):
        seen["settings"] = settings
        raise Started

    monkeypatch.setattr(serve_run, "start_serving", fake_start)
    monkeypatch.setattr(rayexit.cluster, "connect", lambda *a, **k: FakeCluster())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "rayexit.json").write_text("{}")
    argv = ["serve", str(tmp_path / "m"), "--port", str(free_port()), "--guard-target", "0.98", "--guard-sample",
            "0.1", "--guard-allow-past-tuned"]
    args = build_parser().parse_args(argv)
    with pytest.raises(Started):
        args.func(args)
    config = seen["settings"].guard_config()
    assert (config.target, config.sample, config.allow_past_tuned) == (0.98, 0.1, True)
    assert ServeSettings.from_args({"model_dir": "m"}).guard_config() is None  # off by default
    yaml_args = {"model_dir": "m", "guard_target": 0.99, "guard_window": 300, "guard_min_samples": 30}
    assert ServeSettings.from_args(yaml_args).guard_config().window == 300
    defaults = ServeSettings.from_args({"model_dir": "m", "guard_target": 0.99}).guard_config()
    assert (defaults.relax_wait, defaults.tighten_margin, defaults.shift_moves_thin_exits) == (500, 0.0, True)
    tuned = ServeSettings.from_args({**yaml_args, "guard_relax_wait": None, "guard_tighten_margin": 0.2,
                                     "guard_shift_moves_thin_exits": False}).guard_config()
    assert (tuned.relax_after, tuned.tighten_at, tuned.shift_moves_thin_exits) == (30, pytest.approx(0.992), False)
    with pytest.raises(RayexitError, match="guard_relax_wait"):
        ServeSettings.from_args({"model_dir": "m", "guard_relax_wait": 0})  # refused even with the guard off
    with pytest.raises(RayexitError, match="guard_target"):
        ServeSettings.from_args({"model_dir": "m", "guard_target": 1.5})
