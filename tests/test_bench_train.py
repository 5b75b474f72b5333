"""`rayexit bench train`'s bookkeeping and refusals (no Ray, no training)."""

from __future__ import annotations

import pytest
import torch

from rayexit.bench.common import use_threads
from rayexit.bench.train import STEP_VARIANTS, add_scaling_overhead
from rayexit.cli import main
from rayexit.config import TrainSettings


def test_overhead_is_measured_against_perfect_scaling_from_one_worker():
    throughput = {"1": {"workers": 1, "step_s": 0.8}, "2": {"workers": 2, "step_s": 0.5}}
    add_scaling_overhead(throughput)
    assert throughput["1"]["overhead_vs_perfect_scaling"] == 0
    assert throughput["2"]["overhead_vs_perfect_scaling"] == pytest.approx(0.25)  # 0.5 s where 0.4 s was ideal


def test_token_task_refuses_skip_ray_naming_the_flag(tmp_path, capsys):
    assert main(["bench", "train", "--task", "token", "--skip-ray", "--json", str(tmp_path / "t.json")]) == 2
    assert "--skip-ray" in capsys.readouterr().err


def test_step_time_variants_are_the_scopes_their_names_say():
    """Each variant is a change from the defaults; the paper's step must not drift with the default scope."""
    base = TrainSettings(method="romebert")
    built = {label: TrainSettings.from_dict({**base.to_dict(), **change}) for label, change in STEP_VARIANTS.items()}
    assert built["joint"].method == "joint"
    assert (built["romebert"].gr_scope, built["romebert"].gr_direction) == ("encoder", "reverse")
    assert built["romebert_no_projection"].gr_direction == "none"
    assert built["romebert_hidden"].gr_scope == "hidden"
    assert built["romebert_hidden_per_example"].gr_scope == "hidden_per_example"


@pytest.fixture
def torch_threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_option_sets_torchs_thread_count_and_none_leaves_it(torch_threads_restored):
    use_threads(1)
    assert torch.get_num_threads() == 1
    use_threads(2)  # a change on any machine, one core or many
    assert torch.get_num_threads() == 2
    use_threads(None)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bench", ["exit", "revalidate", "token", "train"])
def test_each_cpu_benchmark_refuses_fewer_than_one_thread_naming_the_flag(
    bench, tmp_path, capsys, torch_threads_restored
):
    before = torch.get_num_threads()
    given = {"exit": ["--json", "e.json"], "revalidate": ["--json", "e.json", "--work", "w", "--out", "o.json"],
             "token": ["--json", "t.json"], "train": ["--json", "t.json"]}[bench]
    assert main(["bench", bench, *given, "--threads", "0", "--datasets", str(tmp_path)]) == 2
    assert "--threads: got 0, expected a whole number >= 1" in capsys.readouterr().err
    assert torch.get_num_threads() == before and not list(tmp_path.iterdir())  # refused before any work
