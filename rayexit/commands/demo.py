"""`rayexit demo`: the whole flow on packaged data, no network.

RomeBERT one-stage training of the packaged MiniLM on the packaged ATIS intents (less a
validation split), an exit policy chosen on that validation split, every exit and the chosen
policy measured on ATIS test, the accuracy/speed-up table printed and drawn as a PNG, and last
the model served with Ray Serve on loopback, asked a few questions, and shut down.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# The demo's settings live in the repository's configs/demo.yaml, the same file a user can copy.
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
VALID_FRACTION = 0.1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, evaluate and plot on the packaged MiniLM + ATIS (no network)")
    p.add_argument("--output", default="runs/demo", help="folder for the model, report and plot")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="training settings (default: configs/demo.yaml)")
    p.add_argument("--epochs", type=float, help="training epochs (default: the config's)")
    p.add_argument("--max-examples", type=int, help="train on the first N utterances only")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (the median is kept)")
    p.add_argument("--no-serve", action="store_true", help="stop after evaluation; do not start Ray Serve")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.config import train_settings
    from rayexit.files import write_json
    from rayexit.model_dir import ModelDir
    from rayexit.plots import plot_curve
    from rayexit.sweep import evaluate, format_report
    from rayexit.tasks import task_named
    from rayexit.train.recipe import train_to_directory
    from rayexit.tune.split import write_tsv

    output = Path(args.output)
    started = time.perf_counter()
    task = task_named("sequence")
    settings = train_settings(args.config, {"epochs": args.epochs, "max_examples": args.max_examples})
    # Policies are chosen on validation carved from ATIS train and reported on ATIS test.
    fit, valid = task.split(task.load("atis:train", settings.max_examples), VALID_FRACTION, settings.seed)
    fit_path = write_tsv(fit, output / "data" / "fit.tsv")
    model_dir = output / "model"
    print(
        f"[1/3] training {settings.method} on packaged MiniLM + {len(fit)} ATIS intents "
        f"({len(valid)} held out for validation) -> {model_dir}",
        flush=True,
    )
    run_, result = train_to_directory("minilm", str(fit_path), None, settings, model_dir)
    print(f"      trained in {result.seconds:.0f}s ({result.steps} steps)", flush=True)

    print("[2/3] choosing an exit policy on validation, measuring it and every exit on ATIS test", flush=True)
    model, tokenizer = run_.model, run_.tokenizer
    test = task.load("atis:test", known=model.labels)
    report = evaluate(
        task,
        model,
        task.encode(tokenizer, test, model.labels, model.exit_config.max_length),
        select_on=task.encode(tokenizer, valid, model.labels, model.exit_config.max_length),
        max_drop=0.01,
        repeats=args.repeats,
    )
    report.update(model=str(model_dir), data="atis:test", select_on=f"atis:train validation ({len(valid)})")
    write_json(output / "eval.json", report)
    plot_curve(report, output / "curve.png", title="RomeBERT MiniLM on ATIS intents (test; chosen on validation)")
    print(format_report(report))
    selected = report["selected"]
    # Serve the chosen policy, exported the way `rayexit tune` exports its best/.
    serve_dir = ModelDir(model_dir).with_policy(model_policy(selected), output / "best", selected).path
    print(f"report -> {output / 'eval.json'}, plot -> {output / 'curve.png'}, served model -> {serve_dir}")
    if not args.no_serve:
        from rayexit.serve.demo import serve_demo

        print("[3/3] serving the model with Ray Serve on 127.0.0.1 and sending a few requests", flush=True)
        serve_demo(serve_dir)
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0


def model_policy(point: dict):
    from rayexit.policy import ExitPolicy

    return ExitPolicy.from_dict(point["policy"])
