"""`rayexit bench exit`'s arithmetic over finished runs: time-to-quality, the summary across
seeds, the issue-10 targets, the printed table and the remaining-time estimate.

Everything here is recomputed from the runs in the JSON, so a resumed benchmark and a reader
of the file get the same figures. A run is one (method, seed) record written by
`rayexit.bench.exit`; the single-exit fine-tune's (`finetune`) holds its full-depth figures only.
"""

from __future__ import annotations

import math
import statistics

POINTS = ("selected", "at_1.5x", "at_2x", "at_3x", "within_reference")
POINT_FIGURES = ("accuracy", "layer_speedup", "flops_speedup", "wallclock_speedup", "oracle_fraction")
QUALITY_POINT = "at_2x"  # time-to-quality: DeeBERT's final accuracy at this point is the bar
REFERENCE = "finetune"
TOLERANCE = 1e-9


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one value), min, max and count."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# -- time-to-quality ----------------------------------------------------------------------------


def time_to_quality(snapshots: list[dict], bar: float, point: str = QUALITY_POINT, start_seconds: float = 0.0) -> dict:
    """The first snapshot whose `point` test accuracy reaches `bar`: its training seconds and steps.

    Snapshots are in training order; their `train_seconds` leave the snapshot evaluations out
    and include every earlier stage (DeeBERT's stage 1). Resolution is the snapshot spacing, so
    `after_seconds` keeps the last look that was still under the bar (the snapshot before, or
    `start_seconds`, where the snapshotted stage began): the bar was crossed in (after, seconds].
    """
    before = start_seconds
    for index, snap in enumerate(snapshots):
        if snap[point]["accuracy"] >= bar - TOLERANCE:
            return {"bar": bar, "reached": True, "seconds": snap["train_seconds"], "steps": snap["steps_so_far"],
                    "after_seconds": before, "snapshot": index + 1, "of": len(snapshots)}
        before = snap["train_seconds"]
    best = max((s[point]["accuracy"] for s in snapshots), default=None)
    return {"bar": bar, "reached": False, "seconds": None, "steps": None, "best": best, "of": len(snapshots)}


def add_time_to_quality(runs: dict[str, dict]) -> None:
    """Each run with snapshots gets `time_to_quality` against its seed's DeeBERT final 2x-point accuracy."""
    bars = {r["seed"]: r[QUALITY_POINT]["accuracy"] for r in runs.values()
            if r["method"] == "deebert" and QUALITY_POINT in r}
    for run in runs.values():
        run.pop("time_to_quality", None)
        if run.get("snapshots") and run["seed"] in bars:
            # snapshots are taken in the last stage only: the stages before it end under the bar
            start = sum(run.get("stage_seconds", [])[:-1])
            run["time_to_quality"] = time_to_quality(run["snapshots"], bars[run["seed"]], start_seconds=start)


# -- summary across seeds -----------------------------------------------------------------------


def summarize(runs: dict[str, dict]) -> dict:
    """Per method, over its seeds: `spread` of every headline figure."""
    by_method: dict[str, list[dict]] = {}
    for run in runs.values():
        by_method.setdefault(run["method"], []).append(run)
    out = {}
    for method, items in by_method.items():
        row: dict[str, dict] = {"seeds": sorted(r["seed"] for r in items)}  # type: ignore[dict-item]
        if all("exit_accuracy" in r for r in items):
            for i in range(len(items[0]["exit_accuracy"])):
                row[f"exit{i + 1}"] = spread([r["exit_accuracy"][i] for r in items])
        for name in ("full", "validation_full", "oracle_layer_speedup", "train_seconds"):
            if all(r.get(name) is not None for r in items):
                row[name] = spread([r[name] for r in items])
        for point in POINTS:
            for figure in POINT_FIGURES:
                values = [r[point].get(figure) for r in items if point in r]
                if values and len(values) == len(items) and all(v is not None for v in values):
                    row[f"{point}.{figure}"] = spread(values)
            met = [r[point]["within"] for r in items if point in r and "within" in r[point]]
            if met:
                row[f"{point}.within_on_validation"] = {"seeds": sum(met), "n": len(met)}
        ttq = [r["time_to_quality"] for r in items if "time_to_quality" in r]
        if ttq:
            reached = [t for t in ttq if t["reached"]]
            row["time_to_quality.reached"] = {"seeds": len(reached), "n": len(ttq)}  # type: ignore[assignment]
            if reached:
                row["time_to_quality.seconds"] = spread([t["seconds"] for t in reached])
                row["time_to_quality.steps"] = spread([t["steps"] for t in reached])
        out[method] = row
    return out


