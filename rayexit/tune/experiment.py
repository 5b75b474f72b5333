"""The Tune experiment: split the data, run the Tuner with OptunaSearch, resume it, hand results on.

An output folder holds everything: `job.json` (what was asked, so `--resume` needs nothing
else), `data/` (the fit and validation splits as TSV), `optuna.db` (the Optuna study, written
as trials finish, so `optuna-dashboard` shows it live and an interrupted run keeps it),
`experiment/` (Tune's experiment directory: TensorBoard and the dashboard read it; one
checkpoint per trial lives there) and, once the trials are done, what `rayexit.tune.results`
writes. With `storage_path` (a shared path or a URI Ray's storage takes: s3://, gs://,
file://...) the experiment goes there instead, under the output folder's name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from rayexit.errors import RayexitError
from rayexit.files import write_json
from rayexit.reading import read_json
from rayexit.tune.space import INTEGER_SETTINGS, TuneConfig, TuneSpec
from rayexit.tune.split import carve_validation, write_conll, write_tsv
from rayexit.tune.trial import TrialJob, run_trial

log = logging.getLogger(__name__)

EXPERIMENT = "experiment"
JOB_FILE = "job.json"
OPTUNA_FILE = "optuna.db"
STUDY_NAME = "rayexit-tune"
Trainable = Callable[[dict, TrialJob], None]


def _portable(source: str) -> str:
    """Trials run in their own working folders: a local path must be absolute to mean the same there."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def output_folder(value: str | Path, flag: str = "--output") -> Path:
    """The run's folder: a local or shared path, or file://; refused inside a Ray job when relative."""
    from rayexit.storage import check_job_path, local_path

    check_job_path(str(value), flag)
    path = local_path(value)
    if path is None:
        raise RayexitError(
            f"{flag} {value}: the run folder is read by every trial, so it must be a path every node sees "
            "(absolute, on shared storage) or file://; put the Tune experiment on a URI with --storage-path"
        )
    return path


def experiment_path(output: Path, storage_path: str | None) -> str:
    """Where Tune keeps the experiment: `output/experiment`, or `storage_path/<output's name>`."""
    from rayexit.storage import check_job_path, ray_storage_path

    if storage_path is None:
        return str((output / EXPERIMENT).resolve())
    check_job_path(storage_path, "--storage-path")
    return f"{ray_storage_path(storage_path).rstrip('/')}/{output.name}"


def optuna_url(output: Path) -> str:
    return f"sqlite:///{(output / OPTUNA_FILE).resolve()}"


def load_sources(task_name: str, train: str, eval_source: str, valid: str | None = None,
                 max_examples: int | None = None):
    """Read --eval, --valid and --train once (a bad file fails now, not after Ray has started or a
    trial has run); returns the training examples."""
    from rayexit.tasks import task_named

    task = task_named(task_name)
    task.load(eval_source)
    if valid is not None:
        task.load(valid)
    return task.load(train, max_examples)


