"""The accuracy guard: exits that watch their own agreement with full depth on live traffic.

Thresholds are tuned on validation data; when live traffic drifts away from it, early answers
can stop matching what the full network would say. The guard (after Apparate, SOSP 2024) checks
a sampled fraction of served rows at full depth, off the request's path, and moves each exit's
threshold so that early answers keep agreeing with the final layer's at least `target` of the time.

How it decides (plain Python and torch, no Ray: tests drive it directly):

- A checked row keeps, for every exit, the policy's statistic and the exit's prediction. The
  sliding window holds the last `window` checked rows. Agreement is *replayed*: for any set of
  thresholds the window says where each row would have left and whether that answer equals
  the final layer's (the same criterion as the live runner, `rayexit.policy.passes`). So the
  evidence stays valid when thresholds move, and a looser threshold can be judged before it is
  served.
- Tighten: an exit whose replayed agreement (at least `min_samples` rows leaving there) is below
  `target` moves one step toward never exiting, repeated on the same window until it meets the
  target; a step halves the distance to "never" on the criterion's own scale.
- Tighten on the pooled evidence too: an exit that takes a small share of traffic holds fewer
  than `min_samples` of the window's rows, so a deficit spread thinly over several such exits
  would never trip the per-exit rule. While all early-leaving rows of the window together (at
  least `min_samples`) agree less than `target`, the exit holding the most disagreeing rows (the
  shallower on a tie) moves one step.
- Relax: an exit tightened earlier moves one step back toward its tuned value when the window
  says the looser threshold would still agree comfortably (`target + relax_margin * (1 - target)`)
  over all early-leaving rows, and at that exit too when it has `min_samples` rows of its own
  (a thin exit relaxes on the pooled rows alone), and only `relax_wait` (500) checked rows after
  that exit's last move, then at most one step per `relax_wait` rows. Past
  the tuned value only with `allow_past_tuned` (then a step is load relief's step, `rayexit.policy.relax`).
- A tightening is evidence that traffic moved. An exit that few texts leave at holds fewer than
  `min_samples` checked rows of its own, and at 5% sampling its evidence can take thousands of
  requests to arrive; so when anything tightens, every such thin exit still at its tuned value
  moves one step too (`shift_moves_thin_exits`; its move's evidence is "shift"). Having no
  evidence of its own, it counts at its tuned value when the others' relaxes are judged, and it
  returns to tuned once no exit is tightened on evidence any more.
- Tightening is quick and relaxing slow on purpose: a false alarm costs speed for a while, a
  missed one costs accuracy.
- Two things make a shift show sooner. The newest `recent` rows are judged on their own too
  (tightening on either view, relaxing only when both are comfortable): a 200-row window at 5%
  sampling takes thousands of texts to turn over. And a tightening is evidence that traffic has
  moved, so for the next `window` checked rows the sampling rate and the busy replica's check
  budget are `boost` times higher; the window then refills with the new traffic quickly, and
  the steady state, where nothing tightens, keeps the configured rate. Replayed on the bench's
  shifted stream over 10 sampling seeds (`python -m rayexit.bench.serve_guard`), the two took
  the seeds whose every 500-request block after the first move agrees at 0.99 or more from 4
  to 7 (boost alone: 6), and the median first move after the shift from 327 to 140 requests.

Rows are sampled uniformly (whatever their exit layer) so the window stays a sample of traffic,
which replay at looser thresholds needs. Checks prefer spare capacity: with nothing queued they
run at once; on a busy replica they may take at most `max_overhead` of the model's time.

A new replica starts from the tuned thresholds with an empty window (no state is saved): the
tuned values are the only ones chosen on labelled data, and a window refills within a few
hundred checked rows.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from rayexit.errors import RayexitError
from rayexit.policy import HIGHER_IS_SURER, ExitPolicy, passes, relax, token_statistic


@dataclass
class GuardConfig:
    target: float
    sample: float = 0.05
    window: int = 200
    min_samples: int = 20
    relax_margin: float = 0.5
    allow_past_tuned: bool = False
    max_steps: int = 8
    max_overhead: float = 0.04
    max_pending: int = 64
    rows_per_check: int = 8
    recent: int = 100  # the newest checked rows are also judged alone (0: the whole window only)
    boost: float = 4.0  # after a tightening, sample and budget this many times more for one window of rows
    # Tighten below target + tighten_margin * (1 - target): a little headroom, so that the dip a block
    # shows before the window has the evidence is more often a dip above the target.
    tighten_margin: float = 0.0
    # Rows checked since an exit's last move before it may relax (None: min_samples). Replayed on the bench's
    # shifted stream, relaxing after min_samples rows let a few seeds relax mid-shift into a block under target
    # (7 of 10 seeds held every block); after 500 rows, 9 of 10 did.
    relax_wait: int | None = 500
    # A tightening is evidence that traffic moved: exits with too few checked rows of their own to judge
    # (fewer than min_samples in the window) and still at their tuned value move one step with it.
    shift_moves_thin_exits: bool = True

    def __post_init__(self) -> None:
        for name in ("target", "sample"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
                raise RayexitError(f"serve args.guard_{name}: got {value!r}, expected a number in (0, 1]")
        if self.target == 1:
            raise RayexitError("serve args.guard_target: got 1, expected a number below 1 (1 means never exit early)")
        for name in ("window", "min_samples", "max_steps", "max_pending", "rows_per_check"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RayexitError(f"serve args.guard_{name}: got {value!r}, expected a whole number >= 1")
        if self.min_samples > self.window:
            raise RayexitError(
                f"serve args.guard_min_samples: got {self.min_samples}, more than guard_window ({self.window})"
            )
        if not isinstance(self.recent, int) or isinstance(self.recent, bool) or self.recent < 0:
            raise RayexitError(f"serve args.guard_recent: got {self.recent!r}, expected a whole number >= 0 "
                               "(0, or guard_window and above: no separate view of the newest rows)")
        if not isinstance(self.boost, (int, float)) or isinstance(self.boost, bool) or not 1 <= self.boost < math.inf:
            raise RayexitError(f"serve args.guard_boost: got {self.boost!r}, "
                               "expected a finite number >= 1 (1: no boost)")
        for name in ("relax_margin", "max_overhead", "tighten_margin"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise RayexitError(f"serve args.guard_{name}: got {value!r}, expected a number in [0, 1]")
        if self.tighten_margin >= self.relax_margin and self.tighten_margin > 0:
            raise RayexitError(f"serve args.guard_tighten_margin: got {self.tighten_margin}, expected less than "
                               f"the relax margin ({self.relax_margin}): otherwise a relax would be tightened "
                               "again at the next check")
        if self.relax_wait is not None and (not isinstance(self.relax_wait, int) or isinstance(self.relax_wait, bool)
                                            or self.relax_wait < 1):
            raise RayexitError(f"serve args.guard_relax_wait: got {self.relax_wait!r}, expected a whole number >= 1 "
                               "(or null: guard_min_samples)")

    @property
    def tighten_at(self) -> float:
        return self.target + self.tighten_margin * (1 - self.target)

    @property
    def relax_after(self) -> int:
        return self.min_samples if self.relax_wait is None else self.relax_wait

    @property
    def relax_at(self) -> float:
        return self.target + self.relax_margin * (1 - self.target)


def stepped(kind: str, tuned: float, level: int, num_labels: int) -> float:
    """`tuned` moved `level` steps: > 0 tighter (each halves the distance to never exiting), < 0 looser."""
    if level == 0 or kind == "none":
        return tuned
    if level < 0:
        return float(relax(ExitPolicy(kind, tuned), -level, num_labels).thresholds)
    if kind == "patience":  # one more agreeing layer per step
        return float(tuned + level)
    if kind in HIGHER_IS_SURER:  # maxprob: leaves when p >= t; never at t > 1
        return 1.0 - (1.0 - min(tuned, 1.0)) / 2**level
    return tuned / 2**level  # uncertainties leave when below t; never at 0


def sentence_units(logits: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's statistic and prediction, [N, L] each, from full-depth logits [N, L, C]."""
    from rayexit.exits import ExitCache

    cache = ExitCache(logits)
    return cache.statistic(kind), cache.argmax


