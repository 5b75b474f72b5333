"""The served model in plain PyTorch: texts in, (label, probability, exit layer) out.

A batch from the queue is grouped by layer cap (the runner takes one cap per call), sorted
by length and cut into passes that stay under a padded-token budget, so short texts are not
padded to the longest one in the queue. Everything here runs in one worker thread of the
replica; Ray stays in app.py.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from rayexit.config import ExitPolicy
from rayexit.data.encode import pad_batch
from rayexit.exits import run_early_exit
from rayexit.serve.controller import relax_policy


@dataclass
class Answer:
    label: str
    probability: float
    exit_layer: int

    def to_json(self) -> dict:
        return {"label": self.label, "probability": round(self.probability, 6), "exit_layer": self.exit_layer}


@dataclass
class PassStats:
    """One call's bookkeeping, for metrics: padded tokens computed against real tokens."""

    passes: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    layer_rows: list[int] = field(default_factory=list)  # rows computed by each layer execution


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    # Half precision only where it is fast and supported: CPU kernels for float16 are slow or missing.
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


_Served = TypeVar("_Served", bound="ServedModel")  # typing.Self needs Python 3.11; 3.10 is supported


class ServedModel:
    """What both served models share: the model on its device and dtype, its tokenizer and served
    policy, the padded-token budget and the depth cap under overload; built from a model directory."""

    task: str | None = None  # the model directory's task the subclass serves (None: any)

    def __init__(
        self,
        model,
        tokenizer,
        policy: ExitPolicy | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        token_budget: int = 4096,
        overload_layer_cap: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.policy = policy or self.default_policy(model.exit_config.policy)
        self.token_budget = token_budget
        self.overload_layer_cap = overload_layer_cap
        self.max_length = model.exit_config.max_length

    @staticmethod
    def default_policy(saved: ExitPolicy) -> ExitPolicy:
        return saved

    @classmethod
    def from_model_dir(
        cls: type[_Served],
        directory: str | Path,
        policy: ExitPolicy | None = None,
        device: str = "auto",
        dtype: str = "auto",
        token_budget: int = 4096,
        overload_layer_cap: int | None = None,
    ) -> _Served:
        from rayexit.api import load

        loaded = load(directory, task=cls.task)  # the Python API's loader: same checks, same object
        chosen = pick_device(device)
        return cls(
            loaded.model, loaded.tokenizer, policy, chosen, pick_dtype(dtype, chosen), token_budget, overload_layer_cap
        )

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def labels(self) -> list[str]:
        return self.model.labels


class ServedClassifier(ServedModel):
    task = "sequence"

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    @functools.cached_property
    def special_tokens(self) -> int:
        """How many ids an encoded text has before any of its words ([CLS] and [SEP] for BERT)."""
        return len(self.encode([""])[0])

    def classify(
        self, texts: list[str], layer_caps: list[int | None] | None = None, relax_level: int = 0
    ) -> tuple[list[Answer], PassStats]:
        """Answers in the order of `texts`; `layer_caps[i]` bounds text i's depth."""
        return self.classify_encoded(self.encode(texts), layer_caps, relax_level)

    def classify_encoded(
        self, sequences: list[list[int]], layer_caps: list[int | None] | None = None, relax_level: int = 0
    ) -> tuple[list[Answer], PassStats]:
        """As classify, on token ids already made by `encode` (the replica encodes once, to check texts early)."""
        caps, policy = self.plan(len(sequences), layer_caps, relax_level)
        answers: list[Answer | None] = [None] * len(sequences)
        stats = PassStats()
        by_cap: dict[int | None, list[int]] = {}
        for i, cap in enumerate(caps):
            by_cap.setdefault(cap, []).append(i)
        for cap, rows in by_cap.items():
            for chunk in token_budget_chunks(rows, [len(sequences[i]) for i in rows], self.token_budget):
                self._run_pass([sequences[i] for i in chunk], chunk, cap, policy, answers, stats)
        return answers, stats  # type: ignore[return-value]

    def plan(
        self, count: int, layer_caps: list[int | None] | None, relax_level: int
    ) -> tuple[list[int | None], ExitPolicy]:
        """Each text's depth cap and the policy they run under, load relief applied (shared with rebatching)."""
        caps = list(layer_caps or [None] * count)
        policy = relax_policy(self.policy, relax_level, len(self.labels))
        if relax_level > 0 and self.overload_layer_cap is not None:
            caps = [min(c or self.num_layers, self.overload_layer_cap) for c in caps]
        return caps, policy

    def _run_pass(self, sequences, rows, cap, policy, answers, stats: PassStats) -> None:
        ids, mask = pad_batch(sequences, self.pad_id)
        stats.passes += 1
        stats.real_tokens += int(mask.sum())
        stats.padded_tokens += mask.numel()
        result = run_early_exit(
            self.model, ids.to(self.device), mask.to(self.device), policy, layer_cap=cap
        )
        predictions = result.predictions.tolist()
        confidences = result.confidences.float().tolist()
        layers = result.exit_layers.tolist()
        # A row runs layer k iff it exits at k or later; the runner stops after the deepest exit.
        stats.layer_rows += [sum(exit_layer > k for exit_layer in layers) for k in range(max(layers))]
        for j, row in enumerate(rows):
            answers[row] = Answer(self.labels[predictions[j]], confidences[j], layers[j])

    @torch.no_grad()
    def exit_logits_encoded(self, sequences: list[list[int]]) -> torch.Tensor:
        """Every exit's logits [N, L, C] at full depth, in the order of `sequences` (the accuracy guard's check)."""
        out = torch.zeros(len(sequences), self.num_layers, len(self.labels))
        for chunk in token_budget_chunks(list(range(len(sequences))), [len(s) for s in sequences], self.token_budget):
            ids, mask = pad_batch([sequences[i] for i in chunk], self.pad_id)
            logits = self.model(ids.to(self.device), mask.to(self.device))
            out[chunk] = torch.stack(logits, dim=1).float().cpu()
        return out

    def warm_up(self) -> float:
        """One pass so the first real request does not pay for lazy initialisation; returns its seconds."""
        start = time.perf_counter()
        self.classify(["warm up"])
        return time.perf_counter() - start


def token_budget_chunks(rows: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Rows sorted by length, cut so that each chunk's rows x longest-length stays within `budget`.

    A single row longer than the budget still gets its own chunk: the budget bounds waste,
    it never refuses work.
    """
    order = sorted(range(len(rows)), key=lambda k: lengths[k])
    chunks: list[list[int]] = []
    current: list[int] = []
    for k in order:
        width = lengths[k]  # sorted ascending, so the newcomer is the longest in the chunk
        if current and (len(current) + 1) * width > budget:
            chunks.append(current)
            current = []
        current.append(rows[k])
    if current:
        chunks.append(current)
    return chunks
