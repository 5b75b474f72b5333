"""Model directories that are what they claim to be, or a refusal that names the file.

Most damage to a model directory still loads: a flipped byte is just another weight, transformers
builds a tokenizer of special tokens when the vocabulary is gone, and a non-strict state dict
ignores the layers a shortened `config.json` no longer has. Each function here turns one such
case into a one-line error.

At save time the sha256 of every file the model directory holds (backbone config, weights,
tokenizer files) goes into `rayexit.json` under `sha256` (format_version 2); at load time each
file is checked just before it is read. Weights are also checked key by key and shape by shape
against the model the configs describe, and for NaN/inf.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from rayexit.config import HEADS, POOLINGS
from rayexit.errors import RayexitError
from rayexit.reading import SMALL_JSON_LIMIT, read_json

log = logging.getLogger(__name__)

DIGESTS_KEY = "sha256"
DIGESTS_FORMAT = 2  # format_version of a rayexit.json that records digests
KNOWN_FORMATS = (1, DIGESTS_FORMAT)
BACKBONE_CONFIG = "config.json"
TASKS = ("sequence", "token")
# Any one of these lets transformers rebuild the real vocabulary; without them it silently
# builds a tokenizer that knows only its special tokens (5 ids for BERT).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Buffers transformers rebuilds from the config; older versions saved them, newer ones do not.
DERIVED_BUFFERS = ("position_ids", "token_type_ids")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_warned: set[str] = set()


# -- digests -------------------------------------------------------------------------------


def file_digest(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def with_digests(record: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """`record` plus the sha256 of every file now in `directory` (write rayexit.json after the rest)."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    digests = {p.relative_to(directory).as_posix(): file_digest(p) for p in files}
    return {**record, "format_version": DIGESTS_FORMAT, DIGESTS_KEY: digests}


def read_record(path: str | Path) -> dict[str, Any]:
    """rayexit.json as a dict without its digests; binary, deep, huge or non-object files refused."""
    data = read_json(path, SMALL_JSON_LIMIT)
    if not isinstance(data, dict):
        raise RayexitError(f"{path}: expected a JSON object (task, labels, ...), got {type(data).__name__}")
    _digests_of(data, path)  # a damaged digest map is refused even by readers that only want labels
    return {k: v for k, v in data.items() if k != DIGESTS_KEY}


def recorded_digests(directory: str | Path, record_name: str) -> dict[str, str] | None:
    """The digests rayexit.json holds, or None for a directory written before digests existed."""
    path = Path(directory) / record_name
    if not path.is_file():
        raise RayexitError(f"{directory}: not a rayexit model directory (no {record_name})")
    return _digests_of(read_json(path, SMALL_JSON_LIMIT), path)


def _digests_of(data: Any, path: str | Path) -> dict[str, str] | None:
    if not isinstance(data, dict):
        raise RayexitError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version not in KNOWN_FORMATS or isinstance(version, bool):
        raise RayexitError(
            f"{path}: format_version {version!r}, expected one of {', '.join(map(str, KNOWN_FORMATS))} "
            "(written by a newer rayexit, or damaged)"
        )
    if version == 1 and DIGESTS_KEY not in data:
        return None
    digests = data.get(DIGESTS_KEY)
    if not isinstance(digests, dict) or not digests:
        # An empty map would check nothing; a directory that claims digests must carry them.
        raise RayexitError(f"{path}: `{DIGESTS_KEY}` must map each file to its sha256, got {digests!r:.80}")
    for name, digest in digests.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest) or Path(name).is_absolute() or ".." in name:
            raise RayexitError(f"{path}: `{DIGESTS_KEY}` entry {name!r}: expected a file name and 64 hex digits")
    return digests


def check_files(directory: str | Path, names: list[str], record_name: str) -> None:
    """Each named file exists and has the digest rayexit.json recorded for it at save time."""
    digests = recorded_digests(directory, record_name)
    if digests is None:
        _warn_unchecked(directory, record_name)
        return
    for name in names:
        if name not in digests:
            raise RayexitError(f"{Path(directory) / record_name}: records no sha256 for {name}; the record is damaged")
        _check_one(Path(directory), name, digests[name], record_name)


