"""`rayexit bench token`: SENTEE and TOKEE on CoNLL-2003, stage 1 against self-sampling.

Stage 1 trains on a train slice (the first N sentences of CoNLL-2003 train.txt), stage 2
(self-sampling) fine-tunes that model on the same slice. Policies (the best at 2x and 3x FLOPs
speed-up, the fastest within the F1 budget) are chosen on CoNLL-2003 valid.txt and every figure
is a live run of the batched runner on the whole test set (3,453 sentences). Wall-clock at the
2x point is the median of `--repeats` interleaved rounds against full depth, with its range.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rayexit.bench.common import add_threads_option, datasets_dir, machine_info, use_threads
from rayexit.files import write_json

BENCH_SETTINGS = {"lr": 1e-4, "head_lr": 1e-3, "batch_size": 32, "max_length": 128, "seed": 42}
SPEEDUPS = (1.5, 2.0, 2.5, 3.0)


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
    p.add_argument("--valid-sentences", type=int, help="first N valid sentences to choose on (default: all 3,250)")
    p.add_argument("--max-drop", type=float, default=0.01, help="F1 budget below full depth (validation)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds at the 2x point (median kept)")
    p.add_argument("--work", default="runs/bench-token", help="folder for the two model directories")
    p.add_argument("--reuse", action="store_true", help="reuse model directories already in --work")
    add_threads_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.config import TrainSettings
    from rayexit.model_dir import ModelDir
    from rayexit.sweep import protocol_report
    from rayexit.tasks import task_named
    from rayexit.train.recipe import train_to_directory

    use_threads(args.threads)

    task = task_named("token")
    conll = datasets_dir(args.datasets) / "conll2003"
    work = Path(args.work)
    stage1_dir, stage2_dir = work / "stage1", work / "self-sampling"
    train_file = str(conll / "train.txt")

    timings: dict[str, float] = {}
    stage1 = TrainSettings.from_dict({**BENCH_SETTINGS, "method": "joint", "epochs": args.epochs,
                                      "max_examples": args.train_sentences})
    stage2 = TrainSettings.from_dict({**stage1.to_dict(), "method": "self-sampling", "epochs": args.ss_epochs,
                                      "lr": args.ss_lr})
    if not (args.reuse and (stage1_dir / "rayexit.json").exists()):
        print(f"== stage 1 on the first {args.train_sentences} sentences of CoNLL-2003 train.txt", flush=True)
        _, result = train_to_directory(args.model, train_file, None, stage1, stage1_dir, task="token")
        timings["stage1_train_seconds"] = result.seconds
    if not (args.reuse and (stage2_dir / "rayexit.json").exists()):
        print("== self-sampling (stage 2) on the same slice", flush=True)
        _, result = train_to_directory(
            None, train_file, None, stage2, stage2_dir, task="token", init=str(stage1_dir)
        )
        timings["self_sampling_train_seconds"] = result.seconds

    valid = task.load(str(conll / "valid.txt"), args.valid_sentences)
    test = task.load(str(conll / "test.txt"), args.test_sentences)
    reports: dict[str, dict] = {}
    for name, directory in (("stage1", stage1_dir), ("self_sampling", stage2_dir)):
        model_dir = ModelDir(directory)
        model, tokenizer = model_dir.load_model(), model_dir.load_tokenizer()
        length = model.exit_config.max_length
        valid_data = task.encode(tokenizer, valid, model.labels, length)
        test_data = task.encode(tokenizer, test, model.labels, length)
        reports[name] = {}
        replays = task.replay(model, valid_data, args.batch_size), task.replay(model, test_data, args.batch_size)
        for kinds in (("tokee",), ("sentee",)):
            print(f"== {name}, {kinds[0]}: chosen on {len(valid)} valid sentences, reported on {len(test)}", flush=True)
            started = time.perf_counter()
            reports[name][kinds[0]] = protocol_report(
                task, model, valid_data, test_data, max_drop=args.max_drop, speedups=SPEEDUPS,
                batch_size=args.batch_size, repeats=args.repeats, kinds=kinds,
                timed=("at_2x",) if name == "self_sampling" and kinds == ("tokee",) else (), replays=replays,
            )
            timings[f"{name}_{kinds[0]}_eval_seconds"] = time.perf_counter() - started
    figures = {
        "benchmark": "token",
        "train_slice": f"first {args.train_sentences} sentences of CoNLL-2003 train.txt",
        "validation_set": f"CoNLL-2003 valid.txt, {len(valid)} sentences (policies are chosen here)",
        "test_set": f"CoNLL-2003 test.txt, {len(test)} sentences (figures are reported here)",
        "model": args.model,
        "stage1_settings": stage1.to_dict(),
        "self_sampling_settings": stage2.to_dict(),
        "reports": reports,
        "targets": targets(reports),
        "timings": timings,
        "machine": machine_info(),
    }
    write_json(args.json, figures)
    print(format_summary(figures))
    print(f"figures -> {args.json}")
    return 0


def targets(reports: dict) -> dict:
    """The token issue's targets from the figures above: drops in F1 points at matched FLOPs speed-ups."""
    final, stage1 = reports["self_sampling"], reports["stage1"]
    out = {
        "tokee_2x_drop_le_0.5": _check(_drop(final["tokee"], 2.0), lambda v: v <= 0.5),
        "tokee_3x_drop_le_1.5": _check(_drop(final["tokee"], 3.0), lambda v: v <= 1.5),
    }
    for s in SPEEDUPS:
        name = _point(s)
        tokee, sentee = final["tokee"][name], final["sentee"][name]
        reached = {kind: _reached(point, s) for kind, point in (("tokee", tokee), ("sentee", sentee))}
        # A policy that cannot reach the speed-up on validation has no F1 there: TOKEE is above it if it does.
        met: bool | None = None  # neither reached it: nothing to compare
        if reached["tokee"]:
            met = not reached["sentee"] or tokee["f1"] > sentee["f1"]
        elif reached["sentee"]:
            met = False
        out[f"tokee_above_sentee_{name}"] = {"tokee_f1": tokee["f1"], "sentee_f1": sentee["f1"],
                                            "tokee_reached": reached["tokee"], "sentee_reached": reached["sentee"],
                                            "met": met}
    for speedup in (2.0, 3.0):
        name = _point(speedup)
        ss, s1 = final["tokee"][name], stage1["tokee"][name]
        both = _reached(ss, speedup) and _reached(s1, speedup)
        out[f"self_sampling_improves_tokee_{name[3:]}"] = {
            "self_sampling_f1": ss["f1"], "stage1_f1": s1["f1"], "met": (ss["f1"] > s1["f1"]) if both else None,
        }
    clock = final["tokee"]["at_2x"].get("wallclock_speedup")
    out["wallclock_2x_ge_1.6"] = _check(clock, lambda v: v >= 1.6)
    return out


