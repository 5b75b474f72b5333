"""`rayexit eval`: every exit's score, the accuracy/speed-up curve, and one policy measured honestly.

The policy reported as `selected` is chosen on `--select-on` (validation data) or given with
`--policy/--threshold`, and measured on `--data`; thresholds are never placed using `--data`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate every exit, sweep exit policies, measure one on the data")
    p.add_argument("--model", required=True, help="a model directory written by `rayexit train`")
    p.add_argument("--data", required=True, help="the data to report on (file, `atis:test`, hub dataset)")
    p.add_argument("--json", required=True, help="where to write the report")
    p.add_argument("--select-on", help="validation data: choose the policy here, report it on --data")
    p.add_argument("--max-drop", type=float, default=0.01, help="score drop allowed on validation (default 0.01)")
    p.add_argument("--min-speedup", type=float, help="instead: best score at this speed-up or more (validation)")
    p.add_argument("--policy", help="evaluate this policy: entropy, maxprob, patience, tokee, sentee, none")
    p.add_argument(
        "--threshold", type=float, action="append",
        help="the policy's threshold; repeat it for one per exit (exit 1 first)",
    )
    p.add_argument("--window", type=int, help="tokee: words in the uncertainty window (default 3)")
    p.add_argument("--plot", help="PNG of the score against speed-up")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds; the median is kept")
    p.add_argument("--time-front", type=int, default=2, help="also time this many points of the curve's front")
    p.add_argument(
        "--time-examples", type=int, default=500,
        help="time on this many examples, evenly spread over --data (0: all); scores always use all of it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.api import load
    from rayexit.errors import RayexitError
    from rayexit.files import write_json
    from rayexit.policy import FULL_DEPTH
    from rayexit.sweep import evaluate, format_report
    from rayexit.tasks import task_named

    if args.policy and args.select_on:
        raise RayexitError("--policy and --select-on: give one (a policy to measure, or data to choose one on)")
    if args.repeats < 1:
        raise RayexitError(f"--repeats: got {args.repeats}, expected a whole number >= 1")
    if args.time_examples < 0:
        raise RayexitError(f"--time-examples: got {args.time_examples}, expected a whole number >= 0 (0: all)")
    if args.batch_size < 1:
        raise RayexitError(f"--batch-size: got {args.batch_size}, expected a whole number >= 1")
    if args.time_front < 0:
        raise RayexitError(f"--time-front: got {args.time_front}, expected a whole number >= 0")
    if not math.isfinite(args.max_drop) or not 0 <= args.max_drop < 1:
        raise RayexitError(f"--max-drop: got {args.max_drop}, expected a score drop in [0, 1), e.g. 0.01")
    if args.min_speedup is not None and (not math.isfinite(args.min_speedup) or args.min_speedup < 1):
        raise RayexitError(f"--min-speedup: got {args.min_speedup}, expected a layer speed-up >= 1, e.g. 2")
    for flag, value in (("--json", args.json), ("--plot", args.plot)):
        if value and Path(value).is_dir():  # found now, not after the whole evaluation
            raise RayexitError(f"{flag} {value}: is a folder; expected a file name to write")
    loaded = load(args.model)  # the Python API's loader (rayexit.load), as Serve uses
    task = task_named(loaded.task)
    model, tokenizer = loaded.model, loaded.tokenizer
    max_length = model.exit_config.max_length

    def encoded(examples):
        return task.encode(tokenizer, examples, model.labels, max_length)

    policy, select_on, time_front = given_policy(args), args.select_on, args.time_front
    note = single_exit_note(model.exit_config.method, policy is not None)
    if note and policy is None:
        # Choosing exit points among heads that never trained would report noise as a speed-up.
        policy, select_on, time_front = FULL_DEPTH, None, 0
    data = task.load(args.data, known=model.labels)
    timing = evenly_spread(task, data, args.time_examples)
    report = evaluate(
        task,
        model,
        encoded(data),
        time_on=encoded(timing) if timing is not None else None,
        select_on=encoded(task.load(select_on, known=model.labels)) if select_on else None,
        policy=policy,
        max_drop=args.max_drop,
        min_speedup=args.min_speedup,
        batch_size=args.batch_size,
        repeats=args.repeats,
        time_front=time_front,
    )
    report.update(model=str(args.model), data=args.data, select_on=args.select_on)
    if note:
        report["note"] = note
    write_json(args.json, report)
    print(format_report(report))
    if note:
        print(f"note: {note}")
    if args.plot:
        from rayexit.plots import plot_curve

        plot_curve(report, args.plot, title=f"{args.model} on {args.data}", score=report["metric"])
        print(f"plot -> {args.plot}")
    print(f"report -> {args.json}")
    return 0


def evenly_spread(task, examples, count: int):
    """Every k-th example, so the timed subset keeps the data's mix of lengths and easy/hard rows.

    Wall-clock is the slow part of eval (repeats x timed points x passes); a few hundred examples
    give a stable ratio, while scores, layers and FLOPs are still measured on all the data.
    """
    if count == 0 or count >= len(examples):
        return None
    step = len(examples) / count
    return task.subset(examples, [int(i * step) for i in range(count)], "timing")


def single_exit_note(method: str, policy_given: bool) -> str | None:
    """What `rayexit eval` says about a single-exit fine-tune (None for a multi-exit model)."""
    if method != "finetune":
        return None
    said = "a single-exit fine-tune (method finetune): only the final exit was trained; exits 1 to L-1 are untrained"
    if policy_given:
        return said + " heads, so the early exits measured here for the given --policy are not meaningful"
    return said + " heads, so the policy is full depth (no exit point was chosen; --select-on, if given, is unused)"


def given_policy(args: argparse.Namespace):
    from rayexit.errors import RayexitError
    from rayexit.policy import ExitPolicy

    if not args.policy:
        if args.threshold or args.window:
            raise RayexitError("--threshold/--window: give --policy too")
        return None
    if args.policy != "none" and not args.threshold:
        raise RayexitError(f"--policy {args.policy}: give --threshold (repeat it for one per exit)")
    thresholds = args.threshold or [0.0]
    return ExitPolicy(
        args.policy, thresholds[0] if len(thresholds) == 1 else thresholds, window=args.window or 3
    )
