"""`rayexit bench serve --runs guard`: the accuracy guard on a stream that starts like the data and then shifts.

The stream ("atis-concat shift"): requests carry ATIS test sentences as they are, then, from request
`--guard-clean-requests` on, each sentence followed by another ATIS test sentence of a different
intent, as a client that batches two utterances into one text would send (seeded). The label stays
the first sentence's intent, so accuracy is reported beside agreement, though a joined text no
longer has one right answer. Word noise and truncation were tried first on the bench's model and
moved agreement less: its confident early exits stayed right on them.

`--guard-thresholds` serves other thresholds than the model directory's (as serve's `thresholds`):
with thresholds chosen on validation at a strict accuracy budget, early answers may agree with full
depth on this stream whatever it does, and the guard has nothing to correct.

The same stream is sent twice, closed loop, in request order: guard off (the tuned thresholds, fixed)
and guard on. Per block of 500 requests: agreement of served answers with the full-depth answers
(computed once in this process with `policy: none`), accuracy, req/s, p99 and the mean exit layer.
The guard's state is polled from /v1/model, which dates its first move in requests after the shift.
The steady-state overhead is req/s on unshifted traffic, guard on against off, in interleaved repeats,
at `--guard-overhead-thresholds`: thresholds that miss the target on unshifted traffic make the guard
tighten there too, so its "overhead" then mixes slower answers with the cost of the checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

BLOCK = 500
SHIFT_NAME = "atis-concat shift: ATIS test sentences, then each followed by another ATIS test sentence of a " \
             "different intent"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guard-target", type=float, default=0.99, help="guard run: agreement target")
    p.add_argument("--guard-sample", type=float, default=0.05, help="guard run: share of texts checked")
    p.add_argument("--guard-clean-requests", type=int, default=1000, help="guard run: requests before the shift")
    p.add_argument("--guard-shifted-requests", type=int, default=3000, help="guard run: requests after the shift")
    p.add_argument("--guard-concurrency", type=int, default=8, help="guard run: closed-loop clients")
    p.add_argument("--guard-overhead-requests", type=int, default=600,
                   help="guard run: requests per overhead repeat (unshifted traffic, guard on vs off)")
    p.add_argument("--guard-overhead-repeats", type=int, default=3, help="guard run: interleaved overhead pairs")
    p.add_argument("--guard-thresholds", type=float, help="guard run: serve this entropy/policy threshold instead "
                   "of the model directory's")
    p.add_argument("--guard-overhead-thresholds", default="same",
                   help="guard run: thresholds of the overhead repeats: `same` (as the stream), `tuned` (the model "
                        "directory's) or a number; where they already meet the target on unshifted traffic the "
                        "guard has nothing to tighten and the repeats time its checks alone")


def joined(pair: tuple[str, str], pairs: list[tuple[str, str]], rng: random.Random) -> str:
    text, label = pair
    while True:
        other, other_label = rng.choice(pairs)
        if other_label != label:
            return f"{text} {other}"


def build_stream(texts: list[str], labels: list[str], clean: int, shifted: int, per_request: int,
                 seed: int) -> list[list[tuple[str, str]]]:
    """Requests of (text, gold label): `clean` from the sentences as they are, then `shifted` noisy ones."""
    rng = random.Random(seed)
    pairs = list(zip(texts, labels, strict=True))
    stream = [rng.sample(pairs, per_request) for _ in range(clean)]
    for _ in range(shifted):
        stream.append([(joined(p, pairs, rng), p[1]) for p in rng.sample(pairs, per_request)])
    return stream


def full_depth_labels(model_dir: Path, texts: list[str]) -> dict[str, str]:
    from rayexit.config import ExitPolicy
    from rayexit.serve.engine import ServedClassifier

    engine = ServedClassifier.from_model_dir(model_dir, ExitPolicy("none", 0.0), device="cpu")
    unique = sorted(set(texts))
    out: dict[str, str] = {}
    for start in range(0, len(unique), 64):
        chunk = unique[start:start + 64]
        answers, _ = engine.classify(chunk)
        out.update({t: a.label for t, a in zip(chunk, answers, strict=True)})
    return out


async def send_stream(url: str, stream: list[list[tuple[str, str]]], concurrency: int,
                      poll_s: float = 0.5) -> tuple[list[dict], list[dict]]:
    """Closed loop in stream order; every answer kept, and /v1/model polled for the guard's state."""
    import aiohttp

    records: list[dict] = [{} for _ in stream]
    polls: list[dict] = []
    next_index = 0
    done = 0

    async def client(session) -> None:
        nonlocal next_index, done
        while next_index < len(stream):
            index = next_index
            next_index += 1
            start = time.perf_counter()
            async with session.post(url + "/v1/classify", json={"texts": [t for t, _ in stream[index]]}) as response:
                body = await response.json(content_type=None)
                records[index] = {"status": response.status, "latency": time.perf_counter() - start,
                                  "finished": time.perf_counter(), "results": body.get("results")}
            done += 1

    async def poller(session) -> None:
        while done < len(stream):
            async with session.get(url + "/v1/model") as response:
                guard = (await response.json()).get("guard")
            if guard is not None:
                polls.append({"completed": done, "time": time.perf_counter(), "levels": guard["levels"],
                              "thresholds": guard["thresholds"], "agreement": guard["agreement"],
                              "samples": guard["samples"]})
            await asyncio.sleep(poll_s)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency + 1)) as s:
        await asyncio.gather(poller(s), *(client(s) for _ in range(concurrency)))
    return records, polls


