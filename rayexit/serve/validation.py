"""Request checking: every way a body can be wrong becomes a 4xx that names the field and the limit.

Plain functions over bytes, so tests reach every case without a server. Nothing a request
carries is ever used as a path: the model comes from the deployment's config only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Limits:
    max_texts: int
    max_text_chars: int
    max_body_bytes: int


class RequestError(Exception):
    def __init__(self, status: int, field: str, message: str, limit: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message
        self.limit = limit

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"field": self.field, "message": self.message}
        if self.limit is not None:
            error["limit"] = self.limit
        return {"error": error}


@dataclass
class TextsRequest:
    texts: list[str]
    max_layers: int | None


def check_declared_size(content_length: str | None, limits: Limits) -> None:
    """Refuse before reading when the client already says the body is too large."""
    if content_length is None:
        return
    try:
        size = int(content_length)
    except ValueError:
        raise RequestError(400, "content-length", f"not a number: {content_length!r}") from None
    if size > limits.max_body_bytes:
        raise too_large(limits)


def too_large(limits: Limits) -> RequestError:
    return RequestError(
        413, "body", f"request body is larger than {limits.max_body_bytes} bytes", limits.max_body_bytes
    )


def parse_texts_request(body: bytes, limits: Limits, num_layers: int, key: str = "texts") -> TextsRequest:
    """`{"texts": [str, ...], "max_layers": int?}` -> TextsRequest, or a RequestError saying what is wrong."""
    if len(body) > limits.max_body_bytes:
        raise too_large(limits)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, "body", f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RequestError(422, "body", f"expected a JSON object with a {key!r} list, got {type(data).__name__}")
    unknown = sorted(set(data) - {key, "max_layers"})
    if unknown:
        raise RequestError(422, unknown[0], f"unknown field; expected {key!r} and optionally 'max_layers'")
    if key not in data:
        raise RequestError(422, key, "missing; expected a list of strings")
    texts = data[key]
    if not isinstance(texts, list):
        raise RequestError(422, key, f"expected a list of strings, got {type(texts).__name__}")
    if not texts:
        raise RequestError(422, key, "empty list; send at least one text", limits.max_texts)
    if len(texts) > limits.max_texts:
        raise RequestError(
            422, key, f"{len(texts)} texts, more than the limit of {limits.max_texts} per request", limits.max_texts
        )
    for i, text in enumerate(texts):
        where = f"{key}[{i}]"
        if not isinstance(text, str):
            raise RequestError(422, where, f"expected a string, got {type(text).__name__}")
        if not text.strip():
            raise RequestError(422, where, "empty text; expected at least one non-space character")
        if len(text) > limits.max_text_chars:
            raise RequestError(
                422,
                where,
                f"{len(text)} characters, more than the limit of {limits.max_text_chars}",
                limits.max_text_chars,
            )
    max_layers = data.get("max_layers")
    if max_layers is not None and (
        not isinstance(max_layers, int) or isinstance(max_layers, bool) or not 1 <= max_layers <= num_layers
    ):
        raise RequestError(422, "max_layers", f"got {max_layers!r}, expected a whole number from 1 to {num_layers}",
                           num_layers)
    return TextsRequest(texts, max_layers)
