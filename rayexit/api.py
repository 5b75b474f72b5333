"""The Python API: `rayexit.load(path)`, then `predict` (sentence models) or `tag` (token models).

    import rayexit
    model = rayexit.load("runs/atis")
    model.predict(["show me flights to boston"])
    # [{"label": "atis_flight", "probability": 0.97, "exit_layer": 2}]

A `LoadedModel` is a model directory read once (through `ModelDir`: digests, strict weights) with
its tokenizer. `rayexit serve`'s engines and `rayexit eval` load through it too, so a folder
that loads here loads there, with the same checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rayexit.errors import RayexitError
from rayexit.model_dir import ModelDir
from rayexit.policy import FULL_DEPTH, ExitPolicy

PolicyLike = ExitPolicy | dict | str | None


@dataclass
class LoadedModel:
    """A multi-exit model with its tokenizer, ready to answer."""

    model: Any  # MultiExitForSequenceClassification | MultiExitForTokenClassification, in eval mode
    tokenizer: Any
    path: Path | None = None

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def policy(self) -> ExitPolicy:
        """The exit policy saved in the model directory (what `policy=None` uses)."""
        if self.task == "token":
            from rayexit.token_exits import saved_token_policy

            return saved_token_policy(self.model)
        return self.model.exit_config.policy

    def resolve_policy(self, policy: PolicyLike) -> ExitPolicy:
        """None -> the saved policy; "none" -> full depth; an ExitPolicy or a dict such as
        {"kind": "entropy", "thresholds": 0.3}. Refuses a policy of the other task."""
        if policy is None:
            chosen = self.policy
        elif isinstance(policy, ExitPolicy):
            chosen = policy
        elif isinstance(policy, dict):
            chosen = ExitPolicy.from_dict(policy)
        elif policy == "none":
            chosen = FULL_DEPTH
        else:
            raise RayexitError(
                f"policy: got {policy!r}; expected None (the saved policy), 'none' (full depth), an ExitPolicy "
                "or a dict such as {'kind': 'entropy', 'thresholds': 0.3}"
            )
        return chosen.check_task(self.task)

    def predict(
        self, texts: Sequence[str], policy: PolicyLike = None, batch_size: int = 32, max_layers: int | None = None
    ) -> list[dict[str, Any]]:
        """One dict per text, in order: `label`, `probability` (of that label at the exit taken), `exit_layer`.

        `texts`: a list (or any sequence, e.g. a pandas Series) of strings, each cut at the model's
        `max_length` word-pieces, as in training. `max_layers` bounds the depth any text may use.
        """
        if self.task != "sequence":
            raise RayexitError(f"predict: {self._name()} is a {self.task} model (one tag per word); use tag()")
        texts = _checked_texts(texts, "texts")
        chosen = self.resolve_policy(policy)
        size = _checked_batch_size(batch_size)
        cap = self._checked_max_layers(max_layers)
        if not texts:
            return []
        from rayexit.data.encode import pad_batch
        from rayexit.exits import run_early_exit

        ids = self.tokenizer(texts, truncation=True, max_length=self.model.exit_config.max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
        device = next(self.model.parameters()).device
        out: list[dict[str, Any] | None] = [None] * len(texts)
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            batch, mask = pad_batch([ids[i] for i in rows], self.tokenizer.pad_token_id or 0)
            result = run_early_exit(self.model, batch.to(device), mask.to(device), chosen, cap)
            for row, label, probability, layer in zip(
                rows, result.predictions.tolist(), result.confidences.float().tolist(), result.exit_layers.tolist()
            ):
                out[row] = {"label": self.labels[label], "probability": probability, "exit_layer": layer}
        return out  # type: ignore[return-value]

    def tag(
        self, texts: Sequence[str] | Sequence[list[str]], policy: PolicyLike = None, batch_size: int = 32,
        max_layers: int | None = None,
    ) -> list[dict[str, Any]]:
        """One dict per text, in order: `words`, `tags` and `exit_layers` (one per word).

        A text is a string (split on whitespace) or a list of words; a sentence longer than the
        model's `max_length` runs as several windows. `max_layers` bounds the depth any word may use.
        """
        if self.task != "token":
            raise RayexitError(f"tag: {self._name()} is a {self.task} model (one label per text); use predict()")
        texts = _as_list(texts, "texts", "a list of strings or of word lists")
        sentences = []
        for index, text in enumerate(texts):
            if isinstance(text, str):
                sentences.append(text.split())
            elif isinstance(text, list) and all(isinstance(w, str) and w.strip() for w in text):
                sentences.append(list(text))
            else:
                raise RayexitError(f"texts[{index}]: expected a string or a list of non-empty word strings")
        chosen = self.resolve_policy(policy)
        size = _checked_batch_size(batch_size)
        cap = self._checked_max_layers(max_layers)
        out = [{"words": words, "tags": [], "exit_layers": []} for words in sentences]
        filled = [i for i, words in enumerate(sentences) if words]
        if not filled:
            return out
        from rayexit.data.conll import encode_tagged
        from rayexit.token_exits import run_over_tokens

        data = encode_tagged(self.tokenizer, [sentences[i] for i in filled], None, self.model.exit_config.max_length)
        run = run_over_tokens(self.model, data, chosen, size, cap)
        for k, i in enumerate(filled):
            out[i]["tags"] = [self.labels[t] for t in run.predictions[k]]
            out[i]["exit_layers"] = [int(layer) for layer in run.exit_layers[k]]
        return out

    def _checked_max_layers(self, max_layers: Any) -> int | None:
        layers = self.model.num_layers
        if max_layers is not None and (not isinstance(max_layers, int) or isinstance(max_layers, bool)
                                       or not 1 <= max_layers <= layers):
            raise RayexitError(f"max_layers: got {max_layers!r}, expected a whole number from 1 to {layers} (or None)")
        return max_layers

    def _name(self) -> str:
        return str(self.path) if self.path is not None else "this model"


def load(path: str | Path, *, device: str = "cpu", dtype: Any = None, task: str | None = None) -> LoadedModel:
    """The model directory at `path` with its tokenizer; `task` refuses a directory of the other task.

    `device` is where the model runs (`cpu`, `cuda`, `auto`: a GPU when there is one), for both tasks.
    `dtype` is what the weights run in: None is float32, `auto` the dtype they were saved in, else
    `float16`, `bfloat16` or a torch dtype; half precision suits a GPU, on a CPU it is usually slower.
    """
    directory = ModelDir(path)
    model = directory.load_model(expected_task=task, dtype=dtype)
    tokenizer = directory.load_tokenizer()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        try:
            model = model.to(torch.device(device))
        except (RuntimeError, AssertionError) as exc:
            raise RayexitError(f"device: could not use {device!r} ({exc})") from None
    return LoadedModel(model, tokenizer, Path(path))


def _as_list(texts: Any, name: str, expected: str) -> list:
    """Any sequence of texts (a list, a tuple, a pandas Series, a datasets column) as a list; one
    string is refused rather than read as a sequence of characters."""
    if isinstance(texts, (str, bytes, dict)) or not isinstance(texts, Iterable):
        raise RayexitError(f"{name}: expected {expected}, got {type(texts).__name__}")
    return list(texts)


def _checked_texts(texts: Any, name: str) -> list[str]:
    texts = _as_list(texts, name, "a list of strings")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise RayexitError(f"{name}[{index}]: expected a string, got {type(text).__name__}")
    return texts


def _checked_batch_size(batch_size: Any) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise RayexitError(f"batch_size: got {batch_size!r}, expected a whole number >= 1")
    return batch_size
