"""`rayexit bench serve --runs rebatch`: layer-level rebatching on against off, under the same closed loop.

Both sides are today's adaptive batcher with shedding off (as in the sweep: at a fixed number of
clients, p99 is clients / rate, and 503s would blur the comparison); one side adds `rebatch: true`.
The two deployments alternate (off, on, off, on, ...) `--rebatch-repeats` times, every concurrency
level run on each, and the report gives per level the median req/s, p50 and p99 over the repeats
with their spread, the rows each layer execution computed (read from `/v1/model` before and after
the level), and the 5xx count. `ratio` is on/off req/s; `p99_ratio` on/off p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import urllib.request
from typing import Any

SIDES = {"off": {"adaptive": True}, "on": {"adaptive": True, "rebatch": True}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rebatch-repeats", type=int, default=2, help="interleaved off/on repeats of the rebatch run")


def layer_counters(url: str) -> tuple[int, int]:
    """(layer executions, rows computed by them) so far, from the replica's /v1/model."""
    with urllib.request.urlopen(url + "/v1/model", timeout=30) as response:
        batching = json.loads(response.read())["batching"]
    return batching.get("layer_runs") or 0, batching.get("layer_rows") or 0


def compare(url: str, base: dict[str, Any], payloads: list[dict], levels: list[int], requests: int,
            timeout_s: float, repeats: int) -> dict[str, Any]:
    from rayexit.bench.serve import SWEEP_NO_SHEDDING, load, redeploy
    from rayexit.serve.settings import ServeSettings

    samples: list[dict] = []
    for repeat in range(max(1, repeats)):
        for side, extra in SIDES.items():
            redeploy(ServeSettings.from_args({**base, **extra, **SWEEP_NO_SHEDDING}))
            for level in levels:
                asyncio.run(load(url, payloads[:20], concurrency=2, count=20, timeout_s=30))  # warm
                runs_before, rows_before = layer_counters(url)
                result = asyncio.run(load(url, payloads, level, requests, timeout_s))
                runs_after, rows_after = layer_counters(url)
                layer_runs = runs_after - runs_before
                per_run = round((rows_after - rows_before) / layer_runs, 2) if layer_runs else None
                result.update(side=side, concurrency=level, repeat=repeat, layer_runs=layer_runs,
                              rows_per_layer_run=per_run)
                samples.append(result)
                print(format_sample(result), flush=True)
    return {"samples": samples, "levels": summarize(samples, levels)}


def _median_spread(values: list[float]) -> tuple[float, float]:
    return round(statistics.median(values), 2), round(max(values) - min(values), 2)


def summarize(samples: list[dict], levels: list[int]) -> list[dict]:
    rows = []
    for level in levels:
        row: dict[str, Any] = {"concurrency": level}
        for side in SIDES:
            mine = [s for s in samples if s["side"] == side and s["concurrency"] == level]
            if not mine:
                continue
            rate, rate_spread = _median_spread([s["requests_per_s"] for s in mine])
            rows_per_run = [s["rows_per_layer_run"] for s in mine if s["rows_per_layer_run"] is not None]
            row[side] = {
                "requests_per_s": rate,
                "requests_per_s_spread": rate_spread,
                "p50_ms": _median_spread([s["p50_ms"] for s in mine])[0],
                "p99_ms": _median_spread([s["p99_ms"] for s in mine])[0],
                "p99_ms_spread": _median_spread([s["p99_ms"] for s in mine])[1],
                "rows_per_layer_run": round(statistics.median(rows_per_run), 2) if rows_per_run else None,
                "server_errors_5xx": sum(s["server_errors_5xx"] for s in mine),
                "repeats": len(mine),
            }
        if "on" in row and "off" in row:
            row["ratio"] = round(row["on"]["requests_per_s"] / max(row["off"]["requests_per_s"], 1e-9), 3)
            row["p99_ratio"] = round(row["on"]["p99_ms"] / max(row["off"]["p99_ms"], 1e-9), 3)
        rows.append(row)
    return rows


def format_sample(s: dict) -> str:
    return (
        f"rebatch {s['side']:<3} #{s['repeat']} c={s['concurrency']:<3} {s['requests_per_s']:>7.1f} req/s  "
        f"p50 {s['p50_ms']:>7.1f} ms  p99 {s['p99_ms']:>7.1f} ms  rows/layer run {s['rows_per_layer_run']}  "
        f"5xx {s['server_errors_5xx']} of {s['requests']}"
    )


def format_summary(rows: list[dict]) -> str:
    lines = ["concurrency  req/s off -> on (ratio)   p99 ms off -> on (ratio)   rows/layer run off -> on   5xx"]
    for r in rows:
        off, on = r.get("off", {}), r.get("on", {})
        errors = off.get("server_errors_5xx", 0) + on.get("server_errors_5xx", 0)
        lines.append(
            f"{r['concurrency']:>11}  {off.get('requests_per_s', '-'):>7} -> {on.get('requests_per_s', '-'):<7} "
            f"({r.get('ratio', '-')})   {off.get('p99_ms', '-'):>7} -> {on.get('p99_ms', '-'):<7} "
            f"({r.get('p99_ratio', '-')})   {off.get('rows_per_layer_run', '-'):>6} -> "
            f"{on.get('rows_per_layer_run', '-'):<6}   {errors}"
        )
    return "\n".join(lines)
