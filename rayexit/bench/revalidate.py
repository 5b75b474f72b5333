"""`rayexit bench revalidate`: a finished `bench exit` re-chosen on validation that shares no
text with training (or, with `--choose-on carved`, on its own carved split with today's grid).

SST-2's train.tsv holds phrases of the same sentences at many lengths, so a validation split
carved from a slice of it shares text with the lines trained on: a phrase held out is often a
piece of a phrase kept (61% of seed 1's split appear verbatim inside a training line, against
0.1% of dev). Validation then reads higher than dev and favours early exits that recall text
seen in training. This command keeps every trained model of a `bench exit` run (its `--work`
folder), builds a validation set from the train.tsv lines *after* the slice that share no word
n-gram with any line of the slice, makes every choice again on it, and reports on the same dev
set, side by side with the points chosen on the carved split. Nothing is trained. Wall-clock is
measured only with `--repeats` (as `bench exit` does it: batch 32, median of interleaved rounds
against full depth); layer and FLOPs speed-ups need no timing.

`--choose-on carved` re-draws each seed's carved split exactly as `bench exit` did and makes the
choices again there: a change to the sweep's grid or rule is then measured on the same models,
against the same validation, without training anything. Its "within 1 point" bar is the
fine-tune's validation score from the JSON, so the fine-tune's model folders are not needed.

`--report-on disjoint` (with `--choose-on carved`) keeps the benchmark's choices and reports them
on the disjoint lines instead of dev: about four times dev's size, so a gap between two methods
that dev's 872 sentences cannot resolve (one point is 9 sentences) is measured with less sampling
noise. Dev stays the benchmark's test set; this is a second one, never chosen on.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

from rayexit.bench.common import add_threads_option, datasets_dir, machine_info, use_threads
from rayexit.bench.disjoint import MIN_WORDS, NGRAM, disjoint_validation
from rayexit.errors import RayexitError
from rayexit.files import write_json

POINTS = ("at_1.5x", "at_2x", "at_3x", "within_reference")
REFERENCE = "finetune"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("revalidate", help="re-choose a bench exit's points on validation sharing no text with training")
    p.add_argument("--json", required=True, help="the `bench exit` JSON whose runs to re-choose")
    p.add_argument("--work", required=True, help="that run's --work folder (holds seed<N>/<method> model folders)")
    p.add_argument("--out", required=True, help="where to write the figures (resumed if it exists)")
    p.add_argument("--datasets", help="the shared datasets folder (default ../shared/datasets)")
    p.add_argument("--methods", help="comma-separated methods to re-choose (default: every run's)")
    p.add_argument("--choose-on", choices=("disjoint", "carved"), default="disjoint",
                   help="disjoint: train.tsv lines after the slice sharing no N-word run with it; carved: each "
                        "seed's split as the benchmark carved it (to measure a new grid or rule on the same models)")
    p.add_argument("--report-on", choices=("dev", "disjoint"), default="dev",
                   help="dev: SST-2 dev, the benchmark's test set; disjoint: the disjoint train.tsv lines as a "
                        "larger second test set (needs --choose-on carved: nothing is chosen on them)")
    p.add_argument("--min-words", type=int, default=MIN_WORDS, help="shortest validation line, in words")
    p.add_argument("--repeats", type=int, default=0, help="timing rounds per chosen point (0: untimed)")
    p.add_argument("--ngram", type=int, default=NGRAM, help="leave out lines sharing N words in a row with the slice")
    add_threads_option(p)
    p.set_defaults(func=run)


def slice_size_of(bench: dict, path: str) -> int:
    found = re.search(r"first (\d+) examples", str(bench.get("train_slice", "")))
    if bench.get("benchmark") != "exit" or not found:
        raise RayexitError(f"{path}: not a `rayexit bench exit` JSON (expected `train_slice` "
                           "'SST-2 train.tsv, first N examples')")
    return int(found.group(1))


def carved_fraction_of(bench: dict, path: str) -> float:
    found = re.match(r"([0-9.]+) of the train slice", str(bench.get("validation", "")))
    if not found:
        raise RayexitError(f"{path}: its `validation` is {bench.get('validation')!r}, not a carved split "
                           "('F of the train slice ...'); --choose-on carved needs a `bench exit` run that carved one")
    return float(found.group(1))


def validation_sets(args: argparse.Namespace, task, bench: dict, sst2: Path):
    """(validation set per seed name, what it is, its size) for `--choose-on`."""
    slice_size = slice_size_of(bench, args.json)
    if args.choose_on == "carved":
        fraction = carved_fraction_of(bench, args.json)
        examples = task.load(str(sst2 / "train.tsv"), slice_size)
        splits: dict[str, object] = {}

        def carved(seed: str):
            if seed not in splits:  # the benchmark's own split: same slice, fraction and seed
                splits[seed] = task.split(examples, fraction, int(seed.removeprefix("seed")))[1]
            return splits[seed]

        first = min((key.split("/")[1] for key in bench["runs"]), default="seed1")
        return carved, bench["validation"], len(carved(first))
    validation = disjoint_validation(task.load(str(sst2 / "train.tsv")), slice_size,
                                     min_words=args.min_words, ngram=args.ngram)
    return (lambda seed: validation), validation.origin, len(validation)


def run(args: argparse.Namespace) -> int:
    from rayexit.tasks import task_named

    use_threads(args.threads)

    if args.repeats < 0:
        raise RayexitError(f"--repeats: got {args.repeats}, expected 0 (untimed) or more rounds")
    try:
        bench = json.loads(Path(args.json).read_text())
    except (OSError, ValueError) as exc:
        raise RayexitError(f"--json {args.json}: cannot read it as a `rayexit bench exit` JSON ({exc})") from None
    if args.report_on == "disjoint" and args.choose_on != "carved":
        raise RayexitError("--report-on disjoint reports on the lines that --choose-on disjoint chooses on; "
                           "pass --choose-on carved so that nothing is chosen on the set reported on")
    sst2 = datasets_dir(args.datasets) / "sst2"
    task = task_named("sequence")
    validation_of, origin, size = validation_sets(args, task, bench, sst2)
    if args.report_on == "dev":
        test, test_set = task.load(str(sst2 / "dev.tsv")), bench.get("test_set")
    else:
        test = disjoint_validation(task.load(str(sst2 / "train.tsv")), slice_size_of(bench, args.json),
                                   min_words=args.min_words, ngram=args.ngram)
        test_set = f"{test.origin}: {len(test)} lines (a second test set; nothing is chosen on it)"
    fresh = {"benchmark": "revalidate", "source": str(args.json), "choose_on": args.choose_on, "validation": origin,
             "validation_examples": size, "report_on": args.report_on, "min_words": args.min_words,
             "ngram": args.ngram, "repeats": args.repeats,
             "test_set": test_set, "test_examples": len(test), "max_drop": bench.get("max_drop", 0.01),
             "machine": machine_info(), "runs": {}}
    output = resume(args.out, fresh)
    wanted = {m.strip() for m in args.methods.split(",") if m.strip()} if args.methods else None
    known = {key.split("/")[0] for key in bench["runs"]}
    if wanted is not None and (not wanted or wanted - known):
        raise RayexitError(f"--methods: got {args.methods!r}, expected some of {', '.join(sorted(known))} "
                           f"(the methods {args.json} holds)")
    print(f"validation: {size} lines ({origin}); test: {len(test)} lines ({args.report_on})", flush=True)
    # a seed's fine-tune is needed only as the bar of a wanted method's run of that seed
    seeds = {key.split("/")[1] for key in bench["runs"] if wanted is None or key.split("/")[0] in wanted}
    for key in ordered_keys(bench["runs"]):
        method, seed = key.split("/")
        if seed not in seeds or (wanted is not None and method not in wanted | {REFERENCE}):
            continue
        if key in output["runs"]:
            print(f"== {key}: already re-chosen, skipped", flush=True)
            continue
        started = time.perf_counter()
        if method == REFERENCE and args.choose_on == "carved" and args.report_on == "dev":
            output["runs"][key] = reference_as_benchmarked(bench["runs"][key])  # nothing to choose or measure
        else:
            output["runs"][key] = rechoose(task, bench["runs"][key], Path(args.work) / seed / method,
                                           key, validation_of(seed), test, output, args.repeats,
                                           on_dev=args.report_on == "dev")
        write_json(args.out, output)
        print(format_run(key, output["runs"][key], time.perf_counter() - started, args.report_on), flush=True)
    output["summary"] = summarize(output["runs"])
    write_json(args.out, output)
    print(format_summary(output["summary"], output["choose_on"], output["report_on"]))
    print(f"figures -> {args.out}")
    return 0


def resume(path: str, fresh: dict) -> dict:
    if not Path(path).exists():
        return fresh
    stored = json.loads(Path(path).read_text())
    stored.setdefault("choose_on", "disjoint")  # written before --choose-on existed
    stored.setdefault("report_on", "dev")  # and before --report-on
    for key in ("source", "choose_on", "report_on", "validation", "min_words", "ngram", "repeats"):
        if stored.get(key) != fresh[key]:
            raise RayexitError(f"{path}: was written with {key} {stored.get(key)!r}, this run has {fresh[key]!r}; "
                               "pass another --out")
    return stored


def ordered_keys(runs: dict) -> list[str]:
    """Each seed's fine-tune first: its validation score is the others' "within 1 point" bar."""
    return sorted(runs, key=lambda k: (k.split("/")[1], k.split("/")[0] != REFERENCE))


def reference_as_benchmarked(run: dict) -> dict:
    return {"single_exit": True, "full": run["full"], "validation_full": run["validation_full"],
            "as_benchmarked_validation_full": run["validation_full"]}


def rechoose(task, run: dict, directory: Path, key: str, validation, test, output: dict, repeats: int = 0,
             on_dev: bool = True) -> dict:
    """One run's choices made on `validation` and measured on `test` (dev unless `on_dev` is False)."""
    from rayexit.bench.exit import add_oracle_fractions
    from rayexit.model_dir import EXIT_CONFIG_FILE, ModelDir
    from rayexit.policy import FULL_DEPTH
    from rayexit.sweep import protocol_report

    if not (directory / EXIT_CONFIG_FILE).is_file():
        raise RayexitError(f"{directory}: no model folder for {key}; pass the --work folder the benchmark ran with")
    folder = ModelDir(directory)
    model, tokenizer = folder.load_model(expected_task="sequence"), folder.load_tokenizer()
    max_length = model.exit_config.max_length  # the benchmark's own, saved with the model
    valid_data = task.encode(tokenizer, validation, model.labels, max_length)
    test_data = task.encode(tokenizer, test, model.labels, max_length)
    if run.get("single_exit"):
        valid, test = task.replay(model, valid_data, 32), task.replay(model, test_data, 32)
        figures = {"single_exit": True, "validation_full": valid.outcome(FULL_DEPTH).score,
                   "full": test.exit_scores()[-1]}
    else:
        reference = output["runs"].get(f"{REFERENCE}/{key.split('/')[1]}")
        figures = protocol_report(task, model, valid_data, test_data, max_drop=output["max_drop"],
                                  speedups=(1.5, 2.0, 3.0), batch_size=32, repeats=max(repeats, 1),
                                  reference=reference["validation_full"] if reference else None,
                                  timed=None if repeats > 0 else (), show_progress=False)
        figures.pop("curve", None)
        add_oracle_fractions(figures, POINTS)
        if repeats == 0:  # one untimed round of full depth: not a figure to keep
            figures.pop("full_depth_seconds", None)
            figures.pop("full_depth_spread", None)
        figures["as_benchmarked"] = {point: {"accuracy": run[point]["accuracy"],
                                             "layer_speedup": run[point]["layer_speedup"]}
                                     for point in POINTS if point in run}
    figures["as_benchmarked_validation_full"] = run["validation_full"]
    # The same model on a set the JSON also scored it on (dev, or the carved split re-drawn when the
    # test is elsewhere): a mismatch means --work holds other models than --json describes.
    field, where = ("full", "full-depth dev") if on_dev else ("validation_full", "carved-split")
    if abs(figures[field] - run[field]) > 1e-9:
        raise RayexitError(f"{directory}: {where} accuracy {figures[field]:.4f}, the JSON says "
                           f"{run[field]:.4f} for {key}; is --work the folder this JSON was made with?")
    if not on_dev:
        figures["dev_full"] = run["full"]
    return figures


