"""Training checkpoints: a model directory plus what it takes to resume (optimizer, schedule, step).

A checkpoint directory is a complete model directory (`rayexit eval` can read it) with two more
files: `optimizer.safetensors` (the optimizer's tensors) and `train_state.json` (everything
else: the loop position, the scheduler, the history so far, and sha256 digests of the weight
files). `train_state.json` is written last and its digests are checked on load, so a directory
that was cut off while being written is refused instead of resumed from. No pickle is involved.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rayexit.errors import RayexitError
from rayexit.files import write_atomic, write_json
from rayexit.model_dir import WEIGHTS_FILE, load_weights
from rayexit.train.loop import LoopState

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT_VERSION = 1


def write_checkpoint(directory: str | Path, model, state: LoopState, tokenizer=None, extra: dict | None = None) -> Path:
    """Write model + resume state into `directory` (created; must not hold another checkpoint)."""
    directory = Path(directory)
    model.save_pretrained(directory, tokenizer)
    tensors, optimizer_meta = _split_optimizer(state.optimizer)
    if tensors:
        write_atomic(directory / OPTIMIZER_FILE, lambda tmp: save_file(tensors, str(tmp)))
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
        "sha256": {name: _digest(directory / name) for name in [WEIGHTS_FILE] + ([OPTIMIZER_FILE] if tensors else [])},
    }
    write_json(directory / STATE_FILE, record)
    return directory


def read_checkpoint(directory: str | Path, model) -> tuple[LoopState, dict]:
    """Load the weights into `model` and return the loop state and the `extra` dict."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise RayexitError(f"{directory}: not a training checkpoint (no {STATE_FILE}); it may have been cut off")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RayexitError(f"{path}: unreadable ({exc})") from None
    if record.get("format_version") != FORMAT_VERSION:
        raise RayexitError(f"{path}: format_version {record.get('format_version')!r}, expected {FORMAT_VERSION}")
    for name, digest in record["sha256"].items():
        if not (directory / name).is_file() or _digest(directory / name) != digest:
            raise RayexitError(f"{directory / name}: missing or does not match {STATE_FILE}; the checkpoint is damaged")
    load_weights(model, directory)
    optimizer = None
    if record["optimizer"] is not None:
        tensors = load_file(str(directory / OPTIMIZER_FILE)) if (directory / OPTIMIZER_FILE).is_file() else {}
        optimizer = _join_optimizer(tensors, record["optimizer"])
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


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for index, slot in meta["state"].items():
        state[int(index)] = {
            name: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
            for name, value in slot.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
