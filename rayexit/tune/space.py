"""What a tuning run searches and how it chooses, read from YAML and checked before any trial.

A tune config has two sections: `train:` holds the fixed training settings (the same as
`rayexit train --config`), `tune:` holds the search. Inside `tune.space`, each searched
training setting is a number (held fixed), a `[low, high]` pair, or
`{low: .., high: .., log: true|false}`. Exit policies and thresholds are not sampled by Optuna:
every trial searches them on its cached validation logits, which costs no retraining.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayexit.config import TrainSettings, finite_number, load_yaml
from rayexit.errors import RayexitError

# Searchable training settings: allowed interval and whether to sample on a log scale by default.
SEARCHABLE = {
    "gamma": (0.0, 1.0, False),
    "temperature": (1e-3, 100.0, False),
    "lr": (1e-8, 1.0, True),
    "head_lr": (1e-8, 1.0, True),
    "exit_grad_scale": (0.0, 1.0, False),
}
# The token task trains stage 1 (joint) and then stage 2 (self-sampling, METHODS section 5) in
# every trial: stage 1's rates, and stage 2's epochs (0: no stage 2), rate and sampling range
# (each sentence draws a threshold in [0, sampling_max_threshold] and an odd window up to
# sampling_max_window, which must be a whole number).
TOKEN_SEARCHABLE = {
    "lr": (1e-8, 1.0, True),
    "head_lr": (1e-8, 1.0, True),
    "self_sampling_epochs": (0.0, 100.0, False),
    "self_sampling_lr": (1e-8, 1.0, True),
    "sampling_max_threshold": (1e-3, 1.0, False),
    "sampling_max_window": (1.0, 63.0, False),
}
INTEGER_SETTINGS = ("sampling_max_window",)
TASKS = ("sequence", "token")
OBJECTIVES = ("pareto", "within_drop")
SCHEDULERS = ("none", "asha")
TRAINERS = ("distributed", "local")
SEARCH_POLICIES = ("entropy", "maxprob", "patience")
TOKEN_POLICIES = ("tokee", "sentee")

# The paper's default (RomeBERT scripts): gamma 0.9, T 3; lr comes from the `train:` section.
PAPER_DEFAULT = {"gamma": 0.9, "temperature": 3.0}
# The token default: the `train:` section's stage-1 settings, then one epoch of self-sampling
# at the same rate with the sampling range of TrainSettings (threshold up to 0.4, windows 1-7).
TOKEN_DEFAULT = {"self_sampling_epochs": 1.0}


def searchable(task: str) -> dict[str, tuple[float, float, bool]]:
    return TOKEN_SEARCHABLE if task == "token" else SEARCHABLE


@dataclass
class Range:
    low: float
    high: float
    log: bool = False

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "log": self.log}


def default_space(task: str = "sequence") -> dict[str, Range]:
    if task == "token":
        return {
            "lr": Range(3e-5, 3e-4, log=True),
            "head_lr": Range(3e-4, 3e-3, log=True),
            "self_sampling_epochs": Range(1.0, 1.0),
            "self_sampling_lr": Range(1e-5, 1e-4, log=True),
            "sampling_max_threshold": Range(0.1, 0.6),
            "sampling_max_window": Range(3, 9),
        }
    return {"gamma": Range(0.5, 1.0), "temperature": Range(1.0, 10.0), "lr": Range(2e-5, 2e-4, log=True)}


@dataclass
class TuneSpec:
    """The `tune:` section. Every field is checked in `__post_init__`, naming the setting."""

    trials: int = 8
    objective: str = "within_drop"
    max_drop: float = 0.01
    scheduler: str = "none"
    grace_epochs: int = 1  # ASHA: epochs every trial runs before it can be stopped
    task: str = "sequence"
    space: dict[str, Range] | None = None  # None: the task's default space
    policies: list[str] | None = None  # None: every kind of the task (token: tokee and sentee)
    windows: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 9, 15])  # token: TOKEE windows searched
    per_layer: bool = True
    threshold_samples: int = 4000
    validation_fraction: float = 0.1
    split_seed: int = 0
    seed: int = 0
    include_default: bool = True
    reference_accuracy: float | None = None
    live_checks: int = 3  # token: TOKEE candidates run live on validation before one is chosen
    trainer: str = "distributed"
    workers: int = 1
    # CPUs each Ray Train worker reserves; below 1 lets N workers share N CPUs with the trial's own share
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    cpus_per_trial: float | None = None  # None: the whole machine, so trials run one at a time
    optuna_db: bool = True

    def __post_init__(self) -> None:
        _choice("tune.task", self.task, TASKS)
        self.space = parse_space(default_space(self.task) if self.space is None else self.space, self.task)
        kinds = TOKEN_POLICIES if self.task == "token" else SEARCH_POLICIES
        if self.policies is None:
            self.policies = list(kinds)
        if not isinstance(self.windows, list) or not self.windows or any(
            not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in self.windows
        ):
            raise RayexitError(f"tune.windows: got {self.windows!r}, expected a list of whole numbers >= 1")
        _integer("tune.trials", self.trials, 1)
        _integer("tune.threshold_samples", self.threshold_samples, 0)
        _integer("tune.workers", self.workers, 1)
        _integer("tune.live_checks", self.live_checks, 0)
        _integer("tune.grace_epochs", self.grace_epochs, 1)
        _integer("tune.split_seed", self.split_seed, 0)
        _integer("tune.seed", self.seed, 0)
        _choice("tune.objective", self.objective, OBJECTIVES)
        _choice("tune.scheduler", self.scheduler, SCHEDULERS)
        _choice("tune.trainer", self.trainer, TRAINERS)
        if not finite_number(self.max_drop) or self.max_drop < 0:
            raise RayexitError(f"tune.max_drop: got {self.max_drop!r}, expected an accuracy drop >= 0 (0.01 = 1 point)")
        if self.max_drop >= 1:
            raise RayexitError(f"tune.max_drop: got {self.max_drop}, expected a fraction below 1 (0.01 = 1 point)")
        if not finite_number(self.validation_fraction) or not 0 < self.validation_fraction < 1:
            raise RayexitError(
                f"tune.validation_fraction: got {self.validation_fraction!r}, expected a value in (0, 1)"
            )
        if self.reference_accuracy is not None and (
            not finite_number(self.reference_accuracy) or not 0 <= self.reference_accuracy <= 1
        ):
            raise RayexitError(f"tune.reference_accuracy: got {self.reference_accuracy!r}, expected a value in [0, 1]")
        if not isinstance(self.policies, list) or not self.policies:
            raise RayexitError(f"tune.policies: got {self.policies!r}, expected a list from {', '.join(kinds)}")
        for kind in self.policies:
            _choice("tune.policies", kind, kinds)
        if self.task == "token" and self.scheduler == "asha":
            raise RayexitError("tune.scheduler: asha is for the sequence task; a token trial reports once, at its end")
        if self.scheduler == "asha" and self.objective != "within_drop":
            raise RayexitError(
                "tune.scheduler: asha stops trials on one number; use objective: within_drop with it "
                "(objective pareto has two)"
            )
        if self.scheduler == "asha" and self.trainer != "local":
            raise RayexitError(
                "tune.scheduler: asha needs a report after every epoch, which the trial makes when it trains "
                "itself; use trainer: local with it"
            )
        if not finite_number(self.cpus_per_worker) or self.cpus_per_worker <= 0:
            raise RayexitError(f"tune.cpus_per_worker: got {self.cpus_per_worker!r}, expected a number > 0")
        if self.cpus_per_trial is not None and (not finite_number(self.cpus_per_trial) or self.cpus_per_trial < 0):
            raise RayexitError(f"tune.cpus_per_trial: got {self.cpus_per_trial!r}, expected a number >= 0")
        for name in ("per_layer", "include_default", "use_gpu", "optuna_db"):
            if not isinstance(getattr(self, name), bool):
                raise RayexitError(f"tune.{name}: got {getattr(self, name)!r}, expected true or false")

    def searched(self) -> dict[str, Range]:
        return {name: r for name, r in self.space.items() if not r.fixed}

    def fixed(self) -> dict[str, float]:
        return {name: r.low for name, r in self.space.items() if r.fixed}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["space"] = {name: r.to_dict() for name, r in (self.space or {}).items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneSpec:
        if not isinstance(data, dict):
            raise RayexitError(f"tune: expected a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise RayexitError(f"tune: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


def parse_space(space: Any, task: str = "sequence") -> dict[str, Range]:
    if not isinstance(space, dict) or not space:
        raise RayexitError(f"tune.space: expected a mapping of settings to ranges, got {space!r}")
    allowed = searchable(task)
    parsed = {}
    for name, value in space.items():
        if name not in allowed:
            raise RayexitError(
                f"tune.space.{name}: not a setting that can be searched for the {task} task; searchable: "
                f"{', '.join(allowed)} (exit policies and thresholds are searched on cached exits, not here)"
            )
        parsed[name] = value if isinstance(value, Range) else _parse_range(f"tune.space.{name}", value)
        _check_range(name, parsed[name], allowed)
    return parsed


def _parse_range(where: str, value: Any) -> Range:
    if finite_number(value):
        return Range(float(value), float(value))
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(finite_number(v) for v in value):
        return Range(float(value[0]), float(value[1]))
    if isinstance(value, dict):
        extra = sorted(set(value) - {"low", "high", "log"})
        if extra or "low" not in value or "high" not in value:
            raise RayexitError(f"{where}: expected keys low, high and optionally log; got {', '.join(map(str, value))}")
        if not (finite_number(value["low"]) and finite_number(value["high"])):
            raise RayexitError(f"{where}: low and high must be numbers, got {value['low']!r} and {value['high']!r}")
        log = value.get("log", False)
        if not isinstance(log, bool):
            raise RayexitError(f"{where}.log: got {log!r}, expected true or false")
        return Range(float(value["low"]), float(value["high"]), log)
    raise RayexitError(f"{where}: got {value!r}; expected a number, [low, high] or {{low, high, log}}")


def _check_range(name: str, r: Range, allowed: dict[str, tuple[float, float, bool]]) -> None:
    where = f"tune.space.{name}"
    bottom, top, log_default = allowed[name]
    if r.low > r.high:
        raise RayexitError(f"{where}: low {r.low} is above high {r.high}")
    if r.low < bottom or r.high > top:
        raise RayexitError(f"{where}: [{r.low}, {r.high}] leaves the allowed interval [{bottom}, {top}]")
    if name in ("temperature", "lr", "head_lr", "self_sampling_lr") and r.low <= 0:
        raise RayexitError(f"{where}: low {r.low} must be > 0")
    if name in INTEGER_SETTINGS and (r.low != int(r.low) or r.high != int(r.high)):
        raise RayexitError(f"{where}: [{r.low}, {r.high}]: expected whole numbers")
    if not r.log and log_default and not r.fixed and r.high / max(r.low, 1e-300) > 10:
        r.log = True  # a rate spanning decades is sampled per decade unless said otherwise


@dataclass
class TuneConfig:
    """Both sections of a tune config: fixed training settings and the search."""

    train: TrainSettings
    tune: TuneSpec
    source: str = ""

    def trial_settings(self, sampled: dict[str, float]) -> TrainSettings:
        values = {**self.tune.fixed(), **sampled}
        return dataclasses.replace(self.train, **values)

    def token_stages(self, sampled: dict[str, float]) -> tuple[TrainSettings, TrainSettings | None]:
        """A token trial's stage-1 (joint) settings, and its self-sampling settings (None: no stage 2)."""
        values = {**self.tune.fixed(), **sampled}
        first = dataclasses.replace(
            self.train, method="joint", **{k: values[k] for k in ("lr", "head_lr") if k in values}
        )
        epochs = float(values.get("self_sampling_epochs", TOKEN_DEFAULT["self_sampling_epochs"]))
        if epochs <= 0:
            return first, None
        widest = int(round(values.get("sampling_max_window", max(self.train.sampling_windows))))
        second = dataclasses.replace(
            first,
            method="self-sampling",
            epochs=epochs,
            lr=float(values.get("self_sampling_lr", first.lr)),
            sampling_max_threshold=float(values.get("sampling_max_threshold", self.train.sampling_max_threshold)),
            sampling_windows=list(range(1, widest + 1, 2)),
        )
        return first, second

    def default_point(self) -> dict[str, float]:
        """The paper's setting among the searched ones (lr: the `train:` section's value)."""
        point = {}
        token = self.tune.task == "token"
        for name in self.tune.searched():
            if token:
                value = TOKEN_DEFAULT.get(name)
                if value is None:
                    value = {
                        "self_sampling_lr": self.train.lr,
                        "sampling_max_window": max(self.train.sampling_windows),
                    }.get(name, getattr(self.train, name, None))
            else:
                value = PAPER_DEFAULT.get(name, getattr(self.train, name))
            r = self.tune.space[name]
            if value is not None and r.low <= value <= r.high:
                point[name] = int(value) if name in INTEGER_SETTINGS else float(value)
        return point


