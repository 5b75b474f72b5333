"""`rayexit tune`: Ray Tune + Optuna over training settings; exit policies searched on cached exits.

Sentence models: gamma, T and lr, thresholds on cached logits. Token models (`--task token`):
stage-1 and self-sampling settings, then SENTEE/TOKEE, window and threshold on cached word uncertainties.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="search training settings and exit thresholds; export the best model")
    p.add_argument("--model", help="encoder: a folder, a hub name, or `minilm` (packaged)")
    p.add_argument(
        "--task", choices=("sequence", "token"),
        help="sequence (default): one label per text; token: tagging with SENTEE/TOKEE (CoNLL files, `atis`)",
    )
    p.add_argument("--train", help="training data; the validation split used for choosing is carved from it")
    p.add_argument("--valid", help="validation data to choose on, instead of a split carved from --train")
    p.add_argument("--eval", help="the set the final figures are reported on (never used for choosing)")
    p.add_argument("--trials", type=int, help="number of trials (default: the config's, else 8)")
    p.add_argument("--output", help="folder for the experiment, pareto.json/png, best/ and serve.yaml")
    p.add_argument("--config", help="YAML with `train:` (fixed settings) and `tune:` (the search) sections")
    p.add_argument("--max-examples", type=int, help="use the first N examples of --train (before the split)")
    p.add_argument("--max-drop", type=float, help="accuracy drop allowed below the best full depth (0.01 = 1 point)")
    p.add_argument("--objective", choices=("pareto", "within_drop"), help="two objectives, or one with ASHA")
    p.add_argument("--scheduler", choices=("none", "asha"), help="asha stops poor trials (objective within_drop)")
    p.add_argument("--trainer", choices=("distributed", "local"), help="Ray Train (default) or in the trial")
    p.add_argument("--workers", type=int, help="Ray Train workers per trial")
    p.add_argument("--epochs", type=float)
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted `rayexit tune --output DIR`")
    p.add_argument(
        "--storage-path",
        help="where Tune keeps the experiment (trial checkpoints, logs): a shared path or a URI "
        "(s3://, gs://, file://); default DIR/experiment",
    )
    p.add_argument(
        "--address",
        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray on 127.0.0.1 with its dashboard)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.errors import RayexitError
    from rayexit.tune.experiment import experiment_path, load_job, load_sources, output_folder
    from rayexit.tune.run import tune_new, tune_resume
    from rayexit.tune.space import load_tune_config

    if args.resume:
        given = [
            flag
            for flag in ("model", "train", "valid", "eval", "output", "config", "trials", "storage_path", "task")
            if getattr(args, flag)
        ]
        if given:
            flags = ", --".join(flag.replace("_", "-") for flag in given)
            raise RayexitError(f"--resume takes the earlier run's settings; drop --{flags}")
        output = output_folder(args.resume, "--resume")
        _start(args.address, output, load_job(output)[0].config.tune.optuna_db)
        report = tune_resume(output)
    else:
        missing = [flag for flag in ("model", "train", "eval", "output") if not getattr(args, flag)]
        if missing:
            raise RayexitError(f"missing --{', --'.join(missing)} (or --resume DIR to continue a run)")
        if args.max_examples is not None and args.max_examples < 1:
            raise RayexitError(f"--max-examples: got {args.max_examples}, expected a whole number >= 1")
        output = output_folder(args.output)
        config = load_tune_config(
            args.config,
            {"epochs": args.epochs},
            {
                "trials": args.trials,
                "max_drop": args.max_drop,
                "objective": args.objective,
                "scheduler": args.scheduler,
                "trainer": args.trainer,
                "workers": args.workers,
                "task": args.task,
            },
        )
        if args.storage_path:
            experiment_path(output, args.storage_path)  # refuse a bad --storage-path before Ray starts
        # and bad data; prepare_job reads the files again (cheap next to a search, and it keeps that API whole)
        load_sources(config.tune.task, args.train, args.eval, args.valid, args.max_examples)
        _start(args.address, output, config.tune.optuna_db)
        report = tune_new(
            args.model, args.train, args.eval, output, config, args.max_examples, storage_path=args.storage_path,
            valid=args.valid,
        )
    print(format_report(report))
    print(f"best model -> {output}/best ; serve with: serve run {output}/serve.yaml")
    return 0


def _start(address: str | None, output, optuna_db: bool) -> None:
    """Join or start Ray, and say where to watch the search while it runs."""
    from rayexit.tune.experiment import OPTUNA_FILE, connect

    url = connect(address)
    if url:
        print(f"Ray dashboard (this machine only): {url}", flush=True)
    if optuna_db:
        print(f"Optuna study, live: optuna-dashboard sqlite:///{(output / OPTUNA_FILE).resolve()}", flush=True)


def format_report(report: dict) -> str:
    if report.get("task") == "token":
        return format_token_report(report)
    chosen = report["chosen"]
    lines = [
        f"{report['trials']} trial(s) in {report['seconds']:.0f}s; validation split: {report['split']['name']}",
        f"threshold search: {report['threshold_settings_per_second']:.0f} settings/s (slowest trial)",
        f"best full-depth accuracy on eval: {report['best_full_eval_accuracy']:.4f}",
        f"chosen: gamma {chosen['gamma']:.3f}, T {chosen['temperature']:.2f}, lr {chosen['lr']:.2e}, "
        f"{chosen['policy']} {chosen['thresholds']}",
        f"  on eval: accuracy {chosen['accuracy']:.4f} (its full depth {chosen['full_accuracy']:.4f}), "
        f"layer speed-up {chosen['layer_speedup']:.2f}x",
        f"  best/ through the runner: accuracy {report['best_runner_eval']['accuracy']:.4f}, "
        f"layer speed-up {report['best_runner_eval']['layer_speedup']:.2f}x",
    ]
    default = report.get("default")
    if default:
        lines.append(
            f"default trial (the paper's gamma 0.9 and T 3; lr and final weight from `train:`; "
            f"one entropy threshold {default['thresholds']:.4f}): "
            f"accuracy {default['accuracy']:.4f}, layer speed-up {default['layer_speedup']:.2f}x"
        )
    return "\n".join(lines)


def format_token_report(report: dict) -> str:
    chosen = report["chosen"]
    params = ", ".join(f"{k} {v:.3g}" for k, v in sorted(chosen["params"].items()))
    window = f" window {chosen['window']}" if chosen["policy"] == "tokee" else ""
    live, valid = report["best_runner_eval"], report["best_runner_validation"]
    gap = report["replay_minus_live_validation"]
    lines = [
        f"{report['trials']} trial(s) in {report['seconds']:.0f}s; validation: {report['split']['name']}",
        f"exit-setting search: {report['threshold_settings_per_second']:.0f} settings/s (slowest trial)",
        f"best full-depth entity F1 on eval: {report['best_full_eval_f1']:.4f}",
        f"chosen: {params}; {chosen['policy']}{window} threshold {chosen['thresholds']:.4g}",
        f"  on eval (replayed): F1 {chosen['f1']:.4f} (its full depth {chosen['full_f1']:.4f}), "
        f"FLOPs speed-up {chosen['flops_speedup']:.2f}x",
        f"  best/ through the runner: eval F1 {live['f1']:.4f}, FLOPs speed-up {live['flops_speedup']:.2f}x; "
        f"validation F1 {valid['f1']:.4f} (replayed minus live {gap['f1']:+.4f})",
    ]
    default = report.get("default")
    if default:
        lines.append(
            f"default settings, chosen the same way: F1 {default['f1']:.4f}, "
            f"FLOPs speed-up {default['flops_speedup']:.2f}x"
        )
    return "\n".join(lines)
