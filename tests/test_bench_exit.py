"""`rayexit bench exit`: run order, resume, time-to-quality, the within-1-point choice and the targets."""

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_backbone

from rayexit.bench import exit as bench_exit
from rayexit.bench.exit_plot import plot_time_to_quality, quality_path
from rayexit.bench.exit_summary import (
    add_time_to_quality,
    crossing_order,
    format_target,
    judge,
    remaining_seconds,
    summarize,
    targets,
    time_to_quality,
)
from rayexit.bench.exit_training import snapshot_steps
from rayexit.cli import main
from rayexit.errors import RayexitError
from rayexit.policy import FULL_DEPTH, ExitPolicy
from rayexit.sweep import within_reference
from rayexit.tasks import Outcome, task_named


def test_run_order_is_seed_major_with_the_fine_tune_first_and_romebert_last():
    order = bench_exit.run_order(["romebert", "joint", "finetune", "deebert"], [2, 1])
    assert order == [
        (2, "finetune"), (2, "joint"), (2, "deebert"), (2, "romebert"),
        (1, "finetune"), (1, "joint"), (1, "deebert"), (1, "romebert"),
    ]


def test_snapshot_steps_are_one_stride_apart_and_end_at_the_last_step():
    assert snapshot_steps(1125, 8) == [141, 282, 423, 564, 705, 846, 987, 1125]
    assert snapshot_steps(3, 8) == [1, 2, 3]
    assert snapshot_steps(10, 3) == [4, 8, 10]


def snap(seconds: float, steps: int, accuracy: float) -> dict:
    return {"train_seconds": seconds, "steps_so_far": steps, "at_2x": {"accuracy": accuracy}}


def test_time_to_quality_is_the_first_snapshot_at_the_bar():
    history = [snap(10, 100, 0.70), snap(20, 200, 0.79), snap(30, 300, 0.81), snap(40, 400, 0.80)]
    reached = time_to_quality(history, 0.80)
    assert (reached["reached"], reached["seconds"], reached["steps"], reached["snapshot"]) == (True, 30, 300, 3)
    assert time_to_quality(history, 0.79)["seconds"] == 20  # equal to the bar counts
    missed = time_to_quality(history, 0.85)
    assert missed["reached"] is False and missed["seconds"] is None and missed["best"] == 0.81


def test_time_to_quality_keeps_the_last_look_under_the_bar():
    history = [snap(10, 100, 0.70), snap(20, 200, 0.79), snap(30, 300, 0.81)]
    assert time_to_quality(history, 0.80)["after_seconds"] == 20  # crossed in (20, 30]
    # reached at the first snapshot: the last look under the bar is where the stage began
    assert time_to_quality(history, 0.60, start_seconds=4)["after_seconds"] == 4
    assert "after_seconds" not in time_to_quality(history, 0.85)


def test_the_quality_plot_goes_beside_the_main_one_and_needs_snapshots(tmp_path):
    assert quality_path(tmp_path / "bench.png") == tmp_path / "bench-quality.png"
    no_snapshots = {"runs": {"finetune/seed1": {"method": "finetune", "seed": 1, "snapshots": []}}}
    assert plot_time_to_quality(no_snapshots, tmp_path / "q.png") is None and not (tmp_path / "q.png").exists()


def test_crossing_order_is_told_only_where_the_intervals_do_not_overlap():
    def ttq(after, seconds):
        return {"reached": True, "after_seconds": after, "seconds": seconds}

    assert crossing_order(ttq(0, 100), ttq(120, 150)) == "sooner"
    assert crossing_order(ttq(0, 120), ttq(120, 150)) == "sooner"  # DeeBERT still under the bar at 120 s
    assert crossing_order(ttq(150, 200), ttq(120, 150)) == "later"
    assert crossing_order(ttq(857, 985), ttq(921, 953)) == "within_resolution"  # seed 4's pair


