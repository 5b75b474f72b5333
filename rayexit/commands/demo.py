"""`rayexit demo`: the whole flow on packaged data, no network.

RomeBERT one-stage training of the packaged MiniLM on the packaged ATIS intents, then every
exit evaluated on ATIS test, the accuracy/speed-up table printed and drawn as a PNG, and last
the model served with Ray Serve on loopback, asked a few questions, and shut down.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# The demo's settings live in the repository's configs/demo.yaml, the same file a user can copy.
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, evaluate and plot on the packaged MiniLM + ATIS (no network)")
    p.add_argument("--output", default="runs/demo", help="folder for the model, report and plot")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="training settings (default: configs/demo.yaml)")
    p.add_argument("--epochs", type=float, help="training epochs (default: the config's)")
    p.add_argument("--max-examples", type=int, help="train on the first N utterances only")
    p.add_argument("--repeats", type=int, default=2, help="timing runs per curve point")
    p.add_argument("--no-serve", action="store_true", help="stop after evaluation; do not start Ray Serve")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.config import train_settings
    from rayexit.evaluate import evaluate_sequence_model, format_table, summarize
    from rayexit.files import write_json
    from rayexit.plots import plot_curve
    from rayexit.train.recipe import train_to_directory

    output = Path(args.output)
    started = time.perf_counter()
    settings = train_settings(args.config, {"epochs": args.epochs, "max_examples": args.max_examples})
    model_dir = output / "model"
    print(f"[1/3] training {settings.method} on packaged MiniLM + ATIS intents -> {model_dir}", flush=True)
    run_, result = train_to_directory("minilm", "atis:train", "atis:test", settings, model_dir)
    print(f"      trained in {result.seconds:.0f}s ({result.steps} steps)", flush=True)

    print("[2/3] evaluating every exit and sweeping thresholds on ATIS test", flush=True)
    report = evaluate_sequence_model(run_.model, run_.eval_data, batch_size=32, repeats=args.repeats)
    report.update(model=str(model_dir), data="atis:test", summary=summarize(report))
    write_json(output / "eval.json", report)
    plot_curve(report, output / "curve.png", title="RomeBERT MiniLM on ATIS intents (test)")
    print(format_table(report))
    best = report["summary"]["best_wallclock_point"]
    serve_dir = model_dir
    if best:
        from rayexit.config import ExitPolicy
        from rayexit.tune.export import export_model

        # Serve the fastest policy that stays within 1 point, as `rayexit tune` would export it.
        serve_dir = export_model(model_dir, output / "best", ExitPolicy(best["policy"], best["threshold"]), best)
        print(
            f"fastest within 1 point of full depth: {best['policy']} {best['threshold']}: accuracy "
            f"{best['accuracy']:.4f}, {best['layer_speedup']:.2f}x fewer layers, "
            f"{best['wallclock_speedup']:.2f}x faster"
        )
    print(f"report -> {output / 'eval.json'}, plot -> {output / 'curve.png'}")
    if not args.no_serve:
        from rayexit.serve.demo import serve_demo

        print("[3/3] serving the model with Ray Serve on 127.0.0.1 and sending a few requests", flush=True)
        serve_demo(serve_dir)
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0
