"""Training a multi-exit tagger: stage-1 joint training and stage-2 self-sampling fine-tuning.

Stage 1 (Li et al., 2021): loss = sum_i i * CE_i / sum_i i, CE_i the mean token-level
cross-entropy of exit i over the words (labels on each word's first piece).

Stage 2, self-sampling: the stage-1 model's per-layer word uncertainties on the training set
are cached once; every training sentence then draws a window size and a threshold, TOKEE's
halting is simulated on the cache, and the model trains with those halting masks: a halted
word's state is frozen from its halting layer on, while active words keep attending to it.
CE_i then covers the words still live at layer i (halting layer >= i), since a halted word's
prediction is read at its halting layer only; the weighting is stage 1's.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rayexit.config import TrainSettings
from rayexit.data.conll import IGNORE, EncodedTokens, TokenBatch, token_batches
from rayexit.progress import progress
from rayexit.token_exits import token_uncertainty, window_scores
from rayexit.train.loop import Stage, TrainResult, apply_gradients, make_optimizer


@dataclass
class SelfSampling:
    """What each training sentence draws from: a window size, and a threshold in [0, max]."""

    windows: list[int] = field(default_factory=lambda: [1, 3, 5, 7])
    max_threshold: float = 0.4
    seed: int = 0


# -- losses --------------------------------------------------------------------------------


def word_logits(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """[B, S, T] piece logits -> [B, W, T] at each word's first piece."""
    return logits.gather(1, batch.word_starts[:, :, None].expand(-1, -1, logits.shape[-1]))


