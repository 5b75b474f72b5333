"""`rayexit train`: one training run into a model directory."""

from __future__ import annotations

import argparse

from rayexit.config import METHODS, POOLINGS, train_settings


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
    p.add_argument("--pooling", choices=POOLINGS, help="what sentence exits read (default: chosen from the encoder)")
    p.add_argument("--max-length", type=int)
    p.add_argument("--seed", type=int)
    ray = p.add_argument_group("distributed (Ray Train; both tasks)")
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
    from rayexit.model_dir import check_output_dir
    from rayexit.storage import is_uri
    from rayexit.tasks import task_named
    from rayexit.train.recipe import train_to_directory

    task = task_named(args.task)
    method = check_method(args)
    overrides = {
        "method": method,
        "epochs": args.epochs,
        "max_examples": args.max_examples,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "head_lr": args.head_lr,
        "gamma": args.gamma,
        "temperature": args.temperature,
        "gr_direction": args.gr_direction,
        "head": args.head,
        "pooling": args.pooling,
        "max_length": args.max_length,
        "seed": args.seed,
    }
    settings = train_settings(args.config, overrides)
    task.check_settings(settings)  # here too: a cluster run would otherwise fail only inside its workers
    if not is_uri(args.output):  # a URI is written by Ray at the end; a local folder is checked now
        check_output_dir(args.output)
    where = {"task": task.name, "init": args.init}
    if args.num_workers is not None:
        from rayexit.train.distributed import fit_distributed

        result = fit_distributed(args.model, args.train, args.eval, settings, args.output, ray_options(args), **where)
        print(
            f"trained {task.name} {settings.method} on {args.num_workers} worker(s) in {result.seconds:.1f}s "
            f"({result.steps} steps; {result.wall_seconds:.1f}s with Ray) -> {args.output}"
        )
        print(f"checkpoints and TensorBoard logs: {result.run_path}")
    else:
        _, result = train_to_directory(args.model, args.train, args.eval, settings, args.output, **where)
        print(f"trained {task.name} {settings.method} in {result.seconds:.1f}s ({result.steps} steps) -> {args.output}")
    if result.history and task.exit_key in result.history[-1]:
        print(format_exit_scores(result.history[-1][task.exit_key], task.metric))
    return 0


def check_method(args: argparse.Namespace) -> str:
    """The method for this task, refusing combinations that cannot run (before any work)."""
    from rayexit.errors import RayexitError

    if args.task == "sequence":
        if args.method == "self-sampling" or args.init:
            raise RayexitError("--method self-sampling and --init are for token tasks; add --task token")
        return args.method or "romebert"
    method = args.method or ("self-sampling" if args.init else "joint")
    if method not in ("joint", "self-sampling"):
        raise RayexitError(
            f"--method {method}: token tasks train stage 1 (joint, weighted sum_i i*CE_i / sum_i i) "
            "or stage 2 (self-sampling with --init)"
        )
    if method == "self-sampling" and not args.init:
        raise RayexitError("--method self-sampling: needs --init DIR, a stage-1 token model directory")
    if method != "self-sampling" and args.init:
        raise RayexitError("--init: only with --method self-sampling")
    if args.init and args.model:
        raise RayexitError("--model and --init: give one; stage 2 starts from the --init directory's model")
    return method


def ray_options(args: argparse.Namespace):
    from rayexit.train.distributed import RayOptions

    return RayOptions(
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        storage_path=args.storage_path,
        name=args.name,
        max_failures=args.max_failures,
        checkpoint_every=args.checkpoint_every,
        resume_from=args.resume_from,
        address=args.address,
    )


def format_exit_scores(scores: list[float], metric: str) -> str:
    return "\n".join([f"exit  {metric}"] + [f"{i + 1:>4}  {score:8.4f}" for i, score in enumerate(scores)])
