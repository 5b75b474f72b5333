"""What one optimisation step computes, per method and task: the `Stage.step` functions.

A step takes (model, batch, params, settings, epoch) and returns (flat gradients, loss value,
combine). The loop averages the flat gradients across workers (one all-reduce) and then calls
`combine`, which turns them into one gradient per parameter (RomeBERT projects here, after
averaging, so every worker applies the same update) plus a conflict flag.

Sentence batches are (input_ids, attention_mask, labels); token batches are `TokenBatch`.

Token stage 2, self-sampling: the stage-1 model's per-layer word uncertainties on the training
set are cached once (`rayexit.token_exits.cache_token_exits`, the same full pass the sweeps
replay); every training sentence then draws a window size and a threshold, TOKEE's halting is
simulated on the cache, and the model trains with those halting masks. The draw depends only
on (seed, epoch, sentence), so a resumed run and N workers draw what one worker would.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayexit.config import HIDDEN_SCOPES, TrainSettings
from rayexit.gradreg import ProjectingFork, ScaledBranch, combine_with_projection
from rayexit.losses import joint_loss, live_word_counts, pabee_loss, romebert_losses, weighted_token_loss
from rayexit.policy import ExitPolicy


@dataclass
class Stage:
    """One optimisation stage: which parameters train, for how many epochs, on which step."""

    name: str
    epochs: float
    params: list[torch.nn.Parameter]
    head_params: set[int]
    step: Callable
    frozen_backbone: bool = False
    progress: float = 0.0  # fraction of this stage's steps already taken; the loop sets it before each step


def build_stages(model, settings: TrainSettings, train_data=None) -> list[Stage]:
    backbone = model.backbone_parameters()
    heads = list(model.heads.parameters())
    head_ids = {id(p) for p in heads}
    if model.task == "token":
        if settings.method == "self-sampling":
            step = SelfSamplingStep(model, train_data, settings)
            return [Stage("self-sampling", settings.epochs, backbone + heads, head_ids, step)]
        return [Stage("joint", settings.epochs, backbone + heads, head_ids, token_joint_step)]
    if settings.method in ("deebert", "finetune"):
        final_head = model.heads.exit_parameters(model.num_layers - 1)
        if settings.head == "shared-pooler":
            final_head += list(model.heads.shared_pooler.parameters())
        final_ids = {id(p) for p in final_head}
        if settings.method == "finetune":  # DeeBERT's stage 1 alone: the intermediate heads never train
            return [Stage("finetune", settings.epochs, backbone + final_head, final_ids, final_only_step)]
        inner = [p for p in heads if id(p) not in final_ids]
        stage2_epochs = settings.deebert_stage2_epochs or settings.epochs
        return [
            Stage("deebert-1", settings.epochs, backbone + final_head, final_ids, final_only_step),
            Stage("deebert-2", stage2_epochs, inner, {id(p) for p in inner}, frozen_exits_step, frozen_backbone=True),
        ]
    if settings.method == "romebert":
        stage = Stage("romebert", settings.epochs, backbone + heads, head_ids, romebert_step)
        # The gamma warm-up needs to know how far training is; only the stage (set by the loop) knows.
        stage.step = lambda *args: romebert_step(*args, progress=stage.progress)
        return [stage]
    step = {"joint": joint_step, "pabee": pabee_step}[settings.method]
    return [Stage(settings.method, settings.epochs, backbone + heads, head_ids, step)]


def grads_of(loss: torch.Tensor, params, retain: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def as_is(grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool | None]:
    return grads, None


# -- sentence classification -----------------------------------------------------------------


def joint_step(model, batch, params, settings, epoch):
    ids, mask, labels = batch
    loss = joint_loss(model(ids, mask), labels)
    return grads_of(loss, params), loss.item(), as_is


def pabee_step(model, batch, params, settings, epoch):
    ids, mask, labels = batch
    loss = pabee_loss(model(ids, mask), labels)
    return grads_of(loss, params), loss.item(), as_is


def final_only_step(model, batch, params, settings, epoch):
    ids, mask, labels = batch
    states = model.layer_states(ids, mask)
    loss = F.cross_entropy(model.exit_logits(model.num_layers - 1, states[-1], mask), labels)
    return grads_of(loss, params), loss.item(), as_is


def frozen_exits_step(model, batch, params, settings, epoch):
    ids, mask, labels = batch
    with torch.no_grad():
        states = model.layer_states(ids, mask)
    logits = [model.exit_logits(i, h, mask) for i, h in enumerate(states[:-1])]
    loss = joint_loss(logits, labels)
    return grads_of(loss, params), loss.item(), as_is


def distillation_weight(gamma: float, warmup: float, progress: float) -> float:
    """RomeBERT's gamma at `progress` (fraction of training done) under a linear warm-up.

    0 at the start (the inner exits learn from the labels alone while the teacher, the final
    exit, is no better than chance), rising linearly to `gamma` at `warmup`, then constant.
    """
    if warmup <= 0.0 or progress >= warmup:
        return gamma
    return gamma * max(progress, 0.0) / warmup


def romebert_step(model, batch, params, settings, epoch, progress: float = 1.0):
    """Both gradients go out in one flat list (one all-reduce); `combine` projects after averaging.

    `progress` (fraction of the stage done) only matters with a warm-up (of gamma, or of the
    final exit alone); a bare call is treated as past both.
    """
    if progress < settings.final_only_warmup:
        # The backbone first learns the task for the final exit alone, as a fine-tune would;
        # the inner exits join with a trained teacher and a backbone that already reads the task.
        return final_only_step(model, batch, params, settings, epoch)
    ids, mask, labels = batch
    gamma = distillation_weight(settings.gamma, settings.gamma_warmup, progress)
    if settings.gr_scope in HIDDEN_SCOPES and settings.gr_direction != "none":
        return romebert_hidden_step(model, batch, params, settings, gamma)
    final, exits = romebert_losses(
        exit_logits_scaled(model, ids, mask, settings.exit_grad_scale), labels, gamma, settings.temperature,
        settings.exit_weights,
    )
    # Scaling the leader leaves the projection unchanged (it depends on the leader's direction
    # only), so with `final` leading the weight shifts the update's balance and nothing else.
    final = settings.final_weight * final
    total = (final + exits).item()
    if settings.gr_direction == "none":
        return grads_of(final + exits, params), total, as_is
    flat = grads_of(final, params, retain=True) + grads_of(exits, params)
    projected = projected_mask(model, params, settings)

    def combine(averaged: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
        g_final, g_exits = averaged[: len(params)], averaged[len(params) :]
        leader, other = (g_exits, g_final) if settings.gr_direction == "reverse" else (g_final, g_exits)
        shared = [i for i, is_projected in enumerate(projected) if is_projected]
        combined, conflict = combine_with_projection(
            [leader[i] for i in shared], [other[i] for i in shared], per_tensor=settings.gr_scope == "per_tensor"
        )
        out = [lead + oth for lead, oth in zip(leader, other)]
        for i, grad in zip(shared, combined):
            out[i] = grad
        return out, conflict

    return flat, total, combine


def romebert_hidden_step(model, batch, params, settings: TrainSettings, gamma: float):
    """`gr_scope: hidden` (or `hidden_per_example`): RomeBERT's projection at every layer's
    output, in one backward pass.

    Each inner layer's hidden state forks into the layers above and its own exit; the fork's
    backward projects one gradient against the other (`ProjectingFork`). It costs one backward
    pass where the parameter-space projection needs two. Data-parallel, the workers sum each
    fork's two scalars (inner product, norm) before projecting, so N workers apply what one
    process would (`rayexit.gradreg`).
    """
    ids, mask, labels = batch
    branch_leads = settings.gr_direction == "reverse"
    per_example = settings.gr_scope == "hidden_per_example"
    conflicts: list[bool] = []
    scale = settings.exit_grad_scale
    states = model.layer_states(
        ids, mask, fork=lambda hidden: ProjectingFork.apply(hidden, branch_leads, conflicts, per_example, scale)
    )
    logits = [model.exit_logits(index, state, mask) for index, state in enumerate(states)]
    final, exits = romebert_losses(logits, labels, gamma, settings.temperature, settings.exit_weights)
    loss = settings.final_weight * final + exits
    grads = grads_of(loss, params)

    def combine(averaged: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
        return averaged, any(conflicts)

    return grads, loss.item(), combine


def exit_logits_scaled(model, ids: torch.Tensor, mask: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """Every exit's logits, the inner exits' gradient into the encoder times `scale` (`exit_grad_scale`)."""
    if scale == 1.0:
        return model(ids, mask)
    states = model.layer_states(ids, mask, fork=lambda hidden: ScaledBranch.apply(hidden, scale))
    return [model.exit_logits(index, state, mask) for index, state in enumerate(states)]


def projected_mask(model, params, settings: TrainSettings) -> list[bool]:
    """Which parameters take part in the projection: encoder layers (RomeBERT) or all shared."""
    chosen = model.encoder_layer_parameters() if settings.gr_scope == "encoder" else model.backbone_parameters()
    ids = {id(p) for p in chosen}
    return [id(p) in ids for p in params]


# -- token tagging ---------------------------------------------------------------------------


def word_logits(logits: torch.Tensor, batch) -> torch.Tensor:
    """[B, S, T] piece logits -> [B, W, T] at each word's first piece."""
    return logits.gather(1, batch.word_starts[:, :, None].expand(-1, -1, logits.shape[-1]))


