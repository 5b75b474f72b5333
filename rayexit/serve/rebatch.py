"""Layer-level rebatching: rows that survive layer k in different request batches share layer k+1.

`run_early_exit` takes one batch through the layers on its own, so its deep layers run on the
few rows that did not exit while other batches wait for it at layer 1. Here every row that
is still running waits in the queue of the layer it needs next, with everything it needs
travelling with it: its hidden states, its own exit thresholds (a row keeps the relaxation
level it was admitted under), its depth cap and its patience state (last argmax, agreeing
layers so far). One `step()` picks a layer, merges the groups waiting there into one working
batch (re-padded to the longest row among them; the attention mask hides the new columns,
so every row's numbers are what it would get alone; a group joins only while the padding
stays within `pad_slack` of computing the groups apart), runs that layer and its exit,
answers the rows that leave and queues the rest for the next layer.

Which layer runs next (`LayerScheduler.pick`):
1. a queue whose oldest group has waited `STARVING_HOLDS` times `max_hold_s` or more, the longest
   waiting first (deepest on a tie): nobody starves;
2. a queue whose oldest group has waited `max_hold_s` or more: under a backlog (at least
   `BACKLOG_FULL_BATCHES` full batches of rows in flight) the one holding the most rows first,
   since then every queue is overdue and taking the deepest ran the queue with the fewest rows
   each time; under light load the deepest first, so the stragglers finish their requests;
3. a queue holding at least `full_rows` rows, deepest first: a full batch is what rebatching
   waits for, and the deeper it is, the sooner its requests finish;
4. otherwise the shallowest queue: new requests start at layer 1 at once, and when none wait,
   stragglers catch up with the rows ahead of them so that the two run deeper layers together.

A step that raises is retried on halves of its rows down to single rows, so one poisoned row
fails only its own ticket (the replica turns that into its request's 500).

Each row carries the model time it cost: every layer execution's seconds shared equally among
the rows it computed. A request batch's cost is then the sum over its rows, which the replica's
controller needs: the batch's wall time also holds the time its rows waited in layer queues
behind other batches' layers, and read as compute it made the controller shrink entry batches
exactly when merging needed them full.

Plain PyTorch and threading: `LayerScheduler` is driven step by step by tests; `Rebatcher`
runs it in one worker thread of the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayexit.data.encode import pad_batch
from rayexit.policy import ExitPolicy, passes, sentence_statistic
from rayexit.serve.engine import Answer, ServedClassifier
from rayexit.serve.queueing import ItemFailed

log = logging.getLogger(__name__)

__all__ = ["Exited", "LayerScheduler", "RebatchedClassifier", "Rebatcher"]

# Past this many holds a queue goes first whatever its size: the rows-first rule alone could leave a
# deep straggler waiting behind a stream of fuller shallow queues.
STARVING_HOLDS = 4
# Rows in flight, in full batches, from which overdue queues run fullest first rather than deepest first.
BACKLOG_FULL_BATCHES = 2


@dataclass
class Exited:
    """One row's answer: the label index, its softmax probability, the 1-based layer it left at, and its
    share of the model time of every layer it was computed in."""

    prediction: int
    confidence: float
    exit_layer: int
    model_s: float = 0.0


@dataclass
class _Group:
    """Rows waiting for the same layer. Before layer 1 they are token ids, after it hidden states."""

    futures: list[Future]
    kind: str
    thresholds: torch.Tensor  # [B, L]: each row's own policy
    last: torch.Tensor  # [B] 0-based index of the deepest layer the row may run
    previous: torch.Tensor  # [B] argmax at the last exit (-1 before layer 1)
    agree: torch.Tensor  # [B] layers in a row that agreed with it (patience)
    states: torch.Tensor  # [B, W] token ids before layer 1, else [B, W, H] hidden states
    mask: torch.Tensor  # [B, W] 1 for real tokens, right padded
    ready_at: float
    spent: list[float]  # [B] model seconds charged to each row so far

    @property
    def rows(self) -> int:
        return len(self.futures)

    def select(self, keep: torch.Tensor) -> _Group:
        """The rows where `keep` is True, with the padding columns none of them needs trimmed."""
        index = keep.nonzero().flatten()
        mask = self.mask[index]
        width = int(mask.sum(1).max())
        return _Group(
            [self.futures[i] for i in index.tolist()], self.kind, self.thresholds[index], self.last[index],
            self.previous[index], self.agree[index], self.states[index][:, :width], mask[:, :width], self.ready_at,
            [self.spent[i] for i in index.tolist()],
        )

    def halves(self) -> tuple[_Group, _Group]:
        middle = self.rows // 2
        first = torch.zeros(self.rows, dtype=torch.bool, device=self.mask.device)
        first[:middle] = True
        return self.select(first), self.select(~first)


def _merge(groups: list[_Group], pad_id: int) -> _Group:
    """One working batch from several groups at the same layer, re-padded to the longest row among them."""
    if len(groups) == 1:
        return groups[0]
    width = max(g.mask.shape[1] for g in groups)
    states, masks = [], []
    for g in groups:
        extra = width - g.mask.shape[1]
        if g.states.dim() == 2:  # token ids: pad with the tokenizer's pad id, as pad_batch does
            states.append(F.pad(g.states, (0, extra), value=pad_id))
        else:  # hidden states: the new columns are masked out of attention, so their values never matter
            states.append(F.pad(g.states, (0, 0, 0, extra)))
        masks.append(F.pad(g.mask, (0, extra)))
    return _Group(
        [f for g in groups for f in g.futures], groups[0].kind, torch.cat([g.thresholds for g in groups]),
        torch.cat([g.last for g in groups]), torch.cat([g.previous for g in groups]),
        torch.cat([g.agree for g in groups]), torch.cat(states), torch.cat(masks), min(g.ready_at for g in groups),
        [s for g in groups for s in g.spent],
    )


class LayerScheduler:
    """Per-layer queues of rows in flight and the rule that picks which layer runs next.

    `add` and `step` may be called from different threads: the queues are guarded by a lock,
    and the model runs outside it so that adding work never waits for a layer to finish.
    `on_layer(layer, rows)` is told of every layer execution (metrics).
    """

    def __init__(
        self,
        model,
        pad_id: int = 0,
        full_rows: int = 16,
        max_hold_s: float = 0.01,
        token_budget: int = 4096,
        pad_slack: float = 1.25,
        clock: Callable[[], float] = time.perf_counter,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> None:
        self.model = model
        self.num_layers = model.num_layers
        self.pad_id = pad_id
        self.full_rows = max(1, full_rows)
        self.max_hold_s = max_hold_s
        self.token_budget = token_budget
        self.pad_slack = pad_slack
        self.clock = clock
        self.on_layer = on_layer
        self._queues: list[deque[_Group]] = [deque() for _ in range(self.num_layers)]
        self._rows = [0] * self.num_layers
        self._lock = threading.Lock()
        self.layer_runs = 0  # layer executions so far
        self.layer_rows = 0  # rows computed over all of them

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pending(self) -> int:
        """Rows still in flight (queued at some layer)."""
        with self._lock:
            return sum(self._rows)

    def waiting(self) -> list[int]:
        """Rows queued per layer (index 0: not started)."""
        with self._lock:
            return list(self._rows)

    def add(self, sequences: list[list[int]], caps: list[int | None], policy: ExitPolicy) -> list[Future]:
        """Queue texts (token ids) at layer 1; each future resolves to an `Exited` or raises the failure."""
        futures: list[Future] = [Future() for _ in sequences]
        if not sequences:
            return futures
        device = self.device
        thresholds = torch.tensor(policy.per_layer(self.num_layers), device=device)
        last = [self.num_layers - 1 if c is None else max(1, min(c, self.num_layers)) - 1 for c in caps]
        # Sorted by length and cut to the token budget, as the runner's passes are: less padding at layer 1.
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        groups, chunk, now = [], [], self.clock()
        for i in order + [None]:
            if i is not None and (not chunk or (len(chunk) + 1) * len(sequences[i]) <= self.token_budget):
                chunk.append(i)
                continue
            ids, mask = pad_batch([sequences[k] for k in chunk], self.pad_id)
            rows = len(chunk)
            groups.append(_Group(
                [futures[k] for k in chunk], policy.kind, thresholds.expand(rows, -1).clone(),
                torch.tensor([last[k] for k in chunk], device=device),
                torch.full((rows,), -1, dtype=torch.long, device=device),
                torch.zeros(rows, dtype=torch.long, device=device), ids.to(device), mask.to(device), now,
                [0.0] * rows,
            ))
            chunk = [] if i is None else [i]
        with self._lock:
            for group in groups:
                self._push(0, group)
        return futures

    def _push(self, layer: int, group: _Group) -> None:
        self._queues[layer].append(group)
        self._rows[layer] += group.rows

    def pick(self, now: float | None = None) -> int | None:
        """The 0-based layer to run next (see the module's docstring), or None when nothing waits."""
        now = self.clock() if now is None else now
        with self._lock:
            return self._pick(now)

    def _pick(self, now: float) -> int | None:
        waiting = [k for k in range(self.num_layers) if self._queues[k]]
        if not waiting:
            return None
        waited = {k: now - min(g.ready_at for g in self._queues[k]) for k in waiting}
        starving = [k for k in waiting if waited[k] >= STARVING_HOLDS * self.max_hold_s]
        if starving:
            return max(starving, key=lambda k: (waited[k], k))
        overdue = [k for k in waiting if waited[k] >= self.max_hold_s]
        if overdue:
            if sum(self._rows) >= BACKLOG_FULL_BATCHES * self.full_rows:
                return max(overdue, key=lambda k: (self._rows[k], k))
            return max(overdue)
        full = [k for k in waiting if self._rows[k] >= self.full_rows]
        if full:
            return max(full)
        return waiting[0]

    def _take(self, layer: int) -> list[_Group]:
        """The oldest group at `layer` and every other there that fits beside it: the same kind, the token
        budget, and at most `pad_slack` times the padded tokens the groups would compute apart (on a CPU,
        compute grows with padded tokens, so merging a short group into a long one must not double its cost)."""
        queue = self._queues[layer]
        taken = [queue.popleft()]
        rows, width, apart = taken[0].rows, taken[0].mask.shape[1], taken[0].mask.numel()
        kept: list[_Group] = []
        while queue:
            group = queue.popleft()
            wider = max(width, group.mask.shape[1])
            merged = (rows + group.rows) * wider
            fits = merged <= self.token_budget and merged <= self.pad_slack * (apart + group.mask.numel())
            if group.kind != taken[0].kind or not fits:
                kept.append(group)
                continue
            taken.append(group)
            rows, width, apart = rows + group.rows, wider, apart + group.mask.numel()
        queue.extend(kept)
        self._rows[layer] -= rows
        return taken

    def step(self) -> bool:
        """Run one layer on one merged working batch; False when nothing is queued."""
        with self._lock:
            layer = self._pick(self.clock())
            if layer is None:
                return False
            groups = self._take(layer)
        try:
            batch = _merge(groups, self.pad_id)
        except Exception as exc:  # noqa: BLE001 - never leave a row unanswered
            for group in groups:
                for future in group.futures:
                    _fail(future, exc)
            return True
        alive = [not future.cancelled() for future in batch.futures]
        if not all(alive):  # their requests were abandoned: stop computing for them
            if not any(alive):
                return True
            batch = batch.select(torch.tensor(alive, device=batch.mask.device))
        self._run(layer, batch)
        return True

    def run_until_idle(self) -> int:
        """Step until every queued row has its answer; returns the number of steps."""
        steps = 0
        while self.step():
            steps += 1
        return steps

    def _run(self, layer: int, group: _Group) -> None:
        started = self.clock()
        charged = False
        try:
            hidden, probs = self._compute(layer, group)
            self._charge(group, started)
            charged = True
            self._route(layer, group, hidden, probs)  # answers are set once, so a retried half cannot change them
        except Exception as exc:  # noqa: BLE001 - pinned on rows by halving, then reported per row
            if not charged:  # the failed attempt cost its rows too; the halves carry that into their retries
                self._charge(group, started)
            if group.rows == 1:
                log.warning("the model failed on one row at layer %d: %s: %s", layer + 1, type(exc).__name__, exc)
                _fail(group.futures[0], exc)
                return
            first, second = group.halves()
            self._run(layer, first)
            self._run(layer, second)
            return
        self.layer_runs += 1
        self.layer_rows += group.rows
        if self.on_layer is not None:
            self.on_layer(layer + 1, group.rows)

    def _charge(self, group: _Group, started: float) -> None:
        share = (self.clock() - started) / group.rows
        group.spent = [s + share for s in group.spent]

    @torch.no_grad()
    def _compute(self, layer: int, group: _Group) -> tuple[torch.Tensor, torch.Tensor]:
        """The same operations as `run_early_exit`'s loop body, on a working batch."""
        model = self.model
        hidden = model.embed(group.states) if layer == 0 else group.states
        additive = model.additive_mask(group.mask, hidden.dtype)
        hidden = model.run_layer(layer, hidden, additive)
        probs = torch.softmax(model.exit_logits(layer, hidden, group.mask).float(), dim=-1)
        if probs.is_cuda:  # kernels only queued so far: the clock must see them finish, not their launch
            torch.cuda.synchronize(probs.device)
        return hidden, probs

    def _route(self, layer: int, group: _Group, hidden: torch.Tensor, probs: torch.Tensor) -> None:
        """Answer the rows that leave at this layer; queue the others for the next one."""
        confidence, predicted = probs.max(-1)
        agree = torch.where(predicted == group.previous, group.agree + 1, torch.zeros_like(group.agree))
        statistic = sentence_statistic(group.kind, probs, agree)
        leaving = passes(group.kind, statistic, group.thresholds[:, layer].to(statistic.dtype))
        leaving = leaving | (group.last == layer)
        if leaving.any():
            done = leaving.nonzero().flatten().tolist()
            labels, confidences = predicted[leaving].tolist(), confidence[leaving].float().tolist()
            for i, label, sure in zip(done, labels, confidences, strict=True):
                _resolve(group.futures[i], Exited(label, sure, layer + 1, group.spent[i]))
        staying = ~leaving
        if not staying.any():
            return
        moved = _Group(group.futures, group.kind, group.thresholds, group.last, predicted, agree, hidden,
                       group.mask, self.clock(), group.spent)
        survivors = moved.select(staying)
        with self._lock:
            self._push(layer + 1, survivors)


def _resolve(future: Future, value: Exited) -> None:
    with contextlib.suppress(InvalidStateError):  # its caller gave up on it (cancelled request), maybe just now
        future.set_result(value)


def _fail(future: Future, exc: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        future.set_exception(exc)


class Rebatcher:
    """A `LayerScheduler` stepped by one worker thread, which sleeps while nothing is queued."""

    def __init__(self, scheduler: LayerScheduler) -> None:
        self.scheduler = scheduler
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="rayexit-rebatch", daemon=True)
        self._thread.start()

    def submit(self, sequences: list[list[int]], caps: list[int | None], policy: ExitPolicy) -> list[Future]:
        futures = self.scheduler.add(sequences, caps, policy)
        with self._wake:
            self._wake.notify()
        return futures

    async def run(self, sequences: list[list[int]], caps: list[int | None], policy: ExitPolicy) -> list:
        """Every row's `Exited`, or the exception that failed that row alone, in input order."""
        futures = self.submit(sequences, caps, policy)
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.scheduler.pending():
                    self._wake.wait()
                if self._closed:
                    return
            try:
                self.scheduler.step()
            except Exception:  # noqa: BLE001 - a scheduler bug must not kill the thread and hang every request
                log.exception("rebatching step failed outside the model")

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)


