"""The HTTP face of a replica: a FastAPI app built per replica around the deployment object.

Built after the deployment's constructor (Serve's late-bound ingress), so the request models
carry this server's real limits and the model's depth, and the OpenAPI schema FastAPI writes
from them agrees with what the server enforces. Every refusal, 404 and 405 included, answers
the one JSON error shape of validation.py; an unexpected exception answers a JSON 500.

No `from __future__ import annotations` here: FastAPI reads the route functions' annotations,
and the request models are local to build_api.
"""

import json
import logging
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayexit.serve.validation import (
    ErrorBody,
    Limits,
    RequestError,
    check_content_type,
    check_declared_size,
    describe_parse_failure,
    from_validation_errors,
    texts_model,
    too_large,
)

log = logging.getLogger(__name__)

CLASSIFY_EXAMPLE = ["show me flights from boston to denver"]
TAG_EXAMPLE = ["Peter Blackburn visited Brussels"]


class JSONText(JSONResponse):
    """JSON in plain ASCII: any text a client sent (a lone surrogate too) can be echoed without failing to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(error: RequestError) -> Response:
    return JSONText(error.to_json(), status_code=error.status, headers=error.headers)


class Service(Protocol):
    limits: Limits
    num_layers: int

    def model_info(self) -> dict[str, Any]: ...

    async def classify(self, texts: list[str], max_layers: int | None) -> dict[str, Any]: ...

    async def tag(self, texts: list[str], max_layers: int | None) -> dict[str, Any]: ...

    def refuse(self, error: RequestError) -> Response:
        """Count the refusal (by status and reason) and answer error_response(error)."""


class Classification(BaseModel):
    label: str
    probability: float
    exit_layer: int


class ClassifyResponse(BaseModel):
    results: list[Classification]
    layers: int


class Tagging(BaseModel):
    words: list[str]
    tags: list[str]
    exit_layers: list[int]


class TagResponse(BaseModel):
    results: list[Tagging]
    layers: int


def _responses(ok: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    error = {"model": ErrorBody}
    return {
        200: {"model": ok},
        400: {**error, "description": "not valid JSON, or a route for the other kind of model"},
        413: {**error, "description": "body over max_body_bytes, or more tokens in all than max_request_tokens"},
        415: {**error, "description": "Content-Type is not application/json"},
        422: {**error, "description": "a field breaks the schema; a text the tokenizer cannot encode or over "
                                      "max_text_tokens"},
        500: {**error, "description": "the model failed on one of this request's texts (other requests unaffected)"},
        503: {
            **error,
            "description": "overloaded: the queue is full or the wait would pass the deadline; retry later",
            "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
        },
    }


class BodyLimit:
    """ASGI middleware: a body over the limit is refused (413) without being held in memory past the limit."""

    def __init__(self, app, limits: Limits, refuse) -> None:
        self.app = app
        self.limits = limits
        self.refuse = refuse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        try:
            check_declared_size(declared.decode("latin-1") if declared is not None else None, self.limits)
        except RequestError as error:
            await self.refuse(error)(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                await self.refuse(too_large(self.limits))(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def require_json(request: Request) -> None:
    check_content_type(request.headers.get("content-type"))


def build_api(service: Service, failed) -> FastAPI:
    """The app for one replica; `failed()` is called (and a JSON 500 answered) when a route raises unexpectedly."""
    limits, layers = service.limits, service.num_layers
    ClassifyRequest = texts_model(limits, layers, "ClassifyRequest", CLASSIFY_EXAMPLE)
    TagRequest = texts_model(limits, layers, "TagRequest", TAG_EXAMPLE)

    api = FastAPI(
        title="rayexit",
        description="Early-exit BERT: each text leaves the network at the first confident exit.",
        version="1",
        default_response_class=JSONText,
    )
    api.add_middleware(BodyLimit, limits=limits, refuse=service.refuse)

    @api.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> Response:
        return service.refuse(error)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        return service.refuse(from_validation_errors(list(error.errors()), layers))

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 404:
            refusal = RequestError(404, "path", "no such route; the API is described at /docs", reason="not_found")
        elif error.status_code == 405:
            refusal = RequestError(405, "method", f"{request.method} is not allowed on this route",
                                   reason="method_not_allowed", headers=dict(error.headers or {}))
        elif error.status_code == 413:
            refusal = too_large(limits)
        elif error.status_code == 400:
            refusal = RequestError(400, "body", describe_parse_failure(error.__cause__), reason="invalid_json")
        else:
            refusal = RequestError(error.status_code, "request", str(error.detail))
        return service.refuse(refusal)

    @api.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> Response:
        log.error("unexpected %s on %s %s: %s", type(error).__name__, request.method, request.url.path, error)
        failed()
        body = {"error": {"field": "server", "message": "internal error; the replica keeps running",
                          "reason": "internal"}}
        return JSONText(body, status_code=500)

    @api.get("/healthz", summary="liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.head("/healthz", summary="liveness, headers only (load balancers' probes)")
    def healthz_head() -> Response:
        return Response(status_code=200)

    # async: it reads the guard's and the queue's state on the event loop that writes them. A plain def would
    # run in a worker thread and could read the guard's two row deques between one write and the next.
    @api.get("/v1/model", summary="the served model, its limits and the batching and queue state now")
    async def model_info() -> dict[str, Any]:
        return service.model_info()

    @api.post(
        "/v1/classify",
        summary="classify texts (sequence models)",
        dependencies=[Depends(require_json)],
        responses=_responses(ClassifyResponse),
        response_model=None,
    )
    async def classify(body: ClassifyRequest) -> Response:
        return JSONText(await service.classify(body.texts, body.max_layers))

    @api.post(
        "/v1/tag",
        summary="tag the whitespace-separated words of texts (token models)",
        dependencies=[Depends(require_json)],
        responses=_responses(TagResponse),
        response_model=None,
    )
    async def tag(body: TagRequest) -> Response:
        return JSONText(await service.tag(body.texts, body.max_layers))

    return api