def word_units(cache, policy: ExitPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's statistic and tag per word, [words, L] each, from a full-depth `TokenCache`.

    Agreement on /v1/tag is per word. TOKEE replays approximately (live, running words attend to
    halted words' frozen states), as in `rayexit.token_exits.TokenCache`; SENTEE exactly.
    """
    layers = cache.uncertainty.shape[2]
    stats = torch.stack([token_statistic(policy, cache.uncertainty[:, :, k], cache.word_mask) for k in range(layers)],
                        dim=2)
    return stats[cache.word_mask], cache.tags[cache.word_mask]


def replay(kind: str, stats: torch.Tensor, preds: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """0-based exit index per row [N] under `thresholds` (the last exit always answers)."""
    layers = stats.shape[1]
    leave = passes(kind, stats, torch.tensor(list(thresholds), dtype=stats.dtype)).clone()
    leave[:, layers - 1] = True
    positions = torch.arange(layers, 0, -1)
    return (leave.int() * positions).argmax(1)


class CheckBudget:
    """Model time spent serving and checking, and wall time, decayed over `horizon_s`.

    A replica is busy when requests are queued or its model thread was in use more than `idle_below`
    of the time: a closed loop of clients leaves the queue empty after every batch, yet the next batch
    is already on its way. Busy, checks may take `share` of the model's time; otherwise they run freely.
    An idle model thread is not an idle machine: the HTTP proxy and the replica's event loop share the
    CPUs. With checks free up to half the time in use, a closed loop at a quarter of it paid 7-9% of its
    req/s for them on 2 cores (`rayexit bench serve --runs guard`), so "idle" means a tenth.
    """

    def __init__(self, share: float, horizon_s: float = 30.0, idle_below: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.share, self.horizon_s, self.idle_below, self.clock = share, horizon_s, idle_below, clock
        self.serving_s = self.checking_s = self.elapsed_s = 0.0
        self._last = clock()

    def _decay(self) -> None:
        now = self.clock()
        factor = math.exp(-(now - self._last) / self.horizon_s)
        self.serving_s *= factor
        self.checking_s *= factor
        self.elapsed_s = self.elapsed_s * factor + (now - self._last)
        self._last = now

    def utilisation(self) -> float:
        self._decay()
        return (self.serving_s + self.checking_s) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def served(self, seconds: float) -> None:
        self._decay()
        self.serving_s += seconds

    def checked(self, seconds: float) -> None:
        self._decay()
        self.checking_s += seconds

    def allows(self, queued: bool) -> bool:
        if not queued and self.utilisation() <= self.idle_below:
            return True
        return self.checking_s <= self.share * (self.serving_s + self.checking_s)


class AccuracyGuard:
    """Per-exit threshold state, the window of checked rows and the tighten/relax rule."""

    def __init__(self, config: GuardConfig, policy: ExitPolicy, num_layers: int, num_labels: int,
                 seed: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        if policy.kind == "none":
            raise RayexitError("serve args.guard_target: the served policy is `none` (full depth); nothing to guard")
        self.config = config
        self.base_policy = policy
        self.kind = policy.kind
        self.num_layers = num_layers
        self.num_labels = num_labels
        self.tuned = policy.per_layer(num_layers)
        self.levels = [0] * (num_layers - 1)  # the last exit always answers: nothing to move there
        self._since_move = [0] * (num_layers - 1)  # rows checked since each exit last moved
        self._shifted: set[int] = set()  # exits tightened only because another one did (evidence "shift")
        self._stats: deque[torch.Tensor] = deque(maxlen=config.window)
        self._preds: deque[torch.Tensor] = deque(maxlen=config.window)
        self.pending: deque[Any] = deque(maxlen=config.max_pending)
        self.samples = 0  # rows checked since start
        self.dropped = 0  # rows sampled but pushed out of `pending` before a check reached them
        self.moves: list[dict[str, Any]] = []
        self.budget = CheckBudget(config.max_overhead, clock=clock)
        self._random = random.Random(seed)
        self._boost_left = 0  # checked rows still to come at the boosted rate

    # -- thresholds ------------------------------------------------------------------------------

    def thresholds(self, levels: Sequence[int] | None = None) -> list[float]:
        levels = self.levels if levels is None else levels
        moved = [stepped(self.kind, t, lv, self.num_labels) for t, lv in zip(self.tuned, levels, strict=False)]
        return moved + self.tuned[len(moved):]

    def policy(self) -> ExitPolicy:
        return replace(self.base_policy, thresholds=self.thresholds())

    # -- sampling --------------------------------------------------------------------------------

    def offer(self, payloads: Sequence[Any]) -> int:
        """Keep each served row for a check with probability `sample`; returns how many were kept."""
        kept = 0
        rate = self.sample_rate()
        for payload in payloads:
            if self._random.random() < rate:
                if len(self.pending) == self.pending.maxlen:
                    self.dropped += 1
                self.pending.append(payload)
                kept += 1
        return kept

    def sample_rate(self) -> float:
        return min(1.0, self.config.sample * self.config.boost) if self._boost_left > 0 else self.config.sample

    def take(self) -> list[Any]:
        rows = []
        while self.pending and len(rows) < self.config.rows_per_check:
            rows.append(self.pending.popleft())
        return rows

    def may_check(self, queued: bool) -> bool:
        return bool(self.pending) and self.budget.allows(queued)

    # -- evidence and the rule ---------------------------------------------------------------------

    def record(self, stats: torch.Tensor, preds: torch.Tensor) -> list[dict[str, Any]]:
        """Add checked rows (per-exit statistic and prediction, [N, L]); returns the moves this made."""
        if stats.shape != preds.shape or stats.dim() != 2 or stats.shape[1] != self.num_layers:
            raise ValueError(f"expected [N, {self.num_layers}] statistics and predictions, got "
                             f"{tuple(stats.shape)} and {tuple(preds.shape)}")
        for row in range(stats.shape[0]):
            self._stats.append(stats[row].float())
            self._preds.append(preds[row].long())
        self.samples += stats.shape[0]
        self._since_move = [n + stats.shape[0] for n in self._since_move]
        self._boost_left = max(0, self._boost_left - stats.shape[0])
        moves = self._decide()
        if any(m["direction"] == "tighten" for m in moves):
            self._boost_left = self.config.window
        self.budget.share = min(1.0, self.config.max_overhead * (self.config.boost if self._boost_left else 1.0))
        return moves

    def _window(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._stats:
            return torch.zeros(0, self.num_layers), torch.zeros(0, self.num_layers, dtype=torch.long)
        return torch.stack(list(self._stats)), torch.stack(list(self._preds))

    def layer_agreement(self, layer: int, levels: Sequence[int] | None = None,
                        window: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[int, float | None]:
        """Rows of the window leaving at exit `layer` (0-based) under `levels`, and their agreement with full depth."""
        stats, preds = window if window is not None else self._window()
        if stats.shape[0] == 0:
            return 0, None
        exits = replay(self.kind, stats, preds, self.thresholds(levels))
        here = exits == layer
        count = int(here.sum())
        if count == 0:
            return 0, None
        agree = preds[here, layer] == preds[here, -1]
        return count, float(agree.double().mean())

    def _decide(self) -> list[dict[str, Any]]:
        # Tightening first (each exit on its own rows, then all early rows together), relaxing last,
        # so a relax is judged on the levels the tightening left and is never undone in the same call.
        window = self._window()
        views = [window]
        if 0 < self.config.recent < window[0].shape[0]:
            views.append((window[0][-self.config.recent:], window[1][-self.config.recent:]))
        moves: list[dict[str, Any]] = []
        for name, view in zip(("window", "recent"), views, strict=False):
            for move in self._tighten_each(view) + self._tighten_pooled(view):
                moves.append({**move, "view": name})
        if moves and self.config.shift_moves_thin_exits:
            moves += [{**move, "view": "window"} for move in self._tighten_thin(window)]
        moves += [{**move, "view": "window"} for move in self._relax(views)]
        self.moves += moves
        return moves

    def _tighten_thin(self, window: tuple[torch.Tensor, torch.Tensor]) -> list[dict[str, Any]]:
        """One step for every exit still at (or looser than) its tuned value whose own evidence is too thin to
        judge; called when something else tightened, i.e. traffic has moved."""
        moves: list[dict[str, Any]] = []
        for layer in range(self.num_layers - 1):
            if self.levels[layer] > 0:
                continue
            count, agreement = self.layer_agreement(layer, window=window)
            if count >= self.config.min_samples:
                continue
            self.levels[layer] = 1
            moves.append(self._moved(layer, "tighten", count, 1.0 if agreement is None else agreement,
                                     evidence="shift"))
        return moves

    def _tighten_each(self, window: tuple[torch.Tensor, torch.Tensor]) -> list[dict[str, Any]]:
        cfg = self.config
        moves: list[dict[str, Any]] = []
        for layer in range(self.num_layers - 1):
            while self.levels[layer] < cfg.max_steps:
                count, agreement = self.layer_agreement(layer, window=window)
                if count < cfg.min_samples or agreement is None or agreement >= cfg.tighten_at:
                    break
                self.levels[layer] += 1
                moves.append(self._moved(layer, "tighten", count, agreement))
        return moves

    def _relax(self, views: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, Any]]:
        """One step back toward tuned per exit, where the window says the looser threshold still agrees
        comfortably over all early rows and, if the exit has `min_samples` rows of its own, there too.
        A thin exit (too few rows of its own, as those the pooled rule moves usually are) relaxes on the
        pooled evidence alone; otherwise it would stay tightened until the replica restarts."""
        cfg = self.config
        floor = -cfg.max_steps if cfg.allow_past_tuned else 0
        moves: list[dict[str, Any]] = []
        window = views[0]
        for layer in range(self.num_layers - 1):
            if self.levels[layer] <= floor or self._since_move[layer] < cfg.relax_after:
                continue  # _moved resets the count, so an exit tightened just now waits
            looser = list(self.levels)
            looser[layer] -= 1
            for other in self._shifted - {layer}:  # no evidence of their own: judged at their tuned value
                looser[other] = min(looser[other], 0)
            count, agreement = self.layer_agreement(layer, looser, window)
            pooled_count, pooled, _ = self.pooled_agreement(looser, window)
            if pooled_count < cfg.min_samples or pooled is None or pooled < cfg.relax_at:
                continue
            own = count >= cfg.min_samples
            if own and (agreement is None or agreement < cfg.relax_at):
                continue
            if not all(self._comfortable(layer, looser, view) for view in views[1:]):
                continue
            self.levels[layer] -= 1
            if own:
                moves.append(self._moved(layer, "relax", count, agreement))
            else:
                moves.append(self._moved(layer, "relax", pooled_count, pooled, evidence="pooled"))
        return moves + self._release_shifted()

    def _release_shifted(self) -> list[dict[str, Any]]:
        """Exits moved only with a shift go back to tuned once no exit is tightened on evidence any more."""
        if not self._shifted or any(lv > 0 for k, lv in enumerate(self.levels) if k not in self._shifted):
            return []
        moves = []
        for layer in sorted(self._shifted):
            if self.levels[layer] > 0:
                self.levels[layer] = 0
                count, agreement = self.layer_agreement(layer)
                moves.append(self._moved(layer, "relax", count, 1.0 if agreement is None else agreement,
                                         evidence="shift"))
        self._shifted.clear()
        return moves

    def _comfortable(self, layer: int, levels: list[int], view: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """The newest rows do not contradict relaxing `layer` to `levels`: over all early rows and over the
        exit's own (each judged where it has `min_samples` rows), comfortably above target. The exit's own
        rows count as the tightening did: a relax that view would undo at the next check is no relax."""
        cfg = self.config
        count, agreement, _ = self.pooled_agreement(levels, view)
        if count >= cfg.min_samples and agreement is not None and agreement < cfg.relax_at:
            return False
        count, agreement = self.layer_agreement(layer, levels, view)
        return count < cfg.min_samples or agreement is None or agreement >= cfg.relax_at

    def pooled_agreement(self, levels: Sequence[int] | None = None,
                         window: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> tuple[int, float | None, list[int]]:
        """Early-leaving rows of the window under `levels`, their agreement with full depth, and the
        disagreeing rows per exit (0-based, the last exit left out)."""
        stats, preds = window if window is not None else self._window()
        guarded = self.num_layers - 1
        if stats.shape[0] == 0:
            return 0, None, [0] * guarded
        exits = replay(self.kind, stats, preds, self.thresholds(levels))
        early = exits < guarded
        count = int(early.sum())
        if count == 0:
            return 0, None, [0] * guarded
        answered = preds.gather(1, exits.unsqueeze(1)).squeeze(1)
        wrong = early & (answered != preds[:, -1])
        per_exit = torch.bincount(exits[wrong], minlength=self.num_layers)[:guarded]
        return count, 1.0 - float(wrong.sum()) / count, [int(n) for n in per_exit]

    def _tighten_pooled(self, window: tuple[torch.Tensor, torch.Tensor]) -> list[dict[str, Any]]:
        cfg = self.config
        moves: list[dict[str, Any]] = []
        while True:
            count, agreement, wrong = self.pooled_agreement(window=window)
            if count < cfg.min_samples or agreement is None or agreement >= cfg.tighten_at:
                return moves
            movable = [k for k in range(self.num_layers - 1) if wrong[k] > 0 and self.levels[k] < cfg.max_steps]
            if not movable:
                return moves
            layer = max(movable, key=lambda k: (wrong[k], -k))
            self.levels[layer] += 1
            moves.append(self._moved(layer, "tighten", count, agreement, evidence="pooled"))

    def _moved(self, layer: int, direction: str, count: int, agreement: float,
               evidence: str = "exit") -> dict[str, Any]:
        """A move's record; `rows` and `agreement` are the exit's own (`evidence: exit`, and `shift` for a
        thin exit moved with a tightening elsewhere) or those of all early-leaving rows (`evidence: pooled`),
        in the whole window or its newest rows (`view`, added by `_decide`)."""
        self._since_move[layer] = 0
        if direction == "tighten" and evidence == "shift":
            self._shifted.add(layer)
        elif direction == "tighten":
            self._shifted.discard(layer)  # now it has evidence of its own
        return {"layer": layer + 1, "direction": direction, "level": self.levels[layer], "rows": count,
                "agreement": round(agreement, 4), "evidence": evidence, "threshold": self.thresholds()[layer],
                "samples": self.samples}

    # -- what /v1/model and the metrics show --------------------------------------------------------

    def agreement_by_layer(self) -> dict[str, float | None]:
        """Replayed agreement at the current thresholds per exit (1-based keys), None where no row leaves."""
        window = self._window()
        return {str(layer + 1): self.layer_agreement(layer, window=window)[1] for layer in range(self.num_layers - 1)}

    def agreement(self) -> float | None:
        """Share of the window's early-leaving rows whose answer matches full depth, at the current thresholds."""
        return self.pooled_agreement()[1]

    def state(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 6)

        return {
            "target": self.config.target,
            "sample": self.config.sample,
            "agreement": rounded(self.agreement()),
            "agreement_by_layer": {k: rounded(v) for k, v in self.agreement_by_layer().items()},
            "samples": self.samples,
            "window": len(self._stats),
            "pending": len(self.pending),
            "dropped": self.dropped,
            "thresholds": self.thresholds(),
            "tuned_thresholds": list(self.tuned),
            "levels": list(self.levels),
            "allow_past_tuned": self.config.allow_past_tuned,
            "moves": len(self.moves),
            "sample_rate": self.sample_rate(),
        }
