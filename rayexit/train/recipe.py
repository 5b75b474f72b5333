"""One training run from sources to a model directory: the recipe behind `rayexit train`.

Read top to bottom: `prepare` (data, tokenizer, model: the task decides how), `train_model`
(the one loop), `save_run` (the model directory with its `training.json`). The Ray Train path
(`rayexit.train.distributed`) calls the same `prepare` and `save_run` around its workers.

Token stage 2 (`--method self-sampling`) starts from a stage-1 model directory (`init`) and
keeps its tag set, tokenizer and length limit.

Settings left unset (None) are chosen for the backbone and task in `prepare` (`fill_defaults`:
the task's `default_settings` on what the encoder's files say), logged in one line, and kept
with the reason in `training.json` and `rayexit.json` under `defaults`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rayexit.config import TrainSettings
from rayexit.errors import RayexitError
from rayexit.model_dir import ModelDir
from rayexit.models import load_tokenizer
from rayexit.models.backbone import describe_backbone
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
    settings: TrainSettings | None = None  # the caller's, with unset ones filled (what trains)
    defaults: dict = field(default_factory=dict)  # {name: {"value": v, "why": reason}} of those filled


def fill_defaults(settings: TrainSettings, task: Task, base: str) -> tuple[TrainSettings, dict]:
    """`settings` with the unset ones chosen for the backbone `base`, and what was chosen and why.

    A value the user gave (YAML, flag, Python, a Tune trial's sample) is never replaced.
    """
    unset = [name for name in task.backbone_defaults if getattr(settings, name) is None]
    choices = {}
    if unset:  # the encoder's files are read only when there is something to choose
        choices = {k: v for k, v in task.default_settings(describe_backbone(base), settings).items() if k in unset}
    chosen = {name: {"value": value, "why": why} for name, (value, why) in choices.items()}
    if chosen:
        said = "; ".join(f"{name} {entry['value']} ({entry['why']})" for name, entry in chosen.items())
        log.info("defaults for %s: %s; a setting you give replaces its default", base, said)
    return dataclasses.replace(settings, **{k: v["value"] for k, v in chosen.items()}), chosen


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
    chosen.check_settings(settings)
    if not init and not model_name:
        raise RayexitError("--model: required (an encoder folder, a hub name, or `minilm`)")
    settings, defaults = fill_defaults(settings, chosen, init or model_name)
    if init:
        start = ModelDir(init)
        model = start.load_model(expected_task=chosen.name)
        tokenizer = start.load_tokenizer()
        labels = model.labels
        train = chosen.load(train_source, settings.max_examples, known=labels)
        model.exit_config.method = settings.method
        model.exit_config.extra["init"] = str(init)
    else:
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
    if defaults:
        model.exit_config.extra["defaults"] = defaults  # rayexit.json says what was chosen for the user, and why
    return PreparedRun(chosen, model, tokenizer, train_data, eval_data, settings, defaults)


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
    result = train_model(run.model, run.train_data, run.settings, eval_data=run.eval_data, show_progress=show_progress)
    save_run(run, output, run.settings, result, base_model=model_name, init=init, train=train_source, eval=eval_source)
    return run, result


def save_run(run: PreparedRun, output: str | Path, settings: TrainSettings, result, **provenance) -> ModelDir:
    """The model directory plus `training.json`: settings, data, time and per-epoch metrics.

    `result` is anything with seconds/steps/conflict_rate/history (one process or Ray Train);
    `provenance` adds what made it (base model, data sources, workers, ...).
    """
    if run.defaults:  # a caller's own settings object: record the values that trained, not its unset ones
        unset = {k: v["value"] for k, v in run.defaults.items() if getattr(settings, k) is None}
        settings = dataclasses.replace(settings, **unset)
    training = {
        "task": run.task.name,
        "method": settings.method,
        "settings": settings.to_dict(),
        "defaults": run.defaults,
        **provenance,
        "train_examples": len(run.train_data),
        "seconds": result.seconds,
        "steps": result.steps,
        "conflict_rate": result.conflict_rate,
        "history": result.history,
    }
    return ModelDir.write(output, run.model, run.tokenizer, training)
