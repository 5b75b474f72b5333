"""Validation lines that share no text with a training slice of SST-2's train.tsv.

train.tsv holds phrases of the same sentences at many lengths, so a split carved from a slice
shares text with the lines trained on (a held-out phrase is often a piece of a kept one). The
lines after the slice that have no run of `ngram` words in common with any line of it do not.
Used by `bench exit --choose-on disjoint` and by `bench revalidate`.
"""

from __future__ import annotations

from rayexit.errors import RayexitError

MIN_WORDS = 8
NGRAM = 5


def word_ngrams(text: str, n: int) -> set[str]:
    words = text.split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def disjoint_validation(examples, slice_size: int, *, min_words: int = MIN_WORDS, ngram: int = NGRAM):
    """The lines after the first `slice_size` with at least `min_words` words and no run of `ngram`
    words in common with any line of the slice (so no phrase of a sentence trained on)."""
    from rayexit.data import TextExamples

    if slice_size >= len(examples):
        raise RayexitError(f"{examples.origin}: {len(examples)} lines, none after a slice of {slice_size}")
    if min_words < ngram or ngram < 1:
        raise RayexitError(f"--min-words ({min_words}) must be at least --ngram ({ngram}), which must be >= 1")
    seen: set[str] = set()
    for text in examples.texts[:slice_size]:
        seen |= word_ngrams(text, ngram)
    keep = [i for i in range(slice_size, len(examples))
            if len(examples.texts[i].split()) >= min_words and not word_ngrams(examples.texts[i], ngram) & seen]
    if not keep:
        raise RayexitError(f"{examples.origin}: no line after the first {slice_size} has {min_words}+ words "
                           f"and no {ngram}-word run in common with them")
    lines = [examples.lines[i] for i in keep] if examples.lines else None
    return TextExamples([examples.texts[i] for i in keep], [examples.labels[i] for i in keep],
                        f"{examples.origin}, lines after the first {slice_size} sharing no {ngram}-gram with them",
                        lines)
