"""`rayexit eval`: per-exit accuracy and the accuracy/speed-up curve of a model directory."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate every exit and sweep exit thresholds")
    p.add_argument("--model", required=True, help="a model directory written by `rayexit train`")
    p.add_argument("--data", required=True, help="evaluation data (file, `atis:test`, or hub dataset)")
    p.add_argument("--json", required=True, help="where to write the report")
    p.add_argument("--plot", help="PNG of accuracy against speed-up")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timing runs per point; the median is kept")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayexit.models import read_exit_config

    if read_exit_config(args.model).task == "token":
        from rayexit.evaluate_token import run_token_eval

        return run_token_eval(args.model, args.data, args.json, args.plot, args.batch_size)
    from rayexit.data import encode_examples, load_text_classification
    from rayexit.evaluate import evaluate_sequence_model, format_table
    from rayexit.files import write_json
    from rayexit.models import MultiExitForSequenceClassification, load_tokenizer
    from rayexit.plots import plot_curve

    model = MultiExitForSequenceClassification.from_pretrained(args.model)
    tokenizer = load_tokenizer(args.model)
    examples = load_text_classification(args.data)
    if examples.origin.startswith("atis:"):
        from rayexit.train.recipe import keep_known_labels

        # as in training: ATIS's test split has intents its train split lacks
        examples = keep_known_labels(examples, model.labels)
    data = encode_examples(tokenizer, examples, model.labels, model.exit_config.max_length)
    report = evaluate_sequence_model(model, data, args.batch_size, repeats=args.repeats)
    report["model"] = str(args.model)
    report["data"] = args.data
    write_json(args.json, report)
    print(format_table(report))
    if args.plot:
        plot_curve(report, args.plot, title=f"{args.model} on {args.data}")
        print(f"plot -> {args.plot}")
    print(f"report -> {args.json}")
    return 0