def check_tokenizer_digests(directory: str | Path, record_name: str) -> None:
    """The tokenizer's files: everything recorded that is neither the backbone config nor weights."""
    digests = recorded_digests(directory, record_name)
    if digests is None:
        _warn_unchecked(directory, record_name)
        return
    for name, digest in digests.items():
        if name != BACKBONE_CONFIG and not name.endswith(".safetensors"):
            _check_one(Path(directory), name, digest, record_name)


def _check_one(directory: Path, name: str, digest: str, record_name: str) -> None:
    path = directory / name
    if not path.is_file():
        raise RayexitError(f"{path}: missing; {record_name} lists it as part of the model directory")
    if file_digest(path) != digest:
        raise RayexitError(
            f"{path}: sha256 differs from the one {record_name} recorded at save time; "
            "the file was changed or damaged after saving"
        )


def _warn_unchecked(directory: str | Path, record_name: str) -> None:
    # Directories written before digests existed load with a warning rather than a refusal:
    # they hold trained models their users have no other copy of, and every other check here
    # (strict keys and shapes, finite weights, a real tokenizer, settings in range) still runs
    # on them, so only damage that keeps shapes and values plausible goes unseen. Digests guard
    # against damage, not against someone editing files on purpose, who could rewrite them too.
    key = str(Path(directory).resolve())
    if key not in _warned:
        _warned.add(key)
        log.warning(
            "%s: written before rayexit recorded file digests (no %s in %s); its files cannot be checked "
            "for damage. Save it again (load and save_pretrained) to record them",
            directory,
            DIGESTS_KEY,
            record_name,
        )


# -- exit config ---------------------------------------------------------------------------


def check_exit_config(config: Any, path: str | Path) -> None:
    """Types and ranges of rayexit.json's fields; the backbone-dependent bounds come later."""
    if config.task not in TASKS:
        raise RayexitError(f"{path}: task {config.task!r}, expected one of {', '.join(TASKS)}")
    labels = config.labels
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise RayexitError(f"{path}: labels must be a non-empty list of non-empty strings, got {labels!r:.80}")
    if len(set(labels)) != len(labels):
        twice = sorted({x for x in labels if labels.count(x) > 1})
        raise RayexitError(f"{path}: labels must be distinct; repeated: {', '.join(twice[:5])}")
    # Token models always have linear heads on every word-piece; head and pooling shape only sentence models.
    if config.task == "sequence" and config.head not in HEADS:
        raise RayexitError(f"{path}: head {config.head!r}, expected one of {', '.join(HEADS)}")
    if config.task == "sequence" and config.pooling not in POOLINGS:
        raise RayexitError(f"{path}: pooling {config.pooling!r}, expected one of {', '.join(POOLINGS)}")
    dropout = config.dropout
    if not _real(dropout) or not 0.0 <= dropout < 1.0:
        raise RayexitError(f"{path}: dropout {dropout!r}, expected a number in [0, 1)")
    if not isinstance(config.max_length, int) or isinstance(config.max_length, bool) or config.max_length < 2:
        raise RayexitError(f"{path}: max_length {config.max_length!r}, expected a whole number >= 2")
    if not isinstance(config.method, str):
        raise RayexitError(f"{path}: method {config.method!r}, expected a string")
    if not isinstance(config.extra, dict):
        raise RayexitError(f"{path}: extra must be an object, got {type(config.extra).__name__}")