def test_time_to_quality_uses_the_seeds_deebert_final_2x_accuracy_and_its_clock_includes_stage_one():
    runs = {
        # DeeBERT's stage 1 took 100 s: its stage-2 snapshots start from there
        "deebert/seed1": {"method": "deebert", "seed": 1, "at_2x": {"accuracy": 0.80},
                          "snapshots": [snap(110, 60, 0.74), snap(120, 70, 0.80)]},
        "romebert/seed1": {"method": "romebert", "seed": 1, "at_2x": {"accuracy": 0.82},
                           "snapshots": [snap(30, 20, 0.78), snap(60, 40, 0.805), snap(90, 60, 0.82)]},
        "romebert/seed2": {"method": "romebert", "seed": 2, "at_2x": {"accuracy": 0.82},
                           "snapshots": [snap(30, 20, 0.9)]},  # no DeeBERT of seed 2: no bar
    }
    add_time_to_quality(runs)
    assert runs["deebert/seed1"]["time_to_quality"]["seconds"] == 120
    assert runs["deebert/seed1"]["time_to_quality"]["after_seconds"] == 110
    assert runs["romebert/seed1"]["time_to_quality"] == pytest.approx(
        {"bar": 0.80, "reached": True, "seconds": 60, "steps": 40, "after_seconds": 30, "snapshot": 2, "of": 3})
    assert "time_to_quality" not in runs["romebert/seed2"]
    (target,) = [t for t in targets(runs) if t["target"] == "time_to_quality_vs_deebert"]
    assert target["margins"] == [60] and target["met"] is True and target["beyond_spread"] is None
    assert target["order"] == ["sooner"]  # 60 s, while DeeBERT was still under the bar at 110 s
    assert format_target(target).endswith("; by the snapshots: sooner")


def test_a_stage_twos_first_snapshot_crossing_counts_from_where_stage_two_began():
    runs = {
        "deebert/seed1": {"method": "deebert", "seed": 1, "at_2x": {"accuracy": 0.80}, "stage_seconds": [100, 20],
                          "snapshots": [snap(110, 60, 0.80), snap(120, 70, 0.80)]},
        "romebert/seed1": {"method": "romebert", "seed": 1, "at_2x": {"accuracy": 0.82}, "stage_seconds": [115],
                           "snapshots": [snap(60, 40, 0.79), snap(115, 80, 0.81)]},
    }
    add_time_to_quality(runs)
    assert runs["deebert/seed1"]["time_to_quality"]["after_seconds"] == 100  # stage 1's end
    assert runs["romebert/seed1"]["time_to_quality"]["after_seconds"] == 60
    (target,) = [t for t in targets(runs) if t["target"] == "time_to_quality_vs_deebert"]
    assert target["margins"] == [-5] and target["order"] == ["within_resolution"]


def outcome(score: float, speedup: float, kind: str = "entropy", threshold: float = 0.1) -> Outcome:
    return Outcome(ExitPolicy(kind, threshold), torch.ones(4, 1), score, speedup, speedup)


def test_within_one_point_of_the_fine_tune_is_the_fastest_point_at_or_above_the_bar():
    task = task_named("sequence")
    full = Outcome(FULL_DEPTH, torch.ones(4, 1), 0.905, 1.0, 1.0)
    points = [outcome(0.895, 1.5, threshold=0.1), outcome(0.889, 2.5, threshold=0.2),
              outcome(0.890, 2.0, threshold=0.3), outcome(0.893, 2.0, threshold=0.4), outcome(0.88, 3.0)]
    # fine-tune validation 0.90, 1 point: bar 0.89; 0.889 at 2.5x misses it, two points tie at 2.0x
    choice = within_reference(task, full, points, reference=0.90, max_drop=0.01)
    assert choice.outcome is points[3]
    record = choice.record(task)
    assert record["full"] == 0.90 and record["drop"] == pytest.approx(0.007)
    # a stricter reference: only 1.5x is within; none at all: the model's own full depth stands in
    assert within_reference(task, full, points, 0.904, 0.01).outcome is points[0]
    fallback = within_reference(task, full, points, 0.95, 0.01)
    assert fallback.outcome is full and fallback.record(task)["drop"] == pytest.approx(0.045)


