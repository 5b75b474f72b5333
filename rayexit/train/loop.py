"""The training loop: plain PyTorch, the same in one process and as a Ray Train worker.

Gradients are computed locally with `torch.autograd.grad`, then averaged across workers by
the `average` function the caller passes (identity in one process, one all-reduce under Ray),
then combined and applied. RomeBERT's projection therefore runs on averaged gradients, the
same arithmetic on every worker, and all workers end each step with identical weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rayexit.config import TrainSettings
from rayexit.data.encode import steps_per_epoch
from rayexit.errors import RayexitError
from rayexit.progress import progress
from rayexit.tasks import task_named
from rayexit.train.steps import Stage, build_stages

__all__ = ["LoopState", "Stage", "TrainResult", "apply_gradients", "make_optimizer", "no_average", "train_model"]

Average = Callable[[list[torch.Tensor]], list[torch.Tensor]]
MAX_GRAD_NORM = 1.0


def no_average(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return grads


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    conflict_rate: float | None = None


@dataclass
class LoopState:
    """Where a run stands, enough to resume it exactly: what a training checkpoint holds.

    `stage` indexes `build_stages`; `step` counts optimizer steps within that stage; `epoch`
    counts finished epochs; `batch` counts batches already taken from the current epoch, so a
    mid-epoch checkpoint resumes on the next batch of the same permutation.
    """

    stage: int = 0
    step: int = 0
    epoch: int = 0
    batch: int = 0
    steps_before: int = 0  # steps of the stages already finished
    seconds: float = 0.0
    optimizer: dict | None = None
    scheduler: dict | None = None
    history: list[dict] = field(default_factory=list)
    conflicts: list[bool] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)


def train_model(
    model,
    train_data,
    settings: TrainSettings,
    *,
    eval_data=None,
    rank: int = 0,
    world_size: int = 1,
    average: Average = no_average,
    on_epoch_end: Callable[[dict], None] | None = None,
    show_progress: bool = True,
    resume: LoopState | None = None,
    on_checkpoint: Callable[[LoopState, dict | None], None] | None = None,
    checkpoint_every: int | None = None,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Train `model` in place, whatever its task (`model.task`: batches, steps and scores follow it).

    For Ray Train workers (all optional; without them the loop is the plain one-process loop):
    `resume` continues from a checkpointed `LoopState`; `on_checkpoint(state, record)` is called
    at every epoch end (with that epoch's record) and every `checkpoint_every` steps (record None);
    `device` is where batches go; `autocast_dtype` (e.g. bfloat16 on GPU) enables mixed precision.
    """
    torch.manual_seed(settings.seed)  # dropout; heads were seeded where the model was built
    task = task_named(model.task)
    result = TrainResult()
    start = time.perf_counter()
    state = resume or LoopState()
    offset = state.seconds  # time spent before a resume counts towards the run's time
    conflicts: list[bool] = list(state.conflicts)
    result.history = list(state.history)
    result.steps = state.steps_before
    for stage_index, stage in enumerate(build_stages(model, settings, train_data)):
        if stage_index < state.stage:
            continue
        per_epoch = steps_per_epoch(train_data, settings.batch_size, world_size)
        total = max(1, math.ceil(stage.epochs * per_epoch))
        optimizer, scheduler = make_optimizer(stage, settings, total)
        step = 0
        epoch = 0
        skip = 0
        losses: list[float] = []
        if resume is not None and stage_index == state.stage:
            step, epoch, skip, losses = state.step, state.epoch, state.batch, list(state.epoch_losses)
            if state.optimizer is not None:
                optimizer.load_state_dict(state.optimizer)
            if state.scheduler is not None:
                scheduler.load_state_dict(state.scheduler)
        bar = progress(range(step, total), desc=f"train {stage.name}", enabled=show_progress and rank == 0)
        bar_iter = iter(bar)
        while step < total:
            model.train()
            if stage.frozen_backbone:
                model.backbone.eval()  # frozen: no dropout noise in the features the exits learn from
            batches = task.batches(
                train_data, settings.batch_size, shuffle_seed=settings.seed + epoch, rank=rank, world_size=world_size
            )
            taken = 0
            for batch in batches:
                if step >= total:
                    break
                taken += 1
                if taken <= skip:  # already trained on before the checkpoint we resumed from
                    continue
                # Dropout masks depend on where the step is, not on what ran before: a resumed
                # run draws exactly what the uninterrupted one drew.
                torch.manual_seed(step_seed(settings.seed, stage_index, step, rank))
                stage.progress = step / total  # read by steps that follow a schedule (RomeBERT's gamma warm-up)
                with _autocast(device, autocast_dtype):
                    flat, loss_value, combine = stage.step(model, _to(batch, device), stage.params, settings, epoch)
                grads, conflict = combine(average(flat))
                apply_gradients(stage.params, grads, optimizer, scheduler)
                losses.append(loss_value)
                if conflict is not None:
                    conflicts.append(conflict)
                step += 1
                next(bar_iter, None)
                if on_checkpoint is not None and checkpoint_every and step % checkpoint_every == 0 and step < total:
                    seconds = offset + time.perf_counter() - start
                    where = (stage_index, step, epoch, taken, seconds)
                    on_checkpoint(_state(where, result, optimizer, scheduler, conflicts, losses), None)
            skip = 0
            epoch += 1
            record = {"stage": stage.name, "epoch": epoch, "step": step, "loss": sum(losses) / max(len(losses), 1)}
            losses = []
            if eval_data is not None:
                record[task.exit_key] = task.exit_scores(model, eval_data, settings.batch_size, device)
            record["seconds"] = offset + time.perf_counter() - start
            result.history.append(record)
            if on_epoch_end is not None:
                on_epoch_end(record)
            if on_checkpoint is not None:
                if step >= total:  # the next stage (if any) starts from its beginning
                    done = LoopState(
                        stage=stage_index + 1,
                        steps_before=result.steps + total,
                        seconds=record["seconds"],
                        history=list(result.history),
                        conflicts=list(conflicts),
                    )
                    on_checkpoint(done, record)
                else:
                    where = (stage_index, step, epoch, 0, record["seconds"])
                    on_checkpoint(_state(where, result, optimizer, scheduler, conflicts, []), record)
        result.steps += total
    result.seconds = offset + time.perf_counter() - start
    if conflicts:
        result.conflict_rate = sum(conflicts) / len(conflicts)
    model.eval()
    return result


