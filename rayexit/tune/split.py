"""The validation split tuning chooses on, carved from the training data the same way every time.

Per label, a seeded shuffle of that label's examples sends the first `fraction` (rounded, at
least one when the label has two or more examples) to validation, so every label the model
learns also appears in validation, and the split depends only on the data, fraction and seed.
Both parts are written as TSV files, which is what the trainers take.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from rayexit.data import TextExamples
from rayexit.errors import RayexitError
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


def carve_validation(examples: TextExamples, fraction: float, seed: int) -> Split:
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(examples.labels):
        by_label.setdefault(label, []).append(index)
    validation: list[int] = []
    for label in sorted(by_label):
        members = by_label[label]
        # One generator per label, seeded by label and seed: adding a class leaves the others' picks alone.
        rng = random.Random(f"{seed}:{label}")
        shuffled = members[:]
        rng.shuffle(shuffled)
        take = round(len(members) * fraction)
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        else:
            take = 0
        validation += shuffled[:take]
    chosen = set(validation)
    if not chosen:
        raise RayexitError(f"{examples.origin}: too few examples to carve a validation split ({len(examples)})")
    validation.sort()
    fit = [i for i in range(len(examples)) if i not in chosen]
    digest = hashlib.sha256(",".join(map(str, validation)).encode()).hexdigest()[:12]
    parts = _subset(examples, fit, "fit"), _subset(examples, validation, "validation")
    return Split(split_name(fraction, seed), *parts, digest)


def _subset(examples: TextExamples, rows: list[int], part: str) -> TextExamples:
    lines = [examples.lines[i] for i in rows] if examples.lines else None
    return TextExamples(
        [examples.texts[i] for i in rows], [examples.labels[i] for i in rows], f"{examples.origin}[{part}]", lines
    )


def write_tsv(examples: TextExamples, path: str | Path) -> Path:
    """`sentence<TAB>label` with a header; tabs and line breaks inside a text become spaces."""

    def clean(text: str) -> str:
        return " ".join(text.replace("\t", " ").splitlines())

    rows = zip(examples.texts, examples.labels, strict=True)
    body = "sentence\tlabel\n" + "".join(f"{clean(text)}\t{label}\n" for text, label in rows)
    return write_atomic(path, lambda tmp: tmp.write_text(body, encoding="utf-8"))
