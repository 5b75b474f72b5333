"""`rayexit bench train`: data-parallel throughput and RomeBERT's step cost against joint's.

Two measurements on the packaged MiniLM and an SST-2 slice:

- step time, in this process: one optimizer step of `joint`, of `romebert` without the
  projection (`gr_direction=none`: one backward pass) and of `romebert` with it (two backward
  passes, the projection, then the update), each the median of `--steps` timed steps after
  warm-up, on the same fixed batch, taking turns step by step. Target: romebert <= 1.5x joint.
- samples/s with 1 and 2 Ray Train workers (1 CPU each) at the same global batch, measured
  inside the training loop (Ray start-up and checkpoint writing excluded), with each count's
  step time and its overhead against perfect scaling (`step_s * workers / step_s at 1 worker - 1`).

`--task token` measures the token task's stage 1 (`joint` on CoNLL-2003 train.txt sentences)
on Ray Train instead; the step-time comparison is a sentence-method one and is skipped there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rayexit.bench.common import add_threads_option, datasets_dir, machine_info, use_threads
from rayexit.config import TrainSettings
from rayexit.files import write_json

TARGET_RATIO = 1.5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="samples/s for 1 and 2 Ray Train workers; romebert vs joint step time")
    p.add_argument("--json", required=True, help="where to write the figures")
    p.add_argument("--datasets", help="the shared datasets folder (default ../shared/datasets)")
    p.add_argument("--model", default="minilm", help="encoder (default: the packaged MiniLM)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (split over the workers)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per method (after 3 warm-up steps)")
    p.add_argument("--train-examples", type=int, default=256, help="examples per throughput run (one epoch)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts for throughput")
    p.add_argument("--skip-ray", action="store_true", help="only the in-process step-time comparison")
    add_threads_option(p, default=1, why="torch threads for the step-time comparison (default 1: less thrown off "
                                         "by other load on a shared machine)")
    p.add_argument("--task", choices=("sequence", "token"), default="sequence",
                   help="token: stage-1 throughput on CoNLL-2003 sentences (no step-time comparison)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.errors import RayexitError

    token = args.task == "token"
    if token and args.skip_ray:
        raise RayexitError("--skip-ray: the token task has only the Ray Train throughput run; drop one of the two")
    if token:
        train_source = str(datasets_dir(args.datasets) / "conll2003" / "train.txt")
        data = f"CoNLL-2003 train.txt, first {args.train_examples} sentences, max_length {args.max_length}"
    else:
        train_source = str(datasets_dir(args.datasets) / "sst2" / "train.tsv")
        data = f"SST-2 train.tsv, first {args.train_examples} examples, max_length {args.max_length}"
    base = TrainSettings(
        batch_size=args.batch_size, max_length=args.max_length, max_examples=args.train_examples, epochs=1.0, lr=1e-4,
        method="joint" if token else "romebert",
    )
    use_threads(args.threads)
    report: dict = {"benchmark": "train", "task": args.task, "model": args.model, "data": data,
                    "global_batch": args.batch_size}
    if not token:
        step_times = measure_step_times(args.model, train_source, base, args.steps)
        ratio = step_times["romebert"]["median_s"] / step_times["joint"]["median_s"]
        hidden = step_times["romebert_hidden"]["median_s"] / step_times["joint"]["median_s"]
        per_example = step_times["romebert_hidden_per_example"]["median_s"] / step_times["joint"]["median_s"]
        print(f"romebert / joint step time: {ratio:.2f}x (target <= {TARGET_RATIO}x); "
              f"with gr_scope hidden: {hidden:.2f}x, hidden_per_example: {per_example:.2f}x", flush=True)
        report.update(step_time=step_times, romebert_over_joint=ratio, romebert_hidden_over_joint=hidden,
                      romebert_hidden_per_example_over_joint=per_example,
                      target_ratio=TARGET_RATIO, target_met=ratio <= TARGET_RATIO)
    throughput = {}
    if not args.skip_ray:
        for count in [int(c) for c in args.workers.split(",") if c.strip()]:
            throughput[str(count)] = measure_throughput(args.model, train_source, base, count, args.task)
            print(f"{count} worker(s): {throughput[str(count)]['samples_per_s']:.1f} samples/s, "
                  f"{throughput[str(count)]['step_s'] * 1000:.0f} ms/step", flush=True)
        add_scaling_overhead(throughput)
    report.update(throughput=throughput, machine=machine_info())
    write_json(args.json, report)
    print(f"wrote {args.json}")
    return 0


def add_scaling_overhead(throughput: dict[str, dict]) -> None:
    """Each count's step time against perfect scaling from 1 worker (0: N workers take 1/N of the time)."""
    one = throughput.get("1")
    for figures in throughput.values():
        if one is not None:
            figures["overhead_vs_perfect_scaling"] = figures["step_s"] * figures["workers"] / one["step_s"] - 1


