"""The tag run of `rayexit bench serve`, without Ray: requests cover each test sentence once, and the
served answers are scored against gold and against full depth on the sentences both answered."""

from __future__ import annotations

import json

from rayexit.bench.serve_tag import score_rows, served_tags, summarize_tag, tag_payloads

GOLD = [["B-PER", "O"], ["O", "B-LOC"], ["B-ORG"], ["O"], ["B-PER", "I-PER"]]
WORDS = [["Ann", "said"], ["in", "Rome"], ["UN"], ["yes"], ["Jo", "Lee"]]


def body(groups, index, tags_of) -> bytes:
    return json.dumps({"results": [{"tags": tags_of(k)} for k in groups[index]]}).encode()


def row(config, rate, p99, errors=0):
    return {"config": config, "concurrency": 4, "requests_per_s": rate, "p99_ms": p99, "server_errors_5xx": errors}


def test_payloads_cover_every_sentence_once_in_a_seeded_order():
    payloads, groups = tag_payloads(WORDS, 2, seed=0)
    assert sorted(k for g in groups for k in g) == list(range(len(WORDS)))
    assert [len(p["texts"]) for p in payloads] == [2, 2, 1]
    assert payloads[0]["texts"] == [" ".join(WORDS[k]) for k in groups[0]]
    assert tag_payloads(WORDS, 2, seed=0) == (payloads, groups)
    assert tag_payloads(WORDS, 2, seed=1)[1] != groups


def test_answers_are_scored_against_gold_and_full_depth_on_the_same_sentences():
    _, groups = tag_payloads(WORDS, 2, seed=0)
    full = served_tags({i: body(groups, i, lambda k: GOLD[k]) for i in range(3)}, groups)
    # early exit tags one sentence with an entity all O, and its last request went unanswered
    missed = next(k for g in groups[:2] for k in g if any(t.startswith("B-") for t in GOLD[k]))

    def early_tags(k):
        return ["O"] * len(GOLD[k]) if k == missed else GOLD[k]

    early = served_tags({i: body(groups, i, early_tags) for i in range(2)}, groups)
    rows = [row("early-exit adaptive", 30.0, 100.0), row("full depth adaptive", 10.0, 300.0)]
    score_rows(rows, {("early-exit adaptive", 4): early, ("full depth adaptive", 4): full}, GOLD)
    adaptive, full_row = rows
    assert full_row["f1"] == 1.0 and full_row["sentences_scored"] == 5
    answered = [k for g in groups[:2] for k in g]
    assert adaptive["sentences_scored"] == len(answered) == 4
    entities = sum(1 for k in answered for t in GOLD[k] if t.startswith("B-"))
    lost = sum(1 for t in GOLD[missed] if t.startswith("B-"))
    assert lost >= 1
    recall = (entities - lost) / entities
    assert adaptive["f1_same_sentences"] == round(2 * recall / (1 + recall), 5)
    assert adaptive["f1_full_same_sentences"] == 1.0  # full depth scored on the same 4 sentences only
    assert adaptive["f1_loss_points"] == round(100 * (1 - adaptive["f1_same_sentences"]), 3)
    [summary] = summarize_tag(rows, [4])
    assert summary["speedup_vs_full"] == 3.0 and summary["f1_loss_points"] == adaptive["f1_loss_points"]
    assert summary["meets_target"] is (adaptive["f1_loss_points"] <= 0.5)