def test_judge_reports_the_margin_and_whether_it_exceeds_the_seeds_spread():
    clear = judge("t", "claim", [0.01, 0.02, 0.03], [1, 2, 3])
    assert clear["met"] and clear["mean_margin"] == pytest.approx(0.02) and clear["std"] == pytest.approx(0.01)
    assert clear["beyond_spread"] is True and clear["seeds_met"] == 3
    noisy = judge("t", "claim", [-0.01, 0.005, 0.002], [1, 2, 3])
    assert noisy["met"] is False and noisy["missed_by"] == pytest.approx(0.001) and noisy["beyond_spread"] is False
    unreached = judge("t", "claim", [0.1, None], [1, 2])
    assert unreached["met"] is False and unreached["seeds_met"] == 1


def run_figures(method: str, seed: int, full: float, exit1: float, at2: float, within: dict | None = None) -> dict:
    point = {"accuracy": at2, "layer_speedup": 2.0, "flops_speedup": 1.9, "wallclock_speedup": 1.7,
             "oracle_fraction": 0.6}
    figures = {"method": method, "seed": seed, "full": full, "exit_accuracy": [exit1, full], "train_seconds": 10.0,
               "oracle_layer_speedup": 3.0, "at_1.5x": point, "at_2x": point, "at_3x": point}
    if within is not None:
        figures["within_reference"] = within
    return figures


def test_targets_pair_seeds_and_say_by_how_much_a_target_is_missed():
    within = {"accuracy": 0.85, "layer_speedup": 2.4, "flops_speedup": 2.3, "wallclock_speedup": 1.5,
              "oracle_fraction": 0.8, "within": True}
    runs = {
        "finetune/seed1": {"method": "finetune", "seed": 1, "full": 0.870, "single_exit": True},
        "finetune/seed2": {"method": "finetune", "seed": 2, "full": 0.860, "single_exit": True},
        "deebert/seed1": run_figures("deebert", 1, 0.870, 0.70, 0.84),
        "deebert/seed2": run_figures("deebert", 2, 0.860, 0.72, 0.83),
        "romebert/seed1": run_figures("romebert", 1, 0.860, 0.75, 0.85, within),
        "romebert/seed2": run_figures("romebert", 2, 0.862, 0.74, 0.84, dict(within, within=False)),
    }
    by_name = {t["target"]: t for t in targets(runs)}
    full = by_name["full_vs_finetune"]  # -0.01 + 0.005 and +0.002 + 0.005
    assert full["margins"] == pytest.approx([-0.005, 0.007]) and full["met"] is True
    exit1 = by_name["exit1_vs_deebert"]  # +0.05 - 0.03 and +0.02 - 0.03
    assert exit1["margins"] == pytest.approx([0.02, -0.01]) and exit1["mean_margin"] == pytest.approx(0.005)
    assert by_name["at_2x_vs_deebert"]["margins"] == pytest.approx([0.01, 0.01])
    assert by_name["at_1.5x_vs_deebert"]["margins"] == pytest.approx([0.01, 0.01])  # a key with a dot in it
    assert by_name["at_2x_vs_pabee"]["met"] is None  # no PABEE runs
    clock = by_name["within_finetune_wallclock_speedup"]  # seed 2's point is not within 1 point: no figure
    assert clock["margins"][0] == pytest.approx(-0.3) and clock["margins"][1] is None and clock["met"] is False
    summary = summarize(runs)
    assert summary["romebert"]["exit1"]["mean"] == pytest.approx(0.745)
    assert summary["romebert"]["within_reference.within_on_validation"] == {"seeds": 1, "n": 2}
    assert "exit1" not in summary["finetune"] and summary["finetune"]["full"]["max"] == 0.870


