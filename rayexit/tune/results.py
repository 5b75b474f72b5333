"""From finished trials to what the user keeps: the choice, pareto.json/png, best/, serve.yaml.

(optuna.db is not written here: the searcher keeps the study there while the trials run.)

Choosing uses validation figures only (the split carved from --train): the reference is the best
full-depth validation accuracy over all trials, and the choice is the fastest policy of any trial
within `max_drop` of it. Every figure written as `accuracy` / `layer_speedup` is measured on --eval.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from rayexit.config import ExitPolicy
from rayexit.errors import RayexitError
from rayexit.files import write_atomic, write_json
from rayexit.policy import FULL_DEPTH
from rayexit.tune.export import export_model, write_serve_config
from rayexit.tune.pareto import fastest_within, pareto_front
from rayexit.tune.space import TuneSpec
from rayexit.tune.trial import read_points

log = logging.getLogger(__name__)

VALIDATION = lambda c: (c["validation"]["accuracy"], c["validation"]["layer_speedup"])  # noqa: E731
# The selection rule of rayexit.sweep.select: the accuracy a point keeps at 95% confidence (its
# model's full depth minus the drop's bound), so a small validation set chooses cautiously.
BOUNDED = lambda c: (c["validation_full"] - c["validation"].get("drop_bound", 0.0), c["validation"]["layer_speedup"])  # noqa: E731


def collect(result_grid) -> list[dict]:
    """One record per trial that finished with a checkpoint (stopped or failed trials have none)."""
    trials = []
    for result in result_grid:
        if result.error is not None or result.checkpoint is None:
            continue
        with result.checkpoint.as_directory() as directory:  # local: the folder itself; a URI: a download
            record = read_points(directory)
        record["trial_id"] = result.metrics.get("trial_id")
        record["checkpoint"] = result.checkpoint
        record["metrics"] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        trials.append(record)
    trials.sort(key=lambda r: str(r["trial_id"]))
    return trials


def _candidate(record: dict, point: dict, index: int) -> dict:
    params = record["settings"]
    return {
        "trial": index,
        "trial_id": record["trial_id"],
        "gamma": params["gamma"],
        "temperature": params["temperature"],
        "lr": params["lr"],
        "policy": point["policy"],
        "thresholds": point["thresholds"],
        "accuracy": point["eval"]["accuracy"],
        "layer_speedup": point["eval"]["layer_speedup"],
        "full_accuracy": record["eval_exit_accuracy"][-1],
        "validation": point["validation"],
        "validation_full": record["validation_exit_accuracy"][-1],
    }


def _full_depth_candidate(record: dict, index: int) -> dict:
    """A trial's last exit for every input (`FULL_DEPTH`), in the shape of a front point."""
    validation_full = record["validation_exit_accuracy"][-1]
    point = {
        "policy": FULL_DEPTH.kind,
        "thresholds": FULL_DEPTH.thresholds,
        "eval": {"accuracy": record["eval_exit_accuracy"][-1], "layer_speedup": 1.0},
        "validation": {"accuracy": validation_full, "layer_speedup": 1.0, "drop_bound": 0.0},
    }
    return _candidate(record, point, index)


def choose(trials: list[dict], spec: TuneSpec, default_params: dict | None = None) -> dict:
    if not trials:
        raise RayexitError("no trial finished with a model; see the Tune experiment folder for the errors")
    candidates = [_candidate(r, p, i) for i, r in enumerate(trials) for p in r["front"]]
    reference = max(r["validation_exit_accuracy"][-1] for r in trials)
    front = pareto_front(candidates, key=VALIDATION)
    chosen = fastest_within(candidates, BOUNDED, reference, spec.max_drop)
    if chosen is None:
        # No early-exit point is surely within the drop (a small validation split widens every
        # bound): the best trial at full depth, which meets the bar by definition.
        best = max(range(len(trials)), key=lambda i: trials[i]["validation_exit_accuracy"][-1])
        chosen = _full_depth_candidate(trials[best], best)
        log.warning(
            "no early-exit policy of any trial is within max_drop %.3f of the best validation accuracy "
            "%.4f at 95%% confidence; exporting trial %s at full depth (policy none)",
            spec.max_drop, reference, trials[best]["trial_id"],
        )
    if chosen not in front:
        front.append(chosen)
    summary = {
        "reference_validation_accuracy": reference,
        "max_drop": spec.max_drop,
        "front": front,
        "candidates": candidates,
        "chosen": chosen,
        "best_full_eval_accuracy": max(r["eval_exit_accuracy"][-1] for r in trials),
    }
    default = _default_choice(trials, spec, default_params)
    if default is not None:
        summary["default"] = default
    return summary


def _default_choice(trials: list[dict], spec: TuneSpec, default_params: dict | None) -> dict | None:
    """The paper's way: its own settings, one entropy threshold, within the drop of its own full depth."""
    if not default_params:
        return None
    for index, record in enumerate(trials):
        if all(abs(record["params"].get(k, float("nan")) - v) < 1e-12 for k, v in default_params.items()):
            sweep = [_candidate(record, p, index) for p in record["entropy_sweep"]]
            own = record["validation_exit_accuracy"][-1]
            return fastest_within(sweep, BOUNDED, own, spec.max_drop)
    return None


