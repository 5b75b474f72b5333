"""Progress display for long loops: tqdm on a terminal, a plain line every few seconds in logs."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    # In CI logs a redrawn bar is noise; print a line at most every 10 seconds instead.
    interval = 0.5 if sys.stderr.isatty() else 10.0
    yield from tqdm(items, desc=desc, total=total, mininterval=interval, leave=False, file=sys.stderr)
