"""`rayexit bench serve`: bounded HTTP load on loopback against the Serve app, then faults and overload.

Runs (`--runs`, all by default):
- sweep: for every serving configuration (early exit with adaptive batching; early exit with
  fixed batch sizes; full depth with adaptive batching) and every concurrency level, a closed
  loop of clients sends a fixed number of requests (or stops at a time limit): requests/s,
  p50/p99 latency and the error count.
- fault: kills the replica's process mid-load; the errors and the time until answers flow again.
- overload: measures the sustainable rate (closed loop), then offers `--overload-factor` times
  that rate open-loop (Poisson arrivals, seeded) for `--overload-seconds`: admitted p50/p99,
  the shed fraction (503 with Retry-After) and any other 5xx (target 0).
- poison: a closed loop in which 1 request in 8 carries a text the tokenizer cannot encode
  (a lone surrogate): how many valid requests failed (target 0).
- guard: the accuracy guard on a stream that shifts (bench/serve_guard.py).
- tag (opt-in, needs `--tag-model`): the sweep's configurations on `/v1/tag` with a token model,
  CoNLL-2003 test sentences as requests, the served answers scored for entity F1 (bench/serve_tag.py).
- rebatch: layer-level rebatching on against off at every concurrency level (serve_rebatch.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from rayexit.bench import serve_guard, serve_rebatch
from rayexit.bench.common import machine_info
from rayexit.config import ExitPolicy
from rayexit.errors import RayexitError

RUNS = ("sweep", "fault", "overload", "poison", "guard", "rebatch", "tag")
# the tag run needs a token model: asked for by name
DEFAULT_RUNS = ("sweep", "fault", "overload", "poison", "guard", "rebatch")
# The sweep compares configurations by throughput under closed-loop load, where p99 is clients / rate
# whatever the batching: shedding (on by default in serving) would turn that comparison into 503 counts.
SWEEP_NO_SHEDDING = {"max_queue_wait_ms": 600_000.0, "max_queued_texts": 1_000_000}

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
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    p.add_argument("--overload-seconds", type=float, default=60.0, help="length of the open-loop overload run")
    p.add_argument("--overload-factor", type=float, default=2.0, help="offered rate as a multiple of the sustainable")
    p.add_argument("--calibrate-seconds", type=float, default=15.0, help="closed loop measuring the sustainable rate")
    p.add_argument("--poison-requests", type=int, default=160, help="requests in the poisoned-batch run (1 in 8 bad)")
    p.add_argument("--seed", type=int, default=0)
    serve_guard.add_arguments(p)
    p.add_argument("--tag-model", help="token model directory for the tag run (its policy is re-chosen on valid.txt)")
    p.add_argument("--datasets", help="folder holding conll2003/{valid,test}.txt (default ../shared/datasets)")
    p.add_argument("--tag-max-drop", type=float, default=0.005,
                   help="largest entity-F1 drop (0-1 scale, bootstrap bound on valid) the tag run's policy may cost")
    serve_rebatch.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.data import load_text_classification
    from rayexit.files import write_json
    from rayexit.serve.run import start_serving
    from rayexit.serve.settings import ServeSettings

    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad_runs = [r for r in runs if r not in RUNS]
    if bad_runs:
        raise RayexitError(f"--runs: unknown {', '.join(bad_runs)}; known: {', '.join(RUNS)}")
    if "tag" in runs and not args.tag_model:
        raise RayexitError("--runs tag: give --tag-model DIR, a token model directory")
    levels = [int(x) for x in args.concurrency.split(",")]
    if runs == ["tag"]:
        return run_tag_only(args, levels)
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
        "policy_choice": exit_config.extra.get("policy_choice"),
        "machine": machine_info(),
        "runs_done": runs,
        "requests_per_level": args.requests,
        "texts_per_request": args.texts_per_request,
        "target_p99_ms": args.target_p99_ms,
        "concurrency": levels,
        "runs": [],
    }
    base = {"model_dir": str(model_dir), "target_p99_ms": args.target_p99_ms, "max_texts": args.texts_per_request}
    adaptive = ServeSettings.from_args({**base, **CONFIGS["early-exit adaptive"]})
    running = None
    try:
        if "sweep" in runs:
            for name in names:
                settings = ServeSettings.from_args({**base, **CONFIGS[name], **SWEEP_NO_SHEDDING})
                if running is None:
                    running = start_serving(settings, include_dashboard="fault" in runs)
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
        if running is None:
            running = start_serving(adaptive, include_dashboard="fault" in runs)
        if "rebatch" in runs:
            report["rebatch"] = serve_rebatch.compare(running.url, base, payloads, levels, args.requests,
                                                      args.level_timeout, args.rebatch_repeats)
            print(serve_rebatch.format_summary(report["rebatch"]["levels"]), flush=True)
            write_json(args.json, report)
        unshed = ServeSettings.from_args({**base, **CONFIGS["early-exit adaptive"], **SWEEP_NO_SHEDDING})
        if "poison" in runs and args.poison_requests > 0:
            # Shedding off: this run measures isolation, and a 503 from load would blur the count it reports.
            redeploy(unshed)
            report["poison"] = asyncio.run(poison_run(running.url, payloads, args.poison_requests))
            print(format_poison(report["poison"]), flush=True)
            write_json(args.json, report)
        if "overload" in runs and args.overload_seconds > 0:
            # The sustainable rate is what the replica computes with nothing refused: measured with shedding off
            # (a closed loop whose refused clients retry at once would only measure how fast 503s are made).
            redeploy(unshed)
            calibration = asyncio.run(load(running.url, payloads, 16, count=10**9, timeout_s=args.calibrate_seconds))
            redeploy(adaptive)
            report["overload"] = asyncio.run(overload_run(
                running.url, payloads, calibration, args.overload_seconds, args.overload_factor, args.seed
            ))
            report["overload"]["target_p99_ms"] = args.target_p99_ms
            print(format_overload(report["overload"]), flush=True)
            write_json(args.json, report)
        if "guard" in runs:
            report["guard"] = serve_guard.run(running.url, model_dir, base, args)
            write_json(args.json, report)
        if "fault" in runs and args.fault_seconds > 0:
            redeploy(adaptive)
            try:
                report["fault"] = asyncio.run(fault_run(running.url, payloads, 16, args.fault_seconds))
                print(format_fault(report["fault"]), flush=True)
            except RayexitError as exc:
                report["fault"] = {"error": str(exc)}
                print(f"fault run failed: {exc}", flush=True)
        if "tag" in runs:
            report["tag"] = tag_run(args, levels, running)
            write_json(args.json, report)
    finally:
        if running is not None:
            running.stop()
    if report["runs"]:
        report["summary"] = summarize(report["runs"], levels)
        print(format_summary(report["summary"]))
    write_json(args.json, report)
    print(f"report -> {args.json}")
    return 0


def run_tag_only(args: argparse.Namespace, levels: list[int]) -> int:
    """`--runs tag`: no sequence model is trained or served."""
    from rayexit.files import write_json

    report: dict[str, Any] = {"machine": machine_info(), "runs_done": ["tag"], "requests_per_level": args.requests,
                              "texts_per_request": args.texts_per_request, "target_p99_ms": args.target_p99_ms,
                              "concurrency": levels}
    report["tag"] = tag_run(args, levels, None)
    write_json(args.json, report)
    print(f"report -> {args.json}")
    return 0


def tag_run(args: argparse.Namespace, levels: list[int], running) -> dict:
    """The sweep's configurations on /v1/tag (see bench/serve_tag.py); full depth last, so every row can be
    scored against what full depth served for the same sentences."""
    from rayexit.bench.common import datasets_dir
    from rayexit.bench.serve_tag import (
        choose_token_policy,
        conll_file,
        format_tag_row,
        format_tag_summary,
        score_rows,
        served_tags,
        summarize_tag,
        tag_payloads,
    )
    from rayexit.data.conll import read_conll
    from rayexit.models import read_exit_config
    from rayexit.serve.run import start_serving
    from rayexit.serve.settings import ServeSettings

    datasets = datasets_dir(args.datasets)
    valid, test_path = conll_file(datasets, "valid.txt"), conll_file(datasets, "test.txt")
    model_dir = choose_token_policy(Path(args.tag_model), valid, Path(args.work) / "tag-model", args.tag_max_drop)
    exit_config = read_exit_config(model_dir)
    test = read_conll(test_path)
    payloads, groups = tag_payloads(test.words, args.texts_per_request, args.seed)
    names = [n.strip() for n in args.configs.split(",")] if args.configs else list(CONFIGS)
    names = sorted(names, key=lambda n: n == "full depth adaptive")
    base = {"model_dir": str(model_dir), "target_p99_ms": args.target_p99_ms, "max_texts": args.texts_per_request}
    rows: list[dict] = []
    tags: dict[tuple[str, int], dict[int, list[str]]] = {}
    controller: dict[str, list] = {}
    started_here = running is None
    try:
        for name in names:
            settings = ServeSettings.from_args({**base, **CONFIGS[name], **SWEEP_NO_SHEDDING})
            if running is None:
                running = start_serving(settings)
            else:
                redeploy(settings)
            for level in levels:
                asyncio.run(load(running.url, payloads[:20], 2, 20, 30, "/v1/tag"))  # warm
                answers: dict[int, bytes] = {}
                result = asyncio.run(
                    load(running.url, payloads, level, args.requests, args.level_timeout, "/v1/tag", answers)
                )
                result.update(config=name, concurrency=level)
                tags[(name, level)] = served_tags(answers, groups)
                rows.append(result)
                print("tag " + format_row(result), flush=True)
            controller[name] = controller_history()
    finally:
        if started_here and running is not None:
            running.stop()
    score_rows(rows, tags, test.tags)
    for row in rows:
        print(format_tag_row(row), flush=True)
    summary = summarize_tag(rows, levels)
    print(format_tag_summary(summary), flush=True)
    return {
        "model": str(model_dir),
        "source_model": str(args.tag_model),
        "policy": exit_config.policy.to_dict(),
        "policy_choice": exit_config.extra.get("policy_choice"),
        "requests_from": f"{test_path.name}: {len(test)} sentences, {args.texts_per_request} per request, "
        f"seed {args.seed}",
        "runs": rows,
        "controller": controller,
        "summary": summary,
    }


def train_quick_model(work: Path) -> Path:
    """A demo-like model (RomeBERT on packaged MiniLM + ATIS, one epoch), reused when already there.

    It trains on ATIS train less a validation split, and its entropy threshold is chosen on that
    split (`rayexit.sweep.select`): the benchmark serves a policy someone would choose, not the
    training default, and the ATIS test set that the requests come from chose nothing.
    """
    from rayexit.config import TrainSettings
    from rayexit.tasks import task_named
    from rayexit.train.recipe import train_to_directory
    from rayexit.tune.split import write_tsv

    model_dir = work / "model"
    if (model_dir / "rayexit.json").is_file():
        return model_dir
    print(f"training a demo-like model into {model_dir} (one epoch; minutes on a small CPU) ...", flush=True)
    settings = TrainSettings(
        method="romebert", epochs=1, pooling="mean", lr=5e-5, head_lr=1e-3, policy=ExitPolicy("entropy", 0.3)
    )
    task = task_named("sequence")
    fit, valid = task.split(task.load("atis:train"), 0.1, settings.seed)
    run, _ = train_to_directory("minilm", str(write_tsv(fit, work / "fit.tsv")), None, settings, model_dir,
                                show_progress=False)
    choose_threshold(model_dir, task.encode(run.tokenizer, valid, run.model.labels, settings.max_length))
    return model_dir


# Entropy thresholds tried, as fractions of the largest possible entropy log(labels), tightest first.
ENTROPY_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


def choose_threshold(model_dir: Path, valid_data, max_drop: float = 0.01) -> dict:
    """Save into the model directory the entropy threshold `rayexit.sweep.select` picks on validation."""
    from rayexit.model_dir import ModelDir
    from rayexit.policy import FULL_DEPTH
    from rayexit.sweep import outcomes, select
    from rayexit.tasks import task_named

    directory = ModelDir(model_dir)
    task, model = task_named("sequence"), directory.load_model()
    replay = task.replay(model, valid_data, 64)
    top = math.log(len(model.labels))
    grid = [ExitPolicy("entropy", round(fraction * top, 6)) for fraction in ENTROPY_FRACTIONS]
    choice = select(task, replay.outcome(FULL_DEPTH), outcomes(replay, grid), max_drop)
    chosen = choice.record(task)
    directory.with_policy(choice.outcome.policy, model_dir, {**chosen, "data": "atis:train validation split"})
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


async def load(
    url: str, payloads: list[dict], concurrency: int, count: int, timeout_s: float, route: str = "/v1/classify",
    answers: dict[int, bytes] | None = None,
) -> dict:
    """Closed loop: `concurrency` clients, each sending its next request when the last one answers.

    `answers`, when given, collects the body of every 200 answer by request number."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    next_index = 0
    deadline = time.perf_counter() + timeout_s

    async def client(session) -> None:
        nonlocal next_index
        while next_index < count and time.perf_counter() < deadline:
            index = next_index
            payload = payloads[index % len(payloads)]
            next_index += 1
            start = time.perf_counter()
            try:
                async with session.post(url + route, json=payload) as response:
                    body = await response.read()
                    key = str(response.status)
                if answers is not None and key == "200":
                    answers[index] = body
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


