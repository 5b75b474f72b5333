"""`rayexit bench exit`: RomeBERT against DeeBERT, PABEE and plain joint training on SST-2.

The protocol (DESIGN.md, "Measuring honestly"): every method trains on the same SST-2 train
slice less a validation split carved from it (stratified, seeded), every policy is chosen on
that validation split (`rayexit.sweep.select`), and every figure is reported on the whole SST-2
dev set (872), which nothing is chosen on. Wall-clock speed-ups are medians of interleaved
rounds against full depth through the same runner, with their min and max.

The JSON is rewritten after every (seed, method), and a run started again with the same
--json skips what it already holds, so a long benchmark can run in the background and resume.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rayexit.bench.common import datasets_dir, machine_info
from rayexit.config import TrainSettings, train_settings
from rayexit.files import write_json

SENTENCE_METHODS = ("romebert", "deebert", "pabee", "joint")
BENCH_DEFAULTS = {"lr": 1e-4, "head_lr": 1e-3, "pooling": "mean", "max_length": 64, "batch_size": 32}
SPEEDUPS = (1.5, 2.0, 3.0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exit", help="romebert vs deebert vs pabee vs joint on an SST-2 slice")
    p.add_argument("--json", required=True, help="where to write the figures (resumed if it exists)")
    p.add_argument("--datasets", help="the shared datasets folder (default ../shared/datasets)")
    p.add_argument("--model", default="minilm", help="encoder (default: the packaged MiniLM)")
    p.add_argument("--train-examples", type=int, default=8000, help="first N lines of SST-2 train.tsv")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="validation carved from the train slice")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs per stage (DeeBERT has two stages)")
    p.add_argument("--methods", default=",".join(SENTENCE_METHODS), help="comma-separated methods to compare")
    p.add_argument("--seeds", default="42", help="comma-separated seeds (training and validation split)")
    p.add_argument("--config", help="YAML with shared training settings (its `train:` section)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size for wall-clock")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median kept)")
    p.add_argument("--max-drop", type=float, default=0.01, help="accuracy budget below full depth")
    p.add_argument("--work", default="runs/bench-exit", help="folder for the split and the model directories")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.model_dir import ModelDir
    from rayexit.sweep import protocol_report
    from rayexit.tasks import task_named
    from rayexit.train.recipe import train_to_directory
    from rayexit.tune.split import write_tsv

    task = task_named("sequence")
    sst2 = datasets_dir(args.datasets) / "sst2"
    work = Path(args.work)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    base = train_settings(args.config, {**BENCH_DEFAULTS, "epochs": args.epochs})
    output = _resume(args.json) or {
        "benchmark": "exit",
        "train_slice": f"SST-2 train.tsv, first {args.train_examples} examples",
        "validation": f"{args.valid_fraction:g} of the train slice, stratified by label, seeded by the run's seed",
        "test_set": "SST-2 dev.tsv, all 872 examples (nothing is chosen on it)",
        "model": args.model,
        "settings": base.to_dict(),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "max_drop": args.max_drop,
        "machine": machine_info(),
        "runs": {},
    }
    examples = task.load(str(sst2 / "train.tsv"), args.train_examples)
    for seed in seeds:
        fit, valid = task.split(examples, args.valid_fraction, seed)
        fit_path = write_tsv(fit, work / f"seed{seed}" / "fit.tsv")
        for method in methods:
            key = f"{method}/seed{seed}"
            if key in output["runs"]:
                print(f"== {key}: already measured, skipped", flush=True)
                continue
            settings = TrainSettings.from_dict({**base.to_dict(), "method": method, "seed": seed})
            print(f"== {key}: training on {len(fit)} examples, choosing on {len(valid)}", flush=True)
            started = time.perf_counter()
            model_dir = work / f"seed{seed}" / method
            run_, trained = train_to_directory(args.model, str(fit_path), None, settings, model_dir)
            train_seconds = time.perf_counter() - started
            directory = ModelDir(model_dir)
            model, tokenizer = run_.model, directory.load_tokenizer()
            valid_data = task.encode(tokenizer, valid, model.labels, settings.max_length)
            test_data = task.encode(
                tokenizer, task.load(str(sst2 / "dev.tsv"), known=model.labels), model.labels, settings.max_length
            )
            figures = protocol_report(
                task, model, valid_data, test_data, max_drop=args.max_drop, speedups=SPEEDUPS,
                batch_size=args.batch_size, repeats=args.repeats,
            )
            figures.update(
                method=method, seed=seed, train_seconds=trained.seconds, train_seconds_with_loading=train_seconds,
                steps=trained.steps, stages=sorted({h["stage"] for h in trained.history}),
            )
            output["runs"][key] = figures
            output["summary"] = summarize(output["runs"])
            write_json(args.json, output)
            print(format_run(key, figures), flush=True)
    output["summary"] = summarize(output["runs"])
    write_json(args.json, output)
    print(format_summary(output))
    print(f"figures -> {args.json}")
    return 0


def _resume(path: str) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if data.get("benchmark") == "exit" and "runs" in data else None


def summarize(runs: dict[str, dict]) -> dict:
    """Per method over its seeds: median, min and max of each headline figure."""
    by_method: dict[str, list[dict]] = {}
    for figures in runs.values():
        by_method.setdefault(figures["method"], []).append(figures)
    out = {}
    for method, items in by_method.items():
        def spread(values: list[float]) -> dict:
            return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}

        layers = len(items[0]["exit_accuracy"])
        row = {f"exit{i + 1}": spread([r["exit_accuracy"][i] for r in items]) for i in range(layers)}
        row["full"] = spread([r["full"] for r in items])
        for name in ["selected"] + [f"at_{s:g}x" for s in SPEEDUPS]:
            if all(name in r for r in items):
                row[f"{name}_accuracy"] = spread([r[name]["accuracy"] for r in items])
                row[f"{name}_layer_speedup"] = spread([r[name]["layer_speedup"] for r in items])
                row[f"{name}_wallclock_speedup"] = spread([r[name]["wallclock_speedup"] for r in items])
        row["train_seconds"] = spread([r["train_seconds"] for r in items])
        out[method] = row
    return out


def format_run(key: str, r: dict) -> str:
    s = r["selected"]
    exits = " ".join(f"{a:.3f}" for a in r["exit_accuracy"])
    return (
        f"{key}: exits {exits}; selected {s['describe']}: acc {s['accuracy']:.4f}, {s['layer_speedup']:.2f}x layers, "
        f"{s['wallclock_speedup']:.2f}x clock ({s['wallclock_spread'][0]:.2f}-{s['wallclock_spread'][1]:.2f}); "
        f"validation drop {s['validation']['drop']:+.4f}, gap {s['gap']:+.4f}; train {r['train_seconds']:.0f}s"
    )


def format_summary(output: dict) -> str:
    header = f"{'method':<10}{'exit1':>7}{'full':>7}{'sel acc':>9}{'layers x':>10}{'clock x':>9}{'train s':>9}"
    lines = [header + "  (medians over seeds)"]
    for method, row in output["summary"].items():
        lines.append(
            f"{method:<10}{row['exit1']['median']:7.3f}{row['full']['median']:7.3f}"
            f"{row['selected_accuracy']['median']:9.3f}{row['selected_layer_speedup']['median']:10.2f}"
            f"{row['selected_wallclock_speedup']['median']:9.2f}{row['train_seconds']['median']:9.0f}"
        )
    lines.append(f"selected: fastest within {output['max_drop']:g} of full depth on validation; reported on SST-2 dev")
    return "\n".join(lines)
