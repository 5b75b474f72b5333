"""One tagger training run from sources to a model directory: `rayexit train --task token`.

Stage 1 starts from a pretrained encoder; stage 2 (`self-sampling`) starts from a stage-1
model directory (`init`) and keeps its tag set, tokenizer and length limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rayexit.config import TrainSettings
from rayexit.data.conll import EncodedTokens, TaggedSentences, encode_tagged, load_tagged, tag_set
from rayexit.errors import RayexitError
from rayexit.files import write_json
from rayexit.models import ExitConfig, load_tokenizer
from rayexit.models.token import MultiExitForTokenClassification
from rayexit.train.loop import TrainResult
from rayexit.train.token_loop import SelfSampling, train_token_model

STAGE1_METHOD = "token-joint"
STAGE2_METHOD = "self-sampling"


@dataclass
class PreparedTagging:
    model: MultiExitForTokenClassification
    tokenizer: object
    train_data: EncodedTokens
    eval_data: EncodedTokens | None
    eval_gold: list[list[str]] | None


def _eval_sentences(source: str | None, tags: list[str]) -> TaggedSentences | None:
    if not source:
        return None
    sentences = load_tagged(source)
    if sentences.origin.startswith("atis:"):
        sentences = sentences.keep_known(tags)
    return sentences


def prepare_tagging(
    model_name: str | None, train_source: str, eval_source: str | None, settings: TrainSettings, init: str | None
) -> PreparedTagging:
    train = load_tagged(train_source, settings.max_examples)
    if init:
        model = MultiExitForTokenClassification.from_pretrained(init)
        tokenizer = load_tokenizer(init)
        tags = model.labels
        if train.origin.startswith("atis:"):
            train = train.keep_known(tags)
        model.exit_config.method = STAGE2_METHOD
    else:
        if not model_name:
            raise RayexitError("--model: needed for stage 1 (an encoder folder, hub name, or `minilm`)")
        tags = tag_set(train)
        if len(tags) < 2:
            raise RayexitError(f"{train.origin}: found only one tag ({tags[0]!r}); need at least two")
        tokenizer = load_tokenizer(model_name)
        exit_config = ExitConfig(
            task="token", labels=tags, head="linear", pooling="token", dropout=settings.dropout,
            max_length=settings.max_length, method=STAGE1_METHOD,
        )
        torch.manual_seed(settings.seed)  # the new exit heads draw their weights here: same seed, same heads
        model = MultiExitForTokenClassification.from_backbone(model_name, exit_config)
    max_length = model.exit_config.max_length
    train_data = encode_tagged(tokenizer, train, tags, max_length)
    eval_sentences = _eval_sentences(eval_source, tags)
    eval_data = encode_tagged(tokenizer, eval_sentences, tags, max_length) if eval_sentences else None
    return PreparedTagging(model, tokenizer, train_data, eval_data, eval_sentences.tags if eval_sentences else None)


def train_token_to_directory(
    model_name: str | None,
    train_source: str,
    eval_source: str | None,
    settings: TrainSettings,
    output: str | Path,
    *,
    init: str | None = None,
    sampling: SelfSampling | None = None,
    show_progress: bool = True,
) -> tuple[PreparedTagging, TrainResult]:
    """Stage 1 without `init`; self-sampling (stage 2) on the stage-1 directory `init`."""
    from rayexit.evaluate_token import exit_f1

    run = prepare_tagging(model_name, train_source, eval_source, settings, init)
    evaluate = None
    if run.eval_data is not None:
        from rayexit.data.conll import token_batches

        batches = list(token_batches(run.eval_data, settings.batch_size))

        def evaluate() -> dict:
            run.model.eval()
            return {"exit_f1": exit_f1(run.model, run.eval_data, run.eval_gold, batches)}

    if init:
        sampling = sampling or SelfSampling(seed=settings.seed)
        run.model.exit_config.extra["self_sampling"] = {
            "windows": sampling.windows, "max_threshold": sampling.max_threshold, "init": str(init),
        }
    else:
        sampling = None
    result = train_token_model(
        run.model, run.train_data, settings, self_sampling=sampling, evaluate=evaluate, show_progress=show_progress
    )
    run.model.save_pretrained(output, run.tokenizer)
    write_json(
        Path(output) / "training.json",
        {
            "settings": settings.to_dict(),
            "task": "token",
            "method": run.model.exit_config.method,
            "base_model": model_name,
            "init": init,
            "train": train_source,
            "eval": eval_source,
            "train_windows": len(run.train_data),
            "train_sentences": run.train_data.num_sentences,
            "seconds": result.seconds,
            "steps": result.steps,
            "history": result.history,
        },
    )
    return run, result
