"""Multi-exit encoder for sentence classification: one exit head per layer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rayexit.errors import RayexitError
from rayexit.integrity import check_encoder_source
from rayexit.models.encoder import (
    ExitConfig,
    MultiExitEncoder,
)
from rayexit.models.heads import ExitHeads

log = logging.getLogger(__name__)


class MultiExitForSequenceClassification(MultiExitEncoder):
    task = "sequence"

    def __init__(self, backbone: torch.nn.Module, exit_config: ExitConfig) -> None:
        super().__init__(backbone, exit_config)
        hidden = backbone.config.hidden_size
        self.heads = ExitHeads(
            exit_config.head,
            self.num_layers,
            hidden,
            len(exit_config.labels),
            exit_config.dropout,
            exit_config.pooling,
        )

    def exit_logits(self, layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.heads(layer, hidden, attention_mask)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None, **extra: Any,
    ) -> list[torch.Tensor]:
        """Logits of every exit, exit 1 first (training and full-depth evaluation)."""
        attention_mask = self.hf_attention_mask(input_ids, attention_mask, token_type_ids, extra)
        states = self.layer_states(input_ids, attention_mask)
        return [self.exit_logits(i, h, attention_mask) for i, h in enumerate(states)]

    @classmethod
    def from_backbone(cls, name_or_path: str, exit_config: ExitConfig) -> MultiExitForSequenceClassification:
        """A new multi-exit model on a pretrained encoder (hub name or local folder)."""
        backbone = load_pretrained_backbone(name_or_path)
        model = cls(backbone, exit_config)
        pooler = getattr(backbone, "pooler", None)
        if pooler is not None and hasattr(pooler, "dense"):
            model.heads.init_poolers_from(pooler.dense)
        return model


def load_pretrained_backbone(name_or_path: str) -> torch.nn.Module:
    """An encoder's pretrained weights; from a rayexit model directory, its trained backbone."""
    from transformers import AutoModel

    from rayexit.data.packaged import resolve_model_name
    from rayexit.model_dir import EXIT_CONFIG_FILE, ModelDir

    resolved = resolve_model_name(name_or_path)
    if (Path(resolved) / EXIT_CONFIG_FILE).is_file():
        # Not AutoModel: before config.json named the multi-exit model, that built a random
        # encoder here and dropped every `backbone.`-prefixed tensor without a word.
        log.info("%s: a rayexit model directory; starting from its trained backbone, with new exit heads", resolved)
        return ModelDir(resolved).load_model().backbone
    check_encoder_source(resolved)  # a local folder of pickled weights only is refused, unread
    try:
        # safetensors only, from a hub too: transformers would otherwise unpickle pytorch_model.bin.
        return AutoModel.from_pretrained(resolved, attn_implementation="sdpa", use_safetensors=True)
    except OSError as exc:
        raise RayexitError(
            f"{name_or_path}: could not load an encoder ({exc}). Give a model folder, a hub name "
            "where a hub is reachable, or `minilm` for the packaged MiniLM"
        ) from None
