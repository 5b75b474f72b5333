"""Multi-exit encoder for sequence labeling: one linear tag head per layer on the token states."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rayexit.models.encoder import (
    ExitConfig,
    MultiExitEncoder,
)
from rayexit.models.sequence import load_pretrained_backbone


class TokenExit(nn.Module):
    """Dropout -> linear to the tags (Li et al., 2021: a plain linear classifier per layer)."""

    def __init__(self, hidden_size: int, num_tags: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_tags)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(states))


class MultiExitForTokenClassification(MultiExitEncoder):
    task = "token"

    def __init__(self, backbone: nn.Module, exit_config: ExitConfig) -> None:
        super().__init__(backbone, exit_config)
        hidden = backbone.config.hidden_size
        self.heads = nn.ModuleList(
            TokenExit(hidden, len(exit_config.labels), exit_config.dropout) for _ in range(self.num_layers)
        )

    def exit_logits(self, layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tag logits of exit `layer` (0-based) for states of any shape [..., H]."""
        return self.heads[layer](hidden)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None, **extra: Any,
    ) -> list[torch.Tensor]:
        """Tag logits [B, S, T] of every exit, exit 1 first, for every word-piece position."""
        attention_mask = self.hf_attention_mask(input_ids, attention_mask, token_type_ids, extra)
        states = self.layer_states(input_ids, attention_mask)
        return [self.exit_logits(i, h) for i, h in enumerate(states)]

    def halting_layer_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, piece_word: torch.Tensor, halt: torch.Tensor
    ) -> list[torch.Tensor]:
        """States after every layer with words frozen after their halting layer `halt` [B, W] (training form).

        Every token runs through each layer and the result is kept only where the token is still
        active, which gives active tokens the same inputs as the early-exit runner (keys/values of
        halted tokens from their frozen states). Special tokens stay active while any word is.
        """
        hidden = self.embed(input_ids)
        mask = self.additive_mask(attention_mask, hidden.dtype)
        piece_halt = halt.gather(1, piece_word.clamp_min(0))
        sentence_halt = halt.max(1).values[:, None]
        piece_halt = torch.where(piece_word < 0, sentence_halt.expand_as(piece_halt), piece_halt)
        states = []
        for layer in range(self.num_layers):
            updated = self.run_layer(layer, hidden, mask)
            hidden = torch.where((piece_halt > layer)[:, :, None], updated, hidden)
            states.append(hidden)
        return states

    @classmethod
    def from_backbone(cls, name_or_path: str, exit_config: ExitConfig) -> MultiExitForTokenClassification:
        """A new multi-exit tagger on a pretrained encoder (hub name or local folder)."""
        return cls(load_pretrained_backbone(name_or_path), exit_config)
