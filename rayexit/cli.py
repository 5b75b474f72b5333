"""`rayexit <command>`: each command lives in rayexit/commands/<name>.py with `register()`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from rayexit.errors import RayexitError

# Each module adds its sub-parser and sets `func`; a new command is one more name here.
COMMANDS = ("train", "eval", "bench", "demo", "tune", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayexit", description="Early-exit BERT on Ray: train, eval, tune, serve")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"rayexit.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RayexitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
