"""A Hugging Face encoder run layer by layer, so that inference can stop early.

Works with BERT-family encoders whose layers are `backbone.encoder.layer` (BERT, RoBERTa,
MiniLM, ELECTRA). The model directory is the hand-off between stages: the backbone's
`config.json`, one `model.safetensors` with backbone and exit heads, the tokenizer files and
`rayexit.json`, which records task, labels, heads and the exit policy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rayexit.config import ExitPolicy
from rayexit.errors import RayexitError
from rayexit.files import share_tree

EXIT_CONFIG_FILE = "rayexit.json"
WEIGHTS_FILE = "model.safetensors"


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
            "format_version": 1,
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
        data["policy"] = ExitPolicy.from_dict(data.get("policy", {}))
        return cls(**data)


class MultiExitEncoder(nn.Module):
    """Backbone plus exits; subclasses say what an exit computes from a layer's states."""

    task = ""

    def __init__(self, backbone: nn.Module, exit_config: ExitConfig) -> None:
        super().__init__()
        if not hasattr(backbone, "encoder") or not hasattr(backbone.encoder, "layer"):
            raise RayexitError(
                f"{type(backbone).__name__}: not a BERT-family encoder (expected encoder.layer); "
                "use a BERT, RoBERTa, MiniLM or ELECTRA checkpoint"
            )
        self.backbone = backbone
        self.exit_config = exit_config

    @property
    def num_layers(self) -> int:
        return len(self.backbone.encoder.layer)

    @property
    def labels(self) -> list[str]:
        return self.exit_config.labels

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

    def layer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states after every layer (layer 1 first)."""
        hidden = self.embed(input_ids)
        mask = self.additive_mask(attention_mask, hidden.dtype)
        states = []
        for index in range(self.num_layers):
            hidden = self.run_layer(index, hidden, mask)
            states.append(hidden)
        return states

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def encoder_layer_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.encoder.layer.parameters() if p.requires_grad]

    # -- model directories -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | Path):
        """Load a model directory written by `save_pretrained`, refusing one of another task."""
        exit_config = read_exit_config(directory)
        if exit_config.task != cls.task:
            raise RayexitError(f"{directory}: holds a {exit_config.task!r} model, expected {cls.task!r}")
        model = cls(load_backbone_from_config(directory), exit_config)
        load_weights(model, directory)
        model.eval()
        return model

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """Write the model directory atomically: a temporary sibling, then a rename."""
        directory = Path(directory)
        if directory.is_dir() and any(directory.iterdir()) and not (directory / EXIT_CONFIG_FILE).exists():
            raise RayexitError(f"{directory}: exists and is not a rayexit model directory; choose a new folder")
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            self.backbone.config.save_pretrained(staging)
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(_untie(state), staging / WEIGHTS_FILE, metadata={"format": "pt"})
            (staging / EXIT_CONFIG_FILE).write_text(json.dumps(self.exit_config.to_dict(), indent=2))
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            share_tree(staging)  # mkdtemp and safetensors make 0700/0600: unreadable to others on shared storage
            _replace_dir(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def read_exit_config(directory: str | Path) -> ExitConfig:
    path = Path(directory) / EXIT_CONFIG_FILE
    if not path.is_file():
        raise RayexitError(
            f"{directory}: not a rayexit model directory (no {EXIT_CONFIG_FILE}); "
            "train one with `rayexit train` or pass a folder it wrote"
        )
    try:
        return ExitConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise RayexitError(f"{path}: unreadable exit config ({exc})") from None


def load_backbone_from_config(directory: str | Path) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(str(directory))
    except Exception as exc:
        raise RayexitError(f"{directory}/config.json: unreadable backbone config ({exc})") from None
    return AutoModel.from_config(config, attn_implementation="sdpa")


def load_weights(model: nn.Module, directory: str | Path) -> None:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise RayexitError(f"{directory}: missing {WEIGHTS_FILE}")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise RayexitError(f"{path}: unreadable weights ({exc})") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
    if missing:
        raise RayexitError(f"{path}: weights missing for {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=False)


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage; give every tensor its own."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def _replace_dir(staging: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    from rayexit.data.packaged import resolve_model_name

    try:
        return AutoTokenizer.from_pretrained(resolve_model_name(str(name_or_path)))
    except OSError as exc:
        raise RayexitError(f"{name_or_path}: could not load a tokenizer ({exc})") from None
