"""`rayexit bench exit`: RomeBERT against DeeBERT, PABEE and plain joint training on SST-2.

Every method trains on the same SST-2 train slice (the first N lines of train.tsv) with the
same budget, and is evaluated on the whole SST-2 dev set (872). Wall-clock speed-ups are
measured in this process, each method's early-exit runner against its own full depth at the
same batch size.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rayexit.bench.common import datasets_dir, machine_info
from rayexit.config import METHODS, TrainSettings, train_settings
from rayexit.files import write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exit", help="romebert vs deebert vs pabee vs joint on an SST-2 slice")
    p.add_argument("--json", required=True, help="where to write the figures")
    p.add_argument("--datasets", help="the shared datasets folder (default ../shared/datasets)")
    p.add_argument("--model", default="minilm", help="encoder (default: the packaged MiniLM)")
    p.add_argument("--train-examples", type=int, default=8000, help="first N lines of SST-2 train.tsv")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs per stage (DeeBERT has two stages)")
    p.add_argument("--methods", default=",".join(METHODS[:4]), help="comma-separated methods to compare")
    p.add_argument("--config", help="YAML with shared training settings (its `train:` section)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size for wall-clock")
    p.add_argument("--repeats", type=int, default=3, help="timing runs per curve point (median kept)")
    p.add_argument("--max-drop", type=float, default=0.01, help="accuracy budget below full depth")
    p.add_argument("--keep-models", help="folder to keep the trained model directories in")
    p.set_defaults(func=run)


BENCH_DEFAULTS = {"lr": 1e-4, "head_lr": 1e-3, "pooling": "mean", "max_length": 64, "batch_size": 32}


def run(args: argparse.Namespace) -> int:
    import tempfile

    from rayexit.evaluate import evaluate_sequence_model, format_table, summarize
    from rayexit.plots import plot_curve
    from rayexit.train.recipe import train_to_directory

    sst2 = datasets_dir(args.datasets) / "sst2"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    base = train_settings(args.config, {**BENCH_DEFAULTS, "epochs": args.epochs, "max_examples": args.train_examples})
    keep = Path(args.keep_models) if args.keep_models else Path(tempfile.mkdtemp(prefix="rayexit-bench-"))
    results: dict[str, dict] = {}
    for method in methods:
        settings = TrainSettings.from_dict({**base.to_dict(), "method": method})
        print(f"== {method}: training on the first {args.train_examples} lines of SST-2 train.tsv", flush=True)
        started = time.perf_counter()
        run_, trained = train_to_directory(
            args.model, str(sst2 / "train.tsv"), str(sst2 / "dev.tsv"), settings, keep / method
        )
        train_seconds = time.perf_counter() - started
        report = evaluate_sequence_model(run_.model, run_.eval_data, args.batch_size, repeats=args.repeats)
        print(format_table(report), flush=True)
        best = summarize(report, args.max_drop)
        results[method] = {
            "exit_accuracy": report["exit_accuracy"],
            "full": report["full"],
            "curve": report["curve"],
            "oracle_layer_speedup": report["oracle_layer_speedup"],
            "best_layer_speedup_within_drop": (best["best_layer_point"] or {}).get("layer_speedup"),
            "best_wallclock_speedup_within_drop": (best["best_wallclock_point"] or {}).get("wallclock_speedup"),
            "best_layer_point": best["best_layer_point"],
            "best_wallclock_point": best["best_wallclock_point"],
            "train_seconds": trained.seconds,
            "train_seconds_with_loading": train_seconds,
            "stages": sorted({h["stage"] for h in trained.history}),
        }
        plot_curve(report, Path(args.json).with_suffix(f".{method}.png"), title=f"{method} on SST-2 dev")
    output = {
        "benchmark": "exit",
        "train_slice": f"SST-2 train.tsv, first {args.train_examples} examples",
        "eval_set": "SST-2 dev.tsv, all 872 examples",
        "model": args.model,
        "settings": base.to_dict(),
        "batch_size": args.batch_size,
        "max_drop": args.max_drop,
        "machine": machine_info(),
        "methods": results,
        "targets": targets(results),
    }
    write_json(args.json, output)
    print(format_summary(output))
    print(f"figures -> {args.json}")
    return 0


def targets(results: dict[str, dict]) -> dict:
    """The issue's targets, computed from the figures above (None where a method was not run)."""
    rome, dee = results.get("romebert"), results.get("deebert")
    out: dict[str, object] = {}
    if rome and dee:
        gap = rome["exit_accuracy"][0] - dee["exit_accuracy"][0]
        out["exit1_gain_points"] = 100 * gap
        out["exit1_gain_met"] = gap >= 0.05
        ratio = rome["train_seconds"] / dee["train_seconds"]
        out["train_time_ratio_romebert_over_deebert"] = ratio
        out["train_time_met"] = ratio <= 0.6
    if rome:
        layer = rome["best_layer_speedup_within_drop"] or 0.0
        clock = rome["best_wallclock_speedup_within_drop"] or 0.0
        out["layer_speedup_met"] = layer >= 2.0
        out["wallclock_speedup_met"] = clock >= 1.8
    return out


def format_summary(output: dict) -> str:
    lines = [
        f"{'method':<10}{'exit1':>7}{'full':>7}{'layers x':>10}{'clock x':>9}{'oracle x':>10}{'train s':>9}",
    ]
    for method, r in output["methods"].items():
        lines.append(
            f"{method:<10}{r['exit_accuracy'][0]:7.3f}{r['full']:7.3f}"
            f"{r['best_layer_speedup_within_drop'] or 0:10.2f}{r['best_wallclock_speedup_within_drop'] or 0:9.2f}"
            f"{r['oracle_layer_speedup']:10.2f}{r['train_seconds']:9.1f}"
        )
    lines.append(f"speed-ups: best within {100 * output['max_drop']:.1f} point(s) of each method's full accuracy")
    lines.append(f"targets: {output['targets']}")
    return "\n".join(lines)
