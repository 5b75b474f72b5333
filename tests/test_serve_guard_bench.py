"""The guard benchmark's stream and bookkeeping on constructed answers (no Serve, no model)."""

from __future__ import annotations

import pytest

from rayexit.bench.serve_guard import (
    BLOCK,
    blocks,
    build_stream,
    first_move,
    held_after_reaction,
    level_changes,
    parse_overhead_thresholds,
)
from rayexit.errors import RayexitError

TEXTS = [f"sentence {i}" for i in range(40)]
LABELS = [f"intent{i % 4}" for i in range(40)]


def test_the_stream_is_seeded_and_shifts_where_asked():
    stream = build_stream(TEXTS, LABELS, clean=5, shifted=7, per_request=2, seed=3)
    assert stream == build_stream(TEXTS, LABELS, clean=5, shifted=7, per_request=2, seed=3)
    assert len(stream) == 12 and all(len(r) == 2 for r in stream)
    assert all(text in TEXTS for r in stream[:5] for text, _ in r)
    for request in stream[5:]:
        for text, label in request:
            second = text.split(" ", 2)[2]
            assert text not in TEXTS and LABELS[TEXTS.index(second)] != label  # joined to another intent


def test_blocks_count_agreement_accuracy_and_rate_per_500_requests():
    stream = [[("a", "x")]] * (BLOCK + 10)
    full = {"a": "x"}
    records = []
    for i in range(len(stream)):
        label = "x" if i % 10 else "y"  # one answer in ten differs from full depth (and from the gold label)
        records.append({"status": 200, "latency": 0.01, "finished": i * 0.01,
                        "results": [{"label": label, "exit_layer": 2}]})
    first, second = blocks(stream, records, full)
    assert first["agreement"] == 0.9 and first["accuracy"] == 0.9 and first["mean_exit_layer"] == 2
    assert first["requests_per_s"] == round(BLOCK / ((BLOCK - 1) * 0.01), 2)
    assert second["requests"] == f"{BLOCK}-{BLOCK + 9}" and second["requests_per_s"] == 100.0


def test_first_move_counts_requests_after_the_shift():
    polls = [{"completed": 900, "levels": [1, 0]}, {"completed": 1100, "levels": [1, 0]},
             {"completed": 1400, "levels": [1, 2]}]
    assert first_move(polls, 1000)["requests_after_shift"] == 400  # a move before the shift does not count
    assert first_move(polls[:2], 1000) is None
    assert first_move([{"completed": 1200, "levels": [0, 1]}], 1000)["requests_after_shift"] == 200


def test_parse_overhead_thresholds_must_be_a_number_when_not_a_keyword():
    assert parse_overhead_thresholds("0.31") == pytest.approx(0.31)
    with pytest.raises(RayexitError, match="--guard-overhead-thresholds: got 'tunde'"):
        parse_overhead_thresholds("tunde")


def test_level_changes_keep_only_the_polls_where_an_exit_moved():
    polls = [{"completed": n, "levels": levels, "samples": n // 10, "time": 0.0, "thresholds": [], "agreement": 1.0}
             for n, levels in ((10, [0, 0]), (20, [0, 0]), (30, [1, 0]), (40, [1, 0]), (50, [0, 0]))]
    assert [(c["completed"], c["levels"]) for c in level_changes(polls)] == [(10, [0, 0]), (30, [1, 0]), (50, [0, 0])]


def test_held_after_reaction_judges_only_whole_blocks_after_the_first_move():
    blocks = [{"requests": f"{start}-{start + 499}", "guard on": value, "target": 0.99}
              for start, value in ((0, 0.97), (500, 0.98), (1000, 0.995), (1500, 0.99))]
    assert held_after_reaction(blocks, shift_at=500, first_move=100)  # blocks from 1000 on count
    assert not held_after_reaction(blocks, shift_at=500, first_move=0)  # the 500-999 block counts, and misses
    assert not held_after_reaction(blocks, shift_at=500, first_move=None)  # never reacted
    # tightened before the shift and never moved after it: judged from the shift on, as a move at once
    assert not held_after_reaction(blocks, shift_at=500, first_move=None, tightened_at_shift=True)
    assert held_after_reaction(blocks[2:], shift_at=500, first_move=None, tightened_at_shift=True)
