"""Sentence-classification examples from files, hub datasets or the packaged ATIS intents.

A source is a string: a path to a TSV/CSV/JSONL/JSON/Parquet file, `atis` or `atis:test`
for the packaged demo data, or a hub dataset such as `glue/sst2` or `glue/sst2:validation`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from rayexit.data.packaged import read_atis
from rayexit.errors import RayexitError

TEXT_COLUMNS = ("sentence", "text")
LABEL_COLUMN = "label"


@dataclass
class TextExamples:
    texts: list[str]
    labels: list[str]
    origin: str
    lines: list[int] | None = None  # file line of each example, for error messages

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, count: int | None) -> TextExamples:
        if count is None or count >= len(self):
            return self
        lines = self.lines[:count] if self.lines else None
        return TextExamples(self.texts[:count], self.labels[:count], self.origin, lines)

    def check_labels(self, label_set: list[str]) -> None:
        """Refuse a label the model does not know, naming where it was found."""
        known = set(label_set)
        for index, label in enumerate(self.labels):
            if label not in known:
                where = f"line {self.lines[index]}" if self.lines else f"example {index}"
                raise RayexitError(
                    f"{self.origin}: {where}: label {label!r} is not in the model's label set "
                    f"({', '.join(label_set[:20])}{', ...' if len(label_set) > 20 else ''})"
                )


def load_text_classification(source: str, max_examples: int | None = None) -> TextExamples:
    path = Path(source)
    if path.exists():
        examples = _read_file(path)
    elif source == "atis" or source.startswith("atis:"):
        split = source.partition(":")[2] or "train"
        words, _, intents = read_atis(split)
        examples = TextExamples([" ".join(w) for w in words], intents, f"atis:{split}")
    elif "/" in source and not source.startswith((".", "/")):
        examples = _read_hub(source)
    else:
        raise RayexitError(
            f"{source}: no such file; expected a TSV/CSV/JSONL/JSON/Parquet file, `atis[:split]`, "
            "or a hub dataset name such as glue/sst2"
        )
    if len(examples) == 0:
        raise RayexitError(f"{examples.origin}: no examples found (empty file?)")
    return examples.head(max_examples)


def _read_file(path: Path) -> TextExamples:
    if path.is_dir():
        raise RayexitError(f"{path}: is a folder, expected a data file")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        rows, first_line = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json"):
        rows, first_line = _read_json(path), 1
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows, first_line = pq.read_table(path).to_pylist(), 1
    else:
        raise RayexitError(f"{path}: unknown file type {suffix!r}; expected .tsv, .csv, .jsonl, .json or .parquet")
    return _rows_to_examples(rows, str(path), first_line)


def _read_delimited(path: Path, delimiter: str) -> tuple[list[dict], int]:
    with path.open(newline="", encoding="utf-8") as handle:
        # SST-2's TSV has quotes inside sentences; they are text, not CSV quoting.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        if reader.fieldnames is None:
            raise RayexitError(f"{path}: empty file; expected a header line naming the columns")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        return list(reader), 2


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise RayexitError(f"{path}: empty file")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RayexitError(f"{path}: not valid JSON ({exc})") from None
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RayexitError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    return rows


def _rows_to_examples(rows: list[dict], origin: str, first_line: int) -> TextExamples:
    if not rows:
        raise RayexitError(f"{origin}: no examples found (empty file?)")
    columns = list(rows[0].keys()) if isinstance(rows[0], dict) else []
    text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
    if text_column is None or LABEL_COLUMN not in columns:
        missing = "a text column (`sentence` or `text`)" if text_column is None else "a `label` column"
        raise RayexitError(f"{origin}: missing {missing}; found columns: {', '.join(map(str, columns)) or 'none'}")
    texts, labels, lines = [], [], []
    for offset, row in enumerate(rows):
        line = first_line + offset
        if not isinstance(row, dict):
            raise RayexitError(f"{origin}: line {line}: expected an object with `{text_column}` and `label`")
        text, label = row.get(text_column), row.get(LABEL_COLUMN)
        if text is None or not str(text).strip():
            raise RayexitError(f"{origin}: line {line}: empty `{text_column}`")
        if label is None or str(label).strip() == "":
            raise RayexitError(f"{origin}: line {line}: empty `label`")
        texts.append(str(text).strip())
        labels.append(str(label).strip())
        lines.append(line)
    return TextExamples(texts, labels, origin, lines)


def _read_hub(name: str) -> TextExamples:
    """`owner/dataset[:split]` or `glue/sst2[:split]` (a config of a multi-config dataset)."""
    import datasets

    spec, _, split = name.partition(":")
    parts = spec.split("/")
    try:
        if parts[0] == "glue" and len(parts) == 2:
            table = datasets.load_dataset("glue", parts[1], split=split or "train")
        else:
            table = datasets.load_dataset(spec, split=split or "train")
    except Exception as exc:  # the hub raises many types; the user needs the name and the reason
        raise RayexitError(f"{name}: could not load the hub dataset ({exc})") from None
    # Integer label ids are kept as labels, the same as GLUE's TSV files give them.
    examples = _rows_to_examples(table.to_list(), name, 1)
    examples.lines = None
    return examples