def _point(speedup: float) -> str:
    return f"at_{speedup:g}x"


def _reached(point: dict, speedup: float) -> bool:
    """Whether the choice made on validation is at least that fast (else it fell back to full depth)."""
    return point["validation"]["flops_speedup"] >= speedup - 1e-9


def _drop(report: dict, speedup: float) -> float | None:
    point = report.get(_point(speedup))
    if point is None or not _reached(point, speedup):
        return None  # the choice fell back to full depth: nothing that fast on validation
    return 100.0 * (report["full"] - point["f1"])


def _check(value: float | None, test) -> dict:
    return {"value": value, "met": None if value is None else bool(test(value))}


def format_summary(figures: dict) -> str:
    lines = [f"train: {figures['train_slice']}", f"choose: {figures['validation_set']}"]
    lines.append(f"report: {figures['test_set']}")
    header = "".join(f"{'F1@' + f'{x:g}x':>9}{'FLOPs x':>8}" for x in SPEEDUPS)
    lines.append(f"{'model':<14}{'policy':<8}{'full F1':>8}{header}")
    for name, per_kind in figures["reports"].items():
        for kind, report in per_kind.items():
            points = [report[_point(x)] for x in SPEEDUPS]
            cells = "".join(f"{point['f1']:9.4f}{point['flops_speedup']:8.2f}" for point in points)
            lines.append(f"{name:<14}{kind:<8}{report['full']:8.4f}{cells}")
    two = figures["reports"]["self_sampling"]["tokee"]["at_2x"]
    if two.get("wallclock_speedup"):
        low, high = two["wallclock_spread"]
        lines.append(f"wall-clock at the 2x point: {two['wallclock_speedup']:.2f}x (range {low:.2f}-{high:.2f})")
    for key, value in figures["targets"].items():
        lines.append(f"target {key}: {value}")
    return "\n".join(lines)