class RebatchedClassifier:
    """The replica's classifier with rebatching on: `ServedClassifier`'s answers, rows merged across batches.

    Load relief and per-request depth caps are applied per row by `ServedClassifier.plan`, exactly as
    the runner applies them per batch; a row the model fails on comes back as an `ItemFailed` in its
    place, so the replica fails only that row's request.
    """

    def __init__(
        self,
        engine: ServedClassifier,
        full_rows: int = 16,
        max_hold_s: float = 0.01,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.scheduler = LayerScheduler(
            engine.model, engine.pad_id, full_rows, max_hold_s, engine.token_budget, on_layer=on_layer
        )
        self.rebatcher = Rebatcher(self.scheduler)

    async def classify_encoded(
        self, sequences: list[list[int]], layer_caps: list[int | None] | None = None, relax_level: int = 0
    ) -> tuple[list[Answer | ItemFailed], list[float | None]]:
        """Every row's answer (or `ItemFailed`) in input order, and the model seconds each row cost
        (None where it failed)."""
        caps, policy = self.engine.plan(len(sequences), layer_caps, relax_level)
        answers: list[Answer | ItemFailed] = []
        model_s: list[float | None] = []
        for result in await self.rebatcher.run(sequences, caps, policy):
            if isinstance(result, Exited):
                answers.append(Answer(self.engine.labels[result.prediction], result.confidence, result.exit_layer))
                model_s.append(result.model_s)
            else:
                answers.append(ItemFailed(f"{type(result).__name__}: {result}"))
                model_s.append(None)  # not known: a batch of failures only is charged its wall time
        return answers, model_s

    def close(self) -> None:
        self.rebatcher.close()
