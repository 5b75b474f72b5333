"""The Serve deployment: one replica's model, its batch queue, admission and load shedding.

A request is checked (schema, then every text through the tokenizer, then its token cost)
before anything of it is queued; admitted, its texts go through `@serve.batch` in bounded
waves so texts from many requests share a forward pass and a big request cannot hold the
queue. The model runs in one worker thread so the event loop keeps accepting (and refusing)
requests while a batch computes. A batch that fails is split until the failure is pinned on
the texts that cause it, so one bad text fails only its own request. After every batch the
adaptive controller may move the batch size, the batch wait and the relaxation level.

The HTTP routes live in http.py; Serve builds them after the constructor
(`__serve_build_asgi_app__`), when the limits and the model's depth are known.

Serve YAML: `import_path: rayexit.serve.app:build_app` with the `args:` of ServeSettings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from rayexit.errors import RayexitError
from rayexit.serve.controller import relax_policy
from rayexit.serve.queueing import Admission, ItemFailed, Overloaded, Shed, Skipped, run_isolated, waves
from rayexit.serve.settings import ServeSettings
from rayexit.serve.validation import RequestError

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ExitClassifier"
# With rebatching, this many entry batches may be inside the layer scheduler at once: the merging happens there.
REBATCH_BATCHES = 8


@dataclass
class _Call:
    """What the texts of one request share: once one fails or is shed, the rest are skipped."""

    failed: bool = False


@dataclass
class _Item:
    payload: Any  # token ids (classification) or words (tagging)
    layer_cap: int | None
    tokens: int
    call: _Call = field(default_factory=_Call)
    enqueued: float = 0.0
    taken: bool = False  # out of the backlog: taken by a batch, or abandoned by its request
    model_s: float | None = None  # with rebatching: the model time this item cost (its share of each layer run)


# Helpers sit above the deployment class: Serve captures the ingress class when it is decorated,
# and a module-level name defined after it was missing in the replica (NameError at request time).
def _load_tagger(settings: ServeSettings, saved_policy):
    """The token model on the settings' device and dtype, serving its saved token policy (or the override)."""
    try:
        from rayexit.serve.tagging import ServedTagger, served_token_policy
    except ImportError as exc:
        raise RayexitError(f"{settings.model_dir}: token models cannot be served yet ({exc})") from None
    try:
        policy = served_token_policy(saved_policy, settings.policy_kind, settings.thresholds)
    except RayexitError as exc:
        raise RayexitError(f"serve args (policy_kind / thresholds) for a token model: {exc}") from None
    tagger = ServedTagger.from_model_dir(
        settings.model_dir, policy, settings.device, settings.dtype, settings.token_budget, settings.overload_layer_cap
    )
    tagger.warm_up()
    return tagger


def _make_guard(settings: ServeSettings, served):
    """The guard over the served model's policy (classifier or tagger), or None when guard_target is unset;
    the model then serves the guard's thresholds."""
    config = settings.guard_config()
    if config is None:
        return None
    from rayexit.serve.guard import AccuracyGuard

    guard = AccuracyGuard(config, served.policy, served.num_layers, len(served.labels))
    served.policy = guard.policy()
    return guard


def _encode_checked(encode, texts: list[str]) -> list:
    """`encode(texts)`; when the tokenizer refuses the list, find the text(s) it refuses and answer 422 naming one."""
    try:
        return encode(texts)
    except Exception:  # noqa: BLE001 - the tokenizer raises TypeError, ValueError or its own errors
        for i, text in enumerate(texts):
            try:
                encode([text])
            except Exception as exc:  # noqa: BLE001
                raise RequestError(
                    422, f"texts[{i}]", f"the tokenizer cannot encode this text ({type(exc).__name__})",
                    reason="text_not_encodable",
                ) from None
        raise


