"""Request checking: the request bodies as Pydantic models, and every refusal as one JSON error shape.

The models are built per replica from the configured limits and the model's depth, so the
OpenAPI schema FastAPI writes carries the same bounds the server enforces (maxItems, maxLength,
maximum). What a schema cannot say (a text the tokenizer cannot encode, the token cost of a
request) is checked in app.py before anything joins a batch, and refused the same way.

Every refusal answers `{"error": {"field", "message", "reason", "limit"?}}`. `reason` comes from
the fixed set REASONS and is the only request-derived value used as a metric label: a client's
own keys and values never become label values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, create_model

# The closed set of refusal reasons (metric label values and the `reason` of an error body).
REASONS = (
    "body_too_large",
    "invalid_json",
    "unsupported_media_type",
    "invalid_field",
    "unknown_field",
    "text_not_encodable",
    "no_words",  # 422: a text with nothing the model can read once split or tokenized
    "too_many_tokens",
    "wrong_route",
    "not_found",
    "method_not_allowed",
    "overloaded",
    "model_error",  # 500: the model failed on one text of the request (after isolation)
    "internal",  # 500: anything else unexpected inside the replica
)
MAX_FIELD_CHARS = 80  # an unknown key is echoed back, cut to this length


@dataclass
class Limits:
    max_texts: int
    max_text_chars: int
    max_body_bytes: int
    max_text_tokens: int = 512
    max_request_tokens: int = 8192


class RequestError(Exception):
    """A refusal: status, the field it is about, a message for people and a reason for machines."""

    def __init__(
        self,
        status: int,
        field: str,
        message: str,
        limit: Any = None,
        reason: str = "invalid_field",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        assert reason in REASONS, reason
        self.status = status
        self.field = safe_field(field)
        self.message = message
        self.limit = limit
        self.reason = reason
        self.headers = headers

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"field": self.field, "message": self.message, "reason": self.reason}
        if self.limit is not None:
            error["limit"] = self.limit
        return {"error": error}


def safe_field(name: str) -> str:
    """A client-chosen key made safe to echo: valid UTF-8 (lone surrogates escaped) and short."""
    text = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_FIELD_CHARS else text[: MAX_FIELD_CHARS - 3] + "..."


def too_large(limits: Limits) -> RequestError:
    return RequestError(
        413, "body", f"request body is larger than {limits.max_body_bytes} bytes", limits.max_body_bytes,
        reason="body_too_large",
    )


def check_declared_size(content_length: str | None, limits: Limits) -> None:
    """Refuse before reading when the client already says the body is too large."""
    if content_length is None:
        return
    try:
        size = int(content_length)
    except ValueError:
        raise RequestError(400, "content-length", f"not a number: {content_length[:40]!r}") from None
    if size > limits.max_body_bytes:
        raise too_large(limits)


def check_content_type(value: str | None) -> None:
    """Only JSON bodies: a form or text/plain POST (what a web page can send cross-site) is refused."""
    media = (value or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        shown = f"got {media!r}" if media else "no Content-Type header"
        raise RequestError(
            415, "content-type", f"{shown}; send the body as JSON with Content-Type: application/json",
            reason="unsupported_media_type",
        )


# -- request models ----------------------------------------------------------------------------


def _valid_unicode(text: str) -> str:
    # JSON allows "\ud800" (and json.loads passes raw surrogate bytes through), but such a string
    # is not text: the tokenizer refuses it, and it cannot be written back as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (e.g. \\ud800); expected valid Unicode text") from None
    return text


def _no_default(schema: dict[str, Any]) -> None:
    # `max_layers` may be left out but not sent as null: a "default": null in the schema would say otherwise.
    schema.pop("default", None)


def texts_model(limits: Limits, num_layers: int, name: str, example: list[str]) -> type[BaseModel]:
    """`{"texts": [str, ...], "max_layers": int?}` with this server's limits, strict (no coercion, no extra keys)."""
    text = Annotated[
        str,
        StringConstraints(min_length=1, max_length=limits.max_text_chars, pattern=r"\S"),
        AfterValidator(_valid_unicode),
    ]
    return create_model(
        name,
        __config__=ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [{"texts": example}]}),
        texts=(
            list[text],
            Field(
                min_length=1,
                max_length=limits.max_texts,
                description=f"1 to {limits.max_texts} non-blank texts of at most {limits.max_text_chars} "
                f"characters; at most {limits.max_text_tokens} tokens each and {limits.max_request_tokens} "
                "in all (413 past that)",
            ),
        ),
        max_layers=(
            int,
            Field(
                default=None,
                ge=1,
                le=num_layers,
                description="per-request layer cap; leave it out for the model's full depth",
                json_schema_extra=_no_default,
            ),
        ),
    )