# What `measure_step_times` compares, each a change from the base settings.
STEP_VARIANTS = {
    "joint": {"method": "joint"},
    "romebert_no_projection": {"method": "romebert", "gr_direction": "none"},
    # the paper's projection on the parameters: two backward passes (pinned: not the default scope)
    "romebert": {"method": "romebert", "gr_direction": "reverse", "gr_scope": "encoder"},
    # the projection on the hidden states, one backward pass (docs/romebert/real-budget.md)
    "romebert_hidden": {"method": "romebert", "gr_direction": "final", "gr_scope": "hidden"},
    "romebert_hidden_per_example": {"method": "romebert", "gr_direction": "final", "gr_scope": "hidden_per_example"},
}


def measure_step_times(model_name: str, train_source: str, base: TrainSettings, steps: int) -> dict:
    """Median wall-clock of one full optimizer step per variant, on one fixed batch.

    The variants take turns step by step (not one block each), so load from other processes
    on a shared machine hits them alike and the ratios stay comparable.
    """
    from rayexit.data.encode import iterate_batches
    from rayexit.train.loop import apply_gradients, make_optimizer
    from rayexit.train.recipe import prepare
    from rayexit.train.steps import build_stages

    run = prepare(model_name, train_source, None, TrainSettings.from_dict({**base.to_dict(), "dropout": 0.0}))
    for module in run.model.modules():  # the backbone's own dropout too: same work every step
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    run.model.train()
    ids, mask, labels = next(iterate_batches(run.train_data, base.batch_size))
    plans = {}
    for label, change in STEP_VARIANTS.items():
        settings = TrainSettings.from_dict({**base.to_dict(), **change})
        stage = build_stages(run.model, settings)[0]
        plans[label] = (settings, stage, stage.step, make_optimizer(stage, settings, steps + 3))
    times: dict[str, list[float]] = {label: [] for label in STEP_VARIANTS}
    conflicts: dict[str, list] = {label: [] for label in STEP_VARIANTS}
    for index in range(steps + 3):
        for label, (settings, stage, step, (optimizer, scheduler)) in plans.items():
            start = time.perf_counter()
            flat, _, combine = step(run.model, (ids, mask, labels), stage.params, settings, 0)
            grads, conflict = combine(flat)
            apply_gradients(stage.params, grads, optimizer, scheduler)
            if index >= 3:
                times[label].append(time.perf_counter() - start)
                conflicts[label].append(conflict)
    out = {}
    for label in STEP_VARIANTS:
        flags = conflicts[label]
        out[label] = {
            "median_s": statistics.median(times[label]),
            "min_s": min(times[label]),
            "steps": steps,
            "batch": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]),
            "conflict_rate": None if flags[0] is None else sum(flags) / len(flags),
            "torch_threads": torch.get_num_threads(),
        }
        print(f"{label}: {out[label]['median_s'] * 1000:.0f} ms/step", flush=True)
    return out


def measure_throughput(model_name: str, train_source: str, base: TrainSettings, workers: int,
                       task: str = "sequence") -> dict:
    import tempfile

    from rayexit.train.distributed import fit_prepared
    from rayexit.train.recipe import prepare

    if base.batch_size % workers:
        from rayexit.errors import RayexitError

        raise RayexitError(f"--batch-size {base.batch_size}: does not split evenly over {workers} workers")
    per_worker = base.batch_size // workers
    settings = TrainSettings.from_dict({**base.to_dict(), "batch_size": per_worker})
    run = prepare(model_name, train_source, None, settings, task=task)
    with tempfile.TemporaryDirectory(prefix="rayexit-bench-train-") as storage:
        result = fit_prepared(
            run, settings, num_workers=workers, storage_path=storage, show_progress=False, num_to_keep=1
        )
    loop_seconds = result.history[-1]["seconds"]  # epoch end, before the checkpoint is written
    samples = result.steps * base.batch_size
    return {
        "workers": workers,
        "method": settings.method,
        "per_worker_batch": settings.batch_size,
        "steps": result.steps,
        "samples": samples,
        "loop_seconds": loop_seconds,
        "step_s": loop_seconds / max(result.steps, 1),
        "samples_per_s": samples / loop_seconds,
        "wall_seconds_with_ray": result.wall_seconds,
        "cpus_per_worker": 1,
    }
