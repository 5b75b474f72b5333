"""`rayexit bench train`'s bookkeeping and refusals (no Ray, no training)."""

from __future__ import annotations

import pytest

from rayexit.bench.train import add_scaling_overhead
from rayexit.cli import main


def test_overhead_is_measured_against_perfect_scaling_from_one_worker():
    throughput = {"1": {"workers": 1, "step_s": 0.8}, "2": {"workers": 2, "step_s": 0.5}}
    add_scaling_overhead(throughput)
    assert throughput["1"]["overhead_vs_perfect_scaling"] == 0
    assert throughput["2"]["overhead_vs_perfect_scaling"] == pytest.approx(0.25)  # 0.5 s where 0.4 s was ideal


def test_token_task_refuses_skip_ray_naming_the_flag(tmp_path, capsys):
    assert main(["bench", "train", "--task", "token", "--skip-ray", "--json", str(tmp_path / "t.json")]) == 2
    assert "--skip-ray" in capsys.readouterr().err