# -- targets ------------------------------------------------------------------------------------


def _paired(runs: dict[str, dict], a: str, b: str | None = None) -> list[tuple[dict, dict | None]]:
    seeds = sorted({r["seed"] for r in runs.values() if r["method"] == a})
    pairs = []
    for seed in seeds:
        first = runs.get(f"{a}/seed{seed}")
        second = runs.get(f"{b}/seed{seed}") if b else None
        if first is not None and (b is None or second is not None):
            pairs.append((first, second))
    return pairs


def judge(name: str, claim: str, margins: list[float | None], seeds: list[int]) -> dict:
    """One target from per-seed margins (figure minus what the target asks; >= 0 is met).

    `met`: the mean margin is >= 0. `beyond_spread`: the mean margin is further from 0 than the
    seeds' sample standard deviation, i.e. the verdict is larger than seed-to-seed noise (None
    with fewer than two seeds). A seed with no figure (e.g. a quality never reached) counts as
    missed and makes the mean None.
    """
    record: dict = {"target": name, "claim": claim, "seeds": seeds, "margins": margins}
    known = [m for m in margins if m is not None]
    if not margins:
        return {**record, "met": None, "note": "no paired runs yet"}
    record["seeds_met"] = sum(1 for m in margins if m is not None and m >= -TOLERANCE)
    if len(known) < len(margins):
        return {**record, "met": False, "mean_margin": None, "note": "a seed has no figure (not reached)"}
    stats = spread(known)
    mean = stats["mean"]
    record.update(met=mean >= -TOLERANCE, mean_margin=mean, std=stats["std"], min=stats["min"], max=stats["max"])
    if mean < -TOLERANCE:
        record["missed_by"] = -mean
    record["beyond_spread"] = None if stats["std"] is None else abs(mean) > stats["std"]
    return record


def figure(run: dict, path: str) -> float | None:
    """`run`'s figure at a dotted path ("at_2x.accuracy", "exit_accuracy.0"); None where absent."""
    value: object = run
    parts = path.split(".")
    while parts:
        part = parts.pop(0)
        if isinstance(value, dict):
            # Keys may hold a dot themselves ("at_1.5x"): take the longest run of parts that names one.
            for extra in range(len(parts), 0, -1):
                longer = ".".join([part, *parts[:extra]])
                if longer in value:
                    part, parts = longer, parts[extra:]
                    break
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def compare(runs: dict[str, dict], name: str, claim: str, other: str, path: str, offset: float) -> dict:
    """RomeBERT's figure at `path` minus `other`'s, plus `offset`, per seed both have."""
    margins, seeds = [], []
    for mine, theirs in _paired(runs, "romebert", other):
        a, b = figure(mine, path), figure(theirs, path)
        if a is not None and b is not None:
            margins.append(a - b + offset)
            seeds.append(mine["seed"])
    return judge(name, claim, margins, seeds)


