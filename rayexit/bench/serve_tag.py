"""The tagging run of `rayexit bench serve`: /v1/tag under closed-loop HTTP load on CoNLL-2003 test sentences.

The served token policy is chosen on CoNLL `valid.txt` (replayed grid, `rayexit.sweep.select`,
then checked live on valid) and exported as a copy of the model directory; test sentences only
ever go over HTTP. For every serving configuration (the sweep's: early exit adaptive, early
exit at fixed batch sizes, full depth adaptive) and concurrency level the run records req/s,
p50/p99 and the status counts, and scores the served answers: entity F1 against the gold tags,
and the loss against what full depth served for the same sentences.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from rayexit.errors import RayexitError

TAG_MAX_DROP = 0.005  # entity F1 (0-1 scale): half a point


def conll_file(datasets: Path, name: str) -> Path:
    path = datasets / "conll2003" / name
    if not path.is_file():
        raise RayexitError(f"{path}: not found; the tag run needs CoNLL-2003 in <--datasets>/conll2003/")
    return path


def choose_token_policy(model_dir: Path, valid_path: Path, target: Path, max_drop: float = TAG_MAX_DROP) -> Path:
    """Export `model_dir` to `target` with the token policy chosen on `valid_path`; reused when already there.

    Screened on the replay cache (exact for SENTEE, close for TOKEE), then the chosen point is run
    live on valid; both figures are kept in the export's `policy_choice`.
    """
    from rayexit.model_dir import ModelDir, read_exit_config
    from rayexit.policy import FULL_DEPTH
    from rayexit.sweep import outcomes, select
    from rayexit.tasks import TOKEE_WINDOWS, TOKEN_GRID_LADDER, TOKEN_GRID_QUANTILES, task_named

    # Recorded as given (no machine paths in kept JSON); compared resolved, and with the grid, so a
    # choice made for another model or on another grid is made again.
    grid = f"quantiles {list(TOKEN_GRID_QUANTILES)} + ladder {list(TOKEN_GRID_LADDER)}, windows {list(TOKEE_WINDOWS)}"
    record_key = {"data": str(valid_path), "source_model": str(model_dir), "max_drop": max_drop, "grid": grid}
    if (target / "rayexit.json").is_file():
        chosen = read_exit_config(target).extra.get("policy_choice") or {}
        same_model = Path(chosen.get("source_model", "")).resolve() == model_dir.resolve()
        if same_model and all(chosen.get(k) == v for k, v in record_key.items() if k != "source_model"):
            return target
    directory = ModelDir(model_dir)
    task = task_named("token")
    model, tokenizer = directory.load_model(expected_task="token"), directory.load_tokenizer()
    model.eval()
    valid = task.load(str(valid_path))
    data = task.encode(tokenizer, valid, model.labels, model.exit_config.max_length)
    print(f"choosing the token policy on {len(valid)} {valid_path.name} sentences (replay, then live) ...", flush=True)
    replay = task.replay(model, data, 64)
    choice = select(task, replay.outcome(FULL_DEPTH), outcomes(replay, task.default_grid(replay)), max_drop)
    policy = choice.outcome.policy
    # Full depth's replayed F1 is exact (the cache is a full pass); the chosen TOKEE point's is close, so it runs live.
    live = task.run_live(model, data, task.eval_batches(data, 32), policy)
    record = {
        **record_key,
        **choice.record(task),
        "live_f1": round(live.score, 5),
        "live_flops_speedup": round(live.flops_speedup, 3),
    }
    directory.with_policy(policy, target, record)
    print(f"chosen on valid: {policy.describe()}: replayed F1 {choice.outcome.score:.4f} "
          f"(full depth {choice.full.score:.4f}), live F1 {live.score:.4f}, FLOPs speed-up {live.flops_speedup:.2f}x",
          flush=True)
    return target


def tag_payloads(sentences: list[list[str]], per_request: int, seed: int) -> tuple[list[dict], list[list[int]]]:
    """Requests of `per_request` test sentences each, in a seeded order, every sentence once; and the
    sentence indices behind each request (to score its answers)."""
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    groups = [order[i : i + per_request] for i in range(0, len(order), per_request)]
    return [{"texts": [" ".join(sentences[k]) for k in group]} for group in groups], groups


def served_tags(answers: dict[int, Any], groups: list[list[int]]) -> dict[int, list[str]]:
    """Sentence index -> tags served, from the answered requests' bodies."""
    out: dict[int, list[str]] = {}
    for index, body in answers.items():
        results = json.loads(body)["results"]
        for sentence, result in zip(groups[index % len(groups)], results, strict=True):
            out[sentence] = result["tags"]
    return out


