"""Data-parallel training on a Ray cluster: the plain training loop run by `TorchTrainer` workers.

Each worker runs `rayexit.train.loop.train_model` unchanged, with its `rank` and `world_size`
and an `average` that does one all-reduce (mean) over all of a step's gradients flattened into
one buffer. RomeBERT sends both of its gradients in that one buffer, so the projection runs on
averaged gradients with the same arithmetic on every worker, and every worker ends every step
with identical weights. No DDP wrapper: DDP would all-reduce once per backward pass and so
average each gradient separately before we could decide how to combine them.

Data: the driver tokenises once and hands every worker the same encoded set; each worker takes
its own slice of every global batch (`iterate_batches(rank=, world_size=)`), a distributed
sampler in effect. We chose that over Ray Data because it gives N workers exactly the batches
one worker would see (the equivalence the tests check) and the token ids of a classification
set are small enough to ship whole.

Checkpoints: at every epoch end (and every `checkpoint_every` steps) rank 0 writes a model
directory plus optimizer/scheduler/step (`rayexit.train.checkpoints`) and reports it with
`ray.train.report`; the other ranks report the same metrics without a checkpoint. A restarted
worker group (`FailureConfig(max_failures)`) resumes from the latest one; so does a new run with
the same `name` and `storage_path` (Ray Train's run restoration).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from ray.train import UserCallback

from rayexit.cluster import connect as connect_ray
from rayexit.config import TrainSettings
from rayexit.errors import RayexitError
from rayexit.train.loop import LoopState, TrainResult, no_average, train_model

log = logging.getLogger(__name__)


@dataclass
class DistributedResult:
    model_dir: Path | str  # a str only for a remote URI (s3://...)
    seconds: float  # time inside the training loop, summed over restarts
    history: list[dict] = field(default_factory=list)  # one record per epoch, as `train_model` makes them
    steps: int = 0
    conflict_rate: float | None = None
    wall_seconds: float = 0.0  # the whole call: Ray start-up, workers, checkpoints, final save
    checkpoint: str | None = None  # the run's latest checkpoint (a model directory + resume state)
    run_path: str | None = None  # Ray Train's run folder: checkpoints, metrics, tensorboard/
    metrics: list[dict] = field(default_factory=list)  # one row per epoch, as each epoch's report to Ray had it


def allreduce_mean(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average a step's gradients over all workers with ONE all-reduce on a flat buffer."""
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    out, offset = [], 0
    for g in grads:
        out.append(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return out


@dataclass
class RayOptions:
    """How a run uses Ray: the one bundle the CLI, jobs, Tune and the benchmarks pass along.

    Checkpoints go to `storage_path/name` (Ray's default storage when `storage_path` is None);
    a run started again with the same `name` and `storage_path` resumes from its latest
    checkpoint, and `resume_from` names a checkpoint directory to start from explicitly.
    `address` (or RAY_ADDRESS) is the cluster to join when Ray is not yet initialised.
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str | None = None
    name: str | None = None
    max_failures: int = 0
    checkpoint_every: int | None = None
    num_to_keep: int | None = 2
    resume_from: str | None = None
    report_to_tune: bool = False
    address: str | None = None
    show_progress: bool = True
    keep_checkpoints: bool | None = None  # None: dropped inside a Tune trial without storage of its own


def fit_distributed(
    model_name: str | None,
    train_source: str,
    eval_source: str | None,
    settings: TrainSettings,
    output: str | Path,
    options: RayOptions | None = None,
    *,
    task: str = "sequence",
    init: str | None = None,
    **option_fields: Any,
) -> DistributedResult:
    """Train with Ray Train workers and write the model directory to `output`.

    `output` gets the same files as `train_to_directory` writes (model directory plus
    `training.json`). `option_fields` are `RayOptions` fields, a shorthand for `options`.
    Asking for more workers (or GPUs) than the cluster has raises RayexitError at once.

    Inside a Ray Tune trial (Ray 2.60, Train V2), checked with a Tuner: call it from the trial
    function as usual. Ray Train starts its own controller (0 CPU, on the trial's node) and
    worker actors; the trial only waits for them. The trial's own reservation counts against
    the cluster too: Tune refuses 0 CPU, so use `tune.with_resources(fn, {"cpu": 0.01})` and
    leave room for the workers (on a 2-CPU machine, 2 workers need `cpus_per_worker=0.99`).
    `ray.train.report` raises inside a trial; report with `ray.tune.report` there. With
    `report_to_tune=True` every epoch's metrics also reach the trial as Tune results (Ray's
    `TuneReportCallback`), for schedulers that stop trials early. Without `storage_path`,
    checkpoints go to the trial's own folder under `train/`, so trials never share a run
    folder. Exceptions reach the trial as RayexitError.
    """
    from rayexit.storage import check_job_path, local_output, local_path
    from rayexit.train.recipe import prepare, save_run

    options = replace(options or RayOptions(), **option_fields)
    if options.name is None:
        options = replace(options, name=_default_name(output))
    start = time.perf_counter()
    check_job_path(str(output), "--output")
    _check_request(options.num_workers, options.cpus_per_worker, options.use_gpu)
    run = prepare(model_name, train_source, eval_source, settings, task=task, init=init)
    outcome = fit_prepared(run, run.settings, options)  # unset settings chosen for the backbone
    with local_output(output) as local:  # a model directory may go to a URI: written here, then copied up
        save_run(
            run,
            local,
            run.settings,
            outcome,
            base_model=model_name,
            init=init,
            train=train_source,
            eval=eval_source,
            num_workers=options.num_workers,
            use_gpu=options.use_gpu,
            run_path=outcome.run_path,
        )
    outcome.model_dir = local_path(output) or str(output)  # a remote URI stays a URI
    outcome.wall_seconds = time.perf_counter() - start
    return outcome


def fit_prepared(
    run, settings: TrainSettings, options: RayOptions | None = None, *, fault: dict | None = None, **option_fields: Any
) -> DistributedResult:
    """Train a `PreparedRun` (from `recipe.prepare`) on Ray; its model ends with the final weights.

    `fault` is for tests: {"rank": r, "step": s, "marker": path} kills rank r's process with
    SIGKILL at its s-th step, once (the marker file records that it happened).
    `keep_checkpoints=False` deletes the run's checkpoints once the model holds the final
    weights (None: only inside a Tune trial without `storage_path`, where the trial reports the
    model as its own checkpoint and a second copy would only take space).
    """
    # before anything of Ray Train is imported here: its classes are picked (V1 or V2) on first import
    _require_train_v2()
    options = replace(options or RayOptions(), **option_fields)
    num_workers, use_gpu, cpus_per_worker = options.num_workers, options.use_gpu, options.cpus_per_worker
    show_progress = options.show_progress
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.perf_counter()
    # a wrong path, other settings or another worker count are named before Ray starts
    resume_from = _resume_source(options.resume_from, settings, num_workers)
    global_batch = settings.batch_size * num_workers
    if len(run.train_data) < global_batch:
        raise RayexitError(
            f"batch_size: {settings.batch_size} per worker x {num_workers} workers = {global_batch}, "
            f"more than the {len(run.train_data)} training examples; use a smaller batch or fewer workers"
        )
    if not ray.is_initialized():
        connect_ray(options.address, log_to_driver=show_progress, include_dashboard=None)
    _check_request(num_workers, cpus_per_worker, use_gpu)
    own_storage = options.storage_path is None
    storage_path, filesystem, name, in_tune = _storage(options.storage_path, options.name)
    if own_storage and not in_tune:
        _check_storage_reachable()
    callbacks = [TensorBoardCallback(_tensorboard_dir(storage_path, filesystem, name))]
    keep = options.keep_checkpoints
    drop_checkpoints = keep is False or (keep is None and in_tune and own_storage)
    if options.report_to_tune:
        if not in_tune:
            raise RayexitError("report_to_tune: only possible inside a Ray Tune trial")
        callbacks.append(epoch_tune_report(with_checkpoint_paths=not drop_checkpoints))
    config = {
        "model": run.model,
        "tokenizer": run.tokenizer,
        "train_data": run.train_data,
        "eval_data": run.eval_data,
        "settings": settings.to_dict(),
        "use_gpu": use_gpu,
        "checkpoint_every": options.checkpoint_every,
        "show_progress": show_progress,
        "fault": fault,
        # Train V2 refuses TorchTrainer(resume_from_checkpoint=...): the workers read the path
        # themselves, and only when Ray has no checkpoint of this run to restore
        "resume_from": resume_from,
    }
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=_resources(cpus_per_worker, use_gpu)
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=options.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=options.num_to_keep),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RayexitError(f"distributed training failed: {_root_message(exc)}") from exc
    if result.checkpoint is None:
        raise RayexitError(f"{result.path}: the run finished without a checkpoint")
    from rayexit.train.checkpoints import read_checkpoint

    with result.checkpoint.as_directory() as directory:
        read_checkpoint(directory, run.model)
    if drop_checkpoints:
        _drop_checkpoints(result)
    summary = result.return_value or {}
    # Not result.metrics_dataframe: Train V2 builds it from the checkpoints it kept (num_to_keep), so
    # a 3-epoch run would show its last two epochs only
    metrics = _epoch_rows(summary.get("history", []))
    return DistributedResult(
        model_dir=Path(result.checkpoint.path),
        seconds=summary.get("seconds", 0.0),
        history=summary.get("history", []),
        steps=summary.get("steps", 0),
        conflict_rate=summary.get("conflict_rate"),
        wall_seconds=time.perf_counter() - start,
        checkpoint=result.checkpoint.path,
        run_path=result.path,
        metrics=metrics,
    )


# -- the worker ------------------------------------------------------------------------------


def _worker(config: dict[str, Any]) -> dict:
    """One Ray Train worker: plain PyTorch around `train_model`; Ray only at report time."""
    import ray.train
    import ray.train.torch

    from rayexit.train.checkpoints import read_checkpoint, settings_differences, write_checkpoint

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # One line per worker saying where it runs: the multi-node check reads it from the job log.
    print(f"rayexit-worker rank={rank} node={ray.get_runtime_context().get_node_id()}", flush=True)
    settings = TrainSettings.from_dict(config["settings"])
    model = config["model"]
    device = ray.train.torch.get_device() if config["use_gpu"] else None
    autocast = None
    if device is not None and device.type == "cuda":
        model.to(device)
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else None

    resume: LoopState | None = None
    checkpoint = ray.train.get_checkpoint()  # this run's own latest (a restart, or the same name again)
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume, extra = read_checkpoint(directory, model)
        differences = settings_differences(extra.get("settings"), config["settings"])
        if differences:
            raise RayexitError(
                f"the checkpoint to resume from was trained with other settings ({'; '.join(differences)}); "
                "start a new run (another name) or resume with the same settings"
            )
        # Steps and the place in the epoch count global batches, whose size is per-worker batch x workers
        if extra.get("world_size", world_size) != world_size:
            raise RayexitError(
                f"the checkpoint to resume from was trained with {extra['world_size']} worker(s), this run has "
                f"{world_size}; resume with --num-workers {extra['world_size']}"
            )
        log.info("rank %d resumes at stage %d, step %d, epoch %d", rank, resume.stage, resume.step, resume.epoch)

    average = allreduce_mean if world_size > 1 else no_average
    if config.get("fault"):
        average = _fault_injecting(average, rank, config["fault"])

    def on_checkpoint(state: LoopState, record: dict | None) -> None:
        if record is not None and world_size > 1:
            record["loss"] = _mean_over_workers(record["loss"], device)  # each rank saw only its slice
        metrics = _flat_metrics(record, state.steps_before + state.step)
        if rank != 0:  # identical weights everywhere: rank 0 alone writes them
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="rayexit-ckpt-") as tmp:
            extra = {"settings": config["settings"], "world_size": world_size}
            directory = write_checkpoint(Path(tmp) / "checkpoint", model, state, config["tokenizer"], extra)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        print(f"rayexit-checkpoint step={metrics['global_step']} epoch_end={metrics['epoch_end']}", flush=True)

    result: TrainResult = train_model(
        model,
        config["train_data"],
        settings,
        eval_data=config["eval_data"] if rank == 0 else None,  # evaluated once; the others wait at the next step
        rank=rank,
        world_size=world_size,
        average=average,
        show_progress=config["show_progress"],
        resume=resume,
        on_checkpoint=on_checkpoint,
        checkpoint_every=config["checkpoint_every"],
        device=device,
        autocast_dtype=autocast,
    )
    return {
        "history": result.history,
        "steps": result.steps,
        "seconds": result.seconds,
        "conflict_rate": result.conflict_rate,
    }


def _mean_over_workers(value: float, device: torch.device | None) -> float:
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.item() / dist.get_world_size()


def _flat_metrics(record: dict | None, global_step: int) -> dict:
    """Scalars for Ray's results and TensorBoard; per-exit accuracy as exit{i}_accuracy."""
    metrics: dict[str, Any] = {"global_step": global_step, "epoch_end": record is not None}
    if record is not None:
        metrics.update({k: v for k, v in record.items() if not isinstance(v, list)})
        for key, values in record.items():  # per-exit lists (exit_accuracy, exit_f1) as exit{i}_accuracy ...
            if key.startswith("exit_") and isinstance(values, list):
                for i, value in enumerate(values, start=1):
                    metrics[f"exit{i}_{key[len('exit_'):]}"] = value
    return metrics


def _epoch_rows(history: list[dict]) -> list[dict]:
    """The epoch records as their reports had them (a stage's `step` counts from 0; global_step does not)."""
    rows, before, previous = [], 0, None
    for record in history:
        if previous is not None and record["stage"] != previous["stage"]:
            before += previous["step"]
        rows.append(_flat_metrics(record, before + record["step"]))
        previous = record
    return rows


def _fault_injecting(average, rank: int, fault: dict):
    calls = 0

    def wrapped(grads):
        nonlocal calls
        calls += 1
        marker = Path(fault["marker"])
        if rank == fault["rank"] and calls == fault["step"] and not marker.exists():
            marker.write_text(f"rank {rank} killed itself at step {calls}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return average(grads)

    return wrapped


# -- driver-side helpers ---------------------------------------------------------------------


def _require_train_v2() -> None:
    """The run's pieces (`UserCallback`, the return value, Tune's report callback) exist in Train V2 only."""
    from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled

    if not is_v2_enabled():
        raise RayexitError(
            f"{V2_ENABLED_ENV_VAR}: Ray Train V1 is switched on in this environment; rayexit trains on Train V2 "
            f"(Ray's default): unset {V2_ENABLED_ENV_VAR} or set it to 1"
        )


class TensorBoardCallback(UserCallback):
    """Writes every report's scalars to TensorBoard; runs in Ray Train's controller (driver node)."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self._writer = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        from torch.utils.tensorboard import SummaryWriter

        first = metrics[0] if metrics else {}
        if not first.get("epoch_end"):
            return
        if self._writer is None:
            self._writer = SummaryWriter(self.logdir)
        step = int(first.get("global_step", 0))
        for key, value in first.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "global_step":
                self._writer.add_scalar(key, value, step)
        self._writer.flush()


def epoch_tune_report(with_checkpoint_paths: bool):
    """Ray's `TuneReportCallback`, forwarding the epochs' rows only.

    With `checkpoint_every`, the workers also report mid-epoch (a checkpoint, no loss or accuracy);
    a Tune scheduler or searcher reading the trial's metric would find it missing there. Checkpoint
    paths go with the rows only when the checkpoints outlive the run.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochTuneReport(TuneReportCallback):
        def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
            if metrics and metrics[0].get("epoch_end"):
                super().after_report(run_context, metrics, checkpoint if with_checkpoint_paths else None)

    return EpochTuneReport()


def _resources(cpus_per_worker: float, use_gpu: bool) -> dict:
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return resources


def _check_request(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Fail at once, saying what was asked and what exists, instead of waiting for resources forever."""
    if not isinstance(num_workers, int) or num_workers < 1:
        raise RayexitError(f"num_workers: got {num_workers!r}, expected a whole number >= 1")
    if cpus_per_worker < 0:
        raise RayexitError(f"cpus_per_worker: got {cpus_per_worker}, expected >= 0")
    import ray

    if not ray.is_initialized():
        return  # checked again once connected
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total_cpu = sum(n["Resources"].get("CPU", 0) for n in nodes)
    total_gpu = sum(n["Resources"].get("GPU", 0) for n in nodes)
    fit = 0
    for node in nodes:
        cpu, gpu = node["Resources"].get("CPU", 0), node["Resources"].get("GPU", 0)
        by_cpu = int(cpu // cpus_per_worker) if cpus_per_worker > 0 else num_workers
        fit += min(by_cpu, int(gpu)) if use_gpu else by_cpu
    if fit >= num_workers:
        return
    asked = f"{num_workers} worker(s) x {cpus_per_worker:g} CPU" + (" + 1 GPU" if use_gpu else "")
    raise RayexitError(
        f"asked for {asked}, but the Ray cluster has {total_cpu:g} CPU(s) and {total_gpu:g} GPU(s) "
        f"on {len(nodes)} node(s), room for {fit} such worker(s); use --num-workers {max(fit, 1)} or a bigger cluster"
    )


def _check_storage_reachable() -> None:
    """Without --storage-path checkpoints go to Ray's default, a folder on each node's own disk:
    on more than one node Ray refuses that at the first checkpoint, after training has started."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise RayexitError(
            f"--storage-path: the Ray cluster has {len(nodes)} nodes, and checkpoints need storage every node "
            "reaches; pass a folder all nodes mount (an absolute path) or a URI such as s3://bucket/runs"
        )


def _storage(storage_path: str | None, name: str | None) -> tuple[str, object | None, str, bool]:
    """Where the run keeps checkpoints: (storage_path, storage_filesystem, name, in a Tune trial).

    Given: a local or shared path, made absolute, or a URI Ray's storage takes (s3://, gs://,
    file://, ...). Inside a Tune trial without one: the trial's own folder in the experiment's
    storage, whatever filesystem that is, so trials never share a run folder. Else Ray's default.
    """
    from rayexit.storage import check_job_path, ray_storage_path

    in_tune = _in_tune()
    if in_tune and storage_path is None:
        trial = _trial_storage()
        if trial is not None:
            return trial[0], trial[1], name or "train", True
        import ray.tune

        storage_path = ray.tune.get_context().get_trial_dir()
        name = name or "train"
    if storage_path is None:
        from ray.train.constants import DEFAULT_STORAGE_PATH

        storage_path = DEFAULT_STORAGE_PATH
    check_job_path(storage_path, "--storage-path")
    return ray_storage_path(storage_path), None, name or f"rayexit-train-{uuid.uuid4().hex[:8]}", in_tune


def _trial_storage() -> tuple[str, object] | None:
    """The Tune trial's folder on the experiment's storage filesystem (not its local working dir)."""
    try:
        from ray.train._internal.session import get_session

        storage = get_session().storage
        return storage.trial_fs_path, storage.storage_filesystem
    except Exception:  # a private API: fall back to the trial dir Tune's public context gives
        return None


def _tensorboard_dir(storage_path: str, filesystem, name: str) -> str:
    """TensorBoard writes plain files: into the run folder when that is local, else under Ray's local default."""
    import pyarrow.fs

    local = filesystem is None or isinstance(filesystem, pyarrow.fs.LocalFileSystem)
    if local and "://" not in storage_path:
        return str(Path(storage_path) / name / "tensorboard")
    from ray.train.constants import DEFAULT_STORAGE_PATH

    return str(Path(os.path.expanduser(DEFAULT_STORAGE_PATH)) / name / "tensorboard")


# Train V2's record of a run's checkpoints, in the run folder: it must go with them, or a later run of
# the same name (a Tune trial rerun by Tuner.restore) finds it naming folders that are gone and refuses
RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def _drop_checkpoints(result) -> None:
    """Delete a finished run's checkpoint folders (resume state only) and Ray's list of them;
    TensorBoard logs stay. A run of the same name afterwards starts afresh."""
    seen = {(c.path) for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        seen.add(result.checkpoint.path)
    filesystem = result.checkpoint.filesystem
    for path in sorted(seen):
        try:
            filesystem.delete_dir(path)
        except Exception as exc:  # space, not correctness: the model is already in memory
            log.warning("%s: checkpoint not deleted (%s)", path, exc)
    snapshot = f"{str(result.path).rstrip('/')}/{RUN_SNAPSHOT}"
    try:
        filesystem.delete_file(snapshot)
    except FileNotFoundError:
        pass
    except Exception as exc:
        log.warning("%s: not deleted (%s); a run of the same name would refuse this folder", snapshot, exc)


def _resume_source(resume_from: str | None, settings: TrainSettings, num_workers: int) -> str | None:
    """`--resume-from` as every worker will read it: a URI as given, a local folder made absolute.

    The workers may run on other nodes: a local folder must be on storage they all see. A local
    checkpoint's settings and worker count are checked here, before Ray starts (the workers check
    again, for URIs and for a run's own checkpoints).
    """
    if not resume_from:
        return None
    if "://" in resume_from:
        return resume_from
    path = Path(resume_from).expanduser().absolute()
    from rayexit.reading import read_json
    from rayexit.train.checkpoints import STATE_FILE, settings_differences

    if not (path / STATE_FILE).is_file():
        raise RayexitError(
            f"--resume-from: {resume_from} is not a training checkpoint (no {STATE_FILE}); pass a "
            "checkpoint_* folder of a run's storage (STORAGE/NAME/checkpoint_...)"
        )
    extra = read_json(path / STATE_FILE).get("extra") or {}
    differences = settings_differences(extra.get("settings", settings.to_dict()), settings.to_dict())
    if differences:
        raise RayexitError(
            f"--resume-from: {resume_from} was trained with other settings ({'; '.join(differences)}); "
            "resume with the same settings"
        )
    if extra.get("world_size", num_workers) != num_workers:
        raise RayexitError(
            f"--resume-from: {resume_from} was trained with {extra['world_size']} worker(s), this run has "
            f"{num_workers}; resume with --num-workers {extra['world_size']}"
        )
    return str(path)


def _default_name(output: str | Path) -> str:
    """Timestamped, so a rerun starts afresh; inside a Tune trial the same on every attempt of the
    trial, so a trial `Tuner.restore` reruns resumes from its run's checkpoints."""
    trial_id = _tune_trial_id()
    if trial_id is not None:
        return f"train-{trial_id}"
    return f"rayexit-{Path(output).name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _in_tune() -> bool:
    try:
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session
    except ImportError:
        return False
    return bool(_in_tune_session())


def _tune_trial_id() -> str | None:
    if not _in_tune():
        return None
    import ray.tune

    try:
        return ray.tune.get_context().get_trial_id()
    except (AttributeError, RuntimeError):
        return None


def _root_message(exc: BaseException) -> str:
    """The workers' own error, not Ray's wrapper around it."""
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    worker_failures = getattr(exc, "worker_failures", None)
    if isinstance(worker_failures, dict) and worker_failures:
        seen = next(iter(worker_failures.values()))
    # a worker's exception text carries its whole traceback; its last line is the message
    lines = [line for line in str(seen).splitlines() if line.strip()]
    return lines[-1] if lines else type(seen).__name__
