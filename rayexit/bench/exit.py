"""`rayexit bench exit`: RomeBERT against DeeBERT, PABEE, joint training and the plain single-exit
fine-tune, at one budget, over several seeds, on SST-2.

The protocol (DESIGN.md, "Measuring honestly"): every run of a seed trains on the same SST-2
train slice less a validation split carved from it (stratified, seeded by the seed), every
policy is chosen on that validation split (`rayexit.sweep`), and every figure is reported on
the whole SST-2 dev set (872), which nothing is chosen on. With `--choose-on disjoint` the whole
slice is trained on and every choice is made on the train.tsv lines after it that share no text
with it (`rayexit.bench.disjoint`): the carved split shares phrases with the lines trained on.
Wall-clock speed-ups are medians of interleaved rounds against full depth through the same
runner at batch 32, with min and max.

Per seed the fine-tune runs first (its validation accuracy is the bar of the "within 1 point of
the fine-tune" point, and its weights are DeeBERT's stage 1: same step, parameters, seed and
schedule, so DeeBERT starts its stage 2 from them and counts their training seconds), then the
others, RomeBERT last. During training, evenly spaced snapshots (one replay of validation and
test each, untimed, kept off the training clock) give time-to-quality: the training seconds a
method needed to reach its seed's DeeBERT final 2x-point accuracy.

The JSON is rewritten after every run (and at every snapshot, under `in_progress`); a run
started again with the same --json skips the runs it holds and restarts an interrupted one from
its beginning. The summary, targets, table and plot are recomputed from the runs each time.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from rayexit.bench.common import CpuMeter, add_threads_option, datasets_dir, machine_info, use_threads
from rayexit.bench.exit_plot import quality_path
from rayexit.bench.exit_summary import (
    POINTS,
    REFERENCE,
    add_time_to_quality,
    clock,
    format_table,
    remaining_seconds,
    summarize,
    targets,
)
from rayexit.config import TrainSettings, train_settings
from rayexit.errors import RayexitError
from rayexit.files import write_json

SENTENCE_METHODS = ("finetune", "deebert", "pabee", "joint", "romebert")
# `pooling`: attention since seed 4 of docs/results/bench-exit-sst2-20k-attention.json (the JSONs
# made with the mean resume with `train: {pooling: mean}` in --config). `policy`: the sentence
# task's own default, spelled out so that JSONs written before the setting's default became None
# (chosen per task) still resume with the same settings.
BENCH_DEFAULTS = {"lr": 1e-4, "head_lr": 1e-3, "pooling": "attention", "max_length": 64, "batch_size": 32,
                  "policy": {"kind": "entropy", "thresholds": 0.1}}
SPEEDUPS = (1.5, 2.0, 3.0)
CHOOSE_ON = ("carved", "disjoint")
# What the runs of one JSON must share; a rerun with other values would mix budgets in one table.
PROTOCOL_KEYS = ("train_slice", "validation", "model", "settings", "snapshots", "max_drop")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exit", help="romebert vs deebert, pabee, joint and a single-exit fine-tune on SST-2")
    p.add_argument("--json", required=True, help="where to write the figures (resumed if it exists)")
    p.add_argument("--plot", help="PNG of test accuracy against layer speed-up (default: beside --json)")
    p.add_argument("--datasets", help="the shared datasets folder (default ../shared/datasets)")
    p.add_argument("--model", default="minilm", help="encoder (default: the packaged MiniLM)")
    p.add_argument("--train-examples", type=int, default=20000, help="first N lines of SST-2 train.tsv (of 67,349)")
    p.add_argument(
        "--choose-on", choices=CHOOSE_ON, default="carved",
        help="carved: a validation split carved from the train slice (the issue's protocol); disjoint: the "
             "train.tsv lines after the slice sharing no 5-word run with it, the whole slice trained on",
    )
    p.add_argument("--valid-fraction", type=float, help="validation carved from the train slice (default 0.1)")
    p.add_argument("--epochs", type=float, default=2.0, help="epochs per stage (DeeBERT has two stages)")
    p.add_argument("--methods", default=",".join(SENTENCE_METHODS), help="comma-separated methods to compare")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (training and validation split)")
    p.add_argument("--config", help="YAML with shared training settings (its `train:` section)")
    p.add_argument("--snapshots", type=int, default=8, help="evaluations during training, for time-to-quality")
    p.add_argument(
        "--reuse-finetune", action=argparse.BooleanOptionalAction, default=True,
        help="start DeeBERT's stage 2 from the same seed's fine-tune (its stage 1), counting its seconds",
    )
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size for wall-clock")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median kept)")
    p.add_argument("--max-drop", type=float, default=0.01, help="accuracy budget below full depth / the fine-tune")
    p.add_argument("--work", default="runs/bench-exit", help="folder for the split and the model directories")
    add_threads_option(p)
    p.set_defaults(func=run)


def run_order(methods: list[str], seeds: list[int]) -> list[tuple[int, str]]:
    """Seed-major; within a seed the fine-tune first (the others need it), RomeBERT last."""
    rank = {"finetune": 0, "romebert": 2}
    ordered = sorted(dict.fromkeys(methods), key=lambda m: rank.get(m, 1))  # stable: the rest as given
    return [(seed, method) for seed in dict.fromkeys(seeds) for method in ordered]


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SENTENCE_METHODS]
    if unknown or not methods:
        raise RayexitError(f"--methods: got {text!r}, expected some of {', '.join(SENTENCE_METHODS)}")
    return methods


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RayexitError(f"--seeds: got {text!r}, expected comma-separated whole numbers") from None
    if not seeds:
        raise RayexitError(f"--seeds: got {text!r}, expected at least one seed")
    return seeds


def bench_settings(config: str | None, epochs: float) -> TrainSettings:
    """The benchmark's defaults under the YAML's `train:` section: what the YAML sets wins, `--epochs` on top."""
    from rayexit.config import _train_section, load_yaml

    from_yaml = _train_section(config, load_yaml(config)) if config else {}
    return train_settings(None, {**BENCH_DEFAULTS, **from_yaml, "epochs": epochs})


def run(args: argparse.Namespace) -> int:
    from rayexit.tasks import task_named
    from rayexit.tune.split import write_tsv

    use_threads(args.threads)

    methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    for name in ("train_examples", "snapshots", "repeats", "batch_size"):
        if getattr(args, name) < (0 if name == "snapshots" else 1):
            raise RayexitError(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected a whole number >= 1")
    task = task_named("sequence")
    sst2 = datasets_dir(args.datasets) / "sst2"
    work = Path(args.work)
    base = bench_settings(args.config, args.epochs)
    examples = task.load(str(sst2 / "train.tsv"), args.train_examples)
    disjoint, validation = validation_source(args, task, sst2)
    fresh = {
        "benchmark": "exit",
        "train_slice": f"SST-2 train.tsv, first {args.train_examples} examples",
        "validation": validation,
        "test_set": "SST-2 dev.tsv, all 872 examples (nothing is chosen on it)",
        "model": args.model,
        "settings": base.to_dict(),
        "snapshots": args.snapshots,
        "max_drop": args.max_drop,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "machine": machine_info(),
        "runs": {},
    }
    output = resume(args.json, fresh)
    plot_path = Path(args.plot) if args.plot else Path(args.json).with_suffix(".png")
    order = run_order(methods, seeds)
    splits: dict[int, tuple] = {}
    started = time.perf_counter()
    for index, (seed, method) in enumerate(order):
        key = f"{method}/seed{seed}"
        if key in output["runs"]:
            print(f"== {key}: already measured, skipped", flush=True)
            continue
        if seed not in splits:
            carved = disjoint is None
            fit, valid = task.split(examples, args.valid_fraction, seed) if carved else (examples, disjoint)
            splits[seed] = (fit, valid, write_tsv(fit, work / f"seed{seed}" / "fit.tsv"))
        fit, valid, fit_path = splits[seed]
        pending = [(m, planned_steps(m, s, len(fit), base, order, args.reuse_finetune)) for s, m in order[index + 1:]
                   if f"{m}/seed{s}" not in output["runs"]]
        left = remaining_seconds([(method, planned_steps(method, seed, len(fit), base, order, args.reuse_finetune)),
                                  *pending], output["runs"])
        print(f"== {key} ({index + 1}/{len(order)}): training on {len(fit)} examples, choosing on {len(valid)}; "
              f"benchmark time left ~{clock(left)} (measured step times x remaining steps)", flush=True)
        figures = measure_run(args, task, output, seed, method, fit_path, valid, sst2, work, base, pending)
        output.pop("in_progress", None)
        output["runs"][key] = figures
        refresh(output)
        write_json(args.json, output)
        write_plot(output, plot_path)
        print(format_run(key, figures), flush=True)
    refresh(output)
    write_json(args.json, output)
    write_plot(output, plot_path)
    print(format_table(output))
    print(f"figures -> {args.json}; plots -> {plot_path}, {quality_path(plot_path).name} "
          f"({time.perf_counter() - started:.0f}s this session)")
    return 0


def validation_source(args: argparse.Namespace, task, sst2: Path):
    """(the disjoint validation lines or None, the protocol's description of what is chosen on)."""
    from rayexit.bench.disjoint import MIN_WORDS, NGRAM, disjoint_validation

    if args.choose_on == "carved":
        args.valid_fraction = 0.1 if args.valid_fraction is None else args.valid_fraction
        if not 0 < args.valid_fraction < 1:
            raise RayexitError(f"--valid-fraction: got {args.valid_fraction}, expected a fraction between 0 and 1")
        return None, f"{args.valid_fraction:g} of the train slice, stratified by label, seeded by the run's seed"
    if args.valid_fraction is not None:
        raise RayexitError("--valid-fraction carves validation from the slice; with --choose-on disjoint "
                           "nothing is carved (the whole slice is trained on): leave it out")
    lines = disjoint_validation(task.load(str(sst2 / "train.tsv")), args.train_examples)
    return lines, (f"{len(lines)} train.tsv lines after the slice with {MIN_WORDS}+ words sharing no "
                   f"{NGRAM}-word run with it; the whole slice is trained on")


def resume(path: str, fresh: dict) -> dict:
    """The JSON's runs when it exists and was made with the same protocol; else `fresh`."""
    path = Path(path)
    if not path.is_file():
        return fresh
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RayexitError(f"{path}: unreadable benchmark JSON ({exc}); pass a new --json") from None
    if not isinstance(data, dict) or data.get("benchmark") != "exit" or not isinstance(data.get("runs"), dict):
        raise RayexitError(f"{path}: not a `rayexit bench exit` JSON; pass a new --json")
    if isinstance(data.get("settings"), dict):
        data["settings"] = with_added_settings(data["settings"])
    for key in PROTOCOL_KEYS:
        if data.get(key) != fresh[key]:
            raise RayexitError(
                f"{path}: its runs were made with {key} {data.get(key)!r}, this run asks for {fresh[key]!r}; "
                "pass the same options to resume, or a new --json"
            )
    data.pop("in_progress", None)  # an interrupted run starts again from its beginning
    return data


# Settings added after benchmark JSONs were written, with the value every run had before the
# setting existed (not today's default: `final_weight` was 1 until it became a setting).
ADDED_SETTINGS = {"final_weight": 1.0, "exit_weights": "uniform", "final_only_warmup": 0.0, "exit_grad_scale": 1.0}


def with_added_settings(stored: dict) -> dict:
    """`stored` settings plus, for every setting added since they were written, the value it had.

    A JSON made before `final_weight` existed was made at 1, so it resumes only with a run that
    asks for 1.
    """
    return {**{key: value for key, value in ADDED_SETTINGS.items() if key not in stored}, **stored}


def planned_steps(method: str, seed: int, fit_size: int, base: TrainSettings, order, reuse: bool) -> list[int]:
    """Optimizer steps per stage a run will train (DeeBERT's stage 1 is 0 when it comes from the fine-tune)."""
    per_epoch = math.ceil(fit_size / base.batch_size)
    first = max(1, math.ceil(base.epochs * per_epoch))
    if method != "deebert":
        return [first]
    second = max(1, math.ceil((base.deebert_stage2_epochs or base.epochs) * per_epoch))
    from_finetune = reuse and (seed, REFERENCE) in order
    return [0 if from_finetune else first, second]


def measure_run(args, task, output: dict, seed: int, method: str, fit_path, valid, sst2: Path, work: Path,
                base: TrainSettings, pending: list) -> dict:
    """Train one (method, seed) with snapshots, save its model directory, and measure it."""
    from rayexit.bench.exit_training import train_with_snapshots
    from rayexit.model_dir import load_weights
    from rayexit.train.recipe import prepare, save_run

    key = f"{method}/seed{seed}"
    settings = TrainSettings.from_dict({**base.to_dict(), "method": method, "seed": seed})
    wall = time.perf_counter()
    prepared = prepare(args.model, str(fit_path), None, settings)
    model, tokenizer = prepared.model, prepared.tokenizer
    valid_data = task.encode(tokenizer, valid, model.labels, settings.max_length)
    test_examples = task.load(str(sst2 / "dev.tsv"), known=model.labels)
    test_data = task.encode(tokenizer, test_examples, model.labels, settings.max_length)
    start_stage, before, stage1_from = 0, 0.0, None
    finetune = output["runs"].get(f"{REFERENCE}/seed{seed}")
    finetune_dir = work / f"seed{seed}" / REFERENCE
    if method == "deebert" and args.reuse_finetune and finetune and (finetune_dir / "model.safetensors").is_file():
        load_weights(model, finetune_dir)  # DeeBERT's stage 1 is this fine-tune, step for step
        start_stage, before, stage1_from = 1, finetune["train_seconds"], f"{REFERENCE}/seed{seed}"
        print(f"   stage 1 from {stage1_from} ({before:.0f}s of training, counted)", flush=True)
    count = 0 if method == REFERENCE else args.snapshots

    def on_snapshot(snapshot: dict, progress) -> None:
        last = len(progress.stage_steps) - 1
        rate = (snapshot["train_seconds"] - sum(progress.stage_seconds[:last])) / max(snapshot["step"], 1)
        steps_left = snapshot["steps"] - snapshot["step"]
        left = remaining_seconds(pending, output["runs"], {"method": method, "rate": rate, "steps_left": steps_left})
        print(
            f"   {key} snapshot {len(progress.snapshots)}: step {snapshot['step']}/{snapshot['steps']} "
            f"({rate:.2f}s/step), train {snapshot['train_seconds']:.0f}s: full {snapshot['full']:.4f}, "
            f"2x {snapshot['at_2x']['accuracy']:.4f}; this run ~{clock(rate * steps_left)} of training left, "
            f"benchmark ~{clock(left)}", flush=True,
        )
        output["in_progress"] = {"run": key, "snapshots": progress.snapshots}
        write_json(args.json, output)

    meter = CpuMeter()
    trained = train_with_snapshots(
        task, model, prepared.train_data, settings, valid_data, test_data, count=count,
        batch_size=args.batch_size, start_stage=start_stage, seconds_before=before, on_snapshot=on_snapshot,
    )
    meter_figures = meter.figures()
    save_run(prepared, work / f"seed{seed}" / method, settings, trained.result, base_model=args.model,
             train=str(fit_path), stage1_from=stage1_from)
    if method == REFERENCE:
        figures = single_exit_report(task, model, valid_data, test_data, args.batch_size, args.repeats)
    else:
        reference = finetune["validation_full"] if finetune else None
        figures = method_report(task, model, valid_data, test_data, args, reference,
                                finetune["full"] if finetune else None)
    figures.update(
        method=method, seed=seed, train_seconds=trained.train_seconds, steps=trained.result.steps,
        stage_names=trained.stage_names, stage_steps=trained.stage_steps, stage_seconds=trained.stage_seconds,
        snapshot_seconds=trained.eval_seconds, snapshots=trained.snapshots, wall_seconds=time.perf_counter() - wall,
        train_examples=len(prepared.train_data), training_cpu=meter_figures,
    )
    if stage1_from:
        figures.update(stage1_from=stage1_from, stage1_reused=before)
    return figures


def add_oracle_fractions(figures: dict, points=POINTS) -> None:
    """Each chosen point's layer speed-up as a fraction of the oracle's on the same dev set."""
    oracle = figures["oracle_layer_speedup"]
    for point in points:
        if point in figures:
            figures[point]["oracle_fraction"] = figures[point]["layer_speedup"] / oracle


def method_report(task, model, valid_data, test_data, args, reference: float | None, reference_test: float | None):
    from rayexit.sweep import protocol_report

    figures = protocol_report(
        task, model, valid_data, test_data, max_drop=args.max_drop, speedups=SPEEDUPS,
        batch_size=args.batch_size, repeats=args.repeats, reference=reference,
    )
    add_oracle_fractions(figures)
    if "within_reference" in figures:
        point = figures["within_reference"]
        point["within"] = point["validation"]["drop"] <= args.max_drop + 1e-12  # on validation, vs the fine-tune
        point["reference_validation"] = reference
        point["drop_vs_finetune_test"] = reference_test - point["accuracy"]
    return figures


def single_exit_report(task, model, valid_data, test_data, batch_size: int, repeats: int) -> dict:
    """The fine-tune's figures: full depth only (its intermediate heads never trained)."""
    from rayexit.policy import FULL_DEPTH
    from rayexit.sweep import time_policies

    model.eval()
    valid, test = task.replay(model, valid_data, batch_size), task.replay(model, test_data, batch_size)
    batches = task.eval_batches(test_data, batch_size)
    _, timing = time_policies(task, model, test_data, batches, [], repeats)
    return {
        "single_exit": True,
        "full": test.exit_scores()[-1],
        "validation_full": valid.outcome(FULL_DEPTH).score,
        "validation_examples": len(valid_data),
        "test_examples": len(test_data),
        "full_depth_seconds": timing["seconds"],
        "full_depth_spread": timing["spread"],
        "note": "single-exit fine-tune: intermediate heads untrained, so only full depth is reported",
    }


def refresh(output: dict) -> None:
    add_time_to_quality(output["runs"])
    output["summary"] = summarize(output["runs"])
    output["targets"] = targets(output["runs"], SPEEDUPS)


def write_plot(output: dict, path: Path) -> None:
    from rayexit.bench.exit_plot import plot_methods, plot_time_to_quality

    plot_methods(output, path)
    plot_time_to_quality(output, quality_path(path))


def _under_it_at(ttq: dict) -> str:
    """The last look under the bar: the crossing lies between it and `seconds`."""
    return f" (under it at {ttq['after_seconds']:.0f}s)" if ttq.get("after_seconds") is not None else ""


def step_times(r: dict) -> str:
    """Seconds per optimizer step of each stage trained in this run (a reused stage is left out)."""
    parts = []
    for index, (name, steps, seconds) in enumerate(zip(r["stage_names"], r["stage_steps"], r["stage_seconds"])):
        if steps and not (index == 0 and r.get("stage1_from")):
            parts.append(f"{name} {seconds / steps:.3f}s/step x {steps}")
    return ", ".join(parts)


def format_run(key: str, r: dict) -> str:
    if r.get("single_exit"):
        return (f"{key}: full {r['full']:.4f} (validation {r['validation_full']:.4f}); train {r['train_seconds']:.0f}s "
                f"({step_times(r)}); run {r['wall_seconds']:.0f}s in all{shared_cpu_note(r)}")
    exits = " ".join(f"{a:.3f}" for a in r["exit_accuracy"])
    parts = [f"{key}: exits {exits}"]
    for point in ("at_1.5x", "at_2x", "at_3x", "within_reference"):
        if point in r:
            p = r[point]
            clock_x = f"{p['wallclock_speedup']:.2f}x clock" if p.get("wallclock_speedup") is not None else "untimed"
            parts.append(f"{point} {p['accuracy']:.4f} at {p['layer_speedup']:.2f}x layers, {clock_x}")
    ttq = r.get("time_to_quality")
    if ttq:
        parts.append(f"to DeeBERT's 2x accuracy {ttq['bar']:.4f}: "
                     + (f"{ttq['seconds']:.0f}s{_under_it_at(ttq)}" if ttq["reached"] else "not reached"))
    parts.append(f"oracle {r['oracle_layer_speedup']:.2f}x; train {r['train_seconds']:.0f}s ({step_times(r)}); "
                 f"snapshots {r['snapshot_seconds']:.0f}s; run {r['wall_seconds']:.0f}s in all{shared_cpu_note(r)}")
    return "; ".join(parts)


def shared_cpu_note(r: dict) -> str:
    cpu = r.get("training_cpu")  # absent from runs written before it was recorded
    if not cpu or not cpu["shared_cpu"]:
        return ""
    return (f" [training shared the CPU: {cpu['cpu_share']:.0%} of {cpu['torch_threads']} threads' time; "
            "its seconds are not comparable with a quiet run's]")