POISON = "bad \ud800 text"  # a lone surrogate: valid JSON once escaped, but no tokenizer can encode it


async def poison_run(url: str, payloads: list[dict], count: int, concurrency: int = 8) -> dict:
    """Closed loop of `concurrency` clients; request i is poisoned when i % 8 == 7 (one bad text among good ones)."""
    import aiohttp

    outcomes: list[tuple[bool, str]] = []  # (poisoned, status)
    next_index = 0

    async def client(session) -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            poisoned = i % 8 == 7
            payload = payloads[i % len(payloads)]
            if poisoned:
                payload = {"texts": payload["texts"][:-1] + [POISON]}
            body = json.dumps(payload)  # ensure_ascii: the surrogate travels as the escape \ud800
            try:
                async with session.post(url + "/v1/classify", data=body,
                                        headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    status = str(response.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = type(exc).__name__
            outcomes.append((poisoned, status))

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    valid = [s for p, s in outcomes if not p]
    bad = [s for p, s in outcomes if p]
    return {
        "requests": len(outcomes),
        "concurrency": concurrency,
        "valid_requests": len(valid),
        "valid_failed": sum(s != "200" for s in valid),
        "poisoned_requests": len(bad),
        "poisoned_4xx": sum(s.startswith("4") for s in bad),
        "server_errors_5xx": sum(s.startswith("5") for _, s in outcomes),
        "statuses": _count(s for _, s in outcomes),
    }


async def overload_run(url: str, payloads: list[dict], calibration: dict, seconds: float, factor: float,
                       seed: int) -> dict:
    """Offer `factor` times the sustainable rate (a closed loop's answers/s) open-loop, as Poisson arrivals."""
    import aiohttp

    sustainable = calibration["requests_per_s"]
    rate = factor * max(sustainable, 1.0)
    rng = random.Random(seed)
    events: list[tuple[float, float, str, str | None]] = []  # (sent, answered, status, retry-after)
    shed_where = {"admission": 0, "deadline": 0}

    async def one(session, payload) -> None:
        sent = time.perf_counter()
        retry = None
        try:
            async with session.post(url + "/v1/classify", json=payload) as response:
                body = await response.read()
                status, retry = str(response.status), response.headers.get("Retry-After")
            if status == "503":
                shed_where["deadline" if b"deadline" in body else "admission"] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status = type(exc).__name__
        events.append((sent, time.perf_counter(), status, retry))

    timeout = aiohttp.ClientTimeout(total=60)
    tasks = []
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1024)) as session:
        start = time.perf_counter()
        at, i = 0.0, 0
        while at < seconds:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, payloads[i % len(payloads)])))
            i += 1
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    from rayexit.serve.controller import quantile

    admitted = [done - sent for sent, done, status, _ in events if status == "200"]
    shed = [e for e in events if e[2] == "503"]
    statuses = _count(e[2] for e in events)
    return {
        "calibration": {k: calibration[k] for k in ("requests", "requests_per_s", "p50_ms", "p99_ms", "statuses")},
        "sustainable_requests_per_s": sustainable,
        "offered_requests_per_s": round(rate, 2),
        "seconds": seconds,
        "elapsed_s": round(elapsed, 2),
        "requests": len(events),
        "admitted": len(admitted),
        "admitted_per_s": round(len(admitted) / seconds, 2),
        "shed": len(shed),
        "shed_fraction": round(len(shed) / max(len(events), 1), 4),
        "shed_with_retry_after": sum(1 for e in shed if e[3]),
        "shed_at": shed_where,
        "server_errors_5xx_not_shed": sum(1 for e in events if e[2].startswith("5") and e[2] != "503"),
        "client_errors": sum(1 for e in events if not e[2].isdigit()),
        "statuses": statuses,
        "admitted_p50_ms": round(quantile(admitted, 0.5) * 1000, 1),
        "admitted_p99_ms": round(quantile(admitted, 0.99) * 1000, 1),
    }


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out


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


