"""`rayexit bench token`: SENTEE and TOKEE on CoNLL-2003, stage 1 against self-sampling.

Stage 1 trains on a train slice (the first N sentences of CoNLL-2003 train.txt), stage 2
(self-sampling) fine-tunes that model on the same slice; both are evaluated on the whole
CoNLL-2003 test set (3,453 sentences). Every curve point is a real run of the batched
runner; wall-clock at the 2x point is the median of `--repeats` runs at batch 32, against the
same runner at full depth and against the encoder's own padded full-depth forward.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rayexit.bench.common import datasets_dir, machine_info
from rayexit.files import write_json

BENCH_SETTINGS = {"lr": 1e-4, "head_lr": 1e-3, "batch_size": 32, "max_length": 128, "seed": 42}
SPEEDUPS = (2.0, 3.0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="SENTEE vs TOKEE, stage 1 vs self-sampling, on CoNLL-2003")
    p.add_argument("--json", required=True, help="where to write the figures")
    p.add_argument("--datasets", help="the shared datasets folder (default ../shared/datasets)")
    p.add_argument("--model", default="minilm", help="encoder (default: the packaged MiniLM)")
    p.add_argument("--train-sentences", type=int, default=6000, help="first N sentences of CoNLL-2003 train.txt")
    p.add_argument("--epochs", type=float, default=2.0, help="stage-1 epochs")
    p.add_argument("--ss-epochs", type=float, default=1.0, help="self-sampling (stage 2) epochs")
    p.add_argument("--ss-lr", type=float, default=5e-5, help="self-sampling learning rate")
    p.add_argument("--test-sentences", type=int, help="first N test sentences (default: all 3,453)")
    p.add_argument("--windows", default="1,3,5", help="TOKEE windows to sweep")
    p.add_argument("--thresholds", default="0.02,0.05,0.1,0.2,0.3,0.45", help="TOKEE/SENTEE thresholds")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    p.add_argument("--repeats", type=int, default=3, help="timing runs at the 2x point (median kept)")
    p.add_argument("--work", default="runs/bench-token", help="folder for the two model directories")
    p.add_argument("--reuse", action="store_true", help="reuse model directories already in --work")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.config import TrainSettings
    from rayexit.data.conll import encode_tagged, load_tagged
    from rayexit.evaluate_token import default_token_sweep, evaluate_token_model, format_token_table
    from rayexit.models import load_tokenizer
    from rayexit.models.token import MultiExitForTokenClassification
    from rayexit.train.token_recipe import train_token_to_directory

    conll = datasets_dir(args.datasets) / "conll2003"
    work = Path(args.work)
    stage1_dir, stage2_dir = work / "stage1", work / "self-sampling"
    train_file = str(conll / "train.txt")
    windows = tuple(int(w) for w in args.windows.split(","))
    thresholds = tuple(float(t) for t in args.thresholds.split(","))
    sweep = default_token_sweep(windows, thresholds, thresholds)

    timings: dict[str, float] = {}
    stage1 = TrainSettings.from_dict({**BENCH_SETTINGS, "method": "joint", "epochs": args.epochs,
                                      "max_examples": args.train_sentences})
    stage2 = TrainSettings.from_dict({**stage1.to_dict(), "method": "self-sampling", "epochs": args.ss_epochs,
                                      "lr": args.ss_lr})
    if not (args.reuse and (stage1_dir / "rayexit.json").exists()):
        print(f"== stage 1 on the first {args.train_sentences} sentences of CoNLL-2003 train.txt", flush=True)
        _, result = train_token_to_directory(args.model, train_file, None, stage1, stage1_dir)
        timings["stage1_train_seconds"] = result.seconds
    if not (args.reuse and (stage2_dir / "rayexit.json").exists()):
        print("== self-sampling (stage 2) on the same slice", flush=True)
        _, result = train_token_to_directory(None, train_file, None, stage2, stage2_dir, init=str(stage1_dir))
        timings["self_sampling_train_seconds"] = result.seconds

    test = load_tagged(str(conll / "test.txt"), args.test_sentences)
    reports = {}
    for name, directory in (("stage1", stage1_dir), ("self_sampling", stage2_dir)):
        model = MultiExitForTokenClassification.from_pretrained(directory)
        tokenizer = load_tokenizer(directory)
        data = encode_tagged(tokenizer, test, model.labels, model.exit_config.max_length)
        print(f"== evaluating {name} on {len(test)} test sentences", flush=True)
        started = time.perf_counter()
        report = evaluate_token_model(model, data, test.tags, args.batch_size, sweep)
        timings[f"{name}_eval_seconds"] = time.perf_counter() - started
        report["at_speedup"] = at_speedups(report, windows)
        print(format_token_table(report), flush=True)
        reports[name] = report

    model = MultiExitForTokenClassification.from_pretrained(stage2_dir)
    data = encode_tagged(load_tokenizer(stage2_dir), test, model.labels, model.exit_config.max_length)
    two_x = reports["self_sampling"]["at_speedup"]["tokee"]["2x"]
    wallclock = measure_wallclock(model, data, two_x, args.batch_size, args.repeats) if two_x else None

    figures = {
        "benchmark": "token",
        "train_slice": f"first {args.train_sentences} sentences of CoNLL-2003 train.txt",
        "test_set": f"CoNLL-2003 test.txt, {len(test)} sentences",
        "model": args.model,
        "stage1_settings": stage1.to_dict(),
        "self_sampling_settings": stage2.to_dict(),
        "reports": reports,
        "wallclock_at_2x": wallclock,
        "targets": targets(reports, wallclock),
        "timings": timings,
        "machine": machine_info(),
    }
    write_json(args.json, figures)
    print(format_summary(figures))
    print(f"figures -> {args.json}")
    return 0


def at_speedups(report: dict, windows: tuple[int, ...]) -> dict:
    """Best F1 per policy (and per TOKEE window) among points at >= 2x and >= 3x FLOPs speed-up."""
    from rayexit.evaluate_token import best_at_speedup

    out: dict[str, dict] = {}
    keys: list[tuple[str, str, int | None]] = [("sentee", "sentee", None), ("tokee", "tokee", None)]
    keys += [(f"tokee_w{w}", "tokee", w) for w in windows]
    for key, policy, window in keys:
        out[key] = {}
        for s in SPEEDUPS:
            point = best_at_speedup(report["curve"], policy, s, window)
            if point is not None:
                point = dict(point, f1_drop_points=100.0 * (report["full"] - point["f1"]))
            out[key][f"{s:g}x"] = point
    return out


@torch.no_grad()
def measure_wallclock(model, data, point: dict, batch_size: int, repeats: int) -> dict:
    """Median seconds over the test set: TOKEE at the point, the runner at full depth, plain forward."""
    from rayexit.data.conll import token_batches
    from rayexit.metrics import median_seconds
    from rayexit.token_exits import TokenPolicy, run_over_tokens

    batches = list(token_batches(data, batch_size))
    policy = TokenPolicy("tokee", point["threshold"], window=point["window"])

    def plain() -> None:
        for batch in batches:
            model(batch.input_ids, batch.attention_mask)[-1].argmax(-1)

    tokee = median_seconds(lambda: run_over_tokens(model, data, policy, batches=batches), repeats)
    runner_full = median_seconds(lambda: run_over_tokens(model, data, TokenPolicy("none"), batches=batches), repeats)
    padded_full = median_seconds(plain, repeats)
    return {
        "batch_size": batch_size,
        "point": point,
        "tokee_seconds": tokee,
        "runner_full_depth_seconds": runner_full,
        "padded_full_depth_seconds": padded_full,
        "wallclock_speedup": runner_full / tokee,
        "wallclock_speedup_vs_padded_forward": padded_full / tokee,
        "torch_threads": torch.get_num_threads(),
    }


def targets(reports: dict, wallclock: dict | None) -> dict:
    final = reports["self_sampling"]
    at = final["at_speedup"]
    stage1_at = reports["stage1"]["at_speedup"]

    def drop(point: dict | None) -> float | None:
        return None if point is None else point["f1_drop_points"]

    def f1(point: dict | None) -> float | None:
        return None if point is None else point["f1"]

    out = {
        "tokee_2x_drop_le_0.5": _check(drop(at["tokee"]["2x"]), lambda v: v <= 0.5),
        "tokee_3x_drop_le_1.5": _check(drop(at["tokee"]["3x"]), lambda v: v <= 1.5),
    }
    for s in ("2x", "3x"):
        tokee, sentee = f1(at["tokee"][s]), f1(at["sentee"][s])
        out[f"tokee_above_sentee_{s}"] = {
            "tokee_f1": tokee, "sentee_f1": sentee,
            "met": None if tokee is None else (sentee is None or tokee > sentee),
        }
    ss, s1 = f1(at["tokee"]["3x"]), f1(stage1_at["tokee"]["3x"])
    out["self_sampling_improves_tokee_3x"] = {
        "self_sampling_f1": ss, "stage1_f1": s1, "met": None if ss is None or s1 is None else ss > s1,
    }
    clock = None if wallclock is None else wallclock["wallclock_speedup"]
    out["wallclock_2x_ge_1.5"] = _check(clock, lambda v: v >= 1.5)
    return out


def _check(value: float | None, test) -> dict:
    return {"value": value, "met": None if value is None else bool(test(value))}


def format_summary(figures: dict) -> str:
    lines = [f"train: {figures['train_slice']}; test: {figures['test_set']}", ""]
    lines.append(f"{'model':<14}{'policy':<10}{'full F1':>8}{'F1@2x':>8}{'F1@3x':>8}")
    for name, report in figures["reports"].items():
        for policy in [k for k in report["at_speedup"]]:
            cells = []
            for s in ("2x", "3x"):
                point = report["at_speedup"][policy][s]
                cells.append(f"{point['f1']:8.4f}" if point else f"{'-':>8}")
            lines.append(f"{name:<14}{policy:<10}{report['full']:8.4f}{''.join(cells)}")
    wall = figures["wallclock_at_2x"]
    if wall:
        lines.append(
            f"wall-clock at the 2x point, batch {wall['batch_size']}: {wall['wallclock_speedup']:.2f}x vs runner "
            f"full depth, {wall['wallclock_speedup_vs_padded_forward']:.2f}x vs padded forward"
        )
    for key, value in figures["targets"].items():
        lines.append(f"target {key}: {value}")
    return "\n".join(lines)
