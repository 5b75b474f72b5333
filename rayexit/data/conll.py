"""Tagged sentences for sequence labeling: CoNLL files, hub datasets, the packaged ATIS slots.

A source is a string: a CoNLL-style file (`token ... TAG` a line, any whitespace, blank lines
between sentences, `-DOCSTART-` lines skipped; the tag is the last column and every word line
has the same number of columns), `atis` or `atis:test` for the packaged slot tags, or a hub
dataset `owner/name[:split]` with a tokens column and a tags column. Tags are IOB2 strings;
the tag set is read from the training data.

Encoding puts each word's label on its first word-piece. A sentence longer than the model's
limit is split into consecutive windows of whole words (with a warning naming the line), and
predictions are stitched back, so no word ever loses its label.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rayexit.data.encode import global_slices
from rayexit.data.packaged import read_atis
from rayexit.errors import RayexitError
from rayexit.reading import iter_lines

log = logging.getLogger(__name__)

DOCSTART = "-DOCSTART-"
TOKEN_COLUMNS = ("tokens", "words")
TAG_COLUMNS = ("ner_tags", "tags", "labels", "slot_tags")
# A tag as IOB1/IOB2/IOBES files write them: O, or a prefix, a dash and a type (B-PER, I-fromloc.city_name).
TAG_PATTERN = re.compile(r"O|[BIESLU]-\S+")
IGNORE = -100  # label of positions that carry no tag: specials and non-first word-pieces


@dataclass
class TaggedSentences:
    words: list[list[str]]
    tags: list[list[str]]
    origin: str
    lines: list[int] | None = None  # file line of each sentence's first word, for messages

    def __len__(self) -> int:
        return len(self.words)

    def where(self, index: int, word: int | None = None) -> str:
        if self.lines is None:
            return f"sentence {index}" + (f", word {word + 1}" if word is not None else "")
        # CoNLL files hold one word a line, so a word's line is its sentence's first line + offset.
        return f"line {self.lines[index] + (word or 0)}"

    def head(self, count: int | None) -> TaggedSentences:
        if count is None or count >= len(self):
            return self
        lines = self.lines[:count] if self.lines else None
        return TaggedSentences(self.words[:count], self.tags[:count], self.origin, lines)

    def check_tags(self, tag_set: list[str]) -> None:
        """Refuse a tag the model does not know, naming the file and line where it occurs."""
        known = set(tag_set)
        for index, tags in enumerate(self.tags):
            for offset, tag in enumerate(tags):
                if tag not in known:
                    raise RayexitError(
                        f"{self.origin}: {self.where(index, offset)}: tag {tag!r} is not in the model's tag set "
                        f"({', '.join(tag_set[:20])}{', ...' if len(tag_set) > 20 else ''})"
                    )

    def keep_known(self, tag_set: list[str]) -> TaggedSentences:
        """For the packaged demo data only: ATIS's test split has slot tags its train split lacks."""
        known = set(tag_set)
        keep = [i for i, tags in enumerate(self.tags) if all(t in known for t in tags)]
        if len(keep) < len(self):
            dropped = len(self) - len(keep)
            log.warning("%s: left out %d sentence(s) with a tag never seen in training", self.origin, dropped)
        lines = [self.lines[i] for i in keep] if self.lines else None
        return TaggedSentences([self.words[i] for i in keep], [self.tags[i] for i in keep], self.origin, lines)


def tag_set(sentences: TaggedSentences) -> list[str]:
    """`O` first, then by entity type and B before I, so related tags sit together."""
    tags = {t for sentence in sentences.tags for t in sentence}

    def key(tag: str) -> tuple:
        prefix, _, kind = tag.partition("-")
        return (tag != "O", kind or prefix, prefix)

    return sorted(tags, key=key)


def load_tagged(source: str, max_examples: int | None = None) -> TaggedSentences:
    path = Path(source)
    if path.exists():
        sentences = read_conll(path)
    elif source == "atis" or source.startswith("atis:"):
        split = source.partition(":")[2] or "train"
        words, tags, _ = read_atis(split)
        sentences = TaggedSentences(words, tags, f"atis:{split}")
    elif "/" in source and not source.startswith((".", "/")):
        sentences = _read_hub(source)
    else:
        raise RayexitError(
            f"{source}: no such file; expected a CoNLL-style file (`token TAG` a line), `atis[:split]`, "
            "or a hub dataset with tokens and tags columns"
        )
    if len(sentences) == 0:
        raise RayexitError(f"{sentences.origin}: no sentences found (empty file?)")
    return sentences.head(max_examples)