class ErrorDetail(BaseModel):
    field: str
    message: str
    reason: str = Field(description="one of: " + ", ".join(REASONS))
    limit: int | None = Field(default=None, description="the limit that was exceeded, where there is one")


class ErrorBody(BaseModel):
    error: ErrorDetail


# -- translating validation errors -----------------------------------------------------------------

_JSON_TYPES = {"dict": "an object", "list": "an array", "str": "a string", "int": "a number", "float": "a number",
               "bool": "a boolean", "NoneType": "null"}


def _what(value: Any) -> str:
    return _JSON_TYPES.get(type(value).__name__, type(value).__name__)


def _where(loc: tuple | list) -> str:
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    field = ""
    for part in parts:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    return field or "body"


def _shown_number(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 20 else f"a number of {len(text)} digits"


def from_validation_errors(errors: list[dict[str, Any]], num_layers: int | None = None) -> RequestError:
    """The first of Pydantic's (or FastAPI's) errors as one RequestError naming the field and the limit."""
    # An unknown key first: `{"text": [...]}` is a typo of `texts`, more useful to hear than "texts missing".
    ordered = sorted(errors, key=lambda e: e.get("type") != "extra_forbidden")
    error = ordered[0] if ordered else {"type": "missing", "loc": ("body",)}
    kind = error.get("type", "")
    field = _where(error.get("loc", ()))
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "json_invalid":
        return RequestError(400, "body", f"not valid JSON ({ctx.get('error', 'decode error')})", reason="invalid_json")
    if kind == "extra_forbidden":
        return RequestError(422, field, "unknown field; expected 'texts' and optionally 'max_layers'",
                            reason="unknown_field")
    if kind == "string_unicode":  # a key (or text) with a lone surrogate, which Pydantic cannot read
        if field == "body" and isinstance(value, str):
            return RequestError(422, value, "unknown field, and not valid Unicode (a lone surrogate)",
                                reason="unknown_field")
        return RequestError(422, field, "not valid Unicode (a lone surrogate)", reason="text_not_encodable")
    if field == "body":
        if kind == "missing":
            return RequestError(422, "body", "empty body; expected a JSON object with a 'texts' list")
        return RequestError(422, "body", f"expected a JSON object with a 'texts' list, got {_what(value)}")
    if kind == "missing":
        return RequestError(422, field, "missing; expected a list of strings")
    if field == "max_layers":
        top = num_layers if num_layers is not None else ctx.get("le")
        shown = _what(value) if kind == "int_type" else _shown_number(value)
        return RequestError(422, field, f"got {shown}, expected a whole number from 1 to {top}", top)
    if kind == "list_type":
        return RequestError(422, field, f"expected a list of strings, got {_what(value)}")
    if kind == "too_short":
        return RequestError(422, field, "empty list; send at least one text", ctx.get("min_length"))
    if kind == "too_long":
        limit = ctx.get("max_length")
        return RequestError(
            422, field, f"{ctx.get('actual_length')} texts, more than the limit of {limit} per request", limit
        )
    if kind == "string_type":
        return RequestError(422, field, f"expected a string, got {_what(value)}")
    if kind in ("string_too_short", "string_pattern_mismatch"):
        return RequestError(422, field, "empty text; expected at least one non-space character")
    if kind == "string_too_long":
        limit = ctx.get("max_length")
        return RequestError(422, field, f"{len(value)} characters, more than the limit of {limit}", limit)
    if kind == "value_error":
        return RequestError(422, field, str(ctx.get("error", error.get("msg", "invalid value"))),
                            reason="text_not_encodable" if "surrogate" in str(ctx.get("error")) else "invalid_field")
    return RequestError(422, field, str(error.get("msg", "invalid value")))


def describe_parse_failure(cause: BaseException | None) -> str:
    """Why a body that FastAPI could not parse was refused (it raises a bare 400 for these)."""
    if isinstance(cause, RecursionError):
        return "not valid JSON (nested too deeply)"
    if isinstance(cause, UnicodeDecodeError):
        return "not valid JSON (not UTF-8)"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "not valid JSON (a number with more than 4300 digits)"
    return "not valid JSON"
