"""Exit heads for sentence classification: one per layer, on a pooled sentence state."""

from __future__ import annotations

import torch
from torch import nn


class PoolerExit(nn.Module):
    """RomeBERT/DeeBERT head: its own pooler (dense + tanh) -> dropout -> linear."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.tanh(self.pooler(first_token))))


class LinearExit(nn.Module):
    """PABEE head: the shared pooler's output -> dropout -> linear."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))


class ExitHeads(nn.Module):
    """All exits of a model; `head` is `pooler` (one pooler each) or `shared-pooler` (PABEE)."""

    def __init__(
        self, head: str, num_layers: int, hidden_size: int, num_labels: int, dropout: float, pooling: str = "cls"
    ) -> None:
        super().__init__()
        self.head = head
        self.pooling = pooling
        if head == "shared-pooler":
            self.shared_pooler = nn.Linear(hidden_size, hidden_size)
            self.exits = nn.ModuleList(LinearExit(hidden_size, num_labels, dropout) for _ in range(num_layers))
        else:
            self.exits = nn.ModuleList(PoolerExit(hidden_size, num_labels, dropout) for _ in range(num_layers))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        if pooling == "attention":
            # One scorer per exit, so each layer learns which of its tokens to read. Zero weights
            # score every token alike, so training starts from the mean pooling.
            self.scorers = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(num_layers))
            for scorer in self.scorers:
                nn.init.zeros_(scorer.weight)
                nn.init.zeros_(scorer.bias)

    def exit_parameters(self, layer: int) -> list[nn.Parameter]:
        """What only exit `layer` (0-based) reads: its head, and its scorer under attention pooling
        (a shared pooler is everyone's, so it is not here)."""
        own = list(self.exits[layer].parameters())
        return own + list(self.scorers[layer].parameters()) if self.pooling == "attention" else own

    def init_poolers_from(self, pretrained: nn.Linear) -> None:
        """Start every pooler as a copy of the backbone's pretrained one (METHODS section 1)."""
        targets = [self.shared_pooler] if self.head == "shared-pooler" else [e.pooler for e in self.exits]
        with torch.no_grad():
            for target in targets:
                target.weight.copy_(pretrained.weight)
                target.bias.copy_(pretrained.bias)

    def forward(self, layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of exit `layer` (0-based) from that layer's hidden states [B, S, H].

        `cls` reads the first token (BERT's convention); `mean` averages the real tokens, which
        suits sentence-embedding encoders such as all-MiniLM, whose first token was never trained;
        `attention` weighs the real tokens by a learned score, one scorer per exit.
        """
        if self.pooling == "mean":
            weights = attention_mask[:, :, None].to(hidden.dtype)
            first = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        elif self.pooling == "attention":
            # the softmax in float32, so half-precision weights still sum to 1 over the real tokens
            scores = self.scorers[layer](hidden).squeeze(-1).float()
            scores = scores.masked_fill(attention_mask == 0, torch.finfo(scores.dtype).min)
            first = torch.einsum("bs,bsh->bh", scores.softmax(-1).to(hidden.dtype), hidden)
        else:
            first = hidden[:, 0]
        if self.head == "shared-pooler":
            first = torch.tanh(self.shared_pooler(first))
        return self.exits[layer](first)