def read_conll(path: str | Path) -> TaggedSentences:
    """Sentences of a CoNLL-style file whose layout is checked line by line.

    Every word line must have the column count of the file's first word line, and its last
    column must hold a tag (`O` or `PREFIX-TYPE`): a file whose tags sit in another column, or
    with a stray extra column, would otherwise train on chunk tags or junk and exit 0.
    """
    path = Path(path)
    if path.is_dir():
        raise RayexitError(f"{path}: is a folder, expected a CoNLL-style file")
    words: list[list[str]] = []
    tags: list[list[str]] = []
    lines: list[int] = []
    cur_words: list[str] = []
    cur_tags: list[str] = []
    start = 0
    layout: tuple[int, int] | None = None  # (columns, line that set them)

    def close() -> None:
        if cur_words:
            words.append(list(cur_words))
            tags.append(list(cur_tags))
            lines.append(start)
            cur_words.clear()
            cur_tags.clear()

    for number, line in iter_lines(path):
        fields = line.split()
        if not fields:
            close()
            continue
        if fields[0] == DOCSTART:
            close()
            continue
        if len(fields) < 2:
            raise RayexitError(f"{path}:{number}: {fields[0]!r} has no tag; expected `token TAG` (tag last)")
        if layout is None:
            layout = (len(fields), number)
        check_columns(path, number, fields, layout)
        if not cur_words:
            start = number
        cur_words.append(fields[0])
        cur_tags.append(fields[-1])
    close()
    return TaggedSentences(words, tags, str(path), lines)


def check_columns(path: Path, number: int, fields: list[str], layout: tuple[int, int]) -> None:
    """Refuse a word line whose column count or tag column does not fit the file's layout."""
    columns, first = layout
    if len(fields) != columns:
        raise RayexitError(
            f"{path}:{number}: {len(fields)} columns, but line {first} has {columns}; expected the same "
            "columns on every line (token first, tag last)"
        )
    if TAG_PATTERN.fullmatch(fields[-1]):
        return
    others = [i + 1 for i, value in enumerate(fields[1:-1], start=1) if TAG_PATTERN.fullmatch(value)]
    hint = f"; column {others[-1]} looks like a tag, but the tag must be the last column" if others else ""
    raise RayexitError(
        f"{path}:{number}: {fields[-1]!r} in the tag column (column {columns}, the last) is not a tag; "
        f"expected O or PREFIX-TYPE such as B-PER{hint}"
    )


def _read_hub(name: str) -> TaggedSentences:
    import datasets

    spec, _, split = name.partition(":")
    try:
        table = datasets.load_dataset(spec, split=split or "train")
    except Exception as exc:  # the hub raises many types; the user needs the name and the reason
        raise RayexitError(f"{name}: could not load the hub dataset ({exc})") from None
    columns = list(table.column_names)
    token_column = next((c for c in TOKEN_COLUMNS if c in columns), None)
    tag_column = next((c for c in TAG_COLUMNS if c in columns), None)
    if token_column is None or tag_column is None:
        raise RayexitError(
            f"{name}: expected a tokens column ({', '.join(TOKEN_COLUMNS)}) and a tags column "
            f"({', '.join(TAG_COLUMNS)}); found: {', '.join(columns)}"
        )
    feature = getattr(table.features[tag_column], "feature", None)
    names = getattr(feature, "names", None)  # ClassLabel: integer ids with names
    words, tags = [], []
    for index, row in enumerate(table):
        row_tags = [names[t] if names is not None else str(t) for t in row[tag_column]]
        if len(row_tags) != len(row[token_column]):
            raise RayexitError(f"{name}: row {index}: {len(row[token_column])} tokens but {len(row_tags)} tags")
        if row_tags:
            words.append([str(w) for w in row[token_column]])
            tags.append(row_tags)
    return TaggedSentences(words, tags, name)


