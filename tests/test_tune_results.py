"""The report pieces both searches share (tune/results.py), on constructed trials: no Ray, no model."""

from __future__ import annotations

import pytest

from rayexit.tune.results import per_trial, plot_pareto, threshold_rate


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
