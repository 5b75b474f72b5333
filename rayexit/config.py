"""Typed settings loaded from YAML and flags, checked before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from rayexit.errors import RayexitError
from rayexit.policy import POLICIES, ExitPolicy  # noqa: F401  (re-exported: settings carry a policy)

# self-sampling is stage 2 of token-level early exit (sequence labeling only).
METHODS = ("romebert", "deebert", "pabee", "joint", "self-sampling")
GR_DIRECTIONS = ("reverse", "final", "none")
GR_SCOPES = ("encoder", "shared", "per_tensor")
HEADS = ("pooler", "shared-pooler")
POOLINGS = ("cls", "mean")


@dataclass
class TrainSettings:
    """One training run. Defaults follow RomeBERT's scripts except where a note says otherwise."""

    method: str = "romebert"
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 2e-5
    head_lr: float | None = None  # exit heads start from scratch; a larger rate helps short runs
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    max_examples: int | None = None
    seed: int = 42
    gamma: float = 0.9
    temperature: float = 3.0
    gr_direction: str = "reverse"
    gr_scope: str = "encoder"
    deebert_stage2_epochs: float | None = None  # None: the same as `epochs`
    head: str = "pooler"
    pooling: str = "cls"
    dropout: float = 0.1
    policy: ExitPolicy = field(default_factory=ExitPolicy)
    log_every: int = 20
    # token self-sampling (stage 2): each sentence draws a TOKEE window and a threshold in [0, max]
    sampling_windows: list[int] = field(default_factory=lambda: [1, 3, 5, 7])
    sampling_max_threshold: float = 0.4

    def __post_init__(self) -> None:
        if isinstance(self.policy, dict):
            self.policy = ExitPolicy.from_dict(self.policy)
        _choice("method", self.method, METHODS)
        _choice("gr_direction", self.gr_direction, GR_DIRECTIONS)
        _choice("gr_scope", self.gr_scope, GR_SCOPES)
        _choice("head", self.head, HEADS)
        _choice("pooling", self.pooling, POOLINGS)
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        _positive("lr", self.lr)
        _positive("temperature", self.temperature)
        _positive("max_length", self.max_length)
        if self.head_lr is not None:
            _positive("head_lr", self.head_lr)
        if self.max_examples is not None:
            _positive("max_examples", self.max_examples)
        if not 0.0 <= self.gamma <= 1.0:
            raise RayexitError(f"gamma: got {self.gamma}, expected a value in [0, 1]")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise RayexitError(f"warmup_ratio: got {self.warmup_ratio}, expected a value in [0, 1)")
        if not self.sampling_windows or any(
            not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in self.sampling_windows
        ):
            raise RayexitError(f"sampling_windows: got {self.sampling_windows!r}, expected whole numbers >= 1")
        if not 0.0 < self.sampling_max_threshold <= 1.0:
            raise RayexitError(f"sampling_max_threshold: got {self.sampling_max_threshold}, expected (0, 1]")
        if not 0.0 <= self.dropout < 1.0:
            raise RayexitError(f"dropout: got {self.dropout}, expected a value in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["policy"] = self.policy.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        return _build(cls, data, "train")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise RayexitError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RayexitError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise RayexitError(f"{path}: expected a mapping of settings at the top level")
    return data


def train_settings(config_path: str | Path | None, overrides: dict[str, Any]) -> TrainSettings:
    """Settings from the YAML file's `train:` section (or top level), then flags on top."""
    data: dict[str, Any] = {}
    if config_path:
        raw = load_yaml(config_path)
        data = dict(raw.get("train", raw))
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSettings.from_dict(data)


def _build(cls: type, data: dict[str, Any], section: str) -> Any:
    if not isinstance(data, dict):
        raise RayexitError(f"{section}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RayexitError(f"{section}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise RayexitError(f"{section}: {exc}") from None


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RayexitError(f"{name}: got {value!r}, expected one of {', '.join(allowed)}")


def _positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise RayexitError(f"{name}: got {value!r}, expected a number > 0")
