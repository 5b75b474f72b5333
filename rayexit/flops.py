"""FLOPs of an encoder run that computes only some rows: what the early-exit runners save.

Multiply-adds x 2 for the matrix products; layer norms, softmax, biases and activations are
left out, the same way for the full model, so ratios are fair. So is an exit's pooling over the
tokens (the mean, or attention's scorer and weighted sum: at most 4 S H per sentence against a
layer's 8 S H^2 and more, under 0.2% at MiniLM's H = 384).
"""

from __future__ import annotations

import torch


def layer_flops(hidden: int, intermediate: int, queries: torch.Tensor, keys: torch.Tensor) -> int:
    """One encoder layer, per sentence `queries` rows computed and `keys` tokens attended to.

    keys/values 2 x (2 k H^2); query and attention output 2 x (2 q H^2); scores and context
    2 x (2 q k H); feed-forward 2 x (2 q H I).
    """
    q = queries.long()
    k = keys.long()
    projections = 4 * k * hidden * hidden + 4 * q * hidden * hidden
    per_sentence = projections + 4 * q * k * hidden + 4 * q * hidden * intermediate
    return int(per_sentence.sum())


def sizes(model) -> tuple[int, int]:
    config = model.backbone.config
    return config.hidden_size, config.intermediate_size


def sentence_head_flops(model, rows: int) -> int:
    """An exit head on `rows` examples: its pooler (H x H, when it has one) and classifier (H x C)."""
    hidden, _ = sizes(model)
    pooler = hidden * hidden if model.exit_config.head in ("pooler", "shared-pooler") else 0
    return 2 * rows * (pooler + hidden * len(model.labels))


def token_head_flops(model, rows: int) -> int:
    hidden, _ = sizes(model)
    return 2 * rows * hidden * len(model.labels)


def sentence_batch_flops(model, width: int, rows: int) -> int:
    """One layer plus its exit on `rows` examples padded to `width` (the runner computes the padding).

    Plain integers, no tensors: the runner calls this once per layer on Serve's request path.
    """
    hidden, intermediate = sizes(model)
    per_row = 8 * width * hidden * hidden + 4 * width * width * hidden + 4 * width * hidden * intermediate
    return rows * per_row + sentence_head_flops(model, rows)


def full_sentence_flops(model, width: int, rows: int) -> int:
    """What a plain forward computes for a padded batch: every layer, and the final exit only."""
    hidden, intermediate = sizes(model)
    columns = torch.full((rows,), width)
    return model.num_layers * layer_flops(hidden, intermediate, columns, columns) + sentence_head_flops(model, rows)


def replay_full_sentence_flops(model, lengths: torch.Tensor, batches: list[list[int]]) -> int:
    return sum(full_sentence_flops(model, int(lengths[torch.tensor(rows)].max()), len(rows)) for rows in batches)


def replay_sentence_flops(model, exit_layers: torch.Tensor, lengths: torch.Tensor, batches: list[list[int]]) -> int:
    """FLOPs the batched runner computes when examples leave at `exit_layers` (1-based).

    Mirrors `rayexit.exits.run_early_exit` batch by batch: at each layer the examples not yet
    gone are computed, padded to the longest of them (right padding, dead columns trimmed).
    """
    total = 0
    for rows in batches:
        index = torch.tensor(rows)
        leave, length = exit_layers[index], lengths[index]
        for layer in range(int(leave.max())):
            alive = leave > layer
            if not alive.any():
                break
            total += sentence_batch_flops(model, int(length[alive].max()), int(alive.sum()))
    return total