def _refuse_wordless(has_words: list[bool], what: str) -> None:
    """422 naming the first text that leaves nothing to read (the schema's "non-blank" lets through
    control, zero-width and lone combining characters, which tokenizers drop)."""
    for i, ok in enumerate(has_words):
        if not ok:
            raise RequestError(422, f"texts[{i}]", f"{what}; expected at least one word", reason="no_words")


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class ExitClassifier:
    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        from rayexit.config import ExitPolicy
        from rayexit.models import read_exit_config
        from rayexit.serve.controller import AdaptiveBatchController
        from rayexit.serve.engine import ServedClassifier
        from rayexit.serve.metrics import ServeMetrics

        self.settings = ServeSettings.from_args(settings)
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.exit_config = read_exit_config(self.settings.model_dir)
        self.limits = self.settings.limits()
        self.engine = self.tagger = self.rebatched = None
        self.layer_runs = self.layer_rows = 0  # layer executions and the rows they computed (rows per run)
        if self.exit_config.task == "sequence":
            policy = None
            if self.settings.policy_kind is not None or self.settings.thresholds is not None:
                base = self.exit_config.policy
                policy = ExitPolicy(
                    self.settings.policy_kind or base.kind,
                    base.thresholds if self.settings.thresholds is None else self.settings.thresholds,
                )
            self.engine = ServedClassifier.from_model_dir(
                self.settings.model_dir,
                policy,
                self.settings.device,
                self.settings.dtype,
                self.settings.token_budget,
                self.settings.overload_layer_cap,
            )
            self.engine.warm_up()
            self.num_layers = self.engine.num_layers
            if self.settings.rebatch:
                from rayexit.serve.rebatch import RebatchedClassifier

                self.rebatched = RebatchedClassifier(self.engine, self.settings.max_batch_size,
                                                     self.settings.rebatch_hold_ms / 1000,
                                                     lambda layer, rows: self._count_layer(rows))
        else:
            self.tagger = _load_tagger(self.settings, self.exit_config.policy)
            self.num_layers = self.tagger.num_layers
        self.guard = _make_guard(self.settings, self.engine or self.tagger)
        self._checking: asyncio.Task | None = None
        self.controller = AdaptiveBatchController(self.settings.controller_config())
        self.admission = Admission(self.settings.queue_wait_s(), self.settings.max_queued_texts,
                                   clock=time.perf_counter)
        self.metrics = ServeMetrics(self.num_layers)
        self._publish_controller_state()  # every gauge has a value from the start, not from the first change
        if self.guard is not None:
            self._publish_guard_state()
        # One worker thread: batches run one at a time, and torch's own threads do the parallel work.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayexit-model")

    def __serve_build_asgi_app__(self):
        from rayexit.serve.http import build_api

        return build_api(self, lambda: self.metrics.failed.inc(tags={"reason": "internal"}))

    # -- what the routes call --------------------------------------------------------------------

    def model_info(self) -> dict[str, Any]:
        model = self.engine if self.engine is not None else self.tagger
        policy = model.policy
        in_force = relax_policy(policy, self.controller.relax_level, len(self.exit_config.labels))
        limits = self.limits
        return {
            "task": self.exit_config.task,
            "labels": self.exit_config.labels,
            "layers": self.num_layers,
            "method": self.exit_config.method,
            "policy": {"kind": policy.kind, "thresholds": policy.per_layer(self.num_layers)},
            # What requests get now: the policy above relaxed `batching.relax_level` steps under load.
            "policy_in_force": {"kind": in_force.kind, "thresholds": in_force.per_layer(self.num_layers)},
            "max_length": self.exit_config.max_length,
            "limits": {
                "max_texts": limits.max_texts,
                "max_text_chars": limits.max_text_chars,
                "max_body_bytes": limits.max_body_bytes,
                "max_text_tokens": limits.max_text_tokens,
                "max_request_tokens": limits.max_request_tokens,
            },
            "batching": {
                "adaptive": self.settings.adaptive,
                "max_batch_size": self.controller.max_batch_size,
                "batch_wait_ms": round(self.controller.batch_wait_timeout_s * 1000, 3),
                "target_p99_ms": self.settings.target_p99_ms,
                "relax_level": self.controller.relax_level,
                "wave_tokens": self.settings.wave_tokens,
                "rebatch": self.rebatched is not None,
                "layer_runs": self.layer_runs,
                "layer_rows": self.layer_rows,
                "rows_per_layer_run": round(self.layer_rows / self.layer_runs, 3) if self.layer_runs else None,
            },
            "queue": {
                "queued_texts": self.admission.queued_texts,
                "queued_tokens": self.admission.queued_tokens,
                "max_queued_texts": self.admission.max_queued_texts,
                "max_queue_wait_ms": round(self.admission.max_wait_s * 1000, 3),
                "head_wait_ms": round(self.admission.head_wait_s * 1000, 1),
                "estimated_drain_ms": round(self.admission.estimated_wait_s() * 1000, 1),
            },
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "guard": self.guard.state() if self.guard is not None else None,
        }

    async def classify(self, texts: list[str], max_layers: int | None) -> dict[str, Any]:
        started = time.perf_counter()
        if self.engine is None:
            raise RequestError(
                400, "route", f"this server holds a {self.exit_config.task} model; use /v1/tag for it",
                reason="wrong_route",
            )
        self._check_depth(max_layers)
        sequences = _encode_checked(self.engine.encode, texts)
        _refuse_wordless([len(s) > self.engine.special_tokens for s in sequences],
                         "nothing left once tokenized (only characters the tokenizer drops)")
        items = self._items(sequences, [len(s) for s in sequences], max_layers)
        batcher = self._classify_batch if self.rebatched is None else self._classify_batch_rebatched
        answers = await self._submit(batcher, items)
        self._record_latency(started, "classify")
        return {"results": [a.to_json() for a in answers], "layers": self.num_layers}

    async def tag(self, texts: list[str], max_layers: int | None) -> dict[str, Any]:
        started = time.perf_counter()
        if self.tagger is None:
            raise RequestError(
                400, "route", f"this server holds a {self.exit_config.task} classification model; "
                "/v1/tag needs a token (tagging) model, use /v1/classify", reason="wrong_route",
            )
        self._check_depth(max_layers)
        sentences = [text.split() for text in texts]
        _refuse_wordless([bool(s) for s in sentences], "no words once split on whitespace")
        costs = _encode_checked(self.tagger.count_tokens, sentences)
        items = self._items(sentences, costs, max_layers)
        results = await self._submit(self._tag_batch, items)
        self._record_latency(started, "tag")
        return {"results": results, "layers": self.num_layers}

    def refuse(self, error: RequestError):
        from rayexit.serve.http import error_response

        if error.status >= 500 and error.status != 503:
            self.metrics.failed.inc(tags={"reason": error.reason})
        else:
            self.metrics.rejected.inc(tags={"status": str(error.status), "reason": error.reason})
        return error_response(error)

    # -- admission and waves -----------------------------------------------------------------------

    def _check_depth(self, max_layers: int | None) -> None:
        # The schema says the same (maximum = layers); kept for callers that bypass FastAPI (handles).
        if max_layers is not None and not 1 <= max_layers <= self.num_layers:
            raise RequestError(422, "max_layers", f"got {max_layers}, expected a whole number from 1 to "
                               f"{self.num_layers}", self.num_layers)

    def _items(self, payloads: list, costs: list[int], max_layers: int | None) -> list[_Item]:
        limits = self.limits
        for i, cost in enumerate(costs):
            if cost > limits.max_text_tokens:
                raise RequestError(
                    422, f"texts[{i}]", f"{cost} tokens, more than the limit of {limits.max_text_tokens} per text",
                    limits.max_text_tokens, reason="too_many_tokens",
                )
        total = sum(costs)
        if total > limits.max_request_tokens:
            raise RequestError(
                413, "texts", f"{total} tokens in all, more than the limit of {limits.max_request_tokens} per "
                "request; send fewer or shorter texts per request", limits.max_request_tokens,
                reason="too_many_tokens",
            )
        call = _Call()
        return [_Item(p, max_layers, c, call) for p, c in zip(payloads, costs, strict=True)]

    async def _submit(self, batch_method, items: list[_Item]) -> list:
        """Admit the request, then queue its items one wave at a time; answers in item order."""
        try:
            self.admission.admit(len(items), sum(item.tokens for item in items))
        except Overloaded as exc:
            raise RequestError(503, "server", str(exc), reason="overloaded",
                               headers={"Retry-After": str(exc.retry_after_s)}) from None
        self.metrics.queued_texts.set(self.admission.queued_texts)
        answers: list = []
        try:
            for wave in waves([item.tokens for item in items], self.settings.wave_tokens):
                now = time.perf_counter()
                batch = [items[k] for k in wave]
                for item in batch:
                    item.enqueued = now
                answers += await asyncio.gather(*(batch_method(item) for item in batch))
                self._raise_for_failures(answers)
        finally:
            # Texts never taken by a batch (the request was cancelled, failed or shed) leave the backlog here:
            # Serve drops cancelled items from its queue without telling the batch handler.
            abandoned = [item for item in items if not item.taken]
            for item in abandoned:
                item.taken = True
            self.admission.release(len(abandoned), sum(item.tokens for item in abandoned))
            self.metrics.queued_texts.set(self.admission.queued_texts)
        return answers

    def _raise_for_failures(self, answers: list) -> None:
        for index, answer in enumerate(answers):
            if isinstance(answer, Shed):
                raise RequestError(
                    503, "server", f"queued {answer.waited_s * 1000:.0f} ms, past the deadline of "
                    f"{self.admission.deadline_s * 1000:.0f} ms; try again shortly", reason="overloaded",
                    headers={"Retry-After": str(self.admission.retry_after_s())},
                )
            if isinstance(answer, ItemFailed):
                raise RequestError(500, f"texts[{index}]", "the model failed on this text; the other requests "
                                   "in its batch were answered", reason="model_error")
        if any(isinstance(answer, Skipped) for answer in answers):  # defensive: a failure above comes with it
            raise RequestError(500, "server", "the request failed", reason="model_error")

    def _record_latency(self, started: float, route: str) -> None:
        latency = time.perf_counter() - started
        self.controller.record_request(latency)
        self.metrics.latency.observe(latency * 1000, tags={"route": route})

    # -- batching ----------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _classify_batch(self, items: list[_Item]) -> list:
        return await self._run_batch(items, self._classify_run)

    # Several entry batches at once, so the layer scheduler has rows from different batches to merge.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002, max_concurrent_batches=REBATCH_BATCHES)
    async def _classify_batch_rebatched(self, items: list[_Item]) -> list:
        return await self._run_batch(items, self._classify_run)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _tag_batch(self, items: list[_Item]) -> list:
        return await self._run_batch(items, self._tag_run)

    async def _classify_run(self, items: list[_Item]) -> list:
        if self.rebatched is not None:  # failures come back per row (ItemFailed), already isolated
            answers, model_s = await self.rebatched.classify_encoded(
                [item.payload for item in items], [item.layer_cap for item in items], self.controller.relax_level
            )
            served = [(item, a) for item, a in zip(items, answers) if not isinstance(a, ItemFailed)]
            self._observe([a.exit_layer for _, a in served], [item.payload for item, _ in served])
            for item, seconds in zip(items, model_s, strict=True):
                item.model_s = seconds
            return answers
        loop = asyncio.get_running_loop()
        answers, stats = await loop.run_in_executor(
            self._pool,
            self.engine.classify_encoded,
            [item.payload for item in items],
            [item.layer_cap for item in items],
            self.controller.relax_level,
        )
        self._observe([a.exit_layer for a in answers], [item.payload for item in items], stats)
        return answers

    def _count_layer(self, rows: int) -> None:
        """One execution of an encoder layer on `rows` texts (the rebatching worker thread calls it too)."""
        self.layer_runs += 1
        self.layer_rows += rows
        self.metrics.layer_rows.observe(rows)

    async def _tag_run(self, items: list[_Item]) -> list:
        loop = asyncio.get_running_loop()
        results, stats = await loop.run_in_executor(
            self._pool,
            self.tagger.tag_words,
            [item.payload for item in items],
            [item.layer_cap for item in items],
            self.controller.relax_level,
        )
        # A sentence leaves the network with its last word: one observation per text, as for /v1/classify.
        layers = [max(r["exit_layers"]) for r in results if r["exit_layers"]]
        self._observe(layers, [item.payload for item in items if item.payload], stats)
        return results

    def _observe(self, exit_layers: list[int], served: list, stats=None) -> None:
        """Metrics of one run (both routes, rebatched or not), and the guard's sample of what was served."""
        if stats is not None:
            if stats.padded_tokens:
                self.metrics.padding.observe(1 - stats.real_tokens / stats.padded_tokens)
            for rows in stats.layer_rows:
                self._count_layer(rows)
        for layer in exit_layers:
            self.metrics.exit_layer.observe(layer)
        if self.guard is not None:
            self.guard.offer(served)

    async def _run_batch(self, items: list[_Item], run) -> list:
        """One batch from Serve's queue: skip what is dead or too old, run the rest with failures isolated."""
        started = time.perf_counter()
        answers: list = [None] * len(items)
        live: list[int] = []
        fresh = [item for item in items if not item.taken]
        for item in fresh:
            item.taken = True
        self.admission.record_wait(max((started - item.enqueued for item in items), default=0.0))
        self.admission.release(len(fresh), sum(item.tokens for item in fresh))  # an emptied queue resets the wait
        self.metrics.queued_texts.set(self.admission.queued_texts)
        for k, item in enumerate(items):
            self.metrics.queue_wait.observe((started - item.enqueued) * 1000)
            if item.call.failed:
                answers[k] = Skipped()
            elif self.admission.expired(item.enqueued, started):
                answers[k] = Shed(started - item.enqueued)
                item.call.failed = True
            else:
                live.append(k)
        results = await run_isolated(run, [items[k] for k in live])
        for k, result in zip(live, results, strict=True):
            answers[k] = result
            if isinstance(result, ItemFailed):
                items[k].call.failed = True
        compute = time.perf_counter() - started
        charged = [items[k].model_s for k in live if items[k].model_s is not None]
        if charged:
            # Rebatched: the batch's wall time includes its rows' waits in layer queues behind other batches.
            # Read as compute, that made the controller halve entry batches just when merging needed them full.
            compute = sum(charged)
        self.admission.record_batch(sum(items[k].tokens for k in live), compute)
        self.controller.record_batch(len(items), compute, backlog=self.admission.queued_texts)
        self.metrics.batch_size.observe(len(items))
        if self.controller.maybe_update() is not None:
            self._publish_controller_state()
        if self.guard is not None:
            self.guard.budget.served(compute)
            self._maybe_check()
        return answers

    # -- the accuracy guard (serve/guard.py): checks run after the batch's answers are handed back ---------

    def _maybe_check(self) -> None:
        # Load relief wins while it is on: a replica over its latency target gets no extra work from checks,
        # and the guard's thresholds wait (relaxed by the controller's level) until relief ends.
        if self._checking is None and self.controller.relax_level == 0 and self.guard.may_check(self._queued()):
            self._checking = asyncio.get_running_loop().create_task(self._check())

    def _queued(self) -> bool:
        return self.admission.queued_texts > 0

    async def _check(self) -> None:
        from rayexit.serve.guard import sentence_units, word_units

        loop = asyncio.get_running_loop()
        served = self.engine or self.tagger
        try:
            while self.guard.pending and self.controller.relax_level == 0:
                if not self.guard.may_check(self._queued()):
                    await asyncio.sleep(0.1)  # over budget: wait for capacity, not for the next batch
                    continue
                rows = self.guard.take()
                started = time.perf_counter()
                if self.engine is not None:
                    logits = await loop.run_in_executor(self._pool, self.engine.exit_logits_encoded, rows)
                    units = sentence_units(logits, self.guard.kind)
                else:  # /v1/tag: one unit per word
                    cache = await loop.run_in_executor(self._pool, self.tagger.exit_cache, rows)
                    units = word_units(cache, self.guard.base_policy)
                self.guard.budget.checked(time.perf_counter() - started)
                if self.guard.record(*units):
                    served.policy = self.guard.policy()
                self._publish_guard_state()
        except Exception:  # noqa: BLE001 - a failed check must never reach a request; its rows are dropped
            log.exception("accuracy guard: a check failed; its rows are dropped")
        finally:
            self._checking = None

    def _publish_guard_state(self) -> None:
        state = self.guard.state()
        if state["agreement"] is not None:
            self.metrics.guard_agreement.set(state["agreement"])
        for layer, value in state["agreement_by_layer"].items():
            if value is not None:
                self.metrics.guard_layer_agreement.set(value, tags={"layer": layer})
        for layer, value in enumerate(state["thresholds"][:-1], start=1):
            self.metrics.guard_threshold.set(value, tags={"layer": str(layer)})
        self.metrics.guard_samples.set(state["samples"])

    def _publish_controller_state(self) -> None:
        for batcher in (self._classify_batch, self._classify_batch_rebatched, self._tag_batch):
            batcher.set_max_batch_size(self.controller.max_batch_size)
            batcher.set_batch_wait_timeout_s(self.controller.batch_wait_timeout_s)
        self.metrics.max_batch_size.set(self.controller.max_batch_size)
        self.metrics.batch_wait.set(self.controller.batch_wait_timeout_s * 1000)
        self.metrics.relax_level.set(self.controller.relax_level)
        self.metrics.queued_texts.set(self.admission.queued_texts)

    def controller_history(self) -> list[dict[str, Any]]:
        """The controller's decisions so far (for the benchmark and for debugging via a handle)."""
        from dataclasses import asdict

        return [asdict(d) for d in self.controller.history]


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for Serve YAML (`import_path: rayexit.serve.app:build_app`)."""
    return bind_app(ServeSettings.from_args(dict(args)))


def bind_app(settings: ServeSettings, ray_actor_options: dict[str, Any] | None = None) -> serve.Application:
    """The deployment bound to checked settings; a GPU is requested when `device: cuda` says so."""
    settings = settings.resolved()
    options = dict(ray_actor_options or {})
    if settings.device == "cuda":
        options.setdefault("num_cpus", 1)
        options["num_gpus"] = 1
    deployment = ExitClassifier.options(ray_actor_options=options) if options else ExitClassifier
    return deployment.bind(settings.to_dict())
