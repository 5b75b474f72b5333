"""One training run from sources to a model directory: the recipe behind `rayexit train`.

Read top to bottom: `prepare` (data, tokenizer, model: the task decides how), `train_model`
(the one loop), `save_run` (the model directory with its `training.json`). The Ray Train path
(`rayexit.train.distributed`) calls the same `prepare` and `save_run` around its workers.

Token stage 2 (`--method self-sampling`) starts from a stage-1 model directory (`init`) and
keeps its tag set, tokenizer and length limit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rayexit.config import TrainSettings
from rayexit.errors import RayexitError
from rayexit.model_dir import ModelDir
from rayexit.models import load_tokenizer
from rayexit.tasks import Task, task_named
from rayexit.train.loop import TrainResult, train_model
from rayexit.train.steps import sampling_cache

log = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    task: Task
    model: object
    tokenizer: object
    train_data: object
    eval_data: object | None


def prepare(
    model_name: str | None,
    train_source: str,
    eval_source: str | None,
    settings: TrainSettings,
    *,
    task: str = "sequence",
    init: str | None = None,
) -> PreparedRun:
    """Data, tokenizer and a new (or, with `init`, a stage-1) model, all seeded by `settings.seed`."""
    chosen = task_named(task)
    if init:
        start = ModelDir(init)
        model = start.load_model(expected_task=chosen.name)
        tokenizer = start.load_tokenizer()
        labels = model.labels
        train = chosen.load(train_source, settings.max_examples, known=labels)
        model.exit_config.method = settings.method
        model.exit_config.extra["init"] = str(init)
    else:
        if not model_name:
            raise RayexitError("--model: required (an encoder folder, a hub name, or `minilm`)")
        train = chosen.load(train_source, settings.max_examples)
        labels = chosen.label_set(train)
        tokenizer = load_tokenizer(model_name)
        model = chosen.new_model(model_name, labels, settings)
    max_length = model.exit_config.max_length
    train_data = chosen.encode(tokenizer, train, labels, max_length)
    if settings.method == "self-sampling":
        sampling_cache(model, train_data, settings.batch_size * 2)
    eval_data = None
    if eval_source:
        eval_data = chosen.encode(tokenizer, chosen.load(eval_source, known=labels), labels, max_length)
    return PreparedRun(chosen, model, tokenizer, train_data, eval_data)


def train_to_directory(
    model_name: str | None,
    train_source: str,
    eval_source: str | None,
    settings: TrainSettings,
    output: str | Path,
    *,
    task: str = "sequence",
    init: str | None = None,
    show_progress: bool = True,
) -> tuple[PreparedRun, TrainResult]:
    run = prepare(model_name, train_source, eval_source, settings, task=task, init=init)
    result = train_model(run.model, run.train_data, settings, eval_data=run.eval_data, show_progress=show_progress)
    save_run(run, output, settings, result, base_model=model_name, init=init, train=train_source, eval=eval_source)
    return run, result


def save_run(run: PreparedRun, output: str | Path, settings: TrainSettings, result, **provenance) -> ModelDir:
    """The model directory plus `training.json`: settings, data, time and per-epoch metrics.

    `result` is anything with seconds/steps/conflict_rate/history (one process or Ray Train);
    `provenance` adds what made it (base model, data sources, workers, ...).
    """
    training = {
        "task": run.task.name,
        "method": settings.method,
        "settings": settings.to_dict(),
        **provenance,
        "train_examples": len(run.train_data),
        "seconds": result.seconds,
        "steps": result.steps,
        "conflict_rate": result.conflict_rate,
        "history": result.history,
    }
    return ModelDir.write(output, run.model, run.tokenizer, training)