def summarize(runs: dict) -> dict:
    by_method: dict[str, list[dict]] = {}
    for key, figures in runs.items():
        by_method.setdefault(key.split("/")[0], []).append(figures)
    summary = {}
    for method, items in by_method.items():
        row = {"seeds": len(items), "full": statistics.mean(f["full"] for f in items),
               "validation_full": statistics.mean(f["validation_full"] for f in items),
               "split_validation_full": statistics.mean(f["as_benchmarked_validation_full"] for f in items)}
        for point in POINTS:
            if all(point in f for f in items):
                row[point] = {"accuracy": statistics.mean(f[point]["accuracy"] for f in items),
                              "layer_speedup": statistics.mean(f[point]["layer_speedup"] for f in items),
                              "split_accuracy": statistics.mean(f["as_benchmarked"][point]["accuracy"] for f in items),
                              "split_layer_speedup": statistics.mean(
                                  f["as_benchmarked"][point]["layer_speedup"] for f in items)}
                if all("oracle_fraction" in f[point] for f in items):  # files written before it have none
                    row[point]["oracle_fraction"] = statistics.mean(f[point]["oracle_fraction"] for f in items)
        summary[method] = row
    return summary


def format_run(key: str, figures: dict, seconds: float, report_on: str = "dev") -> str:
    parts = [f"{key}: {report_on} full {figures['full']:.4f}; validation full {figures['validation_full']:.4f} "
             f"(carved split {figures['as_benchmarked_validation_full']:.4f})"]
    before = "split" if report_on == "dev" else "dev, as benchmarked"
    for point in POINTS:
        if point in figures:
            old = figures["as_benchmarked"][point]
            clock = figures[point].get("wallclock_speedup")
            timed = f", {clock:.2f}x clock" if clock is not None else ""
            parts.append(f"{point} {figures[point]['accuracy']:.4f} at {figures[point]['layer_speedup']:.2f}x{timed} "
                         f"({before}: {old['accuracy']:.4f} at {old['layer_speedup']:.2f}x)")
    return "; ".join(parts) + f" [{seconds:.0f}s]"


def format_summary(summary: dict, choose_on: str = "disjoint", report_on: str = "dev") -> str:
    pair = "disjoint / carved" if choose_on == "disjoint" else "carved, re-chosen / as benchmarked"
    test = "dev" if report_on == "dev" else "disjoint lines"
    points = pair if report_on == "dev" else "disjoint lines / dev as benchmarked"
    head = f"| method | seeds | {test} full | validation full: {pair} | " + " | ".join(
        f"{p}: {points} (acc @ layers x)" for p in POINTS) + " |"
    head += f" within: % of the oracle's layers x ({test}) |"
    lines = [head, "|" + " --- |" * (5 + len(POINTS))]
    for method, row in summary.items():
        cells = [method, str(row["seeds"]), f"{row['full']:.3f}",
                 f"{row['validation_full']:.3f} / {row['split_validation_full']:.3f}"]
        for point in POINTS:
            p = row.get(point)
            cells.append(f"{p['accuracy']:.3f} @ {p['layer_speedup']:.2f} / {p['split_accuracy']:.3f} @ "
                         f"{p['split_layer_speedup']:.2f}" if p else "-")
        fraction = row.get("within_reference", {}).get("oracle_fraction")
        cells.append(f"{100 * fraction:.0f}%" if fraction is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
