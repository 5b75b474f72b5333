"""`rayexit bench token`'s target checks on constructed reports (no model, no data)."""

from __future__ import annotations

import pytest

from rayexit.bench.token import SPEEDUPS, _point, format_summary, targets


def point(f1: float, valid_speedup: float, test_speedup: float | None = None) -> dict:
    return {"f1": f1, "flops_speedup": test_speedup or valid_speedup, "validation": {"flops_speedup": valid_speedup}}


def report(full: float, reached: dict[float, float]) -> dict:
    """Points at each speed-up: those in `reached` with that F1, the others fell back to full depth."""
    out = {"full": full}
    for s in SPEEDUPS:
        out[_point(s)] = point(reached[s], s + 0.05) if s in reached else point(full, 1.0)
    return out


def test_tokee_is_above_a_sentee_that_cannot_reach_the_speed_up_and_drops_are_in_points():
    tokee = report(0.85, {1.5: 0.849, 2.0: 0.846, 2.5: 0.83})
    tokee["at_2x"].update(wallclock_speedup=1.46, wallclock_spread=[1.44, 1.52])
    sentee = report(0.85, {1.5: 0.84})
    reports = {"self_sampling": {"tokee": tokee, "sentee": sentee},
               "stage1": {"tokee": report(0.86, {2.0: 0.844}), "sentee": report(0.86, {})}}
    out = targets(reports)
    assert out["tokee_2x_drop_le_0.5"]["value"] == pytest.approx(0.4) and out["tokee_2x_drop_le_0.5"]["met"]
    assert out["tokee_3x_drop_le_1.5"] == {"value": None, "met": None}  # nothing that fast on validation
    assert out["tokee_above_sentee_at_1.5x"]["met"] is True  # both reached: 0.849 > 0.84
    assert out["tokee_above_sentee_at_2x"] == {"tokee_f1": 0.846, "sentee_f1": 0.85, "tokee_reached": True,
                                               "sentee_reached": False, "met": True}
    assert out["tokee_above_sentee_at_3x"]["met"] is None  # neither reached 3x
    only_sentee = targets({"self_sampling": {"tokee": report(0.85, {}), "sentee": report(0.85, {1.5: 0.84})},
                           "stage1": reports["stage1"]})
    assert only_sentee["tokee_above_sentee_at_1.5x"]["met"] is False  # SENTEE got there, TOKEE did not
    assert out["self_sampling_improves_tokee_2x"]["met"] is True
    assert out["self_sampling_improves_tokee_3x"]["met"] is None
    assert out["wallclock_2x_ge_1.6"] == {"value": 1.46, "met": False}
    text = format_summary({"train_slice": "t", "validation_set": "v", "test_set": "x", "reports": reports,
                           "targets": out})
    assert "F1@1.5x" in text and "F1@3x" in text


def test_the_token_grid_reaches_past_the_quantiles_of_mostly_sure_words():
    from types import SimpleNamespace

    import torch

    from rayexit.tasks import task_named

    # 95% of words near-certain at every exit, as on CoNLL: the quantiles alone stop far below 0.1
    u = torch.full((20, 10, 6), 0.001)
    u[0, :, :] = 0.6
    cache = SimpleNamespace(uncertainty=u, word_mask=torch.ones(20, 10, dtype=torch.bool))
    grid = task_named("token").default_grid(SimpleNamespace(cache=cache))
    tokee3 = sorted(p.thresholds for p in grid if p.kind == "tokee" and p.window == 3)
    assert {0.1, 0.25, 0.5, 0.6} <= set(tokee3) and min(tokee3) <= 0.001  # 0.6: the 0.99 quantile
    assert {p.kind for p in grid} == {"sentee", "tokee"} and {p.window for p in grid if p.kind == "tokee"} == {1, 3, 5}
