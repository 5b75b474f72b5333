"""Reading user files with bounded memory and one-line errors.

Data files, YAML configs and the JSON files of model directories and checkpoints are read
here, so that a binary file, a 1 GB line or a JSON value nested 100,000 deep is refused with
one line naming the file instead of a traceback or an out-of-memory kill. The limits are
checked while reading, before the bytes are held: a line is read at most `line limit + 1`
bytes at a time, a whole file at most `file limit + 1` bytes.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rayexit.errors import RayexitError

LINE_LIMIT_ENV = "RAYEXIT_MAX_LINE_BYTES"
FILE_LIMIT_ENV = "RAYEXIT_MAX_FILE_BYTES"
# A sentence, a JSONL record or a CoNLL word line is far below 1 MiB; a longer line is damage
# (or not a text file at all), and reading it whole is what took past 6 GB of memory.
DEFAULT_LINE_LIMIT = 1 << 20
# Whole-file formats (a JSON array, Parquet) are parsed in memory at several times their size.
DEFAULT_FILE_LIMIT = 1 << 30
# rayexit.json, config.json, train_state.json: a few KB normally, labels and history included.
SMALL_JSON_LIMIT = 64 << 20


def line_limit() -> int:
    return _limit(LINE_LIMIT_ENV, DEFAULT_LINE_LIMIT)


def file_limit() -> int:
    return _limit(FILE_LIMIT_ENV, DEFAULT_FILE_LIMIT)


def _limit(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise RayexitError(f"{name}: got {raw!r}, expected a whole number of bytes > 0")
    return value


def check_size(path: str | Path, limit: int | None = None) -> None:
    """Refuse a regular file larger than `limit` before anything is read from it."""
    limit = file_limit() if limit is None else limit
    try:
        info = os.stat(path)
    except OSError as exc:
        raise RayexitError(f"{path}: cannot read ({exc.strerror})") from None
    if stat.S_ISREG(info.st_mode) and info.st_size > limit:
        raise RayexitError(_too_large(path, info.st_size, limit))


def _too_large(path: str | Path, size: int | str, limit: int) -> str:
    return (
        f"{path}: {size} bytes, more than the {limit}-byte limit "
        f"(raise it with {FILE_LIMIT_ENV} if the file is right)"
    )


def iter_lines(
    path: str | Path, keepends: bool = False, max_line: int | None = None, max_file: int | None = None
) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 text file; a leading byte-order mark is dropped.

    Lines end at `\\n` only (a trailing `\\r` goes with it unless `keepends`), so that stray
    separators inside a line, which `str.splitlines` would honour, never shift line numbers.
    """
    max_line = line_limit() if max_line is None else max_line
    max_file = file_limit() if max_file is None else max_file
    check_size(path, max_file)
    total = 0
    with open_binary(path) as handle:
        number = 0
        while True:
            raw = handle.readline(max_line + 1)
            if not raw:
                return
            number += 1
            total += len(raw)
            if total > max_file:
                raise RayexitError(_too_large(path, f"over {max_file}", max_file))
            if len(raw) > max_line and not raw.endswith(b"\n"):
                raise RayexitError(
                    f"{path}:{number}: line longer than {max_line} bytes; expected a text file with one record a "
                    f"line (raise the limit with {LINE_LIMIT_ENV} if the file is right)"
                )
            text = _decode(raw, path, number)
            if not keepends:
                text = text[:-1] if text.endswith("\n") else text
                text = text[:-1] if text.endswith("\r") else text
            yield number, text


def read_text(path: str | Path, max_file: int | None = None) -> str:
    """A whole UTF-8 text file, refused unread past `max_file` bytes."""
    max_file = file_limit() if max_file is None else max_file
    check_size(path, max_file)
    with open_binary(path) as handle:
        raw = handle.read(max_file + 1)
    if len(raw) > max_file:
        raise RayexitError(_too_large(path, f"over {max_file}", max_file))
    return _decode(raw, path, None)


def parse_json(text: str, where: str) -> Any:
    """`json.loads` with its failures (syntax, nesting, huge integers) as one line naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RayexitError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise RayexitError(f"{where}: JSON nested too deeply to read; expected a few levels of nesting") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise RayexitError(f"{where}: unreadable JSON ({one_line(exc)})") from None


def read_json(path: str | Path, max_file: int = SMALL_JSON_LIMIT) -> Any:
    return parse_json(read_text(path, max_file), str(path))


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """A library's message squeezed onto one line, so the CLI's error stays one line."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_binary(path: str | Path):
    try:
        return open(path, "rb")
    except IsADirectoryError:
        raise RayexitError(f"{path}: is a folder, expected a file") from None
    except OSError as exc:
        raise RayexitError(f"{path}: cannot read ({exc.strerror})") from None


def _decode(raw: bytes, path: str | Path, number: int | None) -> str:
    where = f"{path}:{number}" if number is not None else str(path)
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise RayexitError(f"{where}: binary data (a NUL byte at offset {nul}); expected UTF-8 text")
    try:
        return raw.decode("utf-8-sig" if number in (None, 1) else "utf-8")
    except UnicodeDecodeError as exc:
        raise RayexitError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected UTF-8 text") from None
