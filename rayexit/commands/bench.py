"""`rayexit bench <name>`: the benchmarks behind the README's tables, one module each."""

from __future__ import annotations

import argparse
import importlib

# rayexit/bench/<name>.py defines register(sub); a new benchmark is one more name here.
BENCHMARKS = ("exit", "revalidate", "token", "train", "tune", "serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark and write its figures as JSON")
    inner = p.add_subparsers(dest="benchmark", required=True)
    for name in BENCHMARKS:
        importlib.import_module(f"rayexit.bench.{name}").register(inner)
