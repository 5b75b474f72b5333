"""`rayexit bench serve`: bounded HTTP load on loopback against the Serve app, then a replica kill.

For every serving configuration (early exit with adaptive batching; early exit with fixed
batch sizes; full depth with adaptive batching) and every concurrency level, a closed loop of
clients sends a fixed number of requests (or stops at a time limit) and the benchmark records
requests/s, p50/p99 latency and the error count. The fault run then kills the replica's
process mid-load and measures the errors and the time until answers flow again.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from rayexit.bench.common import machine_info
from rayexit.config import ExitPolicy
from rayexit.errors import RayexitError

CONFIGS: dict[str, dict[str, Any]] = {
    "early-exit adaptive": {"adaptive": True},
    "early-exit fixed 1": {"adaptive": False, "max_batch_size": 1, "batch_wait_ms": 0.0},
    "early-exit fixed 8": {"adaptive": False, "max_batch_size": 8},
    "early-exit fixed 32": {"adaptive": False, "max_batch_size": 32},
    "full depth adaptive": {"adaptive": True, "policy_kind": "none"},
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="Serve under bounded loopback load: adaptive vs fixed batching, full depth, fault")
    p.add_argument("--model", help="model directory to serve (default: train a quick demo-like model into --work)")
    p.add_argument("--work", default="runs/bench-serve", help="folder for the trained model when --model is not given")
    p.add_argument("--json", required=True, help="where to write the figures")
    p.add_argument("--concurrency", default="4,16,64", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=400, help="requests per configuration and concurrency level")
    p.add_argument("--texts-per-request", type=int, default=4)
    p.add_argument("--level-timeout", type=float, default=60.0, help="seconds before a level stops early")
    p.add_argument("--target-p99-ms", type=float, default=250.0)
    p.add_argument("--fault-seconds", type=float, default=25.0, help="length of the fault run (0 skips it)")
    p.add_argument("--configs", help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.data import load_text_classification
    from rayexit.files import write_json
    from rayexit.serve.run import start_serving
    from rayexit.serve.settings import ServeSettings

    model_dir = Path(args.model) if args.model else train_quick_model(Path(args.work))
    levels = [int(x) for x in args.concurrency.split(",")]
    names = [n.strip() for n in args.configs.split(",")] if args.configs else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise RayexitError(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    texts = load_text_classification("atis:test").texts
    payloads = make_payloads(texts, args.texts_per_request, count=max(args.requests, 1000), seed=args.seed)

    from rayexit.models import read_exit_config

    exit_config = read_exit_config(model_dir)
    report: dict[str, Any] = {
        "model": str(model_dir),
        "policy": exit_config.policy.to_dict(),
        "policy_choice": exit_config.extra.get("serve_bench_choice"),
        "machine": machine_info(),
        "requests_per_level": args.requests,
        "texts_per_request": args.texts_per_request,
        "target_p99_ms": args.target_p99_ms,
        "concurrency": levels,
        "runs": [],
    }
    base = {"model_dir": str(model_dir), "target_p99_ms": args.target_p99_ms, "max_texts": args.texts_per_request}
    running = None
    try:
        for name in names:
            settings = ServeSettings.from_args({**base, **CONFIGS[name]})
            if running is None:
                running = start_serving(settings, include_dashboard=args.fault_seconds > 0)
            else:
                redeploy(settings)
            for level in levels:
                asyncio.run(load(running.url, payloads[:20], concurrency=2, count=20, timeout_s=30))  # warm
                result = asyncio.run(load(running.url, payloads, level, args.requests, args.level_timeout))
                result.update(config=name, concurrency=level)
                report["runs"].append(result)
                print(format_row(result), flush=True)
                write_json(args.json, report)  # partial figures survive a later failure
            report.setdefault("controller", {})[name] = controller_history()
        if args.fault_seconds > 0:
            settings = ServeSettings.from_args({**base, **CONFIGS["early-exit adaptive"]})
            redeploy(settings)
            try:
                report["fault"] = asyncio.run(fault_run(running.url, payloads, 16, args.fault_seconds))
                print(format_fault(report["fault"]), flush=True)
            except RayexitError as exc:
                report["fault"] = {"error": str(exc)}
                print(f"fault run failed: {exc}", flush=True)
    finally:
        if running is not None:
            running.stop()
    report["summary"] = summarize(report["runs"], levels)
    write_json(args.json, report)
    print(format_summary(report["summary"]))
    print(f"report -> {args.json}")
    return 0


def train_quick_model(work: Path) -> Path:
    """A demo-like model (RomeBERT on packaged MiniLM + ATIS, one epoch), reused when already there."""
    from rayexit.config import TrainSettings
    from rayexit.train.recipe import train_to_directory

    model_dir = work / "model"
    if (model_dir / "rayexit.json").is_file():
        return model_dir
    print(f"training a demo-like model into {model_dir} (one epoch; minutes on a small CPU) ...", flush=True)
    settings = TrainSettings(
        method="romebert", epochs=1, pooling="mean", lr=5e-5, head_lr=1e-3, policy=ExitPolicy("entropy", 0.3)
    )
    train_to_directory("minilm", "atis", "atis:test", settings, model_dir, show_progress=False)
    choose_threshold(model_dir)
    return model_dir


# Entropy thresholds tried, as fractions of the largest possible entropy log(labels), tightest first.
ENTROPY_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


def choose_threshold(model_dir: Path, max_drop: float = 0.01) -> dict:
    """Write into the model directory the loosest entropy threshold (of the eval sweep) that stays within
    `max_drop` of full-depth accuracy on ATIS test: the serving benchmark should serve a model
    whose policy someone would choose, not the training default."""
    import json

    from rayexit.data import encode_examples, iterate_batches, load_text_classification
    from rayexit.exits import ExitCache, collect_exit_logits
    from rayexit.files import write_json
    from rayexit.models import MultiExitForSequenceClassification, load_tokenizer
    from rayexit.models.encoder import EXIT_CONFIG_FILE
    from rayexit.train.recipe import keep_known_labels

    model = MultiExitForSequenceClassification.from_pretrained(model_dir)
    examples_ = keep_known_labels(load_text_classification("atis:test"), model.labels)
    data = encode_examples(load_tokenizer(model_dir), examples_, model.labels, model.exit_config.max_length)
    logits, labels = collect_exit_logits(model, iterate_batches(data, 64))
    cache = ExitCache(logits)
    full = cache.exit_accuracies(labels)[-1]
    top = math.log(len(model.labels))
    chosen = {"threshold": 0.0, "accuracy": full, "mean_exit_layer": float(cache.num_layers)}
    for fraction in ENTROPY_FRACTIONS:
        policy = ExitPolicy("entropy", round(fraction * top, 6))
        result = cache.simulate(policy)
        acc = (result.predictions == labels).double().mean().item()
        if acc < full - max_drop:
            break  # looser thresholds only lose more
        chosen = {"threshold": policy.thresholds, "accuracy": acc,
                  "mean_exit_layer": result.exit_layers.double().mean().item()}
    config = json.loads((model_dir / EXIT_CONFIG_FILE).read_text())
    config["policy"] = {"kind": "entropy", "thresholds": chosen["threshold"]}
    config.setdefault("extra", {})["serve_bench_choice"] = {**chosen, "full_accuracy": full, "data": "atis:test"}
    write_json(model_dir / EXIT_CONFIG_FILE, config)
    return chosen


def make_payloads(texts: list[str], per_request: int, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"texts": rng.sample(texts, per_request)} for _ in range(count)]


def redeploy(settings) -> None:
    from ray import serve

    from rayexit.serve.app import bind_app
    from rayexit.serve.run import APP_NAME

    serve.run(bind_app(settings), name=APP_NAME, route_prefix="/")


def controller_history() -> list[dict]:
    from ray import serve

    from rayexit.serve.app import DEPLOYMENT_NAME
    from rayexit.serve.run import APP_NAME

    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    history = handle.controller_history.remote().result()
    return [{k: d[k] for k in ("max_batch_size", "batch_wait_timeout_s", "relax_level", "p99_s")} for d in history]


async def load(url: str, payloads: list[dict], concurrency: int, count: int, timeout_s: float) -> dict:
    """Closed loop: `concurrency` clients, each sending its next request when the last one answers."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    next_index = 0
    deadline = time.perf_counter() + timeout_s

    async def client(session) -> None:
        nonlocal next_index
        while next_index < count and time.perf_counter() < deadline:
            payload = payloads[next_index % len(payloads)]
            next_index += 1
            start = time.perf_counter()
            try:
                async with session.post(url + "/v1/classify", json=payload) as response:
                    await response.read()
                    key = str(response.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1
            if key == "200":
                latencies.append(time.perf_counter() - start)

    timeout = aiohttp.ClientTimeout(total=max(timeout_s, 30))
    connector = aiohttp.TCPConnector(limit=concurrency)
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return stats(latencies, statuses, elapsed)


def stats(latencies: list[float], statuses: dict[str, int], elapsed: float) -> dict:
    from rayexit.serve.controller import quantile

    sent = sum(statuses.values())
    return {
        "requests": sent,
        "ok": statuses.get("200", 0),
        "errors": sent - statuses.get("200", 0),
        "server_errors_5xx": sum(n for k, n in statuses.items() if k.startswith("5")),
        "statuses": statuses,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(statuses.get("200", 0) / elapsed, 2) if elapsed > 0 else 0.0,
        "p50_ms": round(quantile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(quantile(latencies, 0.99) * 1000, 1),
    }


def replica_pid() -> int:
    """The live replica actor's process, found through Ray's state API."""
    from ray.util.state import list_actors

    from rayexit.serve.app import DEPLOYMENT_NAME

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    pids = [a.pid for a in actors if a.class_name and a.class_name.endswith(f":{DEPLOYMENT_NAME}")]
    if len(pids) != 1:
        raise RayexitError(f"expected one live {DEPLOYMENT_NAME} replica, found {len(pids)}")
    return pids[0]


async def fault_run(url: str, payloads: list[dict], concurrency: int, seconds: float) -> dict:
    """Load for `seconds`; kill the replica's process a fifth of the way in; time until answers flow again."""
    import aiohttp

    events: list[tuple[float, float, str]] = []  # (sent, answered, status)
    stop_at = time.perf_counter() + seconds
    kill_at = time.perf_counter() + seconds / 5
    killed: dict[str, Any] = {}
    next_index = 0

    async def client(session) -> None:
        nonlocal next_index
        while time.perf_counter() < stop_at:
            payload = payloads[next_index % len(payloads)]
            next_index += 1
            sent = time.perf_counter()
            try:
                async with session.post(url + "/v1/classify", json=payload) as response:
                    await response.read()
                    status = str(response.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = type(exc).__name__
                await asyncio.sleep(0.05)  # a refused connection returns at once; do not spin
            events.append((sent, time.perf_counter(), status))

    async def killer() -> None:
        await asyncio.sleep(max(0.0, kill_at - time.perf_counter()))
        pid = await asyncio.to_thread(replica_pid)
        killed.update(pid=pid, at=time.perf_counter())
        os.kill(pid, signal.SIGKILL)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(killer(), *(client(session) for _ in range(concurrency)))
    kill_time = killed["at"]
    after = [e for e in events if e[1] >= kill_time]
    errors = [e for e in after if e[2] != "200"]
    flowing = [e[1] for e in events if e[2] == "200" and e[0] > kill_time]
    statuses: dict[str, int] = {}
    for _, _, status in events:
        statuses[status] = statuses.get(status, 0) + 1
    return {
        "seconds": seconds,
        "concurrency": concurrency,
        "killed_pid": killed["pid"],
        "requests": len(events),
        "errors": sum(1 for e in events if e[2] != "200"),
        "errors_after_kill": len(errors),
        "statuses": statuses,
        "recovery_s": round(min(flowing) - kill_time, 2) if flowing else None,
        "new_pid": await asyncio.to_thread(_pid_or_none),
    }


def _pid_or_none() -> int | None:
    try:
        return replica_pid()
    except RayexitError:
        return None


def summarize(runs: list[dict], levels: list[int]) -> list[dict]:
    """Per level: adaptive against full depth and against the best fixed batch size."""
    rows = []
    for level in levels:
        at = {r["config"]: r for r in runs if r["concurrency"] == level}
        adaptive, full = at.get("early-exit adaptive"), at.get("full depth adaptive")
        fixed = [r for name, r in at.items() if name.startswith("early-exit fixed")]
        row: dict[str, Any] = {"concurrency": level}
        if adaptive and full:
            row["speedup_vs_full"] = round(adaptive["requests_per_s"] / max(full["requests_per_s"], 1e-9), 2)
            row["p99_adaptive_ms"], row["p99_full_ms"] = adaptive["p99_ms"], full["p99_ms"]
        if adaptive and fixed:
            best = max(fixed, key=lambda r: r["requests_per_s"])
            row["best_fixed"] = best["config"]
            row["adaptive_vs_best_fixed"] = round(adaptive["requests_per_s"] / max(best["requests_per_s"], 1e-9), 3)
        rows.append(row)
    return rows


def format_row(r: dict) -> str:
    return (
        f"{r['config']:<22} c={r['concurrency']:<3} {r['requests_per_s']:>8.1f} req/s  p50 {r['p50_ms']:>7.1f} ms  "
        f"p99 {r['p99_ms']:>7.1f} ms  errors {r['errors']} (5xx {r['server_errors_5xx']}) of {r['requests']}"
    )


def format_fault(f: dict) -> str:
    return (
        f"fault: killed replica pid {f['killed_pid']} under load (c={f['concurrency']}); "
        f"{f['errors_after_kill']} failed requests; answers flowing again after {f['recovery_s']} s"
    )


def format_summary(rows: list[dict]) -> str:
    lines = ["concurrency  adaptive/full  p99 adaptive  p99 full  adaptive/best fixed"]
    for r in rows:
        lines.append(
            f"{r['concurrency']:>11}  {r.get('speedup_vs_full', '-'):>13}  {r.get('p99_adaptive_ms', '-'):>12}  "
            f"{r.get('p99_full_ms', '-'):>8}  {r.get('adaptive_vs_best_fixed', '-')} ({r.get('best_fixed', '-')})"
        )
    return "\n".join(lines)
