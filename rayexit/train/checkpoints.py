"""Training checkpoints: a model directory plus what it takes to resume (optimizer, schedule, step).

A checkpoint directory is a complete model directory (`rayexit eval` can read it) with two more
files: `optimizer.safetensors` (the optimizer's tensors) and `train_state.json` (everything
else: the loop position, the scheduler, the history so far, and sha256 digests of the weight
files). `train_state.json` is written last and its digests are checked on load, so a directory
that was cut off while being written is refused instead of resumed from. No pickle is involved.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rayexit.errors import RayexitError
from rayexit.files import write_atomic, write_json
from rayexit.integrity import file_digest
from rayexit.model_dir import WEIGHTS_FILE, load_weights
from rayexit.reading import one_line, read_json
from rayexit.train.loop import LoopState

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Settings read only once training is over (the exit policy saved with the model) or only for the
# log: a checkpoint resumes under other values of these, because the steps it continues are the
# same. It also lets a checkpoint that recorded the then-default policy resume now that an unset
# policy is left for the task to choose.
NOT_TRAINING_SETTINGS = frozenset({"policy", "log_every"})


def write_checkpoint(directory: str | Path, model, state: LoopState, tokenizer=None, extra: dict | None = None) -> Path:
    """Write model + resume state into `directory` (created; must not hold another checkpoint)."""
    directory = Path(directory)
    model.save_pretrained(directory, tokenizer)
    tensors, optimizer_meta = _split_optimizer(state.optimizer)
    if tensors:
        write_atomic(directory / OPTIMIZER_FILE, lambda tmp: save_file(tensors, str(tmp)))
    digested = [WEIGHTS_FILE] + ([OPTIMIZER_FILE] if tensors else [])
    record = {
        "format_version": FORMAT_VERSION,
        "stage": state.stage,
        "step": state.step,
        "epoch": state.epoch,
        "batch": state.batch,
        "steps_before": state.steps_before,
        "seconds": state.seconds,
        "optimizer": optimizer_meta,
        "scheduler": state.scheduler,
        "history": state.history,
        "conflicts": state.conflicts,
        "epoch_losses": state.epoch_losses,
        "extra": extra or {},
        "sha256": {name: file_digest(directory / name) for name in digested},
    }
    write_json(directory / STATE_FILE, record)
    return directory


def settings_differences(recorded: dict | None, current: dict) -> list[str]:
    """The settings under which resuming would train differently, as `name: recorded -> current`."""
    recorded = recorded if isinstance(recorded, dict) else {}
    names = sorted((set(recorded) | set(current)) - NOT_TRAINING_SETTINGS)
    return [f"{name}: {recorded.get(name)!r} -> {current.get(name)!r}"
            for name in names if recorded.get(name) != current.get(name)]


def read_checkpoint(directory: str | Path, model) -> tuple[LoopState, dict]:
    """Load the weights into `model` and return the loop state and the `extra` dict."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise RayexitError(f"{directory}: not a training checkpoint (no {STATE_FILE}); it may have been cut off")
    record = read_json(path)
    _check_record(record, path)
    for name, digest in record["sha256"].items():
        if not (directory / name).is_file() or file_digest(directory / name) != digest:
            raise RayexitError(f"{directory / name}: missing or does not match {STATE_FILE}; the checkpoint is damaged")
    load_weights(model, directory)
    optimizer = None
    if record["optimizer"] is not None:
        optimizer = _join_optimizer(_read_optimizer(directory / OPTIMIZER_FILE), record["optimizer"], path)
    state = LoopState(
        stage=record["stage"],
        step=record["step"],
        epoch=record["epoch"],
        batch=record["batch"],
        steps_before=record["steps_before"],
        seconds=record["seconds"],
        optimizer=optimizer,
        scheduler=record["scheduler"],
        history=record["history"],
        conflicts=record["conflicts"],
        epoch_losses=record["epoch_losses"],
    )
    return state, record["extra"]


# Fields of train_state.json and the JSON types each may hold (None only where written as null).
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "stage": (int,),
    "step": (int,),
    "epoch": (int,),
    "batch": (int,),
    "steps_before": (int,),
    "seconds": (int, float),
    "optimizer": (dict, type(None)),
    "scheduler": (dict, type(None)),
    "history": (list,),
    "conflicts": (list,),
    "epoch_losses": (list,),
    "extra": (dict,),
    "sha256": (dict,),
}


def _check_record(record: Any, path: Path) -> None:
    """Every field present with its type, and digests for every file the state depends on.

    A record without digests (or with an empty map) would resume from whatever weights sit
    beside it; it is refused, since write_checkpoint has always written them.
    """
    if not isinstance(record, dict):
        raise RayexitError(f"{path}: expected a JSON object, got {type(record).__name__}")
    if record.get("format_version") != FORMAT_VERSION:
        raise RayexitError(f"{path}: format_version {record.get('format_version')!r}, expected {FORMAT_VERSION}")
    for name, types in RECORD_FIELDS.items():
        if name not in record:
            raise RayexitError(f"{path}: no `{name}`; the checkpoint is damaged or cut off")
        value = record[name]
        if not isinstance(value, types) or isinstance(value, bool):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise RayexitError(f"{path}: `{name}` is {type(value).__name__}, expected {expected}")
    digests = record["sha256"]
    needed = [WEIGHTS_FILE] + ([OPTIMIZER_FILE] if _has_tensors(record["optimizer"]) else [])
    for name in needed:
        if name not in digests:
            raise RayexitError(f"{path}: `sha256` has no digest for {name}; the checkpoint cannot be checked")
    for name, digest in digests.items():
        if name not in (WEIGHTS_FILE, OPTIMIZER_FILE) or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise RayexitError(
                f"{path}: `sha256` entry {name!r}: expected {WEIGHTS_FILE} or {OPTIMIZER_FILE} with 64 hex digits"
            )


def _has_tensors(meta: dict | None) -> bool:
    """Whether the optimizer record points into optimizer.safetensors (a fresh optimizer has no tensors)."""
    slots = (meta or {}).get("state")
    if not isinstance(slots, dict):
        return False
    return any(
        isinstance(value, dict) and "tensor" in value
        for slot in slots.values()
        if isinstance(slot, dict)
        for value in slot.values()
    )


def _read_optimizer(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        return {}  # an optimizer state with no tensors (plain SGD) writes no file
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise RayexitError(f"{path}: unreadable optimizer state ({one_line(exc)})") from None


def _split_optimizer(state: dict | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """An optimizer state_dict as tensors (for safetensors) and the rest (for JSON).

    Tensor entries become placeholders naming their safetensors key; plain numbers stay in JSON.
    """
    if state is None:
        return {}, None
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        slot: dict[str, Any] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                key = f"{index}.{name}"
                tensors[key] = value.detach().contiguous().cpu()
                slot[name] = {"tensor": key}
            else:
                slot[name] = value
        per_param[str(index)] = slot
    return tensors, {"state": per_param, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> dict:
    try:
        state = {}
        for index, slot in meta["state"].items():
            state[int(index)] = {
                name: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
                for name, value in slot.items()
            }
        return {"state": state, "param_groups": meta["param_groups"]}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RayexitError(
            f"{path}: optimizer state does not fit {OPTIMIZER_FILE} ({type(exc).__name__}: {one_line(exc)})"
        ) from None