def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> float:
    """seqeval's micro entity F1 (0-1), through the token task's own counting."""
    from rayexit.tasks import entity_counts, task_named

    return float(task_named("token").score_of(entity_counts(gold, predicted))) if gold else 0.0


def score_rows(rows: list[dict], tags: dict[tuple[str, int], dict[int, list[str]]], gold: list[list[str]]) -> None:
    """Per row: entity F1 of its served answers against gold, and against full depth's answers at the same
    level, both on the sentences that both answered (so a refused request cannot flatter either)."""
    for row in rows:
        mine = tags.get((row["config"], row["concurrency"]), {})
        row["sentences_scored"] = len(mine)
        row["f1"] = round(entity_f1([gold[k] for k in sorted(mine)], [mine[k] for k in sorted(mine)]), 5)
        full = tags.get(("full depth adaptive", row["concurrency"]))
        if full is None or row["config"] == "full depth adaptive":
            continue
        both = sorted(set(mine) & set(full))
        row["f1_full_same_sentences"] = round(entity_f1([gold[k] for k in both], [full[k] for k in both]), 5)
        row["f1_same_sentences"] = round(entity_f1([gold[k] for k in both], [mine[k] for k in both]), 5)
        row["f1_loss_points"] = round(100 * (row["f1_full_same_sentences"] - row["f1_same_sentences"]), 3)
        row["agreement_f1_vs_full"] = round(entity_f1([full[k] for k in both], [mine[k] for k in both]), 5)


def summarize_tag(rows: list[dict], levels: list[int]) -> list[dict]:
    """The sweep's summary per level (adaptive against full depth and the best fixed size), with the
    F1 the adaptive answers lost and whether the tagging target was met."""
    from rayexit.bench.serve import summarize

    out = summarize(rows, levels)
    for row in out:
        if "speedup_vs_full" not in row:
            continue
        level = row["concurrency"]
        adaptive = next(r for r in rows if r["concurrency"] == level and r["config"] == "early-exit adaptive")
        row["f1_loss_points"] = adaptive.get("f1_loss_points")
        row["meets_target"] = bool(
            row["speedup_vs_full"] >= 1.5 and row["p99_adaptive_ms"] <= row["p99_full_ms"]
            and (row["f1_loss_points"] or 0.0) <= 0.5 and adaptive["server_errors_5xx"] == 0
        )
    return out


def format_tag_row(r: dict) -> str:
    loss = f"  F1 loss {r['f1_loss_points']:+.2f} pt" if "f1_loss_points" in r else ""
    return (
        f"tag {r['config']:<22} c={r['concurrency']:<3} {r['requests_per_s']:>7.1f} req/s  p50 {r['p50_ms']:>7.1f} ms  "
        f"p99 {r['p99_ms']:>7.1f} ms  5xx {r['server_errors_5xx']} of {r['requests']}  F1 {r['f1']:.4f}{loss}"
    )


def format_tag_summary(rows: list[dict]) -> str:
    lines = ["tag: concurrency  adaptive/full  p99 adaptive  p99 full  F1 loss (pt)  adaptive/best fixed"]
    for r in rows:
        lines.append(
            f"     {r['concurrency']:>11}  {r.get('speedup_vs_full', '-'):>13}  {r.get('p99_adaptive_ms', '-'):>12}  "
            f"{r.get('p99_full_ms', '-'):>8}  {r.get('f1_loss_points', '-'):>12}  "
            f"{r.get('adaptive_vs_best_fixed', '-')} ({r.get('best_fixed', '-')})"
        )
    return "\n".join(lines)
