"""One token Tune trial: stage 1, then self-sampling, then every exit setting replayed on cached exits.

Training takes the sampled stage-1 rates and self-sampling settings (`TuneConfig.token_stages`).
The trained model passes once over validation and once over eval at full depth; the per-word
uncertainties and tags of every exit are cached, and every (SENTEE | TOKEE, window, threshold)
is replayed from the cache (`rayexit.tune.token_replay`), with no retraining. Validation
figures decide; eval figures are only measured, so nothing is chosen on the eval set.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from rayexit.errors import RayexitError
from rayexit.files import write_json
from rayexit.model_dir import ModelDir
from rayexit.policy import FULL_DEPTH
from rayexit.sweep import drop_bounds
from rayexit.tasks import Outcome, TokenReplay, task_named
from rayexit.token_exits import cache_token_exits
from rayexit.tune.pareto import fastest_within, within_drop_score
from rayexit.tune.token_replay import TokenReplayCache, TokenSetting, evaluate_settings, search_token_settings
from rayexit.tune.training import train_trial_model

log = logging.getLogger(__name__)

CACHE_BATCH = 32
SPEED = lambda p: (p.f1, p.flops_speedup)  # noqa: E731


def replay_cache(model, tokenizer, source: str) -> tuple[TokenReplayCache, list[float]]:
    """A data set's full pass, ready for replaying many settings; and every exit's entity F1."""
    task = task_named("token")
    examples = task.load(source, known=model.labels)
    data = task.encode(tokenizer, examples, model.labels, model.exit_config.max_length)
    cache = cache_token_exits(model, data, CACHE_BATCH)
    try:
        replay = TokenReplayCache(cache, model.labels, data.gold)
    except ValueError as exc:
        raise RayexitError(f"{source}: {exc}") from None
    if not replay.exact:
        raise RayexitError(
            f"{source}: tags other than O and B-/I-/E-/S-TYPE; the token search replays entity F1 for IOB2/IOBES tags"
        )
    exit_f1 = TokenReplay(task, cache, data, model.labels).exit_scores()
    return replay, exit_f1


def figures(points: list[TokenSetting], valid: TokenReplayCache, test: TokenReplayCache) -> list[dict]:
    """Each point's validation figures (with the drop's confidence bound: `rayexit.sweep.select`'s
    rule) and its eval figures (measured only)."""
    task = task_named("token")
    measured = evaluate_settings(test, points)
    on_valid = evaluate_settings(valid, points + [full_depth_setting()], per_sentence=True)
    full_counts = on_valid[-1][1]
    full = Outcome(FULL_DEPTH, full_counts, float(task.score_of(full_counts)), 1.0, 1.0)
    outcomes = [Outcome(p.to_policy(), counts, p.f1, p.layer_speedup, p.flops_speedup) for p, counts in on_valid[:-1]]
    bounds = drop_bounds(task, full, outcomes)
    return [
        {
            "policy": p.kind,
            "window": p.window,
            "thresholds": p.thresholds,
            "validation": {
                "f1": v.f1, "flops_speedup": v.flops_speedup, "layer_speedup": v.layer_speedup, "drop_bound": bound,
            },
            "eval": {"f1": m.f1, "flops_speedup": m.flops_speedup, "layer_speedup": m.layer_speedup},
        }
        for p, (v, _), m, bound in zip(points, on_valid[:-1], measured, bounds, strict=True)
    ]


def with_full_depth(points: list[TokenSetting]) -> list[TokenSetting]:
    """The front, plus full depth when it is not on it: the choice falls back to it when nothing else is within."""
    if any(p.layer_speedup == 1.0 for p in points):
        return points
    return points + [full_depth_setting()]


def full_depth_setting() -> TokenSetting:
    """SENTEE at threshold 0: no uncertainty is below 0, so every word runs every layer."""
    return TokenSetting("sentee", 1, 0.0, 0.0, 1.0, 1.0)


def run_token_trial(params: dict, job) -> None:
    """The Tune trainable for `tune.task: token` (a function trainable)."""
    from ray import tune

    config, spec = job.config, job.config.tune
    first, second = config.token_stages(params)
    work = Path(tempfile.mkdtemp(prefix="rayexit-token-trial-"))
    try:
        common = dict(trainer=spec.trainer, workers=spec.workers, cpus_per_worker=spec.cpus_per_worker,
                      use_gpu=spec.use_gpu, storage_path=job.storage_path, task="token")
        model_dir, stage1 = train_trial_model(
            job.model, job.fit_path, job.validation_path, first, work / "stage1", **common
        )
        stage2: dict = {}
        if second is not None:
            model_dir, stage2 = train_trial_model(
                None, job.fit_path, job.validation_path, second, work / "model", init=str(model_dir), **common
            )
        directory = ModelDir(model_dir)
        model, tokenizer = directory.load_model(expected_task="token"), directory.load_tokenizer()
        with torch.no_grad():
            valid, valid_f1 = replay_cache(model, tokenizer, job.validation_path)
            test, eval_f1 = replay_cache(model, tokenizer, job.eval_path)
        result = search_token_settings(valid, spec.policies, spec.windows, spec.threshold_samples)
        record = {
            "task": "token",
            "params": params,
            "settings": first.to_dict(),
            "self_sampling": second.to_dict() if second is not None else None,
            "validation_exit_f1": valid_f1,
            "eval_exit_f1": eval_f1,
            "front": figures(with_full_depth(result.points), valid, test),
            "threshold_settings": result.settings,
            "threshold_seconds": result.seconds,
            "train_seconds": (stage1.get("seconds") or 0.0) + (stage2.get("seconds") or 0.0),
            "history": {"stage1": stage1.get("history"), "self_sampling": stage2.get("history")},
        }
        write_json(Path(model_dir) / "trial_points.json", record)
        if second is not None:  # the checkpoint is the final model only
            shutil.rmtree(work / "stage1", ignore_errors=True)
        reference = max(result.full_f1, spec.reference_accuracy or 0.0)
        chosen = fastest_within(result.points, SPEED, reference, spec.max_drop)
        point = chosen or max(result.points, key=lambda p: p.f1)
        metrics = {
            "f1": point.f1,
            "flops_speedup": point.flops_speedup,
            "score": within_drop_score(result.points, SPEED, reference, spec.max_drop),
            "full_f1": result.full_f1,
            "eval_full_f1": eval_f1[-1],
            "front_size": len(result.points),
            "threshold_settings_per_second": result.settings_per_second,
            "train_seconds": record["train_seconds"],
            "final": 1,
        }
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(model_dir)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
