"""What happens to work between admission and the model, as plain Python a test can drive.

- `Admission` keeps the replica's backlog (texts and tokens admitted but not yet taken by a
  batch) and sheds load: while queued texts wait longer than `max_wait_s`, or the queue is
  full, a new request is refused (503 with Retry-After) before it queues; a text that still
  waited past the deadline when a batch reaches it is dropped then.
- `waves` cuts a request into bounded chunks; a request enters the batch queue one chunk at a
  time, so a small request sent meanwhile joins the next batch instead of waiting for all of a
  big one (the batch queue is first come, first served).
- `run_isolated` runs a batch and, if it fails, splits it in halves until the failure is
  pinned on the items that cause it: one poisoned text fails its own request only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Overloaded(Exception):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ItemFailed(Exception):
    """The model failed on this item alone (after isolation)."""


@dataclass
class Shed:
    """Placed instead of an answer for an item that waited past the deadline."""

    waited_s: float


@dataclass
class Skipped:
    """Placed instead of an answer for an item whose request already failed or was shed."""


class Admission:
    """The backlog, and whether one more request may join it.

    A request is shed when the queue holds work and the text at its head last waited longer
    than `max_wait_s` (the wait a batch actually saw, not a prediction: a shed request adds
    nothing, so the queue drains, the next batch sees a short wait and admission resumes; an
    estimate learnt from slow batches could instead keep refusing long after they passed), or
    when the queue would hold more than `max_queued_texts` texts. The drain rate learnt from
    batches only sizes Retry-After.
    """

    def __init__(
        self, max_wait_s: float, max_queued_texts: int, clock: Callable[[], float] = time.monotonic,
        deadline_factor: float = 2.0,
    ) -> None:
        self.max_wait_s = max_wait_s
        self.max_queued_texts = max_queued_texts
        self.deadline_s = deadline_factor * max_wait_s
        self.clock = clock
        self.queued_texts = 0
        self.queued_tokens = 0
        self.head_wait_s = 0.0  # how long the oldest text of the last batch had waited
        self.tokens_per_s: float | None = None  # drain rate, learnt from batches

    def estimated_wait_s(self) -> float:
        if not self.tokens_per_s:
            return 0.0
        return self.queued_tokens / self.tokens_per_s

    def retry_after_s(self) -> int:
        """Whole seconds until the present backlog should have drained (at least 1)."""
        return max(1, math.ceil(self.estimated_wait_s()))

    def admit(self, texts: int, tokens: int) -> None:
        """Count the request in, or raise Overloaded. An empty queue always admits (else a big request never could)."""
        if self.queued_texts and self.queued_texts + texts > self.max_queued_texts:
            raise Overloaded(
                f"{self.queued_texts} texts already queued (limit {self.max_queued_texts}); try again shortly",
                self.retry_after_s(),
            )
        if self.queued_texts and self.head_wait_s > self.max_wait_s:
            raise Overloaded(
                f"queued texts are waiting {self.head_wait_s * 1000:.0f} ms, over the limit of "
                f"{self.max_wait_s * 1000:.0f} ms; try again shortly",
                self.retry_after_s(),
            )
        self.queued_texts += texts
        self.queued_tokens += tokens

    def release(self, texts: int, tokens: int) -> None:
        """Texts leave the backlog: taken by a batch, or abandoned (request cancelled, failed or shed)."""
        self.queued_texts = max(0, self.queued_texts - texts)
        self.queued_tokens = max(0, self.queued_tokens - tokens)
        if not self.queued_texts:
            self.head_wait_s = 0.0  # nothing waits now

    def record_wait(self, head_wait_s: float) -> None:
        self.head_wait_s = head_wait_s

    def record_batch(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        self.tokens_per_s = rate if self.tokens_per_s is None else 0.8 * self.tokens_per_s + 0.2 * rate

    def expired(self, enqueued: float, now: float | None = None) -> bool:
        return ((self.clock() if now is None else now) - enqueued) > self.deadline_s


def waves(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of consecutive items cut so each wave's cost stays within `budget` (a bigger item goes alone)."""
    out: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, cost in enumerate(costs):
        if current and used + cost > budget:
            out.append(current)
            current, used = [], 0
        current.append(i)
        used += cost
    if current:
        out.append(current)
    return out


async def run_isolated(run: Callable[[list[T]], Awaitable[Sequence[Any]]], items: list[T]) -> list[Any]:
    """`run(items)`, or when it raises, the halves on their own, down to single items; a single
    item that still fails gets an ItemFailed in its place. Answers keep the order of `items`."""
    if not items:
        return []
    try:
        return list(await run(items))
    except Exception as exc:  # noqa: BLE001 - any model failure is isolated, then reported per item
        if len(items) == 1:
            log.warning("the model failed on one item: %s: %s", type(exc).__name__, exc)
            return [ItemFailed(f"{type(exc).__name__}: {exc}")]
        middle = len(items) // 2
        return await run_isolated(run, items[:middle]) + await run_isolated(run, items[middle:])