def targets(runs: dict[str, dict], speedups: tuple[float, ...] = (1.5, 2.0, 3.0)) -> list[dict]:
    """Issue 10's targets for RomeBERT, each judged on the seeds both sides have."""
    out = [compare(runs, "full_vs_finetune", "RomeBERT full accuracy within 0.5 point of the single-exit fine-tune",
                   REFERENCE, "full", 0.005)]
    for s in speedups:
        for other in ("deebert", "pabee", "joint"):
            claim = f"RomeBERT accuracy at {s:g}x layer speed-up >= {other}'s"
            out.append(compare(runs, f"at_{s:g}x_vs_{other}", claim, other, f"at_{s:g}x.accuracy", 0.0))
    out.append(compare(runs, "exit1_vs_deebert", "RomeBERT exit 1 at least 3 points above DeeBERT exit 1",
                       "deebert", "exit_accuracy.0", -0.03))
    mine = [a for a, _ in _paired(runs, "romebert") if "within_reference" in a]
    for name, need, claim in (
        ("layer_speedup", 2.0, "layer speed-up >= 2.0x"),
        ("wallclock_speedup", 1.8, "wall-clock speed-up >= 1.8x at batch 32"),
        ("oracle_fraction", 0.7, "at least 70% of the oracle's layer speed-up"),
    ):
        # a point not within 1 point of the fine-tune on validation has no speed-up to speak of: missed
        margins = [
            figure(a, f"within_reference.{name}") - need
            if a["within_reference"].get("within") and figure(a, f"within_reference.{name}") is not None else None
            for a in mine
        ]
        out.append(judge(f"within_finetune_{name}", f"within 1 point of the single-exit fine-tune: {claim}",
                         margins, [a["seed"] for a in mine]))
    margins, seeds, orders = [], [], []
    for a, b in _paired(runs, "romebert", "deebert"):
        mine_ttq, theirs = a.get("time_to_quality"), b.get("time_to_quality")
        if not mine_ttq or not theirs:
            continue
        ok = mine_ttq["reached"] and theirs["reached"]
        margins.append(theirs["seconds"] - mine_ttq["seconds"] if ok else None)
        orders.append(crossing_order(mine_ttq, theirs) if ok else None)
        seeds.append(a["seed"])
    record = judge(
        "time_to_quality_vs_deebert",
        "RomeBERT reaches DeeBERT's final 2x-point accuracy in less training time than DeeBERT (seconds saved)",
        margins, seeds,
    )
    out.append({**record, "order": orders})
    return out


def crossing_order(mine: dict, theirs: dict) -> str:
    """`sooner` / `later` where the two crossing intervals (after, seconds] do not overlap, else
    `within_resolution`: the snapshots cannot tell which crossed first."""
    if mine["seconds"] <= theirs["after_seconds"]:
        return "sooner"
    if mine["after_seconds"] >= theirs["seconds"]:
        return "later"
    return "within_resolution"


# -- remaining time ------------------------------------------------------------------------------


