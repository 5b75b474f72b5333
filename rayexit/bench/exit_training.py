"""One benchmark run's training, with evaluation snapshots for time-to-quality.

A snapshot is taken at evenly spaced steps of the run's last stage (the stage the exits train
in: all of a one-stage method, DeeBERT's stage 2). It costs one full pass over validation and
one over test (`Task.replay`); the points at 1.5x, 2x and 3x layer speed-up are chosen on the
validation replay and scored on the test replay, with no wall-clock timing. The time a snapshot
takes is kept out of the training clock, and the model's train/eval modes are put back, so the
run trains exactly as it would without snapshots (the loop reseeds dropout at every step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rayexit.data.encode import steps_per_epoch
from rayexit.policy import FULL_DEPTH
from rayexit.sweep import outcomes, select
from rayexit.train.loop import LoopState, TrainResult, train_model
from rayexit.train.steps import build_stages

SNAPSHOT_SPEEDUPS = (1.5, 2.0, 3.0)


@dataclass
class SnapshotRun:
    """What `train_with_snapshots` returns besides the trained model."""

    result: TrainResult
    snapshots: list[dict] = field(default_factory=list)
    stage_names: list[str] = field(default_factory=list)
    stage_steps: list[int] = field(default_factory=list)
    stage_seconds: list[float] = field(default_factory=list)  # training only, snapshots left out
    eval_seconds: float = 0.0  # spent on snapshots

    @property
    def train_seconds(self) -> float:
        return self.result.seconds - self.eval_seconds


def stage_plan(model, settings, train_data) -> tuple[list[str], list[int]]:
    """Each stage's name and optimizer steps, as the loop will count them (one process)."""
    per_epoch = steps_per_epoch(train_data, settings.batch_size)
    stages = build_stages(model, settings, train_data)
    return [s.name for s in stages], [max(1, math.ceil(s.epochs * per_epoch)) for s in stages]


def snapshot_steps(total: int, count: int) -> list[int]:
    """About `count` steps in 1..total: every ceil(total / count)-th, and `total` itself.

    Multiples of one stride, so the loop's `checkpoint_every` lands on each of them.
    """
    stride = math.ceil(total / max(1, min(count, total)))
    return [*range(stride, total, stride), total]


def train_with_snapshots(
    task,
    model,
    train_data,
    settings,
    valid_data,
    test_data,
    *,
    count: int,
    batch_size: int = 32,
    start_stage: int = 0,
    seconds_before: float = 0.0,
    on_snapshot: Callable[[dict, SnapshotRun], None] | None = None,
    show_progress: bool = True,
) -> SnapshotRun:
    """Train `model` in place; `count` snapshots (0: none) in its last stage.

    `start_stage` > 0 skips the stages before it (their weights are already in `model`, e.g.
    DeeBERT's stage 1 taken from the single-exit fine-tune) and `seconds_before` is the training
    time they took, counted on the run's clock.
    """
    names, steps = stage_plan(model, settings, train_data)
    last = len(names) - 1
    wanted = set(snapshot_steps(steps[last], count)) if count > 0 else set()
    out = SnapshotRun(TrainResult(), stage_names=names, stage_steps=steps, stage_seconds=[0.0] * len(names))
    if start_stage:
        out.stage_seconds[start_stage - 1] = seconds_before  # what the skipped stages took, all together
    marks = {"stage_start": seconds_before}

    def on_checkpoint(state: LoopState, record: dict | None) -> None:
        finished = record is not None and state.step == 0 and state.stage > 0 and state.optimizer is None
        stage, step = (state.stage - 1, steps[state.stage - 1]) if finished else (state.stage, state.step)
        clock = state.seconds - out.eval_seconds
        if finished:
            out.stage_seconds[stage] = clock - marks["stage_start"]
            marks["stage_start"] = clock
        if stage != last or step not in wanted or any(s["step"] == step for s in out.snapshots):
            return
        started = time.perf_counter()
        snapshot = evaluate_snapshot(task, model, valid_data, test_data, batch_size)
        snapshot.update(step=step, steps=steps[last], stage=names[last], train_seconds=clock,
                        steps_so_far=sum(steps[:last]) + step)
        out.snapshots.append(snapshot)
        out.eval_seconds += time.perf_counter() - started
        if on_snapshot is not None:
            on_snapshot(snapshot, out)

    resume = None
    if start_stage:
        resume = LoopState(stage=start_stage, steps_before=sum(steps[:start_stage]), seconds=seconds_before)
    # The loop calls back every `stride` steps and at epoch ends; calls off the snapshot grid
    # (epoch ends, earlier stages) only keep the stage clock.
    stride = min(wanted) if wanted else None
    out.result = train_model(
        model, train_data, settings, resume=resume, on_checkpoint=on_checkpoint,
        checkpoint_every=stride, show_progress=show_progress,
    )
    return out


def evaluate_snapshot(task, model, valid_data, test_data, batch_size: int) -> dict:
    """Full depth and the 1.5x/2x/3x points (chosen on validation) on test, from one replay each."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        valid = task.replay(model, valid_data, batch_size)
        test = task.replay(model, test_data, batch_size)
    finally:
        for module, training in modes:  # the loop sets train mode once per epoch: put it back
            module.train(training)
    full_valid = valid.outcome(FULL_DEPTH)
    candidates = outcomes(valid, task.default_grid(valid))
    figures = {"full": test.exit_scores()[-1], "validation_full": full_valid.score, "exit1": test.exit_scores()[0]}
    for speedup in SNAPSHOT_SPEEDUPS:
        choice = select(task, full_valid, candidates, min_speedup=speedup)
        point = test.outcome(choice.outcome.policy)
        figures[f"at_{speedup:g}x"] = {
            task.metric: point.score, "layer_speedup": point.layer_speedup,
            "validation": choice.outcome.score, "describe": choice.outcome.policy.describe(),
        }
    return figures