def blocks(stream: list[list[tuple[str, str]]], records: list[dict], full: dict[str, str]) -> list[dict]:
    from rayexit.serve.controller import quantile

    out = []
    previous_end = None
    for start in range(0, len(stream), BLOCK):
        rows = range(start, min(start + BLOCK, len(stream)))
        ok = [i for i in rows if records[i].get("status") == 200]
        agree = correct = texts = layers = 0
        for i in ok:
            for (text, gold), result in zip(stream[i], records[i]["results"], strict=True):
                texts += 1
                agree += result["label"] == full[text]
                correct += result["label"] == gold
                layers += result["exit_layer"]
        finished = [records[i]["finished"] for i in ok]
        span = max(finished) - (previous_end if previous_end is not None else min(finished)) if finished else 0.0
        previous_end = max(finished) if finished else previous_end
        out.append({
            "requests": f"{start}-{rows[-1]}",
            "errors": len(rows) - len(ok),
            "agreement": round(agree / texts, 4) if texts else None,
            "accuracy": round(correct / texts, 4) if texts else None,
            "mean_exit_layer": round(layers / texts, 3) if texts else None,
            "requests_per_s": round(len(ok) / span, 2) if span > 0 else None,
            "p99_ms": round(quantile([records[i]["latency"] for i in ok], 0.99) * 1000, 1),
        })
    return out


def first_move(polls: list[dict], shift_at: int) -> dict | None:
    """The first poll after the shift whose thresholds differ from those at the shift (the last poll before it,
    else the tuned ones): requests since the shift, and the state then."""
    before = [p for p in polls if p["completed"] < shift_at]
    at_shift = before[-1]["levels"] if before else None
    for poll in polls:
        if poll["completed"] >= shift_at and poll["levels"] != (at_shift or [0] * len(poll["levels"])):
            return {"requests_after_shift": poll["completed"] - shift_at, "levels_at_shift": at_shift, **poll}
    return None


def level_changes(polls: list[dict]) -> list[dict]:
    """The polls at which the guard's levels differ from the poll before: when each exit moved, in requests."""
    changes, previous = [], None
    for poll in polls:
        if poll["levels"] != previous:
            changes.append({"completed": poll["completed"], "levels": poll["levels"], "samples": poll["samples"]})
            previous = poll["levels"]
    return changes


