"""A Hugging Face encoder run layer by layer, so that inference can stop early.

Works with BERT-family encoders whose layers are `backbone.encoder.layer` (BERT, RoBERTa,
MiniLM, ELECTRA). The model directory is the hand-off between stages: `config.json` (a
`rayexit-multi-exit` config with the backbone's nested in it, see `rayexit.models.hf`), one
`model.safetensors` with backbone and exit heads, the tokenizer files and `rayexit.json`,
which records task, labels, heads and the exit policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rayexit import integrity
from rayexit.errors import RayexitError
from rayexit.models.hf import MultiExitConfig, MultiExitPreTrainedModel
from rayexit.policy import ExitPolicy
from rayexit.reading import one_line


@dataclass
class ExitConfig:
    """What a model directory needs besides the backbone to be self-describing."""

    task: str  # "sequence" (one label per text) or "token" (one tag per word)
    labels: list[str]
    head: str = "pooler"
    pooling: str = "cls"
    dropout: float = 0.1
    max_length: int = 128
    method: str = ""
    policy: ExitPolicy = field(default_factory=ExitPolicy)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": 2,
            "task": self.task,
            "labels": self.labels,
            "head": self.head,
            "pooling": self.pooling,
            "dropout": self.dropout,
            "max_length": self.max_length,
            "method": self.method,
            "policy": self.policy.to_dict(),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExitConfig:
        data = dict(data)
        data.pop("format_version", None)
        extra = dict(data.get("extra") or {})
        legacy = extra.pop("token_policy", None)  # token models kept their policy here before format 2
        policy = data.get("policy", {})
        if legacy and data.get("task") == "token" and policy.get("kind", "entropy") not in ("tokee", "sentee"):
            policy = legacy
        elif data.get("task") == "token" and not legacy and policy.get("kind", "entropy") not in ("tokee", "sentee"):
            policy = {"kind": "tokee", "thresholds": 0.1, "window": 3}
        data["extra"] = extra
        data["policy"] = ExitPolicy.from_dict(policy)
        return cls(**data)


class MultiExitEncoder(MultiExitPreTrainedModel):
    """Backbone plus exits; subclasses say what an exit computes from a layer's states.

    A transformers `PreTrainedModel` (`rayexit.models.hf`): `config` describes backbone and
    heads, `from_pretrained` / `save_pretrained` read and write a model directory.
    """

    task = ""

    def __init__(self, backbone: nn.Module, exit_config: ExitConfig) -> None:
        if not hasattr(backbone, "encoder") or not hasattr(backbone.encoder, "layer"):
            raise RayexitError(
                f"{type(backbone).__name__}: not a BERT-family encoder (expected encoder.layer); "
                "use a BERT, RoBERTa, MiniLM or ELECTRA checkpoint"
            )
        super().__init__(MultiExitConfig.describing(backbone.config, exit_config))
        self.backbone = backbone
        self.exit_config = exit_config

    @property
    def num_layers(self) -> int:
        return len(self.backbone.encoder.layer)

    @property
    def labels(self) -> list[str]:
        return self.exit_config.labels

    @staticmethod
    def hf_attention_mask(
        input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None,
        extra: dict[str, Any],
    ) -> torch.Tensor:
        """The mask of a Hugging Face style call (`model(**tokenizer(texts, return_tensors="pt"))`):
        all ones when left out, as transformers does; a second segment or another option is refused
        by name rather than ignored."""
        unknown = sorted(name for name, value in extra.items() if value is not None)
        if unknown:
            raise RayexitError(f"forward: unsupported argument(s) {', '.join(unknown)}; a rayexit model takes "
                               "input_ids and attention_mask and returns every exit's logits (exit 1 first)")
        if token_type_ids is not None and bool(token_type_ids.ne(0).any()):
            raise RayexitError("token_type_ids: a second segment is not supported; rayexit models read single texts")
        return torch.ones_like(input_ids) if attention_mask is None else attention_mask

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.embeddings(input_ids=input_ids)
        project = getattr(self.backbone, "embeddings_project", None)  # ELECTRA's small embeddings
        return project(hidden) if project is not None else hidden

    @staticmethod
    def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, S] 1/0 mask -> [B, 1, 1, S] additive mask that eager and SDPA attention both take."""
        blocked = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        return blocked

    def run_layer(self, index: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone.encoder.layer[index](hidden, mask)
        return out[0] if isinstance(out, tuple) else out

    def layer_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        fork: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> list[torch.Tensor]:
        """Hidden states after every layer (layer 1 first).

        `fork`, when given, splits each inner layer's output into what the next layer reads and
        what is returned for its exit (`rayexit.gradreg.ProjectingFork`: the two paths' gradients
        meet there apart).
        """
        hidden = self.embed(input_ids)
        mask = self.additive_mask(attention_mask, hidden.dtype)
        states = []
        for index in range(self.num_layers):
            hidden = self.run_layer(index, hidden, mask)
            exit_input = hidden
            if fork is not None and index < self.num_layers - 1:
                hidden, exit_input = fork(hidden)
            states.append(exit_input)
        return states

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def encoder_layer_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.encoder.layer.parameters() if p.requires_grad]


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    from rayexit.data.packaged import resolve_model_name

    resolved = resolve_model_name(str(name_or_path))
    integrity.check_tokenizer_source(resolved, "rayexit.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except OSError as exc:
        raise RayexitError(f"{name_or_path}: could not load a tokenizer ({one_line(exc)})") from None
    integrity.check_tokenizer_fits(tokenizer, resolved)
    return tokenizer