def test_remaining_time_is_measured_step_time_times_steps_plus_measured_overhead():
    runs = {"joint/seed1": {"method": "joint", "seed": 1, "stage_steps": [100], "stage_seconds": [50.0],
                            "train_seconds": 50.0, "wall_seconds": 70.0}}
    # joint: 0.5 s/step x 200 + 20 s; romebert unmeasured borrows the mean rate: 0.5 x 100 + 20 s
    assert remaining_seconds([("joint", [200]), ("romebert", [100])], runs) == pytest.approx(190.0)
    now = {"method": "romebert", "rate": 1.0, "steps_left": 30}
    assert remaining_seconds([], runs, now) == pytest.approx(30.0 + 20.0)
    assert remaining_seconds([("joint", [200])], {}) is None  # nothing measured: no made-up estimate


def test_remaining_time_prefers_step_times_measured_on_a_quiet_machine():
    shared = {"method": "joint", "seed": 1, "stage_steps": [100], "stage_seconds": [150.0], "train_seconds": 150.0,
              "wall_seconds": 150.0, "training_cpu": {"shared_cpu": True}}
    quiet = {**shared, "seed": 2, "stage_seconds": [50.0], "train_seconds": 50.0, "wall_seconds": 50.0,
             "training_cpu": {"shared_cpu": False}}
    # alone, the shared run is all there is (1.5 s/step); beside a quiet run, only the quiet one counts
    assert remaining_seconds([("joint", [100])], {"joint/seed1": shared}) == pytest.approx(150.0)
    assert remaining_seconds([("joint", [100])], {"joint/seed1": shared, "joint/seed2": quiet}) == pytest.approx(50.0)


# -- end to end on a tiny encoder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory, minilm_tokenizer, datasets_dir):
    root = tmp_path_factory.mktemp("bench-exit")
    encoder = root / "encoder"
    tiny_backbone(layers=3).save_pretrained(encoder)
    minilm_tokenizer.save_pretrained(encoder)
    sst2 = root / "datasets" / "sst2"
    sst2.mkdir(parents=True)
    train = (datasets_dir / "sst2" / "train.tsv").read_text().splitlines()
    dev = (datasets_dir / "sst2" / "dev.tsv").read_text().splitlines()
    (sst2 / "train.tsv").write_text("\n".join(train[:400]) + "\n")
    (sst2 / "dev.tsv").write_text("\n".join(dev[:41]) + "\n")
    return root, encoder


def bench_args(root, encoder, **changes) -> list[str]:
    options = {"--json": root / "out.json", "--datasets": root / "datasets", "--model": encoder,
               "--train-examples": 100, "--epochs": 1, "--methods": "joint,finetune,deebert", "--seeds": 1,
               "--snapshots": 2, "--repeats": 1, "--work": root / "work", **changes}
    return ["bench", "exit", *[str(x) for pair in options.items() for x in pair]]