# -- encoding ------------------------------------------------------------------------------


@dataclass
class EncodedTokens:
    """Word-piece ids per window of a sentence, where each word starts, and the word tags.

    `pieces[k]` is (sentence index, index of the window's first word); windows of one
    sentence are consecutive. `labels[k]` holds one tag id per word of the window.
    """

    input_ids: list[list[int]]
    word_starts: list[list[int]]  # position of each word's first piece
    labels: list[list[int]]
    pieces: list[tuple[int, int]]
    pad_id: int
    num_sentences: int
    tail_length: int = 1  # special tokens after the last word ([SEP] for BERT)

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_tagged(
    tokenizer, sentences: TaggedSentences | list[list[str]], tag_list: list[str] | None, max_length: int
) -> EncodedTokens:
    """Word-pieces with labels on each word's first piece; tags are checked when given."""
    if isinstance(sentences, TaggedSentences):
        words, origin = sentences.words, sentences
        if tag_list is not None:
            sentences.check_tags(tag_list)
    else:
        words, origin = sentences, None
    if not getattr(tokenizer, "is_fast", False):
        raise RayexitError("sequence labeling needs a fast tokenizer (one with tokenizer.json) to align words")
    index = {t: i for i, t in enumerate(tag_list or [])}
    lead, tail = _special_ids(tokenizer)
    room = max_length - len(lead) - len(tail)
    if room < 1:
        raise RayexitError(f"max_length: got {max_length}, too small to hold one word and the special tokens")
    out = EncodedTokens([], [], [], [], tokenizer.pad_token_id or 0, len(words), len(tail))
    for s, (sentence, per_word) in enumerate(zip(words, _pieces_per_word(tokenizer, words), strict=True)):
        known = origin is not None and tag_list is not None
        tags = [index[t] for t in origin.tags[s]] if known else [0] * len(sentence)
        windows = _windows(per_word, room)
        if len(windows) > 1:
            where = f"{origin.origin}: {origin.where(s)}" if origin is not None else f"sentence {s}"
            log.warning(
                "%s: %d words need more than %d word-pieces; split into %d windows",
                where,
                len(sentence),
                max_length,
                len(windows),
            )
        for first, last in windows:
            body: list[int] = []
            starts = []
            for w in range(first, last):
                starts.append(len(lead) + len(body))
                body.extend(per_word[w][:room])  # a single word longer than the limit keeps its first pieces
            out.input_ids.append(lead + body + tail)
            out.word_starts.append(starts)
            out.labels.append(tags[first:last])
            out.pieces.append((s, first))
    return out


def tagged_token_counts(tokenizer, sentences: list[list[str]], max_length: int) -> list[int]:
    """Word-pieces each sentence takes once `encode_tagged` has laid it out: every word at least
    one piece, at most a window's room, and each window with its special tokens. What tagging it
    costs, which a count of the tokenizer's pieces alone understates (a word the tokenizer strips
    to nothing still takes a slot; a long sentence repeats the special tokens per window)."""
    lead, tail = _special_ids(tokenizer)
    room = max_length - len(lead) - len(tail)
    if room < 1:
        raise RayexitError(f"max_length: got {max_length}, too small to hold one word and the special tokens")
    return [sum(min(len(p), room) for p in per_word) + len(_windows(per_word, room)) * (len(lead) + len(tail))
            for per_word in _pieces_per_word(tokenizer, sentences)]


def _pieces_per_word(tokenizer, sentences: list[list[str]]) -> list[list[list[int]]]:
    """Each sentence's word-pieces, word by word (no special tokens)."""
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    encodings = tokenizer(sentences, is_split_into_words=True, add_special_tokens=False) if sentences else None
    out = []
    for s, sentence in enumerate(sentences):
        if not sentence:
            raise RayexitError(f"sentence {s}: no words")
        per_word: list[list[int]] = [[] for _ in sentence]
        for piece, word in zip(encodings["input_ids"][s], encodings.word_ids(s), strict=True):
            if word is not None:
                per_word[word].append(piece)
        out.append([p or [unk] for p in per_word])  # a word of only stripped characters still needs a slot
    return out