def prepare_job(
    model: str,
    train: str,
    eval_source: str,
    output: str | Path,
    config: TuneConfig,
    max_examples: int | None = None,
    storage_path: str | None = None,
    valid: str | None = None,
) -> TrialJob:
    """Carve the validation split (or take `valid`), write the parts and `job.json`; refuse to reuse a finished folder.

    The task (`tune.task`) decides how data is read and split: TSV for sentences, CoNLL-style
    files for tokens (stratified by each sentence's rarest tag).
    """
    from rayexit.tasks import task_named

    output = output_folder(output)
    if (output / JOB_FILE).exists():
        raise RayexitError(
            f"{output}: holds a tuning run; continue it with --resume {output} or pick a new folder"
        )
    spec = config.tune
    task = task_named(spec.task)
    token = spec.task == "token"
    examples = load_sources(spec.task, train, eval_source, valid, max_examples)
    data = output / "data"
    write = write_conll if token else write_tsv
    suffix = "txt" if token else "tsv"
    if valid is None:
        split = carve_validation(examples, spec.validation_fraction, spec.split_seed, spec.task)
        fit_path = write(split.fit, data / f"fit.{suffix}")
        validation_path = str(write(split.validation, data / f"validation.{suffix}").resolve())
        described = split.describe()
        log.info("validation split %s: %d fit, %d validation", split.name, len(split.fit), len(split.validation))
    else:
        fit_path = write(examples, data / f"fit.{suffix}")
        validation_path = _portable(valid)
        described = {"name": f"given --valid {valid}", "fit_examples": len(examples),
                     "validation_examples": len(task.load(valid))}
    settings = config.train
    if settings.max_examples is not None:  # already applied when carving; the trainer sees the fit file as is
        import dataclasses

        config = TuneConfig(dataclasses.replace(settings, max_examples=None), spec, config.source)
    job = TrialJob(
        model=_portable(model),
        fit_path=str(fit_path.resolve()),
        validation_path=validation_path,
        eval_path=_portable(eval_source),
        config=config,
    )
    write_json(
        output / JOB_FILE,
        {
            "task": spec.task,
            "model": job.model,
            "train": _portable(train),
            "valid": _portable(valid) if valid is not None else None,
            "eval": job.eval_path,
            "max_examples": max_examples,
            "split": described,
            "fit_path": job.fit_path,
            "validation_path": job.validation_path,
            "train_settings": config.train.to_dict(),
            "tune": spec.to_dict(),
            "default_params": config.default_point() if spec.include_default else None,
            "config_file": config.source,
            "experiment": experiment_path(output, storage_path),
        },
    )
    return job


def load_job(output: str | Path) -> tuple[TrialJob, dict]:
    output = Path(output)
    path = output / JOB_FILE
    if not path.is_file():
        raise RayexitError(f"{output}: no {JOB_FILE}; --resume takes the DIR of an earlier `rayexit tune --output DIR`")
    data = read_json(path)  # a damaged file is named, with what is wrong in it
    from rayexit.config import TrainSettings

    keys = ("train_settings", "tune", "model", "fit_path", "validation_path", "eval")
    missing = [k for k in keys if k not in data] if isinstance(data, dict) else list(keys)
    if missing:
        raise RayexitError(f"{path}: not a tune job record (missing {', '.join(missing)}); "
                           "--resume takes the DIR of an earlier `rayexit tune --output DIR`")
    config = TuneConfig(TrainSettings.from_dict(data["train_settings"]), TuneSpec.from_dict(data["tune"]))
    job = TrialJob(data["model"], data["fit_path"], data["validation_path"], data["eval"], config)
    return job, data


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that accepts results of trials it did not suggest in this session.

    After `Tuner.restore`, a trial started before the interruption runs again, but the restored
    searcher may not hold its Optuna trial (its state was saved before that suggestion), and the
    stock class fails with a KeyError; a trial that failed and is restarted was already told to
    Optuna as failed, and the stock class drops its second completion. Such a result is added to
    the study as a finished trial with the parameters Tune ran it with, so the sampler learns
    from it and the study in optuna.db shows it.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        names = self.metric if isinstance(self.metric, list) else [self.metric]
        if not all(n in result for n in names):
            return  # a report without the objective
        if self._live(trial_id):
            super().on_trial_result(trial_id, result)
        elif not isinstance(self.metric, list):  # kept for the trial added at completion
            steps = self.__dict__.setdefault("_orphan_steps", {}).setdefault(trial_id, {})
            steps[int(result.get("training_iteration", len(steps) + 1))] = result[self.metric]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._live(trial_id):
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
        steps = self.__dict__.get("_orphan_steps", {}).pop(trial_id, None)
        self._ot_study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=self._space, values=values, intermediate_values=steps or None
            )
        )
        self._completed_trials.add(trial_id)

    def _live(self, trial_id: str) -> bool:
        """This searcher asked Optuna for the trial and Optuna still holds it as running.

        With the study in a database, the restored searcher state can be older than the study:
        a trial it holds may already be finished there (failed before the interruption).
        """
        trial = self._ot_trials.get(trial_id)
        if trial is None or trial_id in self._completed_trials:
            return False
        try:
            frozen = self._ot_study._storage.get_trial(trial._trial_id)
        except Exception:  # an Optuna without these internals: trust the searcher's own state
            return True
        return not frozen.state.is_finished()