def write_results(output: str | Path, trials: list[dict], spec: TuneSpec, job_data: dict, seconds: float) -> dict:
    output = Path(output)
    default_params = None
    if spec.include_default:
        default_params = job_data.get("default_params")
    summary = choose(trials, spec, default_params)
    chosen = summary["chosen"]
    front = [dict(p, chosen=p is chosen) for p in summary["front"]]
    write_json(output / "pareto.json", front)
    plot_pareto(summary, output / "pareto.png")
    policy = ExitPolicy(chosen["policy"], chosen["thresholds"])
    with trials[chosen["trial"]]["checkpoint"].as_directory() as source:
        best = export_model(source, output / "best", policy, {k: v for k, v in chosen.items() if k != "trial"})
    write_serve_config(best, output / "serve.yaml", name="rayexit-tuned")
    runner = runner_check(best, job_data["eval"])
    report = {
        "split": job_data["split"],
        "eval": job_data["eval"],
        "trials": len(trials),
        "seconds": seconds,
        "reference_validation_accuracy": summary["reference_validation_accuracy"],
        "max_drop": spec.max_drop,
        "best_full_eval_accuracy": summary["best_full_eval_accuracy"],
        "chosen": chosen,
        "default": summary.get("default"),
        "best_runner_eval": runner,
        "threshold_settings_per_second": threshold_rate(trials),
        "per_trial": per_trial(trials),
    }
    write_json(output / "tune.json", report)
    return report


def threshold_rate(trials: list[dict]) -> float:
    """Threshold settings searched per second, in the slowest trial."""
    return min(r["threshold_settings"] / r["threshold_seconds"] for r in trials)


def per_trial(trials: list[dict], task: str = "sequence") -> list[dict]:
    """One row per trial for tune.json, its full-depth figures under the task's metric name."""
    from rayexit.tasks import task_named

    score = task_named(task).metric
    return [
        {
            "trial_id": r["trial_id"],
            "params": r["params"],
            f"validation_full_{score}": r[f"validation_exit_{score}"][-1],
            f"eval_full_{score}": r[f"eval_exit_{score}"][-1],
            "train_seconds": r["train_seconds"],
            "threshold_settings": r["threshold_settings"],
            "threshold_seconds": r["threshold_seconds"],
        }
        for r in trials
    ]


@torch.no_grad()
def runner_check(model_dir: Path, eval_source: str) -> dict:
    """The exported directory, loaded as anyone would, through the batched runner on --eval."""
    from rayexit.model_dir import ModelDir
    from rayexit.tasks import task_named

    directory = ModelDir(model_dir)
    task = task_named(directory.task)
    model = directory.load_model()
    examples = task.load(eval_source, known=model.labels)
    data = task.encode(directory.load_tokenizer(), examples, model.labels, model.exit_config.max_length)
    batches = task.eval_batches(data, 32)
    start = time.perf_counter()
    outcome = task.run_live(model, data, batches, model.exit_config.policy)
    return {
        "accuracy": outcome.score,
        "layer_speedup": outcome.layer_speedup,
        "flops_speedup": outcome.flops_speedup,
        "seconds": time.perf_counter() - start,
        "batch_size": 32,
    }


def plot_pareto(summary: dict, path: Path, task: str = "sequence") -> Path:
    """Every candidate and the front, the task's score against its speed-up on the eval set, with the
    chosen point (`rayexit.tasks`: accuracy | entity F1, layers | FLOPs)."""
    import matplotlib

    from rayexit.tasks import task_named

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    token = task == "token"
    score, speed = task_named(task).metric, task_named(task).cost
    fig, ax = plt.subplots(figsize=(7, 4.5))
    everything = summary["candidates"]
    ax.scatter([c[speed] for c in everything], [c[score] for c in everything], s=6, color="0.8", label="all")
    for kind in sorted({p["policy"] for p in summary["front"]}):
        points = sorted((p for p in summary["front"] if p["policy"] == kind), key=lambda p: p[speed])
        ax.plot([p[speed] for p in points], [p[score] for p in points], "o", ms=4, label=f"front: {kind}")
    chosen = summary["chosen"]
    if chosen:
        ax.plot(chosen[speed], chosen[score], "*", ms=16, color="black", label="chosen")
    default = summary.get("default")
    if default:
        ax.plot(default[speed], default[score], "X", ms=11, color="tab:red",
                label="default settings" if token else "gamma 0.9, T 3 (default trial)")
    best = summary[f"best_full_eval_{score}"]
    ax.axhline(best, color="grey", ls="--", lw=1, label="best full depth")
    ax.axhline(best - summary["max_drop"], color="grey", ls=":", lw=1, label=f"best - {summary['max_drop']:g}")
    ax.set_xlabel(f"{'FLOPs' if speed == 'flops_speedup' else 'layer'} speed-up (x), eval set")
    ax.set_ylabel(f"{'entity F1' if score == 'f1' else 'accuracy'}, eval set")
    ax.set_title(f"{'token ' if token else ''}trials' Pareto front (chosen on validation, measured on eval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
