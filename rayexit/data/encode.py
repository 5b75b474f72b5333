"""Tokenisation into unpadded id lists, and batches padded only to their own longest example."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rayexit.data.sources import TextExamples


@dataclass
class EncodedSet:
    input_ids: list[list[int]]
    labels: list[int]
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_examples(tokenizer, examples: TextExamples, label_set: list[str], max_length: int) -> EncodedSet:
    examples.check_labels(label_set)
    index = {label: i for i, label in enumerate(label_set)}
    encoded = tokenizer(examples.texts, truncation=True, max_length=max_length)["input_ids"]
    return EncodedSet(encoded, [index[label] for label in examples.labels], tokenizer.pad_token_id or 0)


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding, which the batched runner relies on when it trims finished columns."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def rank_slices(
    size: int, batch_size: int, *, shuffle_seed: int | None = None, rank: int = 0, world_size: int = 1
) -> Iterator[list[int]]:
    """Example indices of each batch this worker takes, for both tasks.

    With `world_size > 1` every worker walks the same permutation in global batches of
    `batch_size * world_size` and takes its own contiguous slice, so N workers together see
    exactly the batches one worker would, and their averaged gradients match it. The trailing
    partial global batch is dropped then, so every worker takes the same number of steps.
    """
    for _, chunk in global_slices(size, batch_size, shuffle_seed=shuffle_seed, rank=rank, world_size=world_size):
        yield chunk


def global_slices(
    size: int, batch_size: int, *, shuffle_seed: int | None = None, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[list[int], list[int]]]:
    """(the whole global batch, this worker's slice of it) for each batch `rank_slices` yields.

    The whole batch is for losses that are means over something a slice holds unequal shares
    of (words, for the token task): every worker can count the global batch itself.
    """
    order = list(range(size))
    if shuffle_seed is not None:
        generator = torch.Generator().manual_seed(shuffle_seed)
        order = torch.randperm(size, generator=generator).tolist()
    global_batch = batch_size * world_size
    usable = len(order) if world_size == 1 else len(order) - len(order) % global_batch
    for start in range(0, usable, global_batch):
        whole = order[start : start + global_batch]
        chunk = whole[rank * batch_size : (rank + 1) * batch_size]
        if chunk:
            yield whole, chunk


def iterate_batches(
    data: EncodedSet,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (input_ids, attention_mask, labels) for this worker's slice of each batch (`rank_slices`)."""
    for chunk in rank_slices(len(data), batch_size, shuffle_seed=shuffle_seed, rank=rank, world_size=world_size):
        ids, mask = pad_batch([data.input_ids[i] for i in chunk], data.pad_id)
        yield ids, mask, torch.tensor([data.labels[i] for i in chunk], dtype=torch.long)


def steps_per_epoch(data, batch_size: int, world_size: int = 1) -> int:
    """Batches per epoch for any encoded set (anything with a length), as `rank_slices` cuts them."""
    global_batch = batch_size * world_size
    if world_size == 1:
        return -(-len(data) // batch_size)
    return len(data) // global_batch
