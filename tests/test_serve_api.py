"""The FastAPI layer (http.py) without Ray: a fake service behind the real app, driven by Starlette's TestClient.

Fast cases for every malformed-input shape; the same cases also run through the real Serve app
over HTTP in test_serve_http.py.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from rayexit.serve.http import build_api, error_response
from rayexit.serve.validation import REASONS, Limits, RequestError

LIMITS = Limits(max_texts=4, max_text_chars=200, max_body_bytes=4096, max_text_tokens=64, max_request_tokens=128)


class FakeService:
    limits = LIMITS
    num_layers = 4

    def __init__(self) -> None:
        self.refusals: list[tuple[int, str]] = []
        self.calls: list[tuple[list[str], int | None]] = []

    def model_info(self) -> dict:
        return {"layers": self.num_layers}

    async def classify(self, texts, max_layers):
        self.calls.append((texts, max_layers))
        if texts == ["boom"]:
            raise RuntimeError("model exploded")
        return {"results": [{"label": "x", "probability": 1.0, "exit_layer": 1} for _ in texts], "layers": 4}

    async def tag(self, texts, max_layers):
        raise RequestError(400, "route", "use /v1/classify", reason="wrong_route")

    def refuse(self, error: RequestError):
        self.refusals.append((error.status, error.reason))
        return error_response(error)


@pytest.fixture()
def service():
    return FakeService()


@pytest.fixture()
def client(service):
    failures = []
    api = build_api(service, lambda: failures.append(1))
    with TestClient(api, raise_server_exceptions=False) as client:
        client.failures = failures
        yield client


JSON = {"Content-Type": "application/json"}

# (raw body, status, field): the red-team's inputs and the schema's edges.
BAD_BODIES = [
    (b'{"texts": []}', 422, "texts"),
    (b'{"texts": [""]}', 422, "texts[0]"),
    (b'{"texts": ["ok", "   "]}', 422, "texts[1]"),
    (b'{"texts": ["ok", 5]}', 422, "texts[1]"),
    (b'{"texts": ["a", "b", "c", "d", "e"]}', 422, "texts"),
    (b'{"texts": ["' + b"x" * 201 + b'"]}', 422, "texts[0]"),
    (b'{"texts": "just one string"}', 422, "texts"),
    (b'{"text": ["typo"]}', 422, "text"),
    ('{"texts": ["ok"], "\u00e9": 1}'.encode(), 422, "\u00e9"),
    (b'{"texts": ["ok"], "\\ud800": 1}', 422, "\\ud800"),
    (b"{}", 422, "texts"),
    (b'["a list"]', 422, "body"),
    (b"null", 422, "body"),
    (b'{"texts": ["ok"', 400, "body"),
    (b"\xff\xfe not utf8", 400, "body"),
    (b"[" * 50_000 + b"]" * 50_000, 413, "body"),  # over this app's 4 KiB limit
    (b'{"texts": ["ok"], "max_layers": 0}', 422, "max_layers"),
    (b'{"texts": ["ok"], "max_layers": 5}', 422, "max_layers"),
    (b'{"texts": ["ok"], "max_layers": true}', 422, "max_layers"),
    (b'{"texts": ["ok"], "max_layers": null}', 422, "max_layers"),
    (b'{"texts": ["ok"], "max_layers": 2.0}', 422, "max_layers"),
    (b'{"texts": ["ok"], "max_layers": "2"}', 422, "max_layers"),
    (b'{"texts": ["ok"], "max_layers": ' + b"9" * 5000 + b"}", 413, "body"),  # over 4 KiB as well
    (b'{"texts": ["ok"], "max_layers": ' + b"9" * 3000 + b"}", 422, "max_layers"),
    (b'{"texts": ["lone \\ud800 surrogate"]}', 422, "texts[0]"),
    (b'{"texts": ["raw \xed\xa0\x80 surrogate"]}', 422, "texts[0]"),
]


@pytest.mark.parametrize("body, status, field", BAD_BODIES)
def test_every_malformed_body_is_a_4xx_in_the_json_error_shape(client, service, body, status, field):
    response = client.post("/v1/classify", content=body, headers=JSON)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["message"] and error["reason"] in REASONS
    assert response.content.isascii()  # echoed keys and texts are escaped, never re-encoded raw
    assert service.refusals[-1] == (status, error["reason"])
    assert service.calls == []  # nothing malformed reached the model


def test_limits_are_named(client):
    error = client.post("/v1/classify", json={"texts": ["a"] * 5}).json()["error"]
    assert error["limit"] == 4 and "4" in error["message"]
    error = client.post("/v1/classify", json={"texts": ["x" * 201]}).json()["error"]
    assert error["limit"] == 200 and "200" in error["message"]
    error = client.post("/v1/classify", json={"texts": ["ok"], "max_layers": 9}).json()["error"]
    assert error["limit"] == 4 and "1 to 4" in error["message"]


def test_deep_nesting_and_huge_numbers_are_400_not_500(service):
    roomy = Limits(max_texts=4, max_text_chars=200, max_body_bytes=1 << 20)
    service.limits = roomy
    with TestClient(build_api(service, lambda: None), raise_server_exceptions=False) as client:
        deep = client.post("/v1/classify", content=b"[" * 50_000 + b"]" * 50_000, headers=JSON)
        assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]["message"]
        digits = client.post("/v1/classify", content=b'{"texts": ["ok"], "max_layers": ' + b"9" * 5000 + b"}",
                             headers=JSON)
        assert digits.status_code == 400 and "digits" in digits.json()["error"]["message"]


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_only_json_bodies_are_accepted(client, service, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/classify", content=b'{"texts": ["ok"]}', headers=headers)
    assert response.status_code == 415 and response.json()["error"]["reason"] == "unsupported_media_type"
    assert service.calls == []
    utf8 = {"Content-Type": "application/json; charset=utf-8"}
    ok = client.post("/v1/classify", content=b'{"texts": ["ok"]}', headers=utf8)
    assert ok.status_code == 200


def test_declared_and_streamed_bodies_over_the_limit_are_413(client):
    response = client.post("/v1/classify", content=b"{}", headers={**JSON, "Content-Length": "999999"})
    assert response.status_code == 413 and response.json()["error"]["limit"] == 4096

    def chunks():
        for _ in range(10):
            yield b" " * 1000

    response = client.post("/v1/classify", content=chunks(), headers=JSON)  # chunked: no Content-Length
    assert response.status_code == 413 and response.json()["error"]["reason"] == "body_too_large"


def test_404_405_and_head_healthz_share_the_shape(client):
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["reason"] == "not_found"
    wrong = client.get("/v1/classify")
    assert wrong.status_code == 405 and wrong.json()["error"]["field"] == "method"
    assert "POST" in wrong.headers.get("allow", "")
    assert client.head("/healthz").status_code == 200
    assert client.get("/healthz").json() == {"status": "ok"}


def test_an_unexpected_exception_is_a_json_500(client):
    response = client.post("/v1/classify", json={"texts": ["boom"]})
    assert response.status_code == 500 and response.json()["error"]["reason"] == "internal"
    assert client.failures == [1]
    assert client.post("/v1/classify", json={"texts": ["fine"]}).status_code == 200


def test_openapi_documents_the_limits_and_the_error_statuses(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    body = schemas["ClassifyRequest"]
    texts = body["properties"]["texts"]
    assert (texts["minItems"], texts["maxItems"]) == (1, 4)
    assert texts["items"]["minLength"] == 1 and texts["items"]["maxLength"] == 200 and texts["items"]["pattern"]
    layers = body["properties"]["max_layers"]
    assert (layers["type"], layers["minimum"], layers["maximum"]) == ("integer", 1, 4) and "default" not in layers
    assert body["additionalProperties"] is False and body["required"] == ["texts"]
    for route in ("/v1/classify", "/v1/tag"):
        responses = spec["paths"][route]["post"]["responses"]
        assert {"200", "400", "413", "415", "422", "503"} <= set(responses)
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        assert "Retry-After" in responses["503"]["headers"]
    assert "head" in spec["paths"]["/healthz"]


def test_a_request_error_from_the_service_keeps_its_status(client):
    response = client.post("/v1/tag", json={"texts": ["ok"]})
    assert response.status_code == 400 and response.json()["error"]["reason"] == "wrong_route"


def test_error_bodies_are_valid_json_for_any_field_name():
    error = RequestError(422, "\ud800" + "k" * 200, "unknown field", reason="unknown_field")
    payload = json.loads(error_response(error).body)
    assert payload["error"]["field"].startswith("\\ud800") and len(payload["error"]["field"]) <= 80
