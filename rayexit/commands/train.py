"""`rayexit train`: one training run into a model directory."""

from __future__ import annotations

import argparse

from rayexit.config import METHODS, train_settings
from rayexit.evaluate import format_exit_accuracies


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a multi-exit model")
    p.add_argument("--model", help="encoder: a folder, a hub name, or `minilm` (packaged); not with --init")
    p.add_argument(
        "--task", choices=("sequence", "token"), default="sequence",
        help="sequence: one label per text; token: one tag per word (CoNLL files, `atis` slots, hub tokens/tags)",
    )
    p.add_argument("--init", help="token task, --method self-sampling: the stage-1 model directory to start from")
    p.add_argument("--train", required=True, help="TSV/CSV/JSONL file, `atis`, or a hub dataset like glue/sst2")
    p.add_argument("--eval", help="evaluation data, same kinds as --train")
    p.add_argument(
        "--method", choices=METHODS,
        help="training method (default: romebert; token task: stage-1 joint, or self-sampling with --init)",
    )
    p.add_argument("--epochs", type=float)
    p.add_argument("--output", required=True, help="model directory to write")
    p.add_argument("--config", help="YAML file; its `train:` section holds the settings")
    p.add_argument("--max-examples", type=int, help="use the first N training examples")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--head-lr", type=float)
    p.add_argument("--gamma", type=float, help="distillation weight (romebert)")
    p.add_argument("--temperature", type=float, help="distillation temperature (romebert)")
    p.add_argument("--gr-direction", choices=("reverse", "final", "none"), help="gradient projection leader")
    p.add_argument("--head", choices=("pooler", "shared-pooler"))
    p.add_argument("--max-length", type=int)
    p.add_argument("--seed", type=int)
    ray = p.add_argument_group("distributed (Ray Train; sequence task)")
    ray.add_argument("--num-workers", type=int, help="train data-parallel with N Ray Train workers")
    ray.add_argument("--use-gpu", action="store_true", help="one GPU per worker, bf16 autocast where supported")
    ray.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0)
    ray.add_argument("--storage-path", help="where checkpoints go (default: Ray's ~/ray_results)")
    ray.add_argument("--name", help="run name; a run started again with the same name and storage resumes")
    ray.add_argument("--resume-from", help="a checkpoint directory to start from")
    ray.add_argument("--max-failures", type=int, default=0, help="worker-group restarts from the latest checkpoint")
    ray.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (default: each epoch)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.errors import RayexitError
    from rayexit.train.recipe import train_to_directory

    if args.task == "token":
        if args.num_workers is not None:
            raise RayexitError("--num-workers: distributed training is for the sequence task only")
        return run_token(args)
    if args.method == "self-sampling" or args.init:
        raise RayexitError("--method self-sampling and --init are for token tasks; add --task token")
    if not args.model:
        raise RayexitError("--model: required (an encoder folder, a hub name, or `minilm`)")
    overrides = {
        "method": args.method,
        "epochs": args.epochs,
        "max_examples": args.max_examples,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "head_lr": args.head_lr,
        "gamma": args.gamma,
        "temperature": args.temperature,
        "gr_direction": args.gr_direction,
        "head": args.head,
        "max_length": args.max_length,
        "seed": args.seed,
    }
    settings = train_settings(args.config, overrides)
    if args.num_workers is not None:
        return run_distributed(args, settings)
    _, result = train_to_directory(args.model, args.train, args.eval, settings, args.output)
    print(f"trained {settings.method} in {result.seconds:.1f}s ({result.steps} steps) -> {args.output}")
    last = result.history[-1]
    if "exit_accuracy" in last:
        print(format_exit_accuracies(last["exit_accuracy"]))
    return 0


def run_distributed(args: argparse.Namespace, settings) -> int:
    from rayexit.train.distributed import fit_distributed

    result = fit_distributed(
        args.model,
        args.train,
        args.eval,
        settings,
        args.output,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        storage_path=args.storage_path,
        name=args.name,
        max_failures=args.max_failures,
        checkpoint_every=args.checkpoint_every,
        cpus_per_worker=args.cpus_per_worker,
        resume_from=args.resume_from,
        address=args.address,
    )
    print(
        f"trained {settings.method} on {args.num_workers} worker(s) in {result.seconds:.1f}s "
        f"({result.steps} steps; {result.wall_seconds:.1f}s with Ray) -> {args.output}"
    )
    print(f"checkpoints and TensorBoard logs: {result.run_path}")
    if result.history and "exit_accuracy" in result.history[-1]:
        print(format_exit_accuracies(result.history[-1]["exit_accuracy"]))
    return 0


def run_token(args: argparse.Namespace) -> int:
    from rayexit.errors import RayexitError
    from rayexit.train.token_recipe import train_token_to_directory

    method = args.method or ("self-sampling" if args.init else "joint")
    if method == "self-sampling" and not args.init:
        raise RayexitError("--method self-sampling: needs --init DIR, a stage-1 token model directory")
    if method not in ("joint", "pabee", "self-sampling"):
        raise RayexitError(
            f"--method {method}: token tasks train stage 1 (joint, weighted sum_i i*CE_i / sum_i i) "
            "or stage 2 (self-sampling with --init)"
        )
    if method != "self-sampling" and args.init:
        raise RayexitError("--init: only with --method self-sampling")
    if args.init and args.model:
        raise RayexitError("--model and --init: give one; stage 2 starts from the --init directory's model")
    overrides = {
        "method": "self-sampling" if method == "self-sampling" else "joint",
        "epochs": args.epochs,
        "max_examples": args.max_examples,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "head_lr": args.head_lr,
        "max_length": args.max_length,
        "seed": args.seed,
    }
    settings = train_settings(args.config, overrides)
    _, result = train_token_to_directory(args.model, args.train, args.eval, settings, args.output, init=args.init)
    print(f"trained token {settings.method} in {result.seconds:.1f}s ({result.steps} steps) -> {args.output}")
    last = result.history[-1]
    if "exit_f1" in last:
        print("\n".join(["exit  F1"] + [f"{i + 1:>4}  {f:6.4f}" for i, f in enumerate(last["exit_f1"])]))
    return 0