def format_poison(p: dict) -> str:
    return (
        f"poison: {p['requests']} requests (c={p['concurrency']}), 1 in 8 with a lone surrogate: "
        f"{p['valid_failed']} of {p['valid_requests']} valid requests failed; {p['poisoned_4xx']} of "
        f"{p['poisoned_requests']} poisoned answered 4xx; 5xx {p['server_errors_5xx']}"
    )


def format_overload(o: dict) -> str:
    return (
        f"overload: sustainable {o['sustainable_requests_per_s']} req/s, offered {o['offered_requests_per_s']} req/s "
        f"for {o['seconds']:g} s: {o['requests']} requests, admitted {o['admitted']} (p50 {o['admitted_p50_ms']} ms, "
        f"p99 {o['admitted_p99_ms']} ms), shed {o['shed']} ({o['shed_fraction']:.1%}), "
        f"other 5xx {o['server_errors_5xx_not_shed']}, client errors {o['client_errors']}"
    )


def format_summary(rows: list[dict]) -> str:
    lines = ["concurrency  adaptive/full  p99 adaptive  p99 full  adaptive/best fixed"]
    for r in rows:
        lines.append(
            f"{r['concurrency']:>11}  {r.get('speedup_vs_full', '-'):>13}  {r.get('p99_adaptive_ms', '-'):>12}  "
            f"{r.get('p99_full_ms', '-'):>8}  {r.get('adaptive_vs_best_fixed', '-')} ({r.get('best_fixed', '-')})"
        )
    return "\n".join(lines)
