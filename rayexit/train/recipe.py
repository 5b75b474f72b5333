"""One training run from sources to a model directory: the recipe behind `rayexit train`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rayexit.config import TrainSettings
from rayexit.data import TextExamples, encode_examples, load_text_classification
from rayexit.files import write_json
from rayexit.models import ExitConfig, MultiExitForSequenceClassification, load_tokenizer
from rayexit.train.loop import TrainResult, train_model

log = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    model: MultiExitForSequenceClassification
    tokenizer: object
    train_data: object
    eval_data: object | None


def label_set(examples: TextExamples) -> list[str]:
    """Sorted labels; numerically when every label is an integer, so '10' follows '9'."""
    labels = set(examples.labels)
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def keep_known_labels(examples: TextExamples, labels: list[str]) -> TextExamples:
    """For the packaged demo data only: ATIS's test split has intents its train split lacks."""
    known = set(labels)
    keep = [i for i, label in enumerate(examples.labels) if label in known]
    dropped = len(examples) - len(keep)
    if dropped:
        log.warning("%s: left out %d example(s) whose label never occurs in training", examples.origin, dropped)
    return TextExamples([examples.texts[i] for i in keep], [examples.labels[i] for i in keep], examples.origin)


def prepare(model_name: str, train_source: str, eval_source: str | None, settings: TrainSettings) -> PreparedRun:
    train_examples = load_text_classification(train_source, settings.max_examples)
    labels = label_set(train_examples)
    if len(labels) < 2:
        raise_single_label(train_examples)
    eval_examples = None
    if eval_source:
        eval_examples = load_text_classification(eval_source)
        if eval_examples.origin.startswith("atis:"):
            eval_examples = keep_known_labels(eval_examples, labels)
    tokenizer = load_tokenizer(model_name)
    exit_config = ExitConfig(
        task="sequence",
        labels=labels,
        head=settings.head,
        pooling=settings.pooling,
        dropout=settings.dropout,
        max_length=settings.max_length,
        method=settings.method,
        policy=settings.policy,
    )
    torch.manual_seed(settings.seed)  # the new exit heads draw their weights here: same seed, same heads
    model = MultiExitForSequenceClassification.from_backbone(model_name, exit_config)
    train_data = encode_examples(tokenizer, train_examples, labels, settings.max_length)
    eval_data = encode_examples(tokenizer, eval_examples, labels, settings.max_length) if eval_examples else None
    return PreparedRun(model, tokenizer, train_data, eval_data)


def raise_single_label(examples: TextExamples) -> None:
    from rayexit.errors import RayexitError

    raise RayexitError(f"{examples.origin}: found only one label ({examples.labels[0]!r}); need at least two")


def train_to_directory(
    model_name: str,
    train_source: str,
    eval_source: str | None,
    settings: TrainSettings,
    output: str | Path,
    show_progress: bool = True,
) -> tuple[PreparedRun, TrainResult]:
    run = prepare(model_name, train_source, eval_source, settings)
    result = train_model(run.model, run.train_data, settings, eval_data=run.eval_data, show_progress=show_progress)
    save_run(run, output, settings, result, base_model=model_name, train=train_source, eval=eval_source)
    return run, result


def save_run(run: PreparedRun, output: str | Path, settings: TrainSettings, result, **provenance) -> None:
    """The model directory plus `training.json`: settings, data, time and per-epoch metrics.

    `result` is anything with seconds/steps/conflict_rate/history (one process or Ray Train);
    `provenance` adds what made it (base model, data sources, workers, ...).
    """
    run.model.save_pretrained(output, run.tokenizer)
    write_json(
        Path(output) / "training.json",
        {
            "settings": settings.to_dict(),
            **provenance,
            "train_examples": len(run.train_data),
            "seconds": result.seconds,
            "steps": result.steps,
            "conflict_rate": result.conflict_rate,
            "history": result.history,
        },
    )