def _searcher(config: TuneConfig, storage_url: str | None = None):
    """OptunaSearch over the searched settings; the study lives in `storage_url` (SQLite) when given.

    With storage, every finished trial is in optuna.db as it finishes (`optuna-dashboard` reads
    it live) and the study survives an interrupted run; Tune's own searcher state, restored by
    `Tuner.restore`, points at the same database.
    """
    import optuna

    spec = config.tune
    storage = optuna.storages.RDBStorage(storage_url) if storage_url else None
    extra = {"storage": storage, "study_name": STUDY_NAME}
    space = {
        name: (
            optuna.distributions.IntDistribution(int(r.low), int(r.high))
            if name in INTEGER_SETTINGS
            else optuna.distributions.FloatDistribution(r.low, r.high, log=r.log)
        )
        for name, r in spec.searched().items()
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
            space,
            metric=["f1", "flops_speedup"] if spec.task == "token" else ["accuracy", "layer_speedup"],
            mode=["max", "max"],
            points_to_evaluate=points,
            sampler=sampler,
            **extra,
        )
    sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(10, max(2, spec.trials // 2)))
    return ResumableOptunaSearch(
        space, metric="score", mode="max", points_to_evaluate=points, sampler=sampler, **extra
    )


def _resources(spec: TuneSpec) -> dict:
    """What one trial reserves: with Ray Train, a token share (its workers hold the CPUs)."""
    import ray

    if spec.cpus_per_trial is not None:
        return {"cpu": spec.cpus_per_trial}
    if spec.trainer == "local":
        return {"cpu": float(ray.cluster_resources().get("CPU", 1))}
    # Ray Train's own workers hold the CPUs while training; the trial only waits for them and then
    # measures. (Tune refuses an empty request, hence a token share rather than zero.)
    return {"cpu": TRIAL_TOKEN_CPU}


TRIAL_TOKEN_CPU = 0.01


def concurrent_trials(spec: TuneSpec, cluster: dict) -> int | None:
    """How many trials fit side by side on a cluster with `cluster` resources (None: let Tune's reservations decide).

    With Ray Train, a trial reserves only a token share and its workers ask for theirs later, so
    Tune alone would start every trial at once and leave their workers queueing; the limit is
    how many trials' workers (and GPUs) the cluster holds at the same time.
    """
    if spec.trainer == "local" or spec.cpus_per_trial is not None:
        return None
    per_trial = spec.workers * spec.cpus_per_worker + TRIAL_TOKEN_CPU
    cpus = float(cluster.get("CPU", 0))
    fit = int(cpus // per_trial)
    if spec.use_gpu:
        fit = min(fit, int(float(cluster.get("GPU", 0)) // spec.workers))
    if fit == 0:
        # Not even one trial's workers fit: Ray Train would wait for them and retry without end.
        gpus = f" and {spec.workers} GPU(s)" if spec.use_gpu else ""
        has = f"the cluster has {cpus:g} CPU(s) and {float(cluster.get('GPU', 0)):g} GPU(s)"
        most = max(int((cpus - TRIAL_TOKEN_CPU) // spec.cpus_per_worker), 0)
        if spec.use_gpu:
            most = min(most, int(float(cluster.get("GPU", 0))))
        if not most:
            raise RayexitError(f"tune.workers: {has}, too few for one worker{' with a GPU' if spec.use_gpu else ''} "
                               "beside the trial; use trainer: local")
        # e.g. 2 workers on 2 CPUs: 0.99 each leaves the trial its share
        sharing = math.floor((cpus - TRIAL_TOKEN_CPU) / spec.workers * 100) / 100
        share = f", tune.cpus_per_worker {sharing:g}" if sharing > 0 and not spec.use_gpu else ""
        raise RayexitError(
            f"tune.workers: {spec.workers} worker(s) at {spec.cpus_per_worker:g} CPU(s) each need "
            f"{spec.workers * spec.cpus_per_worker:g} CPU(s){gpus} beside the trial's {TRIAL_TOKEN_CPU}, {has}; "
            f"use tune.workers {most} or less{share}, or trainer: local"
        )
    return fit


class ResumableLimiter(ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter, except that it passes on the completion of a trial restarted by a resume.

    The stock limiter forgets a trial once it fails and then drops its completion when
    `Tuner.restore(restart_errored=True)` runs it again, so the study would never hear of it.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.live_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
        else:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)


def _trainable(job: TrialJob, trainable: Trainable | None):
    from ray import tune

    return tune.with_resources(tune.with_parameters(trainable or run_trial, job=job), _resources(job.config.tune))


def trainable_for(output: str | Path, trainable: Trainable | None = None):
    """The trainable `Tuner.restore` needs for a run folder (Ray must be initialised): what --resume passes."""
    job, _ = load_job(output)
    return _trainable(job, trainable)


def connect(address: str | None = None) -> str | None:
    """Join `address` (or RAY_ADDRESS), or start a local Ray on loopback with its dashboard; its URL or None.

    A Ray this command starts is bound to 127.0.0.1, dashboard included: nothing it opens is
    reachable from other machines. Trial output reaches this console (log_to_driver).
    """
    import os

    import ray

    if ray.is_initialized():
        return None
    from rayexit.cluster import LOOPBACK, loopback_node_ip

    if address or os.environ.get("RAY_ADDRESS"):
        from rayexit.cluster import connect as join

        join(address, log_to_driver=True)  # one line, not a traceback, when a token is missing
        return None
    with loopback_node_ip():  # else Ray swaps 127.0.0.1 for the machine's outward address
        context = ray.init(
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,
            log_to_driver=True,
        )
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and "://" not in url else url


def build_tuner(job: TrialJob, output: str | Path, trainable: Trainable | None = None):
    import ray
    from ray import tune

    connect()
    output = Path(output)
    _, data = load_job(output)
    spec = job.config.tune
    scheduler = None
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # Iterations: one report per epoch, then the final one with the checkpoint.
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=int(job.config.train.epochs) + 2, grace_period=spec.grace_epochs
        )
    single = spec.objective == "within_drop"
    concurrent = concurrent_trials(spec, ray.cluster_resources())
    if concurrent is None and spec.cpus_per_trial is None:
        concurrent = 1  # a local trial holds every CPU
    searcher = _searcher(job.config, optuna_url(output) if spec.optuna_db else None)
    if concurrent is not None:
        searcher = ResumableLimiter(searcher, max_concurrent=concurrent)
    tune_config = tune.TuneConfig(
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=spec.trials,
        metric="score" if single else None,
        mode="max" if single else None,
        max_concurrent_trials=None,  # limited above
    )
    experiment = data["experiment"]
    storage, name = experiment.rsplit("/", 1)
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        # One checkpoint per trial: the final model with its trial_points.json.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=0),
        verbose=1,
    )
    log.info("Tune experiment: %s (trials side by side: %s)", experiment, concurrent or "as resources allow")
    return tune.Tuner(_trainable(job, trainable), tune_config=tune_config, run_config=run_config)


def restore_tuner(output: str | Path, trainable: Trainable | None = None):
    """Continue an interrupted experiment: finished trials stay, unfinished and failed ones run again."""
    from ray import tune

    output = output_folder(output, "--resume")
    job, data = load_job(output)
    experiment = data.get("experiment") or str((output / EXPERIMENT).resolve())
    if not tune.Tuner.can_restore(experiment):
        raise RayexitError(f"{experiment}: no Tune experiment state to resume from")
    connect()
    return job, tune.Tuner.restore(experiment, _trainable(job, trainable), resume_unfinished=True, restart_errored=True)
