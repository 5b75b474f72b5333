"""Evaluate a sentence model: every exit's accuracy, and accuracy against speed-up per policy.

Accuracy and layer speed-up of each point come from the batched runner itself; wall-clock is
that runner's median time over the data at the given batch size, against full depth through
the same runner at the same batch size, the two run alternately.
"""

from __future__ import annotations

import statistics

import torch

from rayexit.config import ExitPolicy
from rayexit.data.encode import EncodedSet, iterate_batches
from rayexit.exits import ExitCache, ExitResult, collect_exit_logits, run_early_exit
from rayexit.metrics import accuracy, best_within, side_by_side
from rayexit.progress import progress

SWEEP_QUANTILES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def default_sweep(cache: ExitCache) -> list[ExitPolicy]:
    """Thresholds at quantiles of the inner exits' own scores on this data.

    A fixed grid suits one model's calibration and misses another's: self-distilled exits are
    soft (high entropy) while plain CE exits are sharp. Quantiles cover both evenly.
    """
    inner_entropy = cache.entropy[:, :-1].flatten()
    inner_confidence = cache.confidence[:, :-1].flatten()
    quantiles = torch.tensor(SWEEP_QUANTILES, dtype=inner_entropy.dtype)
    entropies = torch.quantile(inner_entropy, quantiles).tolist()
    confidences = torch.quantile(inner_confidence, 1 - quantiles).tolist()
    sweep = [ExitPolicy("entropy", _round(t)) for t in sorted(set(entropies))]
    sweep += [ExitPolicy("maxprob", _round(t)) for t in sorted(set(confidences), reverse=True)]
    sweep += [ExitPolicy("patience", p) for p in range(1, cache.num_layers)]
    return sweep


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def run_over(model, batches: list, policy: ExitPolicy) -> ExitResult:
    results = [run_early_exit(model, ids, mask, policy) for ids, mask, _ in batches]
    return ExitResult(
        torch.cat([r.predictions for r in results]),
        torch.cat([r.confidences for r in results]),
        torch.cat([r.exit_layers for r in results]),
    )


def evaluate_sequence_model(
    model,
    data: EncodedSet,
    batch_size: int = 32,
    sweep: list[ExitPolicy] | None = None,
    repeats: int = 3,
    show_progress: bool = True,
) -> dict:
    model.eval()
    batches = list(iterate_batches(data, batch_size))
    labels = torch.tensor(data.labels)
    num_layers = model.num_layers
    logits, _ = collect_exit_logits(model, batches)
    cache = ExitCache(logits)
    exit_accuracy = cache.exit_accuracies(labels)

    full_policy = ExitPolicy("none", 0.0)
    run_over(model, batches, full_policy)  # warm-up: first calls pay for allocation and dispatch set-up
    full_times: list[float] = []

    def point(policy: ExitPolicy) -> dict:
        # Full depth is re-timed beside every point, so a load change on a shared machine hits both.
        full_seconds, seconds, result = side_by_side(
            lambda: run_over(model, batches, full_policy), lambda: run_over(model, batches, policy), repeats
        )
        full_times.append(full_seconds)
        return {
            "policy": policy.kind,
            "threshold": policy.thresholds,
            "accuracy": accuracy(result.predictions, labels),
            "layer_speedup": result.layer_speedup(num_layers),
            "wallclock_speedup": full_seconds / seconds,
            "mean_exit_layer": result.exit_layers.double().mean().item(),
            "seconds": seconds,
        }

    policies = sweep if sweep is not None else default_sweep(cache)
    curve = [point(p) for p in progress(policies, desc="threshold sweep", enabled=show_progress)]
    chosen = point(model.exit_config.policy)
    oracle_layers = cache.oracle_exit_layers()
    return {
        "examples": len(data),
        "batch_size": batch_size,
        "num_layers": num_layers,
        "exit_accuracy": exit_accuracy,
        "full": exit_accuracy[-1],
        "full_depth_seconds": statistics.median(full_times),
        "curve": curve,
        "oracle_layer_speedup": num_layers / oracle_layers.double().mean().item(),
        "chosen": chosen,
    }


def summarize(report: dict, max_drop: float = 0.01) -> dict:
    """Best layer and wall-clock speed-ups among the points within `max_drop` of full accuracy."""
    by_layers = best_within(report["curve"], report["full"], max_drop, "layer_speedup")
    by_clock = best_within(report["curve"], report["full"], max_drop, "wallclock_speedup")
    return {"max_drop": max_drop, "best_layer_point": by_layers, "best_wallclock_point": by_clock}


def format_exit_accuracies(accuracies: list[float]) -> str:
    return "\n".join(["exit  accuracy"] + [f"{i + 1:>4}  {acc:8.4f}" for i, acc in enumerate(accuracies)])


def format_table(report: dict) -> str:
    lines = [format_exit_accuracies(report["exit_accuracy"])]
    lines += ["", f"{'policy':<9}{'threshold':>10}{'accuracy':>10}{'layers x':>10}{'clock x':>9}"]
    for p in report["curve"] + [dict(report["chosen"], policy=report["chosen"]["policy"] + "*")]:
        threshold = p["threshold"] if not isinstance(p["threshold"], list) else "per-layer"
        lines.append(
            f"{p['policy']:<9}{threshold!s:>10}{p['accuracy']:10.4f}{p['layer_speedup']:10.2f}{p['wallclock_speedup']:9.2f}"
        )
    lines.append(
        f"full depth {report['full']:.4f}; oracle layer speed-up "
        f"{report['oracle_layer_speedup']:.2f}x; * = saved policy"
    )
    return "\n".join(lines)
