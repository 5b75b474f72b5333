"""The report pieces both searches share (tune/results.py), on constructed trials: no Ray, no model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rayexit.policy import FULL_DEPTH, ExitPolicy
from rayexit.tune.results import choose, per_trial, plot_pareto, threshold_rate


def trial(score: str, full: float, seconds: float) -> dict:
    return {"trial_id": f"t{full}", "params": {"lr": 1e-4}, f"validation_exit_{score}": [0.1, full],
            f"eval_exit_{score}": [0.2, full - 0.01], "train_seconds": 3.0, "threshold_settings": 1000,
            "threshold_seconds": seconds}


@pytest.mark.parametrize(("task", "score"), [("sequence", "accuracy"), ("token", "f1")])
def test_per_trial_rows_name_the_tasks_metric(task, score):
    rows = per_trial([trial(score, 0.8, 0.5), trial(score, 0.9, 2.0)], task)
    assert [r[f"validation_full_{score}"] for r in rows] == [0.8, 0.9]
    assert [r[f"eval_full_{score}"] for r in rows] == pytest.approx([0.79, 0.89])
    assert threshold_rate([trial(score, 0.8, 0.5), trial(score, 0.9, 2.0)]) == 500  # the slowest trial's rate


@pytest.mark.parametrize(("score", "speed", "task"), [("accuracy", "layer_speedup", "sequence"),
                                                      ("f1", "flops_speedup", "token")])
def test_the_pareto_plot_is_written_for_both_tasks(tmp_path, score, speed, task):
    points = [{"policy": "entropy", score: 0.9 - 0.05 * i, speed: 1.0 + i} for i in range(4)]
    summary = {"candidates": points, "front": points[:3], "chosen": points[1], "default": points[2],
               f"best_full_eval_{score}": 0.9, "max_drop": 0.01}
    path = plot_pareto(summary, tmp_path / "pareto.png", task)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def searched_trial(validation_full: float, eval_full: float, points: list[tuple[float, float, float]]) -> dict:
    """A finished sequence trial whose front holds (validation accuracy, speed-up, drop bound) points."""
    return {
        "trial_id": f"t{validation_full}",
        "params": {},
        "settings": {"gamma": 0.9, "temperature": 3.0, "lr": 1e-4},
        "validation_exit_accuracy": [0.5, validation_full],
        "eval_exit_accuracy": [0.5, eval_full],
        "front": [
            {"policy": "entropy", "thresholds": 0.1 * (i + 1),
             "validation": {"accuracy": acc, "layer_speedup": speed, "drop_bound": bound},
             "eval": {"accuracy": acc - 0.02, "layer_speedup": speed}}
            for i, (acc, speed, bound) in enumerate(points)
        ],
    }


def test_choose_takes_the_fastest_point_whose_bounded_accuracy_is_within_the_drop():
    trials = [searched_trial(0.90, 0.88, [(0.905, 2.0, 0.005), (0.91, 1.5, 0.0)]),
              searched_trial(0.85, 0.84, [(0.86, 3.0, 0.0)])]
    summary = choose(trials, SimpleNamespace(max_drop=0.01), None)
    assert summary["reference_validation_accuracy"] == 0.90
    assert (summary["chosen"]["trial"], summary["chosen"]["layer_speedup"]) == (0, 2.0)  # 0.90 - 0.005 >= 0.89


def test_choose_falls_back_to_the_best_trial_at_full_depth_when_no_point_is_surely_within(caplog):
    # Every early-exit point's confidence bound is wider than the drop: nothing is surely within 1 point.
    trials = [searched_trial(0.85, 0.84, [(0.86, 3.0, 0.05)]),
              searched_trial(0.90, 0.88, [(0.91, 2.0, 0.04), (0.905, 1.5, 0.03)])]
    summary = choose(trials, SimpleNamespace(max_drop=0.01), None)
    chosen = summary["chosen"]
    assert (chosen["trial"], chosen["policy"], chosen["thresholds"]) == (1, "none", 0.0)
    assert (chosen["accuracy"], chosen["layer_speedup"]) == (0.88, 1.0)  # measured on eval at full depth
    assert chosen["validation"] == {"accuracy": 0.90, "layer_speedup": 1.0, "drop_bound": 0.0}
    assert chosen in summary["front"]
    assert ExitPolicy(chosen["policy"], chosen["thresholds"]) == FULL_DEPTH  # what write_results exports
    assert "full depth" in caplog.text
