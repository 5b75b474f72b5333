"""Typed settings loaded from YAML and flags, checked before any work starts."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from rayexit.errors import RayexitError
from rayexit.policy import POLICIES, ExitPolicy  # noqa: F401  (re-exported: settings carry a policy)
from rayexit.reading import one_line, read_text

CONFIG_LIMIT = 1 << 20  # a settings file is a few hundred bytes; anything near this is not one

# self-sampling is stage 2 of token-level early exit (sequence labeling only). finetune is the
# plain single-exit fine-tune (backbone and final classifier only): the reference early-exit
# papers report against; its intermediate heads stay untrained.
METHODS = ("romebert", "deebert", "pabee", "joint", "finetune", "self-sampling")
GR_DIRECTIONS = ("reverse", "final", "none")
# the projection on the hidden states, in one backward pass (`rayexit.gradreg.ProjectingFork`):
# over the batch's whole tensor, or each example's slice on its own
HIDDEN_SCOPES = ("hidden", "hidden_per_example")
GR_SCOPES = ("encoder", "shared", "per_tensor", *HIDDEN_SCOPES)
EXIT_WEIGHTS = ("uniform", "depth")
HEADS = ("pooler", "shared-pooler")
POOLINGS = ("cls", "mean", "attention")


@dataclass
class TrainSettings:
    """One training run. Defaults follow RomeBERT's scripts except where a note says otherwise."""

    method: str = "romebert"
    epochs: float = 3.0
    batch_size: int = 32
    # None: chosen for the backbone and task when the run is prepared (`Task.default_settings`,
    # measured in docs/defaults.md); the loop itself reads an unset head_lr as `lr`
    lr: float | None = None
    head_lr: float | None = None  # exit heads start from scratch: a larger rate than the encoder's
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    max_examples: int | None = None
    seed: int = 42
    gamma: float = 0.9
    # RomeBERT: fraction of training over which gamma ramps from 0 (no distillation: the final
    # exit, the teacher, is still uninformed) up to `gamma`; 0 distils at full weight from step 0
    gamma_warmup: float = 0.0
    # RomeBERT: fraction of training in which the final exit trains alone (a single-exit
    # fine-tune's step: no inner exits, no distillation, no projection) before the one-stage
    # phase; 0 trains every exit from step 0 (the paper's)
    final_only_warmup: float = 0.0
    # RomeBERT: factor on the inner exits' gradient where it enters the encoder (their heads still
    # take it whole); 1 is the paper's. Below 1 the inner exits pull less on the layers the final
    # exit also reads; 0 trains the inner heads on a backbone that only the final exit shapes.
    # 0.3 brought full depth level with the single-exit fine-tune on SST-2 over 3 seeds (+0.5 point
    # over 1) and lifted the matched speed-ups by 0.4-0.7 point on the mean
    # (docs/romebert/real-budget.md, "exit_grad_scale").
    exit_grad_scale: float = 0.3
    temperature: float = 3.0
    # RomeBERT: weight of the final exit's cross-entropy against the inner exits' summed loss (the
    # paper's L has 1). In layers 1-2 the inner exits' gradient is 1.7-3.5x the final exit's on a
    # trained MiniLM; 3 lifted the 3x point and validation in both seeds measured (docs/romebert/real-budget.md).
    final_weight: float = 3.0
    # RomeBERT: `uniform` (the paper's: every inner exit's loss weighs 1) or `depth` (inner exit i
    # weighs i, scaled to a mean of 1: PABEE's weighting, whose full depth is the best of the
    # multi-exit methods in the main benchmark)
    exit_weights: str = "uniform"
    # `final` (the final exit's gradient leads) rather than the paper's `reverse` for SST-2: measured
    # on MiniLM, `reverse` left the final exit below the exits it teaches (docs/romebert/small-budget.md).
    gr_direction: str = "final"
    # `hidden`: the projection on each inner layer's output, in one backward pass (0.60 s per step
    # against 0.93 for `encoder`'s two, joint 0.58); at the real budget it measured level with
    # `encoder` within the seeds' spread (docs/romebert/real-budget.md, "gr_scope: hidden"). `encoder` is the paper's.
    gr_scope: str = "hidden"
    deebert_stage2_epochs: float | None = None  # None: the same as `epochs`
    head: str = "pooler"
    # None: chosen from the backbone when the model is built (`rayexit.tasks.SentenceTask.default_settings`)
    pooling: str | None = None
    dropout: float = 0.1
    # The policy saved with the model. None: the task's own (entropy 0.1 for sentences, TOKEE w=3 /
    # 0.1 for tokens), so a token run can tell a sentence policy it must refuse from no choice at all.
    policy: ExitPolicy | None = None
    log_every: int = 20
    # token self-sampling (stage 2): each sentence draws a TOKEE window and a threshold in [0, max]
    sampling_windows: list[int] = field(default_factory=lambda: [1, 3, 5, 7])
    sampling_max_threshold: float = 0.4

    def __post_init__(self) -> None:
        if isinstance(self.policy, dict):
            self.policy = ExitPolicy.from_dict(self.policy)
        if self.policy is not None and not isinstance(self.policy, ExitPolicy):
            raise RayexitError(f"policy: got {self.policy!r}, expected a mapping {{kind, thresholds, ...}}")
        _choice("method", self.method, METHODS)
        _choice("gr_direction", self.gr_direction, GR_DIRECTIONS)
        _choice("gr_scope", self.gr_scope, GR_SCOPES)
        _choice("exit_weights", self.exit_weights, EXIT_WEIGHTS)
        _choice("head", self.head, HEADS)
        if self.pooling is not None:
            _choice("pooling", self.pooling, POOLINGS)
        for name in ("epochs", "temperature", "final_weight"):
            _positive(name, getattr(self, name))
        for name in ("lr", "head_lr", "deebert_stage2_epochs"):  # None: chosen when the run is prepared
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("batch_size", "max_length", "log_every"):
            _positive(name, getattr(self, name), whole=True)
        if self.max_examples is not None:
            _positive("max_examples", self.max_examples, whole=True)
        if not _whole(self.seed) or self.seed < 0:
            raise RayexitError(f"seed: got {self.seed!r}, expected a whole number >= 0")
        _in_range("gamma", self.gamma, "[0, 1]")
        _in_range("gamma_warmup", self.gamma_warmup, "[0, 1]", "a fraction of training")
        _in_range("final_only_warmup", self.final_only_warmup, "[0, 1)", "a fraction of training")
        _in_range("exit_grad_scale", self.exit_grad_scale, "[0, 1]")
        _in_range("warmup_ratio", self.warmup_ratio, "[0, 1)")
        _in_range("sampling_max_threshold", self.sampling_max_threshold, "(0, 1]")
        _in_range("dropout", self.dropout, "[0, 1)")
        if not finite_number(self.weight_decay) or self.weight_decay < 0:
            raise RayexitError(f"weight_decay: got {self.weight_decay!r}, expected a finite number >= 0")
        if not self.sampling_windows or any(not _whole(w) or w < 1 for w in self.sampling_windows):
            raise RayexitError(f"sampling_windows: got {self.sampling_windows!r}, expected whole numbers >= 1")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["policy"] = self.policy.to_dict() if self.policy is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        return _build(cls, data, "train")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a number.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so `lr: 1e-4` or
    `lr: 2e5` arrive as strings; YAML 1.2 (and every user) reads them as numbers.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise RayexitError(f"{path}: config file not found")
    try:
        data = yaml.load(read_text(path, max_file=CONFIG_LIMIT), Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        raise RayexitError(f"{path}: not valid YAML ({one_line(exc)})") from None
    except RecursionError:
        raise RayexitError(f"{path}: YAML nested too deeply; expected a mapping of settings") from None
    if not isinstance(data, dict):
        raise RayexitError(f"{path}: expected a mapping of settings at the top level")
    return data


def train_settings(config_path: str | Path | None, overrides: dict[str, Any]) -> TrainSettings:
    """Settings from the YAML file's `train:` section (or top level), then flags on top."""
    data: dict[str, Any] = {}
    if config_path:
        data = _train_section(config_path, load_yaml(config_path))
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSettings.from_dict(data)


def _train_section(path: str | Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The `train:` section, refusing a `tune:` section rather than dropping it unread."""
    if "tune" in raw:
        # Training with only the fixed settings of a search config would look like the search
        # ran; say which command reads the file instead of silently ignoring half of it.
        raise RayexitError(
            f"{path}: has a `tune:` section, which only `rayexit tune --config {path}` reads; "
            "to train once with its `train:` settings, put them in a file without `tune:`"
        )
    if "train" not in raw:
        return dict(raw)  # settings at the top level
    others = sorted(set(raw) - {"train"})
    if others:
        raise RayexitError(f"{path}: unknown section(s) {', '.join(map(str, others))}; expected `train:`")
    section = raw["train"]
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise RayexitError(f"{path}: train: expected a mapping of settings, got {type(section).__name__}")
    return dict(section)


def _build(cls: type, data: dict[str, Any], section: str) -> Any:
    if not isinstance(data, dict):
        raise RayexitError(f"{section}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise RayexitError(
            f"{section}: unknown setting(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}"
        )
    data = {name: _coerce_number(known[name], value) for name, value in data.items()}
    try:
        return cls(**data)
    except TypeError as exc:
        raise RayexitError(f"{section}: {exc}") from None


def _coerce_number(spec: dataclasses.Field, value: Any) -> Any:
    """A numeric string for a float setting ("1e-4", from a quoted YAML value or a JSON file) as a float.

    Only float settings: a quoted whole number for an integer setting is left to be refused,
    and a string that is not a finite number stays a string, so the setting's check names it.
    """
    if spec.type not in ("float", "float | None") or not isinstance(value, str):
        return value
    if not _NUMBER.fullmatch(value.strip()):
        return value
    number = float(value.strip().replace("_", ""))
    return number if math.isfinite(number) else value


_NUMBER = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RayexitError(f"{name}: got {value!r}, expected one of {', '.join(allowed)}")


def finite_number(value: Any) -> bool:
    """A real number, not a bool, not NaN or infinite (what every numeric setting must be)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(name: str, value: Any, whole: bool = False) -> None:
    if whole and (not _whole(value) or value <= 0):
        raise RayexitError(f"{name}: got {value!r}, expected a whole number >= 1")
    if not finite_number(value) or value <= 0:  # NaN and inf pass "> 0" but train nothing (or crash steps later)
        raise RayexitError(f"{name}: got {value!r}, expected a finite number > 0")


def _in_range(name: str, value: Any, interval: str, what: str = "a value") -> None:
    """`interval` like "[0, 1)": brackets say whether each end is allowed."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    inside = finite_number(value) and (low <= value if interval[0] == "[" else low < value) and (
        value <= high if interval[-1] == "]" else value < high)
    if not inside:
        raise RayexitError(f"{name}: got {value!r}, expected {what} in {interval}")
