"""Sentence-classification examples from files, hub datasets or the packaged ATIS intents.

A source is a string: a path to a TSV/CSV/JSONL/JSON/Parquet file, `atis` or `atis:test`
for the packaged demo data, or a hub dataset such as `glue/sst2` or `glue/sst2:validation`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from rayexit.data.packaged import read_atis
from rayexit.errors import RayexitError
from rayexit.reading import (
    FILE_LIMIT_ENV,
    check_size,
    file_limit,
    iter_lines,
    one_line,
    open_binary,
    parse_json,
    read_text,
)

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
    if max_examples is not None and max_examples < 1:  # head(0) would be empty, head(-1) one short
        raise RayexitError(f"max_examples: got {max_examples}, expected a whole number >= 1")
    return examples.head(max_examples)


def _read_file(path: Path) -> TextExamples:
    if path.is_dir():
        raise RayexitError(f"{path}: is a folder, expected a data file")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        rows, lines = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json"):
        rows, lines = _read_json(path)
    elif suffix == ".parquet":
        rows, lines = _read_parquet(path), None
    else:
        raise RayexitError(f"{path}: unknown file type {suffix!r}; expected .tsv, .csv, .jsonl, .json or .parquet")
    return _rows_to_examples(rows, str(path), lines)


def _read_delimited(path: Path, delimiter: str) -> tuple[list[dict], list[int]]:
    """Rows as dicts keyed by the header, and the line each row ends on."""
    # SST-2's TSV has quotes inside sentences; they are text, not CSV quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader((text for _, text in iter_lines(path, keepends=True)), delimiter=delimiter, quoting=quoting)
    kind = "TSV" if delimiter == "\t" else "CSV"
    rows, lines = [], []
    header: list[str] | None = None
    try:
        for record in reader:
            if header is None:
                header = [name.strip() for name in record]
                repeated = sorted({name for name in header if header.count(name) > 1})
                if repeated:
                    raise RayexitError(f"{path}:{reader.line_num}: the header names {', '.join(repeated)} more "
                                       "than once; expected each column once")
                continue
            if not record:
                continue
            if len(record) > len(header):
                raise RayexitError(
                    f"{path}:{reader.line_num}: {len(record)} fields, but the header names {len(header)} "
                    f"({', '.join(header)}); expected one {kind} field per column"
                )
            # a short row keeps every column (empty): a missing field is then named at its line, and
            # a short first row cannot hide a column the header has
            rows.append(dict(zip(header, record + [""] * (len(header) - len(record)))))
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise RayexitError(f"{path}:{reader.line_num}: unreadable {kind} ({one_line(exc)})") from None
    if header is None:
        raise RayexitError(f"{path}: empty file; expected a header line naming the columns")
    return rows, lines


def _read_json(path: Path) -> tuple[list, list[int] | None]:
    """A JSON array of objects (read whole, within the file-size limit) or JSON Lines (line by line)."""
    if _starts_with_bracket(path):
        rows = parse_json(read_text(path), str(path))
        if not isinstance(rows, list):
            raise RayexitError(f"{path}: expected a JSON array of objects or one JSON object a line")
        return rows, None
    rows, lines = [], []
    for number, line in iter_lines(path):
        if line.strip():
            rows.append(parse_json(line, f"{path}:{number}"))
            lines.append(number)
    if not rows:
        raise RayexitError(f"{path}: empty file")
    return rows, lines


def _starts_with_bracket(path: Path) -> bool:
    """Whether the first character that is not white space is `[` (a JSON array, not JSON Lines).

    Read in blocks rather than lines: a JSON array is often one long line, which the line limit
    would refuse although the whole-file limit allows it.
    """
    with open_binary(path) as handle:
        block = handle.read(1 << 16).removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        while block:
            stripped = block.lstrip()
            if stripped:
                return stripped.startswith(b"[")
            block = handle.read(1 << 16)
    return False


def _read_parquet(path: Path) -> list[dict]:
    """Rows of a Parquet file, refused as soon as they would take more memory than the file limit.

    Two checks, because the file's size says little: its footer gives the size of the columns
    once decompressed (a compression bomb is refused unread), and batches are counted as they
    are decoded (dictionary-encoded repeats are small on disk and large in memory).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_size(path)
    limit = file_limit()
    try:
        table_file = pq.ParquetFile(path)
        meta = table_file.metadata
        stored = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if stored > limit:
            raise RayexitError(_parquet_too_large(path, stored, "decompressed", limit))
        rows: list[dict] = []
        held = 0
        for batch in table_file.iter_batches(batch_size=1024):
            held += batch.nbytes
            if held > limit:
                raise RayexitError(_parquet_too_large(path, f"over {held}", "decoded", limit))
            rows.extend(batch.to_pylist())
        return rows
    except (pa.ArrowException, OSError) as exc:
        raise RayexitError(f"{path}: not a readable Parquet file ({one_line(exc)})") from None


def _parquet_too_large(path: Path, size: int | str, how: str, limit: int) -> str:
    return (
        f"{path}: {size} bytes once {how}, more than the {limit}-byte limit "
        f"(raise it with {FILE_LIMIT_ENV} if the file is right)"
    )


def _rows_to_examples(rows: list, origin: str, lines: list[int] | None) -> TextExamples:
    if not rows:
        raise RayexitError(f"{origin}: no examples found (empty file?)")
    columns = list(rows[0].keys()) if isinstance(rows[0], dict) else []
    text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
    if text_column is None or LABEL_COLUMN not in columns:
        missing = "a text column (`sentence` or `text`)" if text_column is None else "a `label` column"
        raise RayexitError(f"{origin}: missing {missing}; found columns: {', '.join(map(str, columns)) or 'none'}")
    texts, labels = [], []
    for index, row in enumerate(rows):
        where = f"line {lines[index]}" if lines else f"example {index + 1}"
        if not isinstance(row, dict):
            raise RayexitError(f"{origin}: {where}: expected an object with `{text_column}` and `label`")
        text, label = row.get(text_column), row.get(LABEL_COLUMN)
        if text is not None and not isinstance(text, str):
            raise RayexitError(f"{origin}: {where}: `{text_column}` is {type(text).__name__}, expected a string")
        if label is not None and not isinstance(label, (str, int)):
            raise RayexitError(
                f"{origin}: {where}: `label` is {type(label).__name__}, expected a string or a whole number"
            )
        if text is None or not text.strip():
            raise RayexitError(f"{origin}: {where}: empty `{text_column}`")
        if label is None or str(label).strip() == "":
            raise RayexitError(f"{origin}: {where}: empty `label`")
        texts.append(text.strip())
        labels.append(str(label).strip())
    return TextExamples(texts, labels, origin, list(lines) if lines else None)


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
    return _rows_to_examples(table.to_list(), name, None)
