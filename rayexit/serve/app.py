"""The Serve application: a FastAPI ingress in front of the batched early-exit runner.

Each text of a request is queued on its own through `@serve.batch`, so texts from many
requests share a forward pass; the model runs in one worker thread so the event loop keeps
accepting (and rejecting) requests while a batch computes. After every batch the adaptive
controller may move the batch size, the batch wait and the relaxation level.

Serve YAML: `import_path: rayexit.serve.app:build_app` with the `args:` of ServeSettings.
No `from __future__ import annotations` here: FastAPI must see real types on the route methods
that Serve re-wraps, or it takes `request: Request` for a query parameter.
"""


import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from rayexit.errors import RayexitError
from rayexit.serve.settings import ServeSettings
from rayexit.serve.validation import Limits, RequestError, check_declared_size, parse_texts_request, too_large

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ExitClassifier"

TEXTS_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["texts"],
                "properties": {
                    "texts": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "max_layers": {"type": "integer", "minimum": 1, "description": "per-request layer cap"},
                },
            },
            "example": {"texts": ["show me flights from boston to denver"]},
        }
    },
}

api = FastAPI(
    title="rayexit",
    description="Early-exit BERT classification: each text leaves the network at the first confident exit.",
    version="1",
)


@dataclass
class _Item:
    text: str
    layer_cap: int | None
    enqueued: float


# Helpers sit above the deployment class: Serve captures the ingress class when it is decorated,
# and a module-level name defined after it was missing in the replica (NameError at request time).
async def _read_body(request: Request, limits: Limits) -> bytes:
    check_declared_size(request.headers.get("content-length"), limits)
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_large(limits)
        chunks.append(chunk)
    return b"".join(chunks)


def _load_tagger(settings: ServeSettings):
    try:
        from rayexit.serve.tagging import ServedTagger
    except ImportError as exc:
        raise RayexitError(f"{settings.model_dir}: token models cannot be served yet ({exc})") from None
    return ServedTagger.from_model_dir(settings.model_dir, settings.device, settings.dtype)


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
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
        self.limits = Limits(self.settings.max_texts, self.settings.max_text_chars, self.settings.max_body_bytes)
        self.tagger = None
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
        else:
            self.engine = None
            self.tagger = _load_tagger(self.settings)
            self.num_layers = self.tagger.num_layers
        self.controller = AdaptiveBatchController(self.settings.controller_config())
        self._classify_batch.set_max_batch_size(self.controller.max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(self.controller.batch_wait_timeout_s)
        self.metrics = ServeMetrics(self.num_layers)
        self._publish_controller_state()
        # One worker thread: batches run one at a time, and torch's own threads do the parallel work.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayexit-model")
        self._pending = 0

    # -- routes ------------------------------------------------------------------------------

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model")
    def model_info(self) -> dict[str, Any]:
        policy = self.engine.policy if self.engine is not None else self.exit_config.policy
        return {
            "task": self.exit_config.task,
            "labels": self.exit_config.labels,
            "layers": self.num_layers,
            "method": self.exit_config.method,
            "policy": {"kind": policy.kind, "thresholds": policy.per_layer(self.num_layers)},
            "max_length": self.exit_config.max_length,
            "limits": {
                "max_texts": self.limits.max_texts,
                "max_text_chars": self.limits.max_text_chars,
                "max_body_bytes": self.limits.max_body_bytes,
            },
            "batching": {
                "adaptive": self.settings.adaptive,
                "max_batch_size": self.controller.max_batch_size,
                "batch_wait_ms": round(self.controller.batch_wait_timeout_s * 1000, 3),
                "target_p99_ms": self.settings.target_p99_ms,
                "relax_level": self.controller.relax_level,
            },
            "device": str(self.engine.device) if self.engine is not None else None,
        }

    @api.post("/v1/classify", openapi_extra={"requestBody": TEXTS_BODY})
    async def classify(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            if self.engine is None:
                raise RequestError(
                    400, "route", f"this server holds a {self.exit_config.task} model; use /v1/tag for it"
                )
            body = await _read_body(request, self.limits)
            parsed = parse_texts_request(body, self.limits, self.num_layers)
        except RequestError as exc:
            return self._reject(exc)
        self._pending += len(parsed.texts)
        try:
            answers = await asyncio.gather(
                *(self._classify_batch(_Item(text, parsed.max_layers, time.perf_counter())) for text in parsed.texts)
            )
        except Exception:
            log.exception("classification failed")
            return JSONResponse({"error": {"field": "server", "message": "the model failed on this batch"}}, 500)
        latency = time.perf_counter() - started
        self.controller.record_request(latency)
        self.metrics.latency.observe(latency * 1000, tags={"route": "classify"})
        return JSONResponse({"results": [a.to_json() for a in answers], "layers": self.num_layers})

    @api.post("/v1/tag", openapi_extra={"requestBody": TEXTS_BODY})
    async def tag(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            if self.tagger is None:
                raise RequestError(
                    400, "route", f"this server holds a {self.exit_config.task} classification model; "
                    "/v1/tag needs a token (tagging) model, use /v1/classify"
                )
            body = await _read_body(request, self.limits)
            parsed = parse_texts_request(body, self.limits, self.num_layers)
        except RequestError as exc:
            return self._reject(exc)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._pool, self.tagger.tag, parsed.texts, parsed.max_layers)
        except Exception:
            log.exception("tagging failed")
            return JSONResponse({"error": {"field": "server", "message": "the model failed on this request"}}, 500)
        self.metrics.latency.observe((time.perf_counter() - started) * 1000, tags={"route": "tag"})
        return JSONResponse({"results": results, "layers": self.num_layers})

    # -- batching ----------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _classify_batch(self, items: list[_Item]) -> list:
        started = time.perf_counter()
        for item in items:
            self.metrics.queue_wait.observe((started - item.enqueued) * 1000)
        loop = asyncio.get_running_loop()
        try:
            answers, stats = await loop.run_in_executor(
                self._pool,
                self.engine.classify,
                [item.text for item in items],
                [item.layer_cap for item in items],
                self.controller.relax_level,
            )
        finally:
            self._pending -= len(items)
        compute = time.perf_counter() - started
        self.controller.record_batch(len(items), compute, backlog=self._pending)
        self.metrics.batch_size.observe(len(items))
        if stats.padded_tokens:
            self.metrics.padding.observe(1 - stats.real_tokens / stats.padded_tokens)
        for answer in answers:
            self.metrics.exit_layer.observe(answer.exit_layer)
        if self.controller.maybe_update() is not None:
            self._publish_controller_state()
        return answers

    def _publish_controller_state(self) -> None:
        self._classify_batch.set_max_batch_size(self.controller.max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(self.controller.batch_wait_timeout_s)
        self.metrics.max_batch_size.set(self.controller.max_batch_size)
        self.metrics.batch_wait.set(self.controller.batch_wait_timeout_s * 1000)
        self.metrics.relax_level.set(self.controller.relax_level)

    def _reject(self, exc: RequestError) -> JSONResponse:
        self.metrics.rejected.inc(tags={"status": str(exc.status), "field": exc.field.split("[")[0]})
        return JSONResponse(exc.to_json(), status_code=exc.status)

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