def position_limit(backbone: torch.nn.Module) -> int | None:
    """How many tokens the backbone's position embeddings can place, or None if it has no such limit."""
    positions = getattr(backbone.config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    # RoBERTa-style embeddings number positions from padding_idx + 1, so two slots are never used.
    padding_idx = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    return positions - (padding_idx + 1) if isinstance(padding_idx, int) else positions


def check_max_length(max_length: int, backbone: torch.nn.Module, path: str | Path) -> None:
    limit = position_limit(backbone)
    if limit is not None and max_length > limit:
        raise RayexitError(
            f"{path}: max_length {max_length} is more than the {limit} positions the backbone has "
            f"({BACKBONE_CONFIG} max_position_embeddings {backbone.config.max_position_embeddings}); "
            f"expected at most {limit}"
        )


# -- weights -------------------------------------------------------------------------------


def check_state(state: dict[str, torch.Tensor], model: torch.nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `state` that `model` takes, after refusing any that do not fit it exactly.

    Strict in both directions: a tensor the model lacks means the configs describe a smaller
    model than was saved (`num_hidden_layers` edited down, fewer labels), and serving part of
    the saved model would give wrong answers without an error.
    """
    expected = model.state_dict()
    shape_note = _shape_note(model)
    missing = [k for k in expected if k not in state and not k.endswith(DERIVED_BUFFERS)]
    if missing:
        raise RayexitError(f"{path}: no tensor for {_some(missing)}; the weights do not fit {shape_note}")
    unexpected = [k for k in state if k not in expected and not k.endswith(DERIVED_BUFFERS)]
    if unexpected:
        raise RayexitError(f"{path}: tensors the model lacks: {_some(unexpected)}; they do not fit {shape_note}")
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise RayexitError(
                f"{path}: {key} has shape {list(tensor.shape)}, expected {list(expected[key].shape)} from {shape_note}"
            )
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise RayexitError(f"{path}: {key} holds {bad} non-finite value(s) (NaN or inf); the weights are damaged")
    return {k: v for k, v in state.items() if k in expected}


def _shape_note(model: torch.nn.Module) -> str:
    config = getattr(getattr(model, "backbone", None), "config", None)
    layers = getattr(config, "num_hidden_layers", "?")
    labels = getattr(getattr(model, "exit_config", None), "labels", None)
    counted = f", {len(labels)} labels in rayexit.json" if labels is not None else ""
    return f"the model its configs describe ({BACKBONE_CONFIG} num_hidden_layers {layers}{counted})"


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


# -- tokenizer and encoder sources -----------------------------------------------------------


def check_tokenizer_source(name_or_path: str, record_name: str) -> None:
    """A local tokenizer folder must hold a vocabulary (and match its digests in a model directory)."""
    path = Path(name_or_path)
    if not path.exists():
        return  # a hub name: the hub's own errors name it
    if not path.is_dir():
        raise RayexitError(f"{path}: is a file; expected a model folder, a hub name, or `minilm`")
    if (path / record_name).is_file():
        check_tokenizer_digests(path, record_name)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise RayexitError(
            f"{path}: no tokenizer (expected tokenizer.json or a vocabulary such as vocab.txt); without one "
            "transformers would build a tokenizer that knows only its special tokens"
        )


def check_tokenizer_fits(tokenizer: Any, name_or_path: str) -> None:
    """Every id the tokenizer can produce must have a row in the encoder's embeddings."""
    config_path = Path(name_or_path) / BACKBONE_CONFIG
    if not config_path.is_file():
        return
    config = read_json(config_path, SMALL_JSON_LIMIT)
    if isinstance(config, dict) and isinstance(config.get("backbone"), dict):
        config = config["backbone"]  # a rayexit-multi-exit config.json nests the encoder's (rayexit.models.hf)
    vocab_size = config.get("vocab_size") if isinstance(config, dict) else None
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise RayexitError(
            f"{name_or_path}: the tokenizer has {len(tokenizer)} tokens but {BACKBONE_CONFIG} has vocab_size "
            f"{vocab_size}; expected a tokenizer made for this encoder"
        )


def check_encoder_source(name_or_path: str) -> None:
    """Refuse a local encoder that exists only as pickled weights: nothing is unpickled here."""
    path = Path(name_or_path)
    if not path.exists():
        return  # a hub name; from_pretrained is asked for safetensors only
    if not path.is_dir():
        raise RayexitError(f"{path}: is a file; expected a model folder, a hub name, or `minilm`")
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
    if pickled:
        raise RayexitError(
            f"{path}: holds only pickled weights ({', '.join(pickled[:3])}); rayexit reads safetensors and never "
            "unpickles a file. Convert it where you trust it: AutoModel.from_pretrained(folder).save_pretrained(folder)"
        )
    raise RayexitError(f"{path}: no model.safetensors; expected an encoder folder with config.json and safetensors")


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
