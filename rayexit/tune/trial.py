"""One Tune trial: train with the sampled settings, cache every exit's logits, search thresholds.

Validation logits (from the split carved out of --train) decide; eval logits are only measured,
so each candidate policy carries both figures and nothing is ever chosen on the eval set.
The trial's model directory and its `trial_points.json` go back to Tune as the checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rayexit.data import encode_examples, iterate_batches, load_text_classification
from rayexit.exits import ExitCache, collect_exit_logits
from rayexit.files import write_json
from rayexit.sweep import drop_bounds
from rayexit.tasks import Outcome, task_named
from rayexit.tune.pareto import fastest_within, within_drop_score
from rayexit.tune.space import TuneConfig
from rayexit.tune.thresholds import Point, SearchResult, evaluate_points, search_thresholds
from rayexit.tune.training import train_trial_model

log = logging.getLogger(__name__)

POINTS_FILE = "trial_points.json"
CACHE_BATCH = 64
SPEED = lambda p: (p.accuracy, p.layer_speedup)  # noqa: E731


@dataclass
class TrialJob:
    """What every trial shares; travels to the trial through `tune.with_parameters`."""

    model: str
    fit_path: str
    validation_path: str
    eval_path: str
    config: TuneConfig
    storage_path: str | None = None


def exit_cache(model, source: str, batch_size: int = CACHE_BATCH) -> tuple[ExitCache, torch.Tensor]:
    """Every exit's logits on a data source, computed once at full depth."""
    task = task_named("sequence")
    examples = task.load(source, known=model.labels)
    data = task.encode(model.tokenizer, examples, model.labels, model.exit_config.max_length)
    model.eval()
    logits, labels = collect_exit_logits(model, iterate_batches(data, batch_size))
    return ExitCache(logits), labels


def load_for_measuring(model_dir: Path):
    from rayexit.models import MultiExitForSequenceClassification, load_tokenizer

    model = MultiExitForSequenceClassification.from_pretrained(model_dir)
    model.tokenizer = load_tokenizer(model_dir)
    return model


def search(cache: ExitCache, labels: torch.Tensor, config: TuneConfig, samples: int | None = None) -> SearchResult:
    spec = config.tune
    return search_thresholds(
        cache,
        labels,
        kinds=spec.policies,
        per_layer=spec.per_layer,
        samples=spec.threshold_samples if samples is None else samples,
        seed=spec.seed,
    )


def objectives(result: SearchResult, config: TuneConfig) -> dict:
    """What Optuna and ASHA see: the trial's fastest point within the drop budget, and its score."""
    spec = config.tune
    reference = max(result.full_accuracy, spec.reference_accuracy or 0.0)
    chosen = fastest_within(result.points, SPEED, reference, spec.max_drop)
    point = chosen or max(result.points, key=lambda p: p.accuracy)
    return {
        "accuracy": point.accuracy,
        "layer_speedup": point.layer_speedup,
        "score": within_drop_score(result.points, SPEED, reference, spec.max_drop),
        "full_accuracy": result.full_accuracy,
    }