def token_joint_step(model, batch, params, settings, epoch):
    logits = [word_logits(z, batch) for z in model(batch.input_ids, batch.attention_mask)]
    spread = {}
    if batch.whole is not None:  # data-parallel: normalise by the global batch's words (GlobalBatch says why)
        words = torch.full((len(logits),), sum(batch.whole.words))
        spread = {"exit_words": words, "world_size": batch.whole.world_size}
    loss = weighted_token_loss(logits, batch.labels, **spread)
    return grads_of(loss, params), loss.item(), as_is


class SelfSamplingStep:
    """Token stage 2: train under halting masks simulated from sampled TOKEE settings."""

    def __init__(self, model, train_data, settings: TrainSettings) -> None:
        self.uncertainty = sampling_cache(model, train_data, settings.batch_size * 2)  # [R, W, L]
        self.windows = list(settings.sampling_windows)
        self.max_threshold = settings.sampling_max_threshold
        self.seed = settings.seed

    def __call__(self, model, batch, params, settings, epoch):
        halt = self.halting(batch.rows, batch.word_mask.cpu(), epoch).to(batch.word_mask.device)
        states = model.halting_layer_states(batch.input_ids, batch.attention_mask, batch.piece_word, halt)
        logits = [word_logits(model.exit_logits(i, h), batch) for i, h in enumerate(states)]
        spread = {}
        if batch.whole is not None:
            # Data-parallel: exit i's CE is a mean over the words live at i in the whole global
            # batch. The draws depend only on (seed, epoch, row), so this worker simulates every
            # row's halting itself and counts them; no collective needed (GlobalBatch says why).
            whole = self.halting(batch.whole.rows, batch.whole.word_mask(), epoch)
            spread = {"exit_words": live_word_counts(whole, len(logits)), "world_size": batch.whole.world_size}
        loss = weighted_token_loss(logits, batch.labels, halt, **spread)
        return grads_of(loss, params), loss.item(), as_is

    def halting(self, rows: list[int], word_mask: torch.Tensor, epoch: int) -> torch.Tensor:
        """Halting layers [B, W] of `rows` (word_mask [B, W] on the CPU); each row's depends on that row alone."""
        from rayexit.token_exits import simulate_halting

        u = self.uncertainty[rows][:, : word_mask.shape[1]]
        draws = [random.Random(f"{self.seed}:{epoch}:{row}") for row in rows]
        windows = torch.tensor([draw.choice(self.windows) for draw in draws])
        thresholds = torch.tensor([draw.uniform(0.0, self.max_threshold) for draw in draws])
        policy = ExitPolicy("tokee", 0.0)
        return simulate_halting(u, word_mask, policy, thresholds=thresholds, windows=windows)


def sampling_cache(model, train_data, batch_size: int) -> torch.Tensor:
    """The stage-1 model's per-layer word uncertainties on the training set, computed once.

    Kept on the encoded data (`recipe.prepare` fills it from the --init model before any
    training), so a resumed run and every Ray Train worker sample from the stage-1 model's
    uncertainties, not from weights that have trained since.
    """
    from rayexit.token_exits import cache_token_exits

    if getattr(train_data, "sampling_cache", None) is None:
        train_data.sampling_cache = cache_token_exits(model, train_data, batch_size).uncertainty
    return train_data.sampling_cache