def remaining_seconds(
    pending: list[tuple[str, list[int]]], runs: dict[str, dict], current: dict | None = None
) -> float | None:
    """Measured seconds per step (per method and stage) x steps still to run, plus each run's measured overhead.

    `pending` lists (method, steps per stage to train) for runs not started; `current` is the
    run in progress: {method, rate (seconds per step now), steps_left}. A method not measured
    yet borrows the mean rate of those that are. A run whose training shared the CPU
    (`training_cpu`) counts only where no quiet run of its method and stage has been measured.
    None before any step has been measured.
    """
    quiet: dict[tuple[str, int], list[float]] = {}
    shared: dict[tuple[str, int], list[float]] = {}
    overheads: list[float] = []
    for run in runs.values():
        into = shared if (run.get("training_cpu") or {}).get("shared_cpu") else quiet
        for index, (steps, seconds) in enumerate(zip(run.get("stage_steps", []), run.get("stage_seconds", []))):
            if steps and seconds and not (index == 0 and run.get("stage1_from")):
                into.setdefault((run["method"], index), []).append(seconds / steps)
        if run.get("wall_seconds") is not None and run.get("train_seconds") is not None:
            overheads.append(max(0.0, run["wall_seconds"] - run["train_seconds"] - run.get("stage1_reused", 0.0)))
    rates = {**shared, **quiet}
    fallback = [statistics.fmean(v) for v in rates.values()]
    if current is not None and current.get("rate"):
        fallback.append(current["rate"])
    if not fallback:
        return None  # nothing measured yet: no honest estimate
    default_rate = statistics.fmean(fallback)
    overhead = statistics.fmean(overheads) if overheads else 0.0
    total = 0.0
    if current is not None:
        total += current.get("rate", default_rate) * current.get("steps_left", 0) + overhead
    for method, stage_steps in pending:
        for index, steps in enumerate(stage_steps):
            rate = rates.get((method, index))
            total += (statistics.fmean(rate) if rate else default_rate) * steps
        total += overhead
    return total


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "? (no step measured yet)"
    seconds = max(0, int(math.ceil(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# -- the printed table ---------------------------------------------------------------------------


def _cell(row: dict, key: str, digits: int = 3, scale: float = 1.0) -> str:
    figure = row.get(key)
    if not figure:
        return "-"
    mean = figure["mean"] * scale
    std = figure["std"]
    return f"{mean:.{digits}f}" + (f"±{std * scale:.{digits}f}" if std is not None else "")


def format_table(output: dict) -> str:
    """Means ± sample std over seeds, on the test set; then each target's verdict."""
    summary = output.get("summary", {})
    columns = [
        ("exit1", "exit1", 3, 1.0), ("full", "full", 3, 1.0),
        ("@1.5x", "at_1.5x.accuracy", 3, 1.0), ("@2x", "at_2x.accuracy", 3, 1.0), ("@3x", "at_3x.accuracy", 3, 1.0),
        ("FT-1pt acc", "within_reference.accuracy", 3, 1.0), ("layers x", "within_reference.layer_speedup", 2, 1.0),
        ("FLOPs x", "within_reference.flops_speedup", 2, 1.0),
        ("clock x", "within_reference.wallclock_speedup", 2, 1.0),
        ("oracle x", "oracle_layer_speedup", 2, 1.0), ("% oracle", "within_reference.oracle_fraction", 0, 100.0),
        ("train s", "train_seconds", 0, 1.0), ("to-quality s", "time_to_quality.seconds", 0, 1.0),
    ]
    rows = []
    for method, row in summary.items():
        rows.append([method] + [_cell(row, key, digits, scale) for _, key, digits, scale in columns])
    header = ["method"] + [c[0] for c in columns]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(
        "mean±std over seeds on SST-2 dev; points chosen on validation; FT-1pt: fastest point within 1 point of the "
        "same seed's single-exit fine-tune (validation); to-quality: training seconds to reach DeeBERT's final "
        "2x-point accuracy (seeds that reached it)"
    )
    for target in output.get("targets", []):
        lines.append(format_target(target))
    return "\n".join(lines)


def format_target(t: dict) -> str:
    return _format_verdict(t) + _format_order(t.get("order"))


def _format_verdict(t: dict) -> str:
    if t.get("met") is None:
        return f"  [ ? ] {t['claim']}: {t.get('note', 'not measured')}"
    if t.get("mean_margin") is None:
        return f"  [MISS] {t['claim']}: {t.get('note')} ({t.get('seeds_met', 0)}/{len(t['margins'])} seeds met)"
    verdict = "MET " if t["met"] else "MISS"
    how = f"margin {t['mean_margin']:+.4f}" + (f" (missed by {t['missed_by']:.4f})" if "missed_by" in t else "")
    noise = {True: "beyond the seeds' spread", False: "within the seeds' spread", None: "one seed"}[t["beyond_spread"]]
    std = f", std {t['std']:.4f}" if t.get("std") is not None else ""
    return f"  [{verdict}] {t['claim']}: {how}{std}, {noise}; {t['seeds_met']}/{len(t['margins'])} seeds met"


def _format_order(order: list | None) -> str:
    """Per seed, whether the snapshots can tell which method crossed the bar first."""
    if not order:
        return ""
    return "; by the snapshots: " + ", ".join(o.replace("_", " ") if o else "not reached" for o in order)