def run_trial(params: dict, job: TrialJob) -> None:
    """The Tune trainable (a function trainable); token searches go to `rayexit.tune.token_trial`."""
    from ray import tune

    config = job.config
    if config.tune.task == "token":
        from rayexit.tune.token_trial import run_token_trial

        return run_token_trial(params, job)
    settings = config.trial_settings(params)
    work = Path(tempfile.mkdtemp(prefix="rayexit-trial-"))
    try:
        # A trial that trains itself reports every epoch (ASHA needs it; Tune's table, its
        # result.json and optuna-dashboard's intermediate values show it live). A Ray Train
        # trial's epochs go to TensorBoard under its folder in the experiment.
        hook = _epoch_reporter(config, job) if config.tune.trainer == "local" else None
        model_dir, training = train_trial_model(
            job.model,
            job.fit_path,
            job.validation_path,
            settings,
            work / "model",
            trainer=config.tune.trainer,
            workers=config.tune.workers,
            cpus_per_worker=config.tune.cpus_per_worker,
            use_gpu=config.tune.use_gpu,
            storage_path=job.storage_path,
            on_epoch=hook,
        )
        model = load_for_measuring(model_dir)
        val_cache, val_labels = exit_cache(model, job.validation_path)
        eval_cache, eval_labels = exit_cache(model, job.eval_path)
        result = search(val_cache, val_labels, config)
        # The paper's way to pick, kept per trial so the default can be compared: one entropy threshold.
        entropy_only = search_thresholds(val_cache, val_labels, kinds=["entropy"], per_layer=False)
        record = {
            "params": params,
            "settings": training.get("settings", settings.to_dict()),  # with the defaults prepare() chose
            "defaults": training.get("defaults", {}),
            "validation_exit_accuracy": val_cache.exit_accuracies(val_labels),
            "eval_exit_accuracy": eval_cache.exit_accuracies(eval_labels),
            "front": _paired(result.points, eval_cache, eval_labels, val_cache, val_labels),
            "entropy_sweep": _paired(entropy_only.points, eval_cache, eval_labels, val_cache, val_labels),
            "threshold_settings": result.settings,
            "threshold_seconds": result.seconds,
            "train_seconds": training.get("seconds"),
            "history": training.get("history"),
        }
        write_json(model_dir / POINTS_FILE, record)
        metrics = {
            **objectives(result, config),
            "eval_full_accuracy": record["eval_exit_accuracy"][-1],
            "front_size": len(result.points),
            "threshold_settings_per_second": result.settings_per_second,
            "train_seconds": training.get("seconds") or 0.0,
            "final": 1,
        }
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(model_dir)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _paired(
    points: list[Point], cache: ExitCache, labels: torch.Tensor, val_cache: ExitCache, val_labels: torch.Tensor
) -> list[dict]:
    """Each point's figures on validation (with the drop's confidence bound: the selection rule
    of `rayexit.sweep.select`) and on eval (measured only)."""
    measured = evaluate_points(cache, labels, points)
    bounds = validation_drop_bounds(points, val_cache, val_labels)
    return [
        {
            "policy": p.policy,
            "thresholds": p.thresholds,
            "validation": {"accuracy": p.accuracy, "layer_speedup": p.layer_speedup, "drop_bound": bound},
            "eval": {"accuracy": m.accuracy, "layer_speedup": m.layer_speedup},
        }
        for p, m, bound in zip(points, measured, bounds, strict=True)
    ]


def validation_drop_bounds(points: list[Point], cache: ExitCache, labels: torch.Tensor) -> list[float]:
    """Per point, the upper confidence bound of its accuracy drop below this model's full depth."""
    task = task_named("sequence")

    def outcome(policy) -> Outcome:
        stats = (cache.simulate(policy).predictions == labels).double()[:, None]
        return Outcome(policy, stats, float(task.score_of(stats)), 1.0, 1.0)

    from rayexit.policy import FULL_DEPTH

    return drop_bounds(task, outcome(FULL_DEPTH), [outcome(p.to_policy()) for p in points])


def _epoch_reporter(config: TuneConfig, job: TrialJob):
    """Per-epoch reports for ASHA: the same objective on the validation cache, a quicker search."""
    from ray import tune

    from rayexit.models import load_tokenizer

    encoded: dict = {}

    def report(model, record: dict) -> None:
        if "data" not in encoded:  # the tokenizer training used: the base model's
            examples = load_text_classification(job.validation_path)
            tokenizer = load_tokenizer(job.model)
            encoded["data"] = encode_examples(tokenizer, examples, model.labels, model.exit_config.max_length)
        model.eval()
        logits, labels = collect_exit_logits(model, iterate_batches(encoded["data"], CACHE_BATCH))
        result = search(ExitCache(logits), labels, config, samples=min(config.tune.threshold_samples, 1000))
        tune.report({**objectives(result, config), "epoch": record.get("epoch", 0), "final": 0})

    return report


def read_points(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / POINTS_FILE
    return json.loads(path.read_text())