def _state(where: tuple, result: TrainResult, optimizer, scheduler, conflicts, losses) -> LoopState:
    stage, step, epoch, batch, seconds = where
    return LoopState(
        stage=stage,
        step=step,
        epoch=epoch,
        batch=batch,
        steps_before=result.steps,
        seconds=seconds,
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        history=list(result.history),
        conflicts=list(conflicts),
        epoch_losses=list(losses),
    )


def _autocast(device: torch.device | None, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=(device or torch.device("cpu")).type, dtype=dtype)


def step_seed(seed: int, stage: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + stage * 100_003 + step * 1_009 + rank) % (2**63)


def _to(batch, device: torch.device | None):
    if device is None:
        return batch
    return tuple(t.to(device) for t in batch) if isinstance(batch, tuple) else batch.to(device)


def make_optimizer(stage: Stage, settings: TrainSettings, total_steps: int):
    if settings.lr is None:
        raise RayexitError("lr: not set; set it, or prepare the run with rayexit.train.recipe.prepare (it chooses)")
    head_lr = settings.head_lr or settings.lr
    body = [p for p in stage.params if id(p) not in stage.head_params]
    head = [p for p in stage.params if id(p) in stage.head_params]
    groups = [g for g in ({"params": body, "lr": settings.lr}, {"params": head, "lr": head_lr}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    warmup = int(settings.warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def apply_gradients(params, grads, optimizer, scheduler) -> None:
    for param, grad in zip(params, grads):
        param.grad = grad
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    for param in params:
        param.grad = None
