"""What one served model is configured with: the `args:` of a Serve YAML application, checked up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rayexit.config import finite_number
from rayexit.errors import RayexitError
from rayexit.serve.controller import ControllerConfig
from rayexit.serve.guard import GuardConfig
from rayexit.serve.validation import Limits

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ServeSettings:
    model_dir: str
    # Request limits: anything over them is answered 4xx before it reaches the model.
    max_texts: int = 64
    max_text_chars: int = 2000
    max_body_bytes: int = 256 * 1024
    # Cost limits, in tokens (a classifier truncates each text at the model's max_length first; a tagger
    # tags every word, so a long sentence costs all its word-pieces): 422 past the first, 413 past the second.
    max_text_tokens: int = 512
    max_request_tokens: int = 8192
    # Fairness: a request enters the batch queue at most this many tokens at a time, so a small request
    # sent meanwhile joins the next batch instead of waiting for all of a big one.
    wave_tokens: int = 512
    # Load shedding: a request whose texts would wait longer than max_queue_wait_ms (at the measured drain
    # rate; default half of target_p99_ms), or would overflow max_queued_texts, is answered 503 with
    # Retry-After; a text still queued after twice max_queue_wait_ms is dropped with 503 when a batch reaches it.
    max_queue_wait_ms: float | None = None
    max_queued_texts: int = 1024
    # Batching. `adaptive: false` keeps max_batch_size and batch_wait_ms fixed (the benchmark's baselines).
    adaptive: bool = True
    max_batch_size: int = 16
    batch_wait_ms: float = 2.0
    min_batch_size: int = 1
    max_batch_size_limit: int = 64
    max_batch_wait_ms: float = 20.0
    target_p99_ms: float = 250.0
    window_s: float = 1.0
    token_budget: int = 4096  # padded tokens per forward pass; a batch is split to stay under it
    # Layer-level rebatching (classification): rows that survive a layer in different batches run the next
    # layer together (rayexit/serve/rebatch.py). A layer's queue runs once its oldest rows waited rebatch_hold_ms
    # (the fullest such queue under a backlog, the deepest otherwise) or once it holds max_batch_size rows;
    # otherwise the shallowest queue runs, so new texts start at once.
    rebatch: bool = False
    rebatch_hold_ms: float = 10.0
    # Load relief (METHODS section 7): relax thresholds while p99 is over target, optionally cap depth.
    relax_under_load: bool = False
    max_relax_level: int = 3
    overload_layer_cap: int | None = None
    # Exit policy override; `policy_kind: none` serves full depth. A token model takes tokee or sentee
    # (its window / reduce stay the model directory's), a sequence model entropy, maxprob or patience.
    policy_kind: str | None = None
    thresholds: float | list[float] | None = None
    # Accuracy guard (serve/guard.py): off unless guard_target is set. A `guard_sample` share of served texts
    # is checked at full depth off the request path; each exit's threshold tightens while its agreement with
    # full depth is under guard_target and relaxes back toward the tuned value (past it only with
    # guard_allow_past_tuned). On a busy replica, checks take at most guard_max_overhead of model time.
    # After a tightening, sampling and that budget are guard_boost times higher for one window of checks;
    # the newest guard_recent checked texts are also judged alone, so a shift shows before it fills the window.
    guard_target: float | None = None
    guard_sample: float = 0.05
    guard_window: int = 200
    guard_min_samples: int = 20
    guard_allow_past_tuned: bool = False
    guard_max_overhead: float = 0.04
    guard_recent: int = 100
    guard_boost: float = 4.0
    guard_relax_wait: int | None = 500  # checked texts since an exit's last move before it relaxes (null: min_samples)
    guard_tighten_margin: float = 0.0  # tighten below target + this share of (1 - target): headroom
    guard_shift_moves_thin_exits: bool = True  # a tightening also moves exits with too few checks of their own
    device: str = "auto"
    dtype: str = "auto"  # auto: float16 on a GPU, float32 on CPU
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_text_chars", "max_body_bytes", "max_batch_size", "min_batch_size",
                     "max_batch_size_limit", "token_budget", "max_relax_level", "max_text_tokens",
                     "max_request_tokens", "wave_tokens", "max_queued_texts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "max_relax_level" else 1):
                raise RayexitError(f"serve args.{name}: got {value!r}, expected a whole number >= 1")
        if not isinstance(self.rebatch, bool):
            raise RayexitError(f"serve args.rebatch: got {self.rebatch!r}, expected true or false")
        for name in ("batch_wait_ms", "max_batch_wait_ms", "target_p99_ms", "window_s", "rebatch_hold_ms"):
            value = getattr(self, name)
            if not finite_number(value) or value < 0:  # NaN or inf would switch shedding or rebatching off unseen
                raise RayexitError(f"serve args.{name}: got {value!r}, expected a finite number >= 0")
        wait = self.max_queue_wait_ms
        if wait is not None and (not finite_number(wait) or wait <= 0):
            raise RayexitError(f"serve args.max_queue_wait_ms: got {wait!r}, expected a finite number > 0")
        if self.device not in DEVICES:
            raise RayexitError(f"serve args.device: got {self.device!r}, expected one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise RayexitError(f"serve args.dtype: got {self.dtype!r}, expected one of {', '.join(DTYPES)}")
        cap = self.overload_layer_cap
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise RayexitError(f"serve args.overload_layer_cap: got {cap!r}, expected a whole number >= 1 (or null)")
        if not isinstance(self.guard_shift_moves_thin_exits, bool):
            raise RayexitError(f"serve args.guard_shift_moves_thin_exits: got {self.guard_shift_moves_thin_exits!r}, "
                               "expected true or false")
        if not isinstance(self.guard_allow_past_tuned, bool):
            raise RayexitError(f"serve args.guard_allow_past_tuned: got {self.guard_allow_past_tuned!r}, "
                               "expected true or false")
        self.guard_config()  # checks the guard's settings, named, before a replica starts
        if self.max_batch_size > self.max_batch_size_limit:
            raise RayexitError(
                f"serve args.max_batch_size: got {self.max_batch_size}, more than max_batch_size_limit "
                f"({self.max_batch_size_limit})"
            )

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeSettings:
        if not isinstance(args, dict):
            raise RayexitError(f"serve args: expected a mapping, got {type(args).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise RayexitError(
                f"serve args: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if "model_dir" not in args:
            raise RayexitError("serve args.model_dir: missing; give the model directory to serve")
        try:
            return cls(**args)
        except TypeError as exc:
            raise RayexitError(f"serve args: {exc}") from None

    def resolved(self) -> ServeSettings:
        """With `model_dir` made absolute and checked, so replicas find it whatever their working directory."""
        path = Path(self.model_dir).expanduser().resolve()
        if not (path / "rayexit.json").is_file():
            raise RayexitError(
                f"serve args.model_dir: {self.model_dir} is not a rayexit model directory (no rayexit.json); "
                "train one with `rayexit train` or point at the tuning run's best/ export"
            )
        data = asdict(self)
        data["model_dir"] = str(path)
        return ServeSettings(**data)

    def controller_config(self) -> ControllerConfig:
        """With `adaptive: false` the batch knobs are pinned (min = max); relaxation still works."""
        size, wait = self.max_batch_size, self.batch_wait_ms / 1000
        if self.adaptive:
            smallest, largest = min(self.min_batch_size, size), self.max_batch_size_limit
            shortest, longest = 0.0, max(self.max_batch_wait_ms / 1000, wait)
        else:
            smallest = largest = size
            shortest = longest = wait
        return ControllerConfig(
            target_p99_s=self.target_p99_ms / 1000,
            min_batch_size=smallest,
            max_batch_size=largest,
            initial_batch_size=size,
            min_wait_s=shortest,
            max_wait_s=longest,
            initial_wait_s=wait,
            window_s=self.window_s,
            relax=self.relax_under_load,
            max_relax_level=self.max_relax_level,
        )

    def guard_config(self) -> GuardConfig | None:
        """The accuracy guard's settings; None when guard_target is not set (the guard is off)."""
        # Built even when the guard is off (with a placeholder target), so bad guard_* values are refused early.
        config = GuardConfig(
            self.guard_target if self.guard_target is not None else 0.5, self.guard_sample, self.guard_window,
            self.guard_min_samples, allow_past_tuned=self.guard_allow_past_tuned,
            max_overhead=self.guard_max_overhead, recent=self.guard_recent, boost=self.guard_boost,
            tighten_margin=self.guard_tighten_margin, relax_wait=self.guard_relax_wait,
            shift_moves_thin_exits=self.guard_shift_moves_thin_exits,
        )
        return None if self.guard_target is None else config

    def limits(self) -> Limits:
        return Limits(self.max_texts, self.max_text_chars, self.max_body_bytes, self.max_text_tokens,
                      self.max_request_tokens)

    def queue_wait_s(self) -> float:
        wait_ms = self.target_p99_ms / 2 if self.max_queue_wait_ms is None else self.max_queue_wait_ms
        return wait_ms / 1000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