def load_tune_config(
    path: str | Path | None, train_overrides: dict[str, Any], tune_overrides: dict[str, Any]
) -> TuneConfig:
    """`train:` and `tune:` sections of a YAML file (either may be absent), flags on top."""
    from rayexit.tasks import task_named

    raw: dict[str, Any] = load_yaml(path) if path else {}
    unknown = sorted(map(str, set(raw) - {"train", "tune"}))
    if unknown:
        raise RayexitError(f"{path}: unknown section(s) {', '.join(unknown)}; expected train: and tune:")
    for section in ("train", "tune"):
        if not isinstance(raw.get(section) or {}, dict):
            raise RayexitError(f"{path}: `{section}:` is {type(raw[section]).__name__}, expected a mapping of "
                               f"settings (e.g. `{section}:` then indented `name: value` lines)")
    train_data = dict(raw.get("train") or {})
    train_data.update({k: v for k, v in train_overrides.items() if v is not None})
    tune_data = dict(raw.get("tune") or {})
    tune_data.update({k: v for k, v in tune_overrides.items() if v is not None})
    try:
        config = TuneConfig(TrainSettings.from_dict(train_data), TuneSpec.from_dict(tune_data), str(path or ""))
        task_named(config.tune.task).check_settings(config.train)  # here, not once in every trial
        return config
    except RayexitError as exc:
        raise RayexitError(f"{path}: {exc}" if path else str(exc)) from None




def _integer(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RayexitError(f"{name}: got {value!r}, expected a whole number >= {minimum}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RayexitError(f"{name}: got {value!r}, expected one of {', '.join(allowed)}")