def _special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a sentence's pieces."""
    body = tokenizer(["a"], is_split_into_words=True, add_special_tokens=False)["input_ids"]
    full = tokenizer(["a"], is_split_into_words=True)["input_ids"]
    for at in range(len(full) - len(body) + 1):
        if full[at : at + len(body)] == body:
            return full[:at], full[at + len(body) :]
    raise RayexitError(f"{type(tokenizer).__name__}: cannot tell its special tokens apart from the words")


def _windows(per_word: list[list[int]], room: int) -> list[tuple[int, int]]:
    windows, first, used = [], 0, 0
    for w, pieces in enumerate(per_word):
        size = min(len(pieces), room)
        if used + size > room and w > first:
            windows.append((first, w))
            first, used = w, 0
        used += size
    windows.append((first, len(per_word)))
    return windows


@dataclass
class GlobalBatch:
    """The global batch a data-parallel worker's slice was cut from: what token losses are means over.

    A token loss is a mean over words, and the workers' slices hold different numbers of words,
    so the mean of the workers' means (what the one all-reduce computes) is not the global
    batch's mean. Every worker holds the whole encoded set and walks the same permutation, so it
    knows the global batch's rows and their word counts without asking the others; the loss
    divides its slice's sum by the global count instead (see `weighted_token_loss`), and no
    extra collective is needed. None in one process, whose loss stays the plain mean.
    """

    rows: list[int]
    words: list[int]  # words of each row
    world_size: int

    def word_mask(self) -> torch.Tensor:
        """[G, W] True at each row's words, as `make_batch` lays them out for these rows."""
        lengths = torch.tensor(self.words)
        return torch.arange(int(lengths.max()))[None, :] < lengths[:, None]


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    word_starts: torch.Tensor  # [B, W] first-piece positions, 0 where no word
    word_mask: torch.Tensor  # [B, W] bool
    piece_word: torch.Tensor  # [B, S] word index of each piece, -1 for specials and padding
    labels: torch.Tensor  # [B, W] tag ids, IGNORE where no word
    rows: list[int]  # indices into the EncodedTokens
    whole: GlobalBatch | None = None  # data-parallel only: the global batch these rows are a slice of

    def to(self, device) -> TokenBatch:
        moved = {name: getattr(self, name).to(device) for name in TENSOR_FIELDS}
        return TokenBatch(**moved, rows=self.rows, whole=self.whole)


TENSOR_FIELDS = ("input_ids", "attention_mask", "word_starts", "word_mask", "piece_word", "labels")


def make_batch(data: EncodedTokens, rows: list[int]) -> TokenBatch:
    width = max(len(data.input_ids[r]) for r in rows)
    words = max(len(data.word_starts[r]) for r in rows)
    size = len(rows)
    ids = torch.full((size, width), data.pad_id, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    starts = torch.zeros((size, words), dtype=torch.long)
    word_mask = torch.zeros((size, words), dtype=torch.bool)
    piece_word = torch.full((size, width), -1, dtype=torch.long)
    labels = torch.full((size, words), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        seq, st = data.input_ids[r], data.word_starts[r]
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        starts[b, : len(st)] = torch.tensor(st)
        word_mask[b, : len(st)] = True
        labels[b, : len(st)] = torch.tensor(data.labels[r])
        ends = st[1:] + [len(seq) - data.tail_length]
        for w, (a, e) in enumerate(zip(st, ends, strict=True)):
            piece_word[b, a:e] = w
    return TokenBatch(ids, mask, starts, word_mask, piece_word, labels, list(rows))


def token_batches(
    data: EncodedTokens, batch_size: int, shuffle_seed: int | None = None, *, rank: int = 0, world_size: int = 1
):
    """This worker's slice of each batch, cut the same way as the sentence task's (`rank_slices`).

    With `world_size > 1` each batch also carries its global batch (`GlobalBatch`).
    """
    slices = global_slices(len(data), batch_size, shuffle_seed=shuffle_seed, rank=rank, world_size=world_size)
    for whole, rows in slices:
        batch = make_batch(data, rows)
        if world_size > 1:
            batch.whole = GlobalBatch(list(whole), [len(data.labels[r]) for r in whole], world_size)
        yield batch