def weighted_token_loss(
    logits: list[torch.Tensor], batch: TokenBatch, halt_layers: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_i i * CE_i / sum_i i; with `halt_layers` [B, W], exit i scores only words live at i."""
    total = logits[0].new_zeros(())
    weight_sum = 0.0
    for index, layer_logits in enumerate(logits, start=1):
        labels = batch.labels
        if halt_layers is not None:
            labels = torch.where(halt_layers >= index, labels, torch.full_like(labels, IGNORE))
        if not (labels != IGNORE).any():
            continue
        ce = F.cross_entropy(word_logits(layer_logits, batch).flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        total = total + index * ce
        weight_sum += index
    return total / max(weight_sum, 1.0)


# -- halting masks ---------------------------------------------------------------------------


def simulate_halting(
    uncertainty: torch.Tensor, word_mask: torch.Tensor, windows: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor:
    """TOKEE's halting layer (1-based) per word from per-layer uncertainties [B, W, L].

    Each sentence has its own window and threshold. As at inference, a halted word's
    uncertainty stays at its halting layer's value in its neighbours' windows.
    """
    batch, words, layers = uncertainty.shape
    halt = torch.full((batch, words), layers, dtype=torch.long)
    active = word_mask.clone()
    current = torch.zeros(batch, words)
    for layer in range(layers - 1):
        current = torch.where(active, uncertainty[:, :, layer], current)
        scores = torch.empty_like(current)
        for window in windows.unique().tolist():
            rows = windows == window
            scores[rows] = window_scores(current[rows], word_mask[rows], int(window))
        halting = active & (scores < thresholds[:, None])
        halt[halting] = layer + 1
        active &= ~halting
    return torch.where(word_mask, halt, torch.zeros_like(halt))


def halting_layer_states(model, batch: TokenBatch, halt_layers: torch.Tensor) -> list[torch.Tensor]:
    """States after every layer, with words frozen after their halting layer (training form).

    Every token runs through each layer and the result is kept only where the token is still
    active, which gives active tokens the same inputs as inference (keys/values of halted
    tokens from their frozen states). Special tokens stay active while any word is.
    """
    hidden = model.embed(batch.input_ids)
    mask = model.additive_mask(batch.attention_mask, hidden.dtype)
    piece_halt = halt_layers.gather(1, batch.piece_word.clamp_min(0))
    sentence_halt = halt_layers.max(1).values[:, None]
    piece_halt = torch.where(batch.piece_word < 0, sentence_halt.expand_as(piece_halt), piece_halt)
    states = []
    for layer in range(model.num_layers):
        updated = model.run_layer(layer, hidden, mask)
        active = (piece_halt > layer)[:, :, None]
        hidden = torch.where(active, updated, hidden)
        states.append(hidden)
    return states


@torch.no_grad()
def cache_uncertainties(model, data: EncodedTokens, batch_size: int, show_progress: bool = True) -> list[torch.Tensor]:
    """Per encoded window: [words, L] uncertainty of every exit at full depth."""
    model.eval()
    cache: list[torch.Tensor | None] = [None] * len(data)
    batches = token_batches(data, batch_size)
    total = math.ceil(len(data) / batch_size)
    for batch in progress(batches, desc="self-sampling cache", total=total, enabled=show_progress):
        logits = model(batch.input_ids, batch.attention_mask)
        u = torch.stack([token_uncertainty(word_logits(z, batch)) for z in logits], dim=-1)  # [B, W, L]
        for b, row in enumerate(batch.rows):
            cache[row] = u[b, : len(data.word_starts[row])].clone()
    return cache  # type: ignore[return-value]


# -- the loop ------------------------------------------------------------------------------


def train_token_model(
    model,
    train_data: EncodedTokens,
    settings: TrainSettings,
    *,
    self_sampling: SelfSampling | None = None,
    evaluate: Callable[[], dict] | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Stage 1 when `self_sampling` is None, else stage 2 on the (stage-1) model given."""
    torch.manual_seed(settings.seed)
    result = TrainResult()
    start = time.perf_counter()
    cache = None
    draw = None
    if self_sampling is not None:
        cache = cache_uncertainties(model, train_data, settings.batch_size * 2, show_progress)
        draw = random.Random(self_sampling.seed)
    name = "self-sampling" if self_sampling is not None else "joint"
    heads = list(model.heads.parameters())
    stage = Stage(name, settings.epochs, model.backbone_parameters() + heads, {id(p) for p in heads}, step=None)
    per_epoch = math.ceil(len(train_data) / settings.batch_size)
    total = max(1, math.ceil(settings.epochs * per_epoch))
    optimizer, scheduler = make_optimizer(stage, settings, total)
    bar = iter(progress(range(total), desc=f"train {name}", enabled=show_progress))
    step = epoch = 0
    while step < total:
        model.train()
        losses = []
        for batch in token_batches(train_data, settings.batch_size, shuffle_seed=settings.seed + epoch):
            if step >= total:
                break
            if cache is None:
                loss = weighted_token_loss(model(batch.input_ids, batch.attention_mask), batch)
            else:
                halt = sampled_halting(batch, cache, self_sampling, draw)
                states = halting_layer_states(model, batch, halt)
                logits = [model.exit_logits(i, h) for i, h in enumerate(states)]
                loss = weighted_token_loss(logits, batch, halt)
            grads = torch.autograd.grad(loss, stage.params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(stage.params, grads, strict=True)]
            apply_gradients(stage.params, grads, optimizer, scheduler)
            losses.append(loss.item())
            step += 1
            next(bar, None)
        epoch += 1
        record = {"stage": name, "epoch": epoch, "step": step, "loss": sum(losses) / max(len(losses), 1)}
        if evaluate is not None:
            record.update(evaluate())
        record["seconds"] = time.perf_counter() - start
        result.history.append(record)
    result.steps = total
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def sampled_halting(batch: TokenBatch, cache: list[torch.Tensor], sampling: SelfSampling, draw: random.Random):
    batch_size, words = batch.word_mask.shape
    layers = cache[batch.rows[0]].shape[1]
    u = torch.ones(batch_size, words, layers)
    for b, row in enumerate(batch.rows):
        u[b, : cache[row].shape[0]] = cache[row]
    windows = torch.tensor([draw.choice(sampling.windows) for _ in range(batch_size)])
    thresholds = torch.tensor([draw.uniform(0.0, sampling.max_threshold) for _ in range(batch_size)])
    return simulate_halting(u, batch.word_mask, windows, thresholds)