def test_bench_runs_every_method_and_resumes_without_rerunning(bench_inputs, monkeypatch, capsys):
    root, encoder = bench_inputs
    assert main(bench_args(root, encoder)) == 0
    out = json.loads((root / "out.json").read_text())
    assert list(out["runs"]) == ["finetune/seed1", "joint/seed1", "deebert/seed1"]  # the fine-tune first
    finetune, joint, deebert = (out["runs"][k] for k in out["runs"])
    assert finetune["single_exit"] and "exit_accuracy" not in finetune and not finetune["snapshots"]
    # 90 fit examples at batch 32: 3 steps; snapshots every 2nd step and at the last
    assert [s["step"] for s in joint["snapshots"]] == [2, 3]
    assert joint["within_reference"]["reference_validation"] == finetune["validation_full"]
    assert isinstance(joint["within_reference"]["within"], bool)
    assert joint["within_reference"]["oracle_fraction"] == pytest.approx(
        joint["within_reference"]["layer_speedup"] / joint["oracle_layer_speedup"])
    # DeeBERT starts stage 2 from the fine-tune and its clock counts the fine-tune's seconds
    assert deebert["stage1_from"] == "finetune/seed1" and deebert["stage_steps"] == [3, 3]
    assert deebert["stage_seconds"][0] == finetune["train_seconds"]
    assert deebert["train_seconds"] >= finetune["train_seconds"]
    assert [s["steps_so_far"] for s in deebert["snapshots"]] == [5, 6]
    assert all(s["train_seconds"] > finetune["train_seconds"] for s in deebert["snapshots"])
    assert deebert["time_to_quality"]["reached"]  # its own final 2x accuracy, by the last snapshot
    assert out["summary"]["joint"]["full"]["n"] == 1 and out["targets"]
    for run in (finetune, joint, deebert):  # how much of the CPU the training had, beside its seconds
        cpu = run["training_cpu"]
        assert 0 < cpu["cpu_share"] and cpu["torch_threads"] >= 1 and isinstance(cpu["shared_cpu"], bool)
    assert (root / "out.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "out-quality.png").read_bytes()[:4] == b"\x89PNG"  # time-to-quality, one panel per seed
    assert deebert["time_to_quality"]["after_seconds"] == deebert["stage_seconds"][0]  # stage 2's start
    printed = capsys.readouterr().out
    assert "method" in printed and any(tag in printed for tag in ("[MISS]", "[MET ]", "[ ? ]"))

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was measured again")

    monkeypatch.setattr(bench_exit, "measure_run", refuse)
    assert main(bench_args(root, encoder)) == 0
    assert capsys.readouterr().out.count("already measured, skipped") == 3
    assert json.loads((root / "out.json").read_text())["runs"] == out["runs"]

    # an interrupted run (its snapshots under in_progress, no record) is measured again from the start
    interrupted = dict(out)
    interrupted["runs"] = {k: v for k, v in out["runs"].items() if k != "deebert/seed1"}
    interrupted["in_progress"] = {"run": "deebert/seed1", "snapshots": [deebert["snapshots"][0]]}
    (root / "out.json").write_text(json.dumps(interrupted))
    measured = []
    monkeypatch.setattr(bench_exit, "measure_run", lambda args, task, output, seed, method, *rest: (
        measured.append((seed, method)) or dict(deebert)))
    assert main(bench_args(root, encoder)) == 0
    assert measured == [(1, "deebert")]
    again = json.loads((root / "out.json").read_text())
    assert "in_progress" not in again and list(again["runs"]) == list(out["runs"])


def test_bench_refuses_to_mix_budgets_in_one_json(bench_inputs, capsys):
    root, encoder = bench_inputs
    (root / "other.json").write_text(json.dumps({"benchmark": "exit", "runs": {}, "train_slice": "something else"}))
    assert main(bench_args(root, encoder, **{"--json": root / "other.json"})) == 2
    assert "train_slice" in capsys.readouterr().err
    assert main(bench_args(root, encoder, **{"--json": root / "x.json", "--methods": "joint,tokee"})) == 2
    assert "--methods" in capsys.readouterr().err


def test_a_json_written_before_a_setting_existed_resumes_only_at_the_value_it_had_then(tmp_path):
    defaults = bench_exit.bench_settings(None, 2.0).to_dict()
    assert defaults["final_weight"] == 3.0  # today's default; runs before the setting existed had 1
    fresh = {"benchmark": "exit", "runs": {}, "train_slice": "s", "validation": "v", "model": "m",
             "snapshots": 8, "max_drop": 0.01, "settings": dict(defaults, final_weight=1.0)}
    older = dict(fresh, runs={"joint/seed1": {"full": 0.9}})
    older["settings"] = {k: v for k, v in fresh["settings"].items() if k not in ("final_weight", "exit_weights")}
    (tmp_path / "old.json").write_text(json.dumps(older))
    assert bench_exit.resume(tmp_path / "old.json", fresh)["runs"] == {"joint/seed1": {"full": 0.9}}
    with pytest.raises(RayexitError, match="settings"):
        bench_exit.resume(tmp_path / "old.json", dict(fresh, settings=defaults))
    with pytest.raises(RayexitError, match="settings"):  # made with uniform inner exits, as the paper's loss
        bench_exit.resume(tmp_path / "old.json", dict(fresh, settings=dict(fresh["settings"], exit_weights="depth")))


def test_snapshots_leave_training_unchanged_and_stay_off_its_clock(monkeypatch):
    """A snapshot switches the model to eval mode and costs time; neither may leak into training."""
    import time

    from conftest import tiny_sequence_model
    from test_finetune import encoded_pairs

    from rayexit.bench import exit_training
    from rayexit.config import TrainSettings
    from rayexit.train.loop import train_model

    data, task = encoded_pairs(16), task_named("sequence")
    settings = TrainSettings(method="joint", epochs=2, batch_size=4, lr=1e-3, seed=4)
    plain = tiny_sequence_model(layers=3, seed=2)
    train_model(plain, data, settings, show_progress=False)

    real = exit_training.evaluate_snapshot

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(exit_training, "evaluate_snapshot", slow)
    snapped = tiny_sequence_model(layers=3, seed=2)
    run = exit_training.train_with_snapshots(task, snapped, data, settings, data, data, count=3, batch_size=8,
                                             show_progress=False)
    assert [s["step"] for s in run.snapshots] == [3, 6, 8]  # 4 steps an epoch, 2 epochs: stride 3, and the last
    assert run.eval_seconds >= 0.9
    assert run.train_seconds == pytest.approx(run.result.seconds - run.eval_seconds)
    assert run.snapshots[-1]["train_seconds"] < run.result.seconds - 0.9
    assert [s["train_seconds"] for s in run.snapshots] == sorted(s["train_seconds"] for s in run.snapshots)
    for a, b in zip(plain.parameters(), snapped.parameters()):
        assert torch.equal(a, b)


def test_a_config_file_wins_over_the_benchmarks_own_defaults(tmp_path):
    from rayexit.bench.exit import BENCH_DEFAULTS, bench_settings

    config = tmp_path / "variant.yaml"
    config.write_text("train:\n  lr: 5.0e-5\n  max_length: 128\n  gr_direction: final\n")
    settings = bench_settings(str(config), 2.0)
    assert (settings.lr, settings.max_length, settings.gr_direction, settings.epochs) == (5e-5, 128, "final", 2.0)
    assert settings.head_lr == BENCH_DEFAULTS["head_lr"] and settings.pooling == BENCH_DEFAULTS["pooling"]
    plain = bench_settings(None, 1.0)
    assert (plain.lr, plain.max_length, plain.epochs) == (BENCH_DEFAULTS["lr"], BENCH_DEFAULTS["max_length"], 1.0)


def test_choosing_on_disjoint_lines_trains_on_the_whole_slice_and_chooses_on_lines_after_it(bench_inputs, capsys):
    from rayexit.bench.disjoint import disjoint_validation

    root, encoder = bench_inputs
    out_json = root / "disjoint.json"
    disjoint = {"--json": out_json, "--work": root / "work-disjoint", "--choose-on": "disjoint"}
    assert main(bench_args(root, encoder, **disjoint, **{"--methods": "finetune,joint"})) == 0
    out = json.loads(out_json.read_text())
    lines = disjoint_validation(task_named("sequence").load(str(root / "datasets" / "sst2" / "train.tsv")), 100)
    assert out["validation"].startswith(f"{len(lines)} train.tsv lines after the slice")
    for run in out["runs"].values():
        assert run["train_examples"] == 100  # nothing carved out of the slice
        assert run["validation_examples"] == len(lines)
    fitted = (root / "work-disjoint" / "seed1" / "fit.tsv").read_text().splitlines()
    assert not {line.split("\t")[0] for line in fitted} & set(lines.texts)
    # one JSON, one protocol: a carved run cannot join it, and nothing is carved with disjoint
    assert main(bench_args(root, encoder, **{**disjoint, "--choose-on": "carved"})) == 2
    assert "validation" in capsys.readouterr().err
    assert main(bench_args(root, encoder, **disjoint, **{"--valid-fraction": 0.2})) == 2
    assert "--valid-fraction" in capsys.readouterr().err


def test_the_cpu_meter_is_cpu_seconds_per_wall_second_per_thread(monkeypatch):
    from rayexit.bench import common

    clocks = {"wall": 100.0, "cpu": 10.0}
    monkeypatch.setattr(common.time, "perf_counter", lambda: clocks["wall"])
    monkeypatch.setattr(common.time, "process_time", lambda: clocks["cpu"])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    meter = common.CpuMeter()
    clocks.update(wall=110.0, cpu=28.0)  # 18 CPU seconds in 10 s on 2 threads: the cores were ours
    quiet = meter.figures()
    assert quiet["cpu_share"] == pytest.approx(0.9) and not quiet["shared_cpu"]
    clocks.update(wall=130.0, cpu=38.0)  # 28 CPU seconds in 30 s: something else had half of them
    shared = meter.figures()
    assert shared["cpu_share"] == pytest.approx(28 / 30 / 2, abs=1e-3) and shared["shared_cpu"]


def test_a_sleeping_span_reads_as_not_having_the_cpu():
    from rayexit.bench.common import CpuMeter

    meter = CpuMeter()
    time.sleep(0.3)  # what a starved process sees: wall-clock passing with little CPU time of its own
    assert meter.figures()["cpu_share"] < 0.1 and meter.figures()["shared_cpu"]


def test_a_run_that_shared_the_cpu_says_so_and_older_runs_say_nothing():
    quiet = {"training_cpu": {"cpu_share": 0.93, "torch_threads": 2, "shared_cpu": False}}
    shared = {"training_cpu": {"cpu_share": 0.41, "torch_threads": 2, "shared_cpu": True}}
    assert bench_exit.shared_cpu_note(quiet) == "" and bench_exit.shared_cpu_note({}) == ""
    assert "41% of 2 threads" in bench_exit.shared_cpu_note(shared)


@pytest.mark.parametrize("name,config", [
    ("bench-exit-sst2-20k-attention.json", None),  # today's defaults: attention pooling
    ("bench-exit-sst2-20k-5seeds.json", "train:\n  pooling: mean\n"),  # the README's former table
])
def test_the_committed_benchmarks_resume_with_todays_settings(tmp_path, name, config):
    # Seeds still to run go into these JSONs: a change of a default (e.g. `policy` becoming None,
    # chosen per task) must not make today's settings differ from the ones their runs had.
    committed = Path(__file__).parent.parent / "docs" / "results" / name
    stored = json.loads(committed.read_text())
    path = None
    if config:
        path = tmp_path / "variant.yaml"
        path.write_text(config)
    today = bench_exit.bench_settings(str(path) if path else None, 2.0).to_dict()
    fresh = {key: stored[key] for key in bench_exit.PROTOCOL_KEYS if key != "settings"}
    fresh.update(benchmark="exit", runs={}, settings=today)
    (tmp_path / "copy.json").write_text(committed.read_text())
    assert bench_exit.resume(tmp_path / "copy.json", fresh)["runs"].keys() == stored["runs"].keys()
    assert today["policy"] == {"kind": "entropy", "thresholds": 0.1}
