"""`rayexit bench tune`: a small Tune + Optuna search on an SST-2 slice against the paper's default.

Data: the first N lines of SST-2 train.tsv (the slice); the validation split used for every
choice is carved from that slice (`rayexit.tune.split`); all reported figures are on the whole
SST-2 dev set (872 sentences), which nothing is chosen on.

Default: the paper's RomeBERT setting (gamma 0.9, T 3) with the slice's fixed lr, and one
entropy threshold swept on validation, taking the fastest within `max_drop` of its own
full-depth validation accuracy. It runs as the study's first trial, so it trains exactly like
every other trial. Tuned: Optuna's choice of gamma, T and lr over the trials, with the policy
(entropy, max-prob or patience; one threshold or one per layer) searched on each trial's cache,
taking the fastest within `max_drop` of the best full-depth validation accuracy of any trial.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from rayexit.bench.common import datasets_dir, machine_info
from rayexit.files import write_json

BENCH_TRAIN = {"lr": 1e-4, "head_lr": 1e-3, "pooling": "mean", "max_length": 64, "batch_size": 32}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="Tune + Optuna search vs the paper default on an SST-2 slice")
    p.add_argument("--json", required=True, help="where to write the figures")
    p.add_argument("--datasets", help="the shared datasets folder (default ../shared/datasets)")
    p.add_argument("--model", default="minilm", help="encoder (default: the packaged MiniLM)")
    p.add_argument("--train-examples", type=int, default=2000, help="first N lines of SST-2 train.tsv")
    p.add_argument("--trials", type=int, default=5, help="trials, the paper default's included")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--trainer", choices=("distributed", "local"), default="distributed")
    p.add_argument("--output", help="keep the tuning folder here (default: a temporary folder, removed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.commands.tune import format_report
    from rayexit.tune.run import tune_new
    from rayexit.tune.space import load_tune_config

    sst2 = datasets_dir(args.datasets) / "sst2"
    config = load_tune_config(
        None,
        {**BENCH_TRAIN, "epochs": args.epochs},
        {
            "trials": args.trials,
            "objective": "within_drop",
            "max_drop": args.max_drop,
            "trainer": args.trainer,
            "validation_fraction": 0.2,
            "space": {"gamma": [0.5, 1.0], "temperature": [1.0, 10.0], "lr": [3e-5, 3e-4]},
        },
    )
    output = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="rayexit-bench-tune-")) / "run"
    started = time.perf_counter()
    report = tune_new(args.model, str(sst2 / "train.tsv"), str(sst2 / "dev.tsv"), output, config, args.train_examples)
    seconds = time.perf_counter() - started
    print(format_report(report), flush=True)
    default, chosen = report["default"], report["chosen"]
    best_full = report["best_full_eval_accuracy"]

    def figures(point: dict) -> dict:
        return {
            "accuracy": point["accuracy"],
            "full_accuracy": point["full_accuracy"],
            "layer_speedup": point["layer_speedup"],
            "gamma": point["gamma"],
            "temperature": point["temperature"],
            "lr": point["lr"],
            "policy": point["policy"],
            "thresholds": point["thresholds"],
            "validation": point["validation"],
        }

    tuned = figures(chosen)
    result = {
        "benchmark": "tune",
        "data": {
            "train": f"first {args.train_examples} lines of SST-2 train.tsv",
            "validation_split": report["split"],
            "eval": "SST-2 dev.tsv (all 872)",
        },
        "model": args.model,
        "trainer": args.trainer,
        "trials": report["trials"],
        "train_settings": {**BENCH_TRAIN, "epochs": args.epochs},
        "search_space": config.tune.to_dict()["space"],
        "max_drop": args.max_drop,
        "default": figures(default) if default else None,
        "tuned": tuned,
        "best_full_accuracy": best_full,
        "tuned_runner_check": report["best_runner_eval"],
        "threshold_settings_per_second": report["threshold_settings_per_second"],
        "search_seconds": report["seconds"],
        "total_seconds": seconds,
        "targets": {
            "tuned_within_1_point_of_best_full": tuned["accuracy"] >= best_full - 0.01 - 1e-12,
            "speedup_gain_over_default": (tuned["layer_speedup"] / default["layer_speedup"] - 1) if default else None,
            "speedup_at_least_10pct_over_default": bool(default)
            and tuned["layer_speedup"] >= 1.1 * default["layer_speedup"],
            "threshold_search_at_least_1000_per_s": report["threshold_settings_per_second"] >= 1000,
        },
        "per_trial": report["per_trial"],
        "machine": machine_info(),
    }
    write_json(args.json, result)
    print(f"figures -> {args.json}")
    if not args.output:
        shutil.rmtree(output.parent, ignore_errors=True)
    return 0