def run(url: str, model_dir: Path, base: dict[str, Any], args: argparse.Namespace) -> dict:
    from rayexit.bench.serve import SWEEP_NO_SHEDDING, load, redeploy
    from rayexit.data import load_text_classification
    from rayexit.serve.settings import ServeSettings

    test = load_text_classification("atis:test")
    per_request = args.texts_per_request
    stream = build_stream(test.texts, test.labels, args.guard_clean_requests, args.guard_shifted_requests,
                          per_request, args.seed)
    print(f"guard run: {len(stream)} requests of {per_request} texts; full-depth answers ...", flush=True)
    full = full_depth_labels(model_dir, [t for request in stream for t, _ in request])
    common = {**base, "adaptive": True, **SWEEP_NO_SHEDDING}
    if args.guard_thresholds is not None:
        common["thresholds"] = args.guard_thresholds
    guard_keys = {"guard_target": args.guard_target, "guard_sample": args.guard_sample}
    off, on = ServeSettings.from_args(common), ServeSettings.from_args({**common, **guard_keys})
    # The overhead repeats' settings are built (and so checked) now, not after the long stream.
    quiet_off, quiet_on = off, on
    if args.guard_overhead_thresholds != "same":
        quiet = {key: value for key, value in common.items() if key != "thresholds"}
        if args.guard_overhead_thresholds != "tuned":
            quiet["thresholds"] = parse_overhead_thresholds(args.guard_overhead_thresholds)
        quiet_off, quiet_on = ServeSettings.from_args(quiet), ServeSettings.from_args({**quiet, **guard_keys})
    report: dict[str, Any] = {
        "stream": SHIFT_NAME, "requests": len(stream), "shift_at_request": args.guard_clean_requests,
        "texts_per_request": per_request, "concurrency": args.guard_concurrency, "block_requests": BLOCK,
        "guard": guard_keys, "seed": args.seed, "thresholds": common.get("thresholds", "model directory's"),
    }
    warm = [{"texts": [t for t, _ in r]} for r in stream[:20]]
    for name, settings in (("guard off", off), ("guard on", on)):
        redeploy(settings)
        asyncio.run(load(url, warm, concurrency=2, count=20, timeout_s=30))
        records, polls = asyncio.run(send_stream(url, stream, args.guard_concurrency))
        run_report = {"blocks": blocks(stream, records, full),
                      "server_errors_5xx": sum(1 for r in records if r.get("status", 0) >= 500)}
        if name == "guard on":
            run_report["first_move"] = first_move(polls, args.guard_clean_requests)
            run_report["final"] = polls[-1] if polls else None
            run_report["level_changes"] = level_changes(polls)
        report[name] = run_report
        print(format_run(name, run_report), flush=True)
    report["overhead"] = overhead(url, stream[: args.guard_clean_requests], quiet_off, quiet_on, args)
    report["overhead"]["thresholds"] = quiet_on.thresholds if quiet_on.thresholds is not None else "model directory's"
    print(format_overhead(report["overhead"]), flush=True)
    return report


def parse_overhead_thresholds(text: str) -> float:
    from rayexit.errors import RayexitError

    try:
        return float(text)
    except ValueError:
        raise RayexitError(f"--guard-overhead-thresholds: got {text!r}, expected `same`, `tuned` or a number") from None


def overhead(url: str, clean: list[list[tuple[str, str]]], off, on, args: argparse.Namespace) -> dict:
    """req/s on unshifted traffic, guard off and on alternately; each repeat after a warm-up on the fresh replica."""
    from rayexit.bench.serve import load, redeploy

    payloads = [{"texts": [t for t, _ in r]} for r in clean]
    rates: dict[str, list[float]] = {"guard off": [], "guard on": []}
    p99: dict[str, list[float]] = {"guard off": [], "guard on": []}
    levels: list[list[int] | None] = []  # the guard's levels after each "on" repeat: did it tighten meanwhile?
    for _ in range(args.guard_overhead_repeats):
        for name, settings in (("guard off", off), ("guard on", on)):
            redeploy(settings)
            asyncio.run(load(url, payloads, concurrency=args.guard_concurrency, count=200, timeout_s=60))  # settle
            result = asyncio.run(load(url, payloads, args.guard_concurrency, args.guard_overhead_requests, 120))
            rates[name].append(result["requests_per_s"])
            p99[name].append(result["p99_ms"])
            if name == "guard on":
                levels.append(guard_levels(url))
    off_rate, on_rate = statistics.median(rates["guard off"]), statistics.median(rates["guard on"])
    return {
        "requests_per_repeat": args.guard_overhead_requests, "repeats": args.guard_overhead_repeats,
        "requests_per_s": rates, "p99_ms": p99,
        "median_requests_per_s": {"guard off": off_rate, "guard on": on_rate},
        "overhead_fraction": round(1 - on_rate / off_rate, 4) if off_rate else None,
        "guard_levels_after": levels,
    }


def guard_levels(url: str) -> list[int] | None:
    """The guard's per-exit levels now, from the replica's /v1/model (None when it shows no guard)."""
    with urllib.request.urlopen(url + "/v1/model", timeout=30) as response:
        guard = json.loads(response.read()).get("guard")
    return guard.get("levels") if guard else None


