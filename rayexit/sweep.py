"""The one measurement harness: sweep on a cached pass, choose on validation, time on test.

Used by `rayexit eval`, the demo, tune's runner check and every benchmark, for both tasks.

1. One full-depth pass per data set (`Task.replay`) gives every exit's score and, replayed, any
   policy's score, layer and FLOPs speed-up without running the model again.
2. `select` chooses a policy on validation data with one rule: the fastest point whose drop
   below full depth stays within `max_drop` at 95% confidence (a paired bootstrap over
   validation examples), or the best-scoring point at or above `min_speedup`. The bound makes
   a small validation set choose cautiously instead of overfitting its own noise.
3. `time_policies` measures wall-clock only for the points that matter, through the batched
   runner at the given batch size, interleaved with full depth in every round; the speed-up is
   the median over rounds of (full-depth seconds / point seconds), with min and max kept.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from rayexit.policy import FULL_DEPTH, ExitPolicy
from rayexit.progress import progress
from rayexit.tasks import Outcome, Task

CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 1000
DEFAULT_REPEATS = 5


@dataclass
class Choice:
    """A policy chosen on validation, with the validation figures that chose it."""

    outcome: Outcome  # on validation
    full: Outcome  # full depth on validation
    drop_bound: float  # the drop's upper confidence bound on validation
    rule: str

    def record(self, task: Task) -> dict:
        return {
            "rule": self.rule,
            "examples": int(self.outcome.stats.shape[0]),
            task.metric: self.outcome.score,
            "full": self.full.score,
            "drop": self.full.score - self.outcome.score,
            "drop_bound": self.drop_bound,
            task.cost: getattr(self.outcome, task.cost),
        }


def drop_bounds(task: Task, full: Outcome, points: list[Outcome], seed: int = 0) -> list[float]:
    """Per point, the `CONFIDENCE` quantile of (full score - point score) over paired bootstrap draws."""
    size = full.stats.shape[0]
    if size == 0 or not points:
        return [0.0] * len(points)
    draws = torch.randint(size, (BOOTSTRAP_DRAWS, size), generator=torch.Generator().manual_seed(seed))
    reference = task.score_of(full.stats[draws])
    bounds = []
    for point in points:
        drops = reference - task.score_of(point.stats[draws])
        bounds.append(float(torch.quantile(drops.float(), CONFIDENCE)))
    return bounds


def select(
    task: Task, full: Outcome, points: list[Outcome], max_drop: float = 0.01, min_speedup: float | None = None
) -> Choice:
    """The one selection rule (eval, tune, the demo and the benchmarks all call this).

    Without `min_speedup`: the fastest point (in the task's cost: layers or FLOPs) whose drop
    bound is at most `max_drop`; full depth when none is. With it: the best-scoring point at
    least that fast (ties go to speed); full depth when none is that fast.
    """
    bounds = drop_bounds(task, full, points)
    if min_speedup is not None:
        fast = [(p, b) for p, b in zip(points, bounds) if getattr(p, task.cost) >= min_speedup]
        rule = f"best {task.metric} at {task.cost} >= {min_speedup:g} on validation"
        if not fast:
            return Choice(full, full, 0.0, rule + " (none that fast: full depth)")
        best, bound = max(fast, key=lambda pb: (pb[0].score, getattr(pb[0], task.cost)))
        return Choice(best, full, bound, rule)
    rule = (
        f"fastest {task.cost} whose {task.metric} drop below full depth is <= {max_drop:g} "
        f"at {CONFIDENCE:.0%} confidence (paired bootstrap, {BOOTSTRAP_DRAWS} draws) on validation"
    )
    eligible = [(p, b) for p, b in zip(points, bounds) if b <= max_drop + 1e-12]
    if not eligible:
        return Choice(full, full, 0.0, rule + " (none within: full depth)")
    best, bound = max(eligible, key=lambda pb: (getattr(pb[0], task.cost), pb[0].score))
    return Choice(best, full, bound, rule)


def within_reference(task: Task, full: Outcome, points: list[Outcome], reference: float, max_drop: float) -> Choice:
    """The fastest point whose validation score is at least `reference - max_drop`.

    `reference` is another model's validation score (e.g. the single-exit fine-tune's, the
    literature's comparison), so there is no paired bootstrap: the two models' answers are not
    paired draws of one model. Full depth stands in when no early-exit point reaches the bar,
    and the returned choice's `drop` (reference - score) says whether even full depth did.
    Ties in speed go to the higher score.
    """
    bar = reference - max_drop
    eligible = [p for p in points if p.score >= bar - 1e-12]
    best = max(eligible, key=lambda p: (getattr(p, task.cost), p.score)) if eligible else full
    shifted = Outcome(FULL_DEPTH, full.stats, reference, 1.0, 1.0)
    return Choice(best, shifted, 0.0, f"fastest {task.cost} with validation {task.metric} >= {bar:.4f}")


def time_policies(
    task: Task, model, data, batches: list, policies: list[ExitPolicy], repeats: int = DEFAULT_REPEATS,
    show_progress: bool = False,
) -> tuple[list[dict], dict]:
    """Wall-clock of each policy against full depth through the same runner, interleaved.

    Every round runs full depth once and then each policy once, in turn; a policy's speed-up is
    the median over rounds of that round's full-depth seconds over its own. Returns per policy
    {live outcome, wallclock_speedup, wallclock_spread [min, max], seconds} and the full-depth timing.
    """
    task.run_live(model, data, batches, FULL_DEPTH)  # warm-up: first calls pay for allocation and dispatch set-up
    full_times: list[float] = []
    times: list[list[float]] = [[] for _ in policies]
    live: list[Outcome | None] = [None] * len(policies)
    rounds = progress(range(max(1, repeats)), desc="timing", enabled=show_progress)
    for _ in rounds:
        start = time.perf_counter()
        task.run_live(model, data, batches, FULL_DEPTH)
        full_times.append(time.perf_counter() - start)
        for index, policy in enumerate(policies):
            start = time.perf_counter()
            live[index] = task.run_live(model, data, batches, policy)
            times[index].append(time.perf_counter() - start)
    out = []
    for policy_times, outcome in zip(times, live):
        ratios = [f / t for f, t in zip(full_times, policy_times)]
        out.append({
            "outcome": outcome,
            "wallclock_speedup": statistics.median(ratios),
            "wallclock_spread": [min(ratios), max(ratios)],
            "seconds": statistics.median(policy_times),
        })
    full = {"seconds": statistics.median(full_times), "spread": [min(full_times), max(full_times)]}
    return out, full


def outcomes(replay, policies: list[ExitPolicy], show_progress: bool = False, desc: str = "replay") -> list[Outcome]:
    return [replay.outcome(p) for p in progress(policies, desc=desc, enabled=show_progress)]


def pareto(task: Task, points: list[Outcome]) -> list[Outcome]:
    """The points no other point beats in both score and speed, fastest first."""
    from rayexit.tune.pareto import pareto_front

    return pareto_front(points, key=lambda p: (p.score, getattr(p, task.cost)))


def evaluate(
    task: Task,
    model,
    data,
    *,
    select_on=None,
    policy: ExitPolicy | None = None,
    max_drop: float = 0.01,
    min_speedup: float | None = None,
    batch_size: int = 32,
    repeats: int = DEFAULT_REPEATS,
    time_front: int = 2,
    time_on=None,
    show_progress: bool = True,
) -> dict:
    """The `rayexit eval` report: per-exit scores, the replayed curve, and the timed points.

    The policy reported as `selected` is `policy` when given, else chosen on `select_on`
    (validation data, encoded like `data`) by `select`, else the model's saved policy.
    Threshold grids come from `select_on` when there is one, else from a fixed grid; never
    from `data`, the set that is reported on. With `time_on` (a subset of `data`, encoded the
    same way), wall-clock rounds run there while every score and FLOPs figure comes from `data`.
    """
    model.eval()
    test = task.replay(model, data, batch_size)
    valid = task.replay(model, select_on, batch_size) if select_on is not None else None
    grid = task.default_grid(valid) if valid is not None else fixed_grid(task, model)
    saved = model.exit_config.policy
    choice = None
    if policy is not None:
        selected, how = policy.check_task(task.name), "given"
    elif valid is not None:
        choice = select(task, valid.outcome(FULL_DEPTH), outcomes(valid, grid), max_drop, min_speedup)
        selected, how = choice.outcome.policy, "chosen on validation"
    else:
        selected, how = saved, "saved in the model directory"

    curve = outcomes(test, grid, show_progress, desc="replay on eval data")
    front = [p.policy for p in pareto(task, curve)[:time_front]]
    timed_policies = _unique([selected, saved, *front])
    batches = task.eval_batches(data, batch_size)
    if time_on is None:
        timed, full_timing = time_policies(task, model, data, batches, timed_policies, repeats, show_progress)
    else:
        timed, full_timing = time_policies(
            task, model, time_on, task.eval_batches(time_on, batch_size), timed_policies, repeats, show_progress
        )
        for point, chosen in zip(timed, timed_policies):
            point["outcome"] = task.run_live(model, data, batches, chosen)  # scores on all of `data`
    timed_by_policy = {_key(p): t for p, t in zip(timed_policies, timed)}

    def measured(chosen: ExitPolicy) -> dict:
        point = timed_by_policy[_key(chosen)]
        figures = point["outcome"].figures(task)
        figures.update(wallclock_speedup=point["wallclock_speedup"], wallclock_spread=point["wallclock_spread"])
        return figures

    exit_scores = test.exit_scores()
    report = {
        "task": task.name,
        "metric": task.metric,
        "cost": task.cost,
        "examples": len(data),
        "batch_size": batch_size,
        "num_layers": model.num_layers,
        task.exit_key: exit_scores,
        "full": exit_scores[-1],
        "oracle_layer_speedup": test.oracle_layer_speedup(),
        "curve": [p.figures(task) for p in curve],
        "selected": dict(measured(selected), how=how),
        "saved": measured(saved),
        "timed": [dict(measured(p)) for p in timed_policies],
        "timing": {"repeats": repeats, "examples": len(time_on if time_on is not None else data),
                   "full_depth_seconds": full_timing["seconds"], "full_depth_spread": full_timing["spread"]},
    }
    if choice is not None:
        validation = choice.record(task)
        report["selected"]["validation"] = validation
        # how much the chosen point's drop grew from validation to the reported data
        report["selected"]["gap"] = (report["full"] - report["selected"][task.metric]) - validation["drop"]
    return report


def fixed_grid(task: Task, model) -> list[ExitPolicy]:
    """A grid that depends on nothing measured: for reports with no validation data."""
    if task.name == "token":
        thresholds = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
        grid = [ExitPolicy("sentee", t) for t in thresholds]
        return grid + [ExitPolicy("tokee", t, window=w) for w in (1, 3, 5) for t in thresholds]
    ceiling = float(torch.log(torch.tensor(float(max(len(model.labels), 2)))))
    fractions = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    grid = [ExitPolicy("entropy", round(f * ceiling, 4)) for f in fractions]
    grid += [ExitPolicy("maxprob", p) for p in (0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)]
    return grid + [ExitPolicy("patience", p) for p in range(1, model.num_layers)]


def format_report(report: dict) -> str:
    metric, cost = report["metric"], report["cost"]
    lines = [f"exit  {metric}"] + [f"{i + 1:>4}  {s:8.4f}" for i, s in enumerate(report[f"exit_{metric}"])]
    lines += ["", f"replayed on the evaluation data ({report['examples']} examples):"]
    lines += [f"{'policy':<24}{metric:>10}{'layers x':>10}{'FLOPs x':>9}"]
    for p in report["curve"]:
        lines.append(f"{p['describe']:<24}{p[metric]:10.4f}{p['layer_speedup']:10.2f}{p['flops_speedup']:9.2f}")
    timing = report["timing"]
    lines += ["", f"timed at batch {report['batch_size']} on {timing.get('examples', report['examples'])} examples, "
              f"median of {timing['repeats']} interleaved rounds:"]
    lines += [f"{'policy':<24}{metric:>10}{'layers x':>10}{'FLOPs x':>9}{'clock x':>9}  spread"]
    for p in report["timed"]:
        low, high = p["wallclock_spread"]
        lines.append(
            f"{p['describe']:<24}{p[metric]:10.4f}{p['layer_speedup']:10.2f}{p['flops_speedup']:9.2f}"
            f"{p['wallclock_speedup']:9.2f}  {low:.2f}-{high:.2f}"
        )
    selected = report["selected"]
    lines.append(f"full depth {report['full']:.4f}; oracle layer speed-up {report['oracle_layer_speedup']:.2f}x")
    lines.append(
        f"selected ({selected['how']}): {selected['describe']}: {metric} {selected[metric]:.4f}, "
        f"{selected[cost]:.2f}x {cost.replace('_speedup', '')}, {selected['wallclock_speedup']:.2f}x wall-clock"
    )
    if "validation" in selected:
        v = selected["validation"]
        lines.append(
            f"  on validation ({v['examples']}): {metric} {v[metric]:.4f} vs full {v['full']:.4f} "
            f"(drop {v['drop']:+.4f}, bound {v['drop_bound']:.4f}); validation-to-test gap {selected['gap']:+.4f}"
        )
    return "\n".join(lines)


def _key(policy: ExitPolicy) -> str:
    return repr(policy.to_dict())


def _unique(policies: list[ExitPolicy]) -> list[ExitPolicy]:
    seen, out = set(), []
    for policy in policies:
        if _key(policy) not in seen:
            seen.add(_key(policy))
            out.append(policy)
    return out


def protocol_report(
    task: Task,
    model,
    valid_data,
    test_data,
    *,
    max_drop: float = 0.01,
    speedups: tuple[float, ...] = (),
    batch_size: int = 32,
    repeats: int = DEFAULT_REPEATS,
    reference: float | None = None,
    kinds: tuple[str, ...] | None = None,
    timed: tuple[str, ...] | None = None,
    replays: tuple | None = None,
    show_progress: bool = True,
) -> dict:
    """What a benchmark reports for one model: every choice made on `valid_data`, every figure
    measured on `test_data`.

    `selected`: the fastest point within `max_drop` of the model's own full depth (the rule of
    `select`); `at_speedup[s]`: the best point at `s`x or faster; with `reference` (another
    model's score, e.g. a single-exit fine-tune's validation score), `within_reference`: the
    fastest point within `max_drop` of it. Each chosen point is then run live on the test data,
    timed against full depth (median of `repeats` interleaved rounds, with min/max), and
    reported with its validation figures and the validation-to-test gap of its drop.
    `kinds` limits the grid to some policy kinds (e.g. tokee); `timed` names the choices to time
    (default: all); the others are run live once, untimed. `replays` (validation, test) reuses
    full passes already made on the same model.
    """
    model.eval()
    if replays is None:
        replays = task.replay(model, valid_data, batch_size), task.replay(model, test_data, batch_size)
    valid, test = replays
    grid = [p for p in task.default_grid(valid) if kinds is None or p.kind in kinds]
    full_valid = valid.outcome(FULL_DEPTH)
    candidates = outcomes(valid, grid, show_progress, desc="replay on validation")
    choices = {"selected": select(task, full_valid, candidates, max_drop)}
    for s in speedups:
        choices[f"at_{s:g}x"] = select(task, full_valid, candidates, max_drop, min_speedup=s)
    if reference is not None:
        choices["within_reference"] = within_reference(task, full_valid, candidates, reference, max_drop)
    batches = task.eval_batches(test_data, batch_size)
    to_time = [c for name, c in choices.items() if timed is None or name in timed]
    policies = _unique([c.outcome.policy for c in to_time])
    measured, full_timing = time_policies(task, model, test_data, batches, policies, repeats, show_progress)
    by_key = {_key(p): t for p, t in zip(policies, measured)}
    for choice in choices.values():
        if _key(choice.outcome.policy) not in by_key:
            outcome = task.run_live(model, test_data, batches, choice.outcome.policy)
            by_key[_key(choice.outcome.policy)] = {"outcome": outcome, "wallclock_speedup": None,
                                                  "wallclock_spread": None}
    exit_scores = test.exit_scores()
    out = {
        task.exit_key: exit_scores,
        "full": exit_scores[-1],
        "validation_full": full_valid.score,
        "oracle_layer_speedup": test.oracle_layer_speedup(),
        "validation_examples": len(valid_data),
        "test_examples": len(test_data),
        "full_depth_seconds": full_timing["seconds"],
        "full_depth_spread": full_timing["spread"],
        "curve": [p.figures(task) for p in outcomes(test, grid)],
    }
    for name, choice in choices.items():
        point = by_key[_key(choice.outcome.policy)]
        figures = point["outcome"].figures(task)
        validation = choice.record(task)
        figures.update(
            wallclock_speedup=point["wallclock_speedup"],
            wallclock_spread=point["wallclock_spread"],
            validation=validation,
            gap=(exit_scores[-1] - figures[task.metric]) - validation["drop"],
        )
        out[name] = figures
    return out
