"""The validation split tuning chooses on, carved from the training data the same way every time.

Per label, a seeded shuffle of that label's examples sends the first `fraction` (rounded, at
least one when the label has two or more examples) to validation, so every label the model
learns also appears in validation, and the split depends only on the data, fraction and seed.
Both parts are written as TSV files, which is what the trainers take.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from rayexit.data import TextExamples
from rayexit.files import write_atomic


@dataclass
class Split:
    name: str
    fit: TextExamples
    validation: TextExamples
    digest: str  # of the validation indices, to tell two splits apart in reports

    def describe(self) -> dict:
        return {
            "name": self.name,
            "fit_examples": len(self.fit),
            "validation_examples": len(self.validation),
            "validation_digest": self.digest,
        }


def split_name(fraction: float, seed: int) -> str:
    return f"tune-validation(fraction={fraction:g}, seed={seed}, stratified by label)"


def carve_validation(examples, fraction: float, seed: int, task: str = "sequence") -> Split:
    """The task's own split (`rayexit.tasks.Task.split`), named and fingerprinted for reports.

    The token task stratifies sentences by the rarest tag they hold, so rare entity types reach
    validation too.
    """
    from rayexit.tasks import task_named

    fit, validation = task_named(task).split(examples, fraction, seed)
    if task == "token":
        rows = zip(validation.words, validation.tags, strict=True)
        fingerprint = "\n".join(" ".join(words) + "\t" + " ".join(tags) for words, tags in rows)
        name = split_name(fraction, seed).replace("stratified by label", "stratified by rarest tag")
    else:
        fingerprint = "\n".join(f"{t}\t{label}" for t, label in zip(validation.texts, validation.labels, strict=True))
        name = split_name(fraction, seed)
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    return Split(name, fit, validation, digest)


def write_conll(sentences, path: str | Path) -> Path:
    """`word TAG` a line, a blank line after each sentence: what the token trainers read.

    A word with whitespace inside (possible from hub data) would split into columns; its
    whitespace becomes `_`.
    """

    def clean(word: str) -> str:
        return "_".join(word.split()) or "_"

    blocks = []
    for words, tags in zip(sentences.words, sentences.tags, strict=True):
        blocks.append("".join(f"{clean(w)} {t}\n" for w, t in zip(words, tags, strict=True)) + "\n")
    body = "".join(blocks)
    return write_atomic(path, lambda tmp: tmp.write_text(body, encoding="utf-8"))


def write_tsv(examples: TextExamples, path: str | Path) -> Path:
    """`sentence<TAB>label` with a header; tabs and line breaks inside a text become spaces."""

    def clean(text: str) -> str:
        return " ".join(text.replace("\t", " ").splitlines())

    rows = zip(examples.texts, examples.labels, strict=True)
    body = "sentence\tlabel\n" + "".join(f"{clean(text)}\t{label}\n" for text, label in rows)
    return write_atomic(path, lambda tmp: tmp.write_text(body, encoding="utf-8"))
