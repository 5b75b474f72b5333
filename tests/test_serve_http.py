"""The HTTP API end to end against a running Serve app on the session's Ray instance (127.0.0.1, free port)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
import torch
from test_serve_validation import TEXTS, confident_tiny_model

from rayexit.config import ExitPolicy
from rayexit.data.encode import pad_batch
from rayexit.exits import run_early_exit

LIMITS = {"max_texts": 4, "max_text_chars": 200, "max_body_bytes": 4096}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post(base: str, path: str, payload) -> tuple[int, dict]:
    return call(base + path, json.dumps(payload).encode())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_tokenizer):
    model = confident_tiny_model()
    model.exit_config.policy = ExitPolicy("entropy", 0.15)
    directory = tmp_path_factory.mktemp("served") / "model"
    model.save_pretrained(directory, minilm_tokenizer)
    return directory


@pytest.fixture(scope="module")
def server(ray_session, model_dir):
    from ray import serve

    from rayexit.serve.app import bind_app
    from rayexit.serve.settings import ServeSettings

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings.from_args({"model_dir": str(model_dir), **LIMITS, "max_batch_size": 4, "batch_wait_ms": 5})
    # No CPU reservation: the session's Ray instance has only two and other tests share it.
    app = bind_app(settings, ray_actor_options={"num_cpus": 0})
    serve.run(app, name="rayexit-test", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_health_model_and_openapi(server, model_dir):
    assert call(server + "/healthz") == (200, {"status": "ok"})
    status, info = call(server + "/v1/model")
    assert status == 200
    assert info["task"] == "sequence" and info["labels"] == ["neg", "pos", "neutral"] and info["layers"] == 4
    assert info["policy"] == {"kind": "entropy", "thresholds": [0.15] * 4}
    assert info["limits"]["max_texts"] == 4 and info["batching"]["adaptive"] is True
    assert str(model_dir) not in json.dumps(info)  # no local paths handed out
    status, spec = call(server + "/openapi.json")
    assert status == 200 and {"/v1/classify", "/v1/tag", "/v1/model", "/healthz"} <= set(spec["paths"])


def test_served_answers_equal_the_runners(server, model_dir):
    from rayexit.models import MultiExitForSequenceClassification, load_tokenizer

    model = MultiExitForSequenceClassification.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    served = []
    for start in range(0, len(TEXTS), 3):
        status, body = post(server, "/v1/classify", {"texts": TEXTS[start : start + 3]})
        assert status == 200 and body["layers"] == 4
        served += body["results"]
    ids, mask = pad_batch(tokenizer(TEXTS)["input_ids"], tokenizer.pad_token_id)
    direct = run_early_exit(model, ids, mask, model.exit_config.policy)
    assert [r["label"] for r in served] == [model.labels[i] for i in direct.predictions.tolist()]
    assert [r["exit_layer"] for r in served] == direct.exit_layers.tolist()
    assert torch.allclose(torch.tensor([r["probability"] for r in served]), direct.confidences, atol=1e-4)
    assert len({r["exit_layer"] for r in served}) > 1


def test_per_request_layer_cap(server):
    status, body = post(server, "/v1/classify", {"texts": TEXTS[:4], "max_layers": 1})
    assert status == 200 and [r["exit_layer"] for r in body["results"]] == [1, 1, 1, 1]


@pytest.mark.parametrize(
    "payload, status, field",
    [
        ({"texts": []}, 422, "texts"),
        ({"texts": [""]}, 422, "texts[0]"),
        ({"texts": ["fine", None]}, 422, "texts[1]"),
        ({"texts": ["a", "b", "c", "d", "e"]}, 422, "texts"),
        ({"texts": ["x" * 201]}, 422, "texts[0]"),
        ({"texts": ["ok"], "max_layers": 9}, 422, "max_layers"),
        ({"path": "/etc/passwd"}, 422, "path"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(server, payload, status, field):
    got_status, body = post(server, "/v1/classify", payload)
    assert got_status == status and body["error"]["field"] == field and body["error"]["message"]


def test_invalid_json_and_oversized_bodies(server):
    status, body = call(server + "/v1/classify", b'{"texts": ["unclosed"')
    assert status == 400 and body["error"]["field"] == "body" and "JSON" in body["error"]["message"]
    status, body = call(server + "/v1/classify", json.dumps({"texts": ["y" * 150] * 40}).encode())
    assert status == 413 and body["error"]["limit"] == 4096


def test_tag_on_a_sequence_model_is_a_clear_4xx(server):
    status, body = post(server, "/v1/tag", {"texts": ["book a flight"]})
    assert status == 400 and body["error"]["field"] == "route" and "/v1/classify" in body["error"]["message"]


def test_replica_survives_a_burst_of_bad_and_good_requests(server):
    bad = [b"not json", b"[]", b'{"texts": [1, 2]}', b'{"texts": ["' + b"z" * 300 + b'"]}']
    for body in bad * 3:
        status, _ = call(server + "/v1/classify", body)
        assert 400 <= status < 500
    status, body = post(server, "/v1/classify", {"texts": ["still answering"]})
    assert status == 200 and len(body["results"]) == 1


def test_tag_route_serves_a_token_model(server, tmp_path, minilm_tokenizer):
    from ray import serve
    from test_token_exits import tiny_tagger

    from rayexit.serve.app import bind_app
    from rayexit.serve.settings import ServeSettings
    from rayexit.token_exits import predict_tags

    model = tiny_tagger()
    model.save_pretrained(tmp_path / "tagger", minilm_tokenizer)
    settings = ServeSettings.from_args({"model_dir": str(tmp_path / "tagger"), **LIMITS})
    serve.run(bind_app(settings, ray_actor_options={"num_cpus": 0}), name="rayexit-tagger", route_prefix="/tagger")
    try:
        texts = ["Peter Blackburn visited Brussels today", "German advice"]
        status, body = post(server, "/tagger/v1/tag", {"texts": texts})
        assert status == 200
        direct = predict_tags(model, minilm_tokenizer, [t.split() for t in texts])
        assert [r["tags"] for r in body["results"]] == [d["tags"] for d in direct]
        assert [r["exit_layers"] for r in body["results"]] == [list(map(int, d["exit_layers"])) for d in direct]
        assert body["results"][1]["words"] == ["German", "advice"]
        status, body = post(server, "/tagger/v1/classify", {"texts": ["a sentence"]})
        assert status == 400 and "/v1/tag" in body["error"]["message"]
        status, body = post(server, "/tagger/v1/tag", {"texts": ["ok"], "max_layers": 99})
        assert status == 422 and body["error"]["field"] == "max_layers"
    finally:
        serve.delete("rayexit-tagger")