def format_run(name: str, r: dict) -> str:
    lines = [f"{name}: 5xx {r['server_errors_5xx']}"]
    for b in r["blocks"]:
        lines.append(f"  requests {b['requests']:>11}  agreement {b['agreement']}  accuracy {b['accuracy']}  "
                     f"exit {b['mean_exit_layer']}  req/s {b['requests_per_s']}  p99 {b['p99_ms']} ms")
    move = r.get("first_move")
    if move is not None:
        lines.append(f"  first threshold move seen {move['requests_after_shift']} requests after the shift "
                     f"(levels {move['levels']})")
    if r.get("final"):
        lines.append(f"  final thresholds {[round(t, 4) for t in r['final']['thresholds']]}, "
                     f"checked rows {r['final']['samples']}")
    return "\n".join(lines)


def format_overhead(o: dict) -> str:
    m = o["median_requests_per_s"]
    return (f"guard overhead on unshifted traffic: req/s off {m['guard off']} on {m['guard on']} "
            f"(median of {o['repeats']}; all {o['requests_per_s']}) -> {o['overhead_fraction']}; guard levels after "
            f"each 'on' repeat {o.get('guard_levels_after')}")


def stream_units(model_dir: Path, thresholds: float | None, stream: list[list[tuple[str, str]]]):
    """Every distinct text's per-exit statistic and answer at full depth, computed once: the policy served,
    the statistics [texts, L], the answers [texts, L] and each text's row."""
    import torch

    from rayexit.config import ExitPolicy
    from rayexit.serve.engine import ServedClassifier
    from rayexit.serve.guard import sentence_units

    engine = ServedClassifier.from_model_dir(model_dir, None, device="cpu")
    policy = engine.policy if thresholds is None else ExitPolicy(engine.policy.kind, thresholds)
    unique = sorted({t for request in stream for t, _ in request})
    encoded = engine.encode(unique)
    logits = torch.cat([engine.exit_logits_encoded(encoded[i:i + 64]) for i in range(0, len(encoded), 64)])
    stats, preds = sentence_units(logits, policy.kind)
    return policy, stats, preds, {t: i for i, t in enumerate(unique)}, len(engine.labels)


def replay_rule(units, stream: list[list[tuple[str, str]]], config, clean: int, seed: int) -> dict:
    """The guard's rule on the stream without Serve: answers replayed at the thresholds of the moment,
    checks landing at once. What the rule does, apart from timing."""
    import torch

    from rayexit.serve.guard import AccuracyGuard, replay

    policy, stats, preds, row, num_labels = units
    guard = AccuracyGuard(config, policy, stats.shape[1], num_labels, seed=seed)
    fixed = policy.per_layer(stats.shape[1])
    agree: dict[str, list[bool]] = {"guard off": [], "guard on": []}
    first = None
    tight_at_shift = False
    for n, request in enumerate(stream):
        if n == clean:
            tight_at_shift = any(level > 0 for level in guard.levels)
        index = torch.tensor([row[t] for t, _ in request])
        for name, served in (("guard off", fixed), ("guard on", guard.thresholds())):
            exits = replay(policy.kind, stats[index], preds[index], served)
            agree[name] += (preds[index, exits] == preds[index, -1]).tolist()
        guard.offer(index.tolist())
        while guard.pending:
            checked = torch.tensor(guard.take())
            if guard.record(stats[checked], preds[checked]) and first is None and n >= clean:
                first = n - clean
    per_request = len(stream[0])
    per_block = []
    for start in range(0, len(stream), BLOCK):
        a, b = start * per_request, min(start + BLOCK, len(stream)) * per_request
        per_block.append({"requests": f"{start}-{min(start + BLOCK, len(stream)) - 1}",
                          **{name: round(sum(v[a:b]) / (b - a), 4) for name, v in agree.items()}})
    return {"seed": seed, "blocks": per_block, "first_move_requests_after_shift": first, "moves": guard.moves,
            "final_thresholds": guard.thresholds(), "checked": guard.samples, "tightened_at_shift": tight_at_shift}


def held_after_reaction(blocks: list[dict], shift_at: int, first_move: int | None,
                        tightened_at_shift: bool = False) -> bool:
    """Every whole block that starts after the guard's first move after the shift agrees at target or more.
    A guard that had already tightened before the shift and did not move after it is judged from the shift on."""
    if first_move is None and not tightened_at_shift:
        return False
    reacted = shift_at + (first_move if first_move is not None else 0)
    after = [b for b in blocks if int(b["requests"].split("-")[0]) >= reacted]
    return bool(after) and all(b["guard on"] >= b["target"] for b in after)


