"""The Tune experiment: split the data, run the Tuner with OptunaSearch, resume it, hand results on.

An output folder holds everything: `job.json` (what was asked, so `--resume` needs nothing
else), `data/` (the fit and validation splits as TSV), `experiment/` (Tune's experiment
directory: TensorBoard and the dashboard read it; trial checkpoints live there) and, once the
trials are done, what `rayexit.tune.results` writes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from ray.tune.search.optuna import OptunaSearch

from rayexit.data import load_text_classification
from rayexit.errors import RayexitError
from rayexit.files import write_json
from rayexit.tune.space import TuneConfig, TuneSpec
from rayexit.tune.split import carve_validation, write_tsv
from rayexit.tune.trial import TrialJob, run_trial

log = logging.getLogger(__name__)

EXPERIMENT = "experiment"
JOB_FILE = "job.json"
Trainable = Callable[[dict, TrialJob], None]


def _portable(source: str) -> str:
    """Trials run in their own working folders: a local path must be absolute to mean the same there."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def prepare_job(
    model: str, train: str, eval_source: str, output: str | Path, config: TuneConfig, max_examples: int | None = None
) -> TrialJob:
    """Carve the validation split, write both parts and `job.json`; refuse to reuse a finished folder."""
    output = Path(output)
    if (output / JOB_FILE).exists():
        raise RayexitError(
            f"{output}: holds a tuning run; continue it with --resume {output} or pick a new folder"
        )
    load_text_classification(eval_source)  # fail now on a bad --eval, not after the first trial
    examples = load_text_classification(train, max_examples)
    spec = config.tune
    split = carve_validation(examples, spec.validation_fraction, spec.split_seed)
    data = output / "data"
    fit_path = write_tsv(split.fit, data / "fit.tsv")
    validation_path = write_tsv(split.validation, data / "validation.tsv")
    log.info("validation split %s: %d fit, %d validation examples", split.name, len(split.fit), len(split.validation))
    settings = config.train
    if settings.max_examples is not None:  # already applied when carving; the trainer sees the fit file as is
        import dataclasses

        config = TuneConfig(dataclasses.replace(settings, max_examples=None), spec, config.source)
    job = TrialJob(
        model=_portable(model),
        fit_path=str(fit_path.resolve()),
        validation_path=str(validation_path.resolve()),
        eval_path=_portable(eval_source),
        config=config,
    )
    write_json(
        output / JOB_FILE,
        {
            "model": job.model,
            "train": _portable(train),
            "eval": job.eval_path,
            "max_examples": max_examples,
            "split": split.describe(),
            "fit_path": job.fit_path,
            "validation_path": job.validation_path,
            "train_settings": config.train.to_dict(),
            "tune": spec.to_dict(),
            "default_params": config.default_point() if spec.include_default else None,
            "config_file": config.source,
        },
    )
    return job


def load_job(output: str | Path) -> tuple[TrialJob, dict]:
    output = Path(output)
    path = output / JOB_FILE
    if not path.is_file():
        raise RayexitError(f"{output}: no {JOB_FILE}; --resume takes the DIR of an earlier `rayexit tune --output DIR`")
    data = json.loads(path.read_text())
    from rayexit.config import TrainSettings

    config = TuneConfig(TrainSettings.from_dict(data["train_settings"]), TuneSpec.from_dict(data["tune"]))
    job = TrialJob(data["model"], data["fit_path"], data["validation_path"], data["eval"], config)
    return job, data


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that accepts results of trials it did not suggest in this session.

    After `Tuner.restore`, a trial started before the interruption runs again, but the restored
    searcher may not hold its Optuna trial (its state was saved before that suggestion), and the
    stock class fails with a KeyError. Such a result is added to the study as a finished trial
    with the parameters Tune ran it with, so the sampler still learns from it.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._ot_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        if error or not result:
            return
        import optuna

        names = self.metric if isinstance(self.metric, list) else [self.metric]
        config = result.get("config") or {}
        params = {name: result.get(f"config/{name}", config.get(name)) for name in self._space}
        values = [result.get(name) for name in names]
        if None in values or None in params.values():
            return
        self._ot_study.add_trial(optuna.trial.create_trial(params=params, distributions=self._space, values=values))
        self._completed_trials.add(trial_id)


def _searcher(config: TuneConfig):
    import optuna

    spec = config.tune
    space = {
        name: optuna.distributions.FloatDistribution(r.low, r.high, log=r.log) for name, r in spec.searched().items()
    }
    if not space:
        raise RayexitError("tune.space: nothing to search; give at least one setting a [low, high] range")
    default = config.default_point()
    points = [default] if spec.include_default and set(default) == set(space) else []
    if spec.include_default and not points:
        log.warning("tune.include_default: the paper's default is outside the search space; not queued")
    if spec.objective == "pareto":
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(10, max(2, spec.trials // 2)))
        return ResumableOptunaSearch(
            space, metric=["accuracy", "layer_speedup"], mode=["max", "max"], points_to_evaluate=points, sampler=sampler
        )
    sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(10, max(2, spec.trials // 2)))
    return ResumableOptunaSearch(space, metric="score", mode="max", points_to_evaluate=points, sampler=sampler)


def _resources(spec: TuneSpec) -> dict:
    """Trials one at a time unless the config grants each fewer CPUs than the machine has."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1))
    if spec.cpus_per_trial is not None:
        return {"cpu": spec.cpus_per_trial}
    if spec.trainer == "local":
        return {"cpu": total}
    # Ray Train's own workers hold the CPUs while training; the trial only waits for them and then
    # measures, and with one trial at a time nothing else competes for the machine meanwhile.
    # (Tune refuses an empty request, hence a token share rather than zero.)
    return {"cpu": 0.01}


def _trainable(job: TrialJob, trainable: Trainable | None):
    from ray import tune

    return tune.with_resources(tune.with_parameters(trainable or run_trial, job=job), _resources(job.config.tune))


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)


def build_tuner(job: TrialJob, output: str | Path, trainable: Trainable | None = None):
    from ray import tune

    _ensure_ray()
    spec = job.config.tune
    scheduler = None
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # Iterations: one report per epoch, then the final one with the checkpoint.
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=int(job.config.train.epochs) + 2, grace_period=spec.grace_epochs
        )
    single = spec.objective == "within_drop"
    concurrent = 1 if spec.cpus_per_trial is None else None
    tune_config = tune.TuneConfig(
        search_alg=_searcher(job.config),
        scheduler=scheduler,
        num_samples=spec.trials,
        metric="score" if single else None,
        mode="max" if single else None,
        max_concurrent_trials=concurrent,
    )
    run_config = tune.RunConfig(
        name=EXPERIMENT,
        storage_path=str(Path(output).resolve()),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=0),
        verbose=1,
    )
    return tune.Tuner(_trainable(job, trainable), tune_config=tune_config, run_config=run_config)


def restore_tuner(output: str | Path, trainable: Trainable | None = None):
    """Continue an interrupted experiment: finished trials stay, unfinished and failed ones run again."""
    from ray import tune

    output = Path(output)
    job, _ = load_job(output)
    experiment = output / EXPERIMENT
    if not tune.Tuner.can_restore(str(experiment.resolve())):
        raise RayexitError(f"{experiment}: no Tune experiment state to resume from")
    _ensure_ray()
    return job, tune.Tuner.restore(
        str(experiment.resolve()), _trainable(job, trainable), resume_unfinished=True, restart_errored=True
    )
