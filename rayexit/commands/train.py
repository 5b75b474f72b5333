"""`rayexit train`: one training run into a model directory."""

from __future__ import annotations

import argparse

from rayexit.config import METHODS, train_settings
from rayexit.evaluate import format_exit_accuracies


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a multi-exit model")
    p.add_argument("--model", required=True, help="encoder: a folder, a hub name, or `minilm` (packaged)")
    p.add_argument("--train", required=True, help="TSV/CSV/JSONL file, `atis`, or a hub dataset like glue/sst2")
    p.add_argument("--eval", help="evaluation data, same kinds as --train")
    p.add_argument("--method", choices=METHODS, help="training method (default: romebert)")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.train.recipe import train_to_directory

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
    _, result = train_to_directory(args.model, args.train, args.eval, settings, args.output)
    print(f"trained {settings.method} in {result.seconds:.1f}s ({result.steps} steps) -> {args.output}")
    last = result.history[-1]
    if "exit_accuracy" in last:
        print(format_exit_accuracies(last["exit_accuracy"]))
    return 0