def main() -> int:
    """`python -m rayexit.bench.serve_guard --model DIR --json OUT`: the rule replayed on the stream (no Serve),
    over several sampling seeds, for the default rule and variants of it, each one change from it."""
    import statistics

    from rayexit.data import load_text_classification
    from rayexit.files import write_json
    from rayexit.serve.guard import GuardConfig

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--thresholds", type=float)
    p.add_argument("--clean-requests", type=int, default=500)
    p.add_argument("--shifted-requests", type=int, default=2500)
    p.add_argument("--texts-per-request", type=int, default=2)
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--sample", type=float, default=0.05)
    p.add_argument("--stream-seed", type=int, default=0)
    p.add_argument("--seeds", default="0-9", help="the guard's sampling seeds, e.g. 0-9 or 1,4")
    p.add_argument("--rules", help="names of the rules to replay, separated by ';' (default: all of them)")
    a = p.parse_args()
    seeds = _seeds(a.seeds)
    test = load_text_classification("atis:test")
    stream = build_stream(test.texts, test.labels, a.clean_requests, a.shifted_requests, a.texts_per_request,
                          a.stream_seed)
    units = stream_units(Path(a.model), a.thresholds, stream)
    rules = {
        "default": GuardConfig(a.target, a.sample),
        "no recent view": GuardConfig(a.target, a.sample, recent=0),
        "no boost": GuardConfig(a.target, a.sample, boost=1.0),
        "no boost, no recent view": GuardConfig(a.target, a.sample, boost=1.0, recent=0),
        "aim 0.25 above": GuardConfig(a.target, a.sample, tighten_margin=0.25),
        "relax margin 0.8": GuardConfig(a.target, a.sample, relax_margin=0.8),
        "relax after 20 checks": GuardConfig(a.target, a.sample, relax_wait=None),
        "thin exits wait for their own evidence": GuardConfig(a.target, a.sample, shift_moves_thin_exits=False),
    }
    if a.rules:
        wanted = [name.strip() for name in a.rules.split(";") if name.strip()]
        unknown = [name for name in wanted if name not in rules]
        if unknown:
            raise SystemExit(f"--rules: unknown {'; '.join(unknown)}; known: {'; '.join(rules)}")
        rules = {name: rules[name] for name in wanted}
    report: dict[str, Any] = {"stream": SHIFT_NAME, "shift_at_request": a.clean_requests,
                              "texts_per_request": a.texts_per_request, "stream_seed": a.stream_seed,
                              "thresholds": units[0].per_layer(units[1].shape[1]), "target": a.target,
                              "sample": a.sample, "seeds": seeds, "rules": {}}
    for name, config in rules.items():
        runs = [replay_rule(units, stream, config, a.clean_requests, seed) for seed in seeds]
        for run in runs:
            for block in run["blocks"]:
                block["target"] = a.target
            run["held_after_reaction"] = held_after_reaction(run["blocks"], a.clean_requests,
                                                             run["first_move_requests_after_shift"],
                                                             run["tightened_at_shift"])
        firsts = [r["first_move_requests_after_shift"] for r in runs]
        reacted = [f for f in firsts if f is not None]
        per_block = [[r["blocks"][k]["guard on"] for r in runs] for k in range(len(runs[0]["blocks"]))]
        summary = {
            "held_after_reaction": sum(r["held_after_reaction"] for r in runs),
            "median_first_move_requests_after_shift": statistics.median(reacted) if reacted else None,
            "first_move_requests_after_shift": firsts,
            "median_agreement_per_block": [round(statistics.median(block), 4) for block in per_block],
            "min_agreement_per_block": [min(block) for block in per_block],
            "guard_off_per_block": [b["guard off"] for b in runs[0]["blocks"]],
        }
        report["rules"][name] = {"summary": summary, "runs": runs}
        print(f"{name}: {summary['held_after_reaction']}/{len(runs)} seeds at or above {a.target} in every block "
              f"after the first move; median first move {summary['median_first_move_requests_after_shift']} "
              f"requests after the shift; median agreement per block {summary['median_agreement_per_block']} "
              f"(guard off {summary['guard_off_per_block']})", flush=True)
    write_json(a.json, report)
    return 0


def _seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-", 1)
        return list(range(int(first), int(last) + 1))
    return [int(x) for x in text.split(",") if x]


if __name__ == "__main__":
    raise SystemExit(main())
