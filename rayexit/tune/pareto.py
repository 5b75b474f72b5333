"""Pareto fronts over (accuracy, speed-up) and the one rule that picks a point from them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is at least as good as b everywhere and better somewhere (every objective maximised)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_front(items: list[T], key: Callable[[T], tuple[float, float]]) -> list[T]:
    """The items no other item dominates, fastest first; equal scores keep their first item.

    Two objectives make this a sort and one sweep: in order of falling speed-up (then falling
    accuracy), an item belongs to the front when its accuracy beats every faster item's.
    """
    order = sorted(range(len(items)), key=lambda i: (-key(items[i])[1], -key(items[i])[0], i))
    front: list[T] = []
    best_accuracy = float("-inf")
    for index in order:
        accuracy = key(items[index])[0]
        if accuracy > best_accuracy:  # equal accuracy at no more speed is dominated (or a duplicate)
            front.append(items[index])
            best_accuracy = accuracy
    return front


def fastest_within(
    items: list[T], key: Callable[[T], tuple[float, float]], reference: float, max_drop: float
) -> T | None:
    """The fastest item whose accuracy is at most `max_drop` below `reference`; ties go to accuracy."""
    bar = reference - max_drop - 1e-12
    eligible = [item for item in items if key(item)[0] >= bar]
    if not eligible:
        return None
    return max(eligible, key=lambda item: (key(item)[1], key(item)[0]))


def within_drop_score(
    points: list[T], key: Callable[[T], tuple[float, float]], reference: float, max_drop: float
) -> float:
    """One number to maximise: the speed-up of the fastest point within the drop budget.

    Below the bar altogether (a reference set higher than this model reaches), the score is the
    best accuracy as a fraction of the bar, which is under 1 and still orders such trials.
    """
    chosen = fastest_within(points, key, reference, max_drop)
    if chosen is not None:
        return float(key(chosen)[1])
    bar = max(reference - max_drop, 1e-12)
    return max(key(p)[0] for p in points) / bar if points else 0.0
