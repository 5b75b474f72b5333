"""The HTTP API end to end against running Serve apps on the session's Ray instance (127.0.0.1, free port).

One Serve instance for the module with three apps: the classifier under test at `/`, a token
tagger at `/tagger`, and at `/slow` a classifier whose batches wait long enough to watch the
queue (shedding, deadlines, cancelled requests).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_serve_api import BAD_BODIES
from test_serve_validation import TEXTS, confident_tiny_model

from rayexit.config import ExitPolicy
from rayexit.data.encode import pad_batch
from rayexit.exits import run_early_exit

LIMITS = {"max_texts": 4, "max_text_chars": 200, "max_body_bytes": 128 * 1024, "max_text_tokens": 40,
          "max_request_tokens": 100}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None,
         with_headers: bool = False):
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw, got = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, raw, got = error.code, error.read(), error.headers
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = raw  # not JSON: left for the caller to fail on
    return (status, payload, got) if with_headers else (status, payload)


def call_as_a_client_would(url: str, body: bytes, attempts: int = 6) -> tuple[int, dict]:
    """Like `call`, but a 503 "overloaded" is retried after its Retry-After, as the API asks clients to do:
    on a slow machine the default queue deadline (125 ms) sheds some of eight concurrent requests, and
    shedding is not what the tests using this look at."""
    for _ in range(attempts - 1):
        status, payload, headers = call(url, body, with_headers=True)
        if status != 503:
            return status, payload
        assert payload["error"]["reason"] == "overloaded", payload
        time.sleep(int(headers["retry-after"]))
    return call(url, body)


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
def tagger_model():
    from test_token_exits import tiny_tagger

    return tiny_tagger()


@pytest.fixture(scope="module")
def server(ray_session, model_dir, tagger_model, tmp_path_factory, minilm_tokenizer):
    from ray import serve

    from rayexit.serve.app import bind_app
    from rayexit.serve.settings import ServeSettings

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    tagger_dir = tmp_path_factory.mktemp("served-tagger") / "tagger"
    tagger_model.save_pretrained(tagger_dir, minilm_tokenizer)
    apps = {
        "rayexit-test": ("/", {"model_dir": str(model_dir), **LIMITS, "max_batch_size": 4, "batch_wait_ms": 5}),
        "rayexit-tagger": ("/tagger", {"model_dir": str(tagger_dir), **LIMITS, "max_text_chars": 4000,
                                       "max_text_tokens": 512,
                                       "max_request_tokens": 1024, "wave_tokens": 64, "adaptive": False,
                                       "max_batch_size": 2, "batch_wait_ms": 300, "max_queue_wait_ms": 2000}),
        # Batches wait 1.5 s to fill: texts sit in the queue long enough to be seen, shed and cancelled.
        "rayexit-slow": ("/slow", {"model_dir": str(model_dir), **LIMITS, "adaptive": False, "max_batch_size": 64,
                                   "max_batch_size_limit": 64, "batch_wait_ms": 1500, "max_queued_texts": 8,
                                   "max_queue_wait_ms": 100}),
    }
    try:
        for name, (prefix, args) in apps.items():
            # No CPU reservation: the session's Ray instance has only two and other tests share it.
            app = bind_app(ServeSettings.from_args(args), ray_actor_options={"num_cpus": 0})
            serve.run(app, name=name, route_prefix=prefix)
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
    status, body = call(server + "/v1/classify", json.dumps({"texts": ["y" * 150] * 1000}).encode())
    assert status == 413 and body["error"]["limit"] == 128 * 1024


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


def test_tag_route_serves_a_token_model(server, tagger_model, minilm_tokenizer):
    from rayexit.token_exits import predict_tags

    texts = ["Peter Blackburn visited Brussels today", "German advice"]
    status, body = post(server, "/tagger/v1/tag", {"texts": texts})
    assert status == 200
    direct = predict_tags(tagger_model, minilm_tokenizer, [t.split() for t in texts])
    assert [r["tags"] for r in body["results"]] == [d["tags"] for d in direct]
    assert [r["exit_layers"] for r in body["results"]] == [list(map(int, d["exit_layers"])) for d in direct]
    assert body["results"][1]["words"] == ["German", "advice"]
    status, body = post(server, "/tagger/v1/classify", {"texts": ["a sentence"]})
    assert status == 400 and "/v1/tag" in body["error"]["message"]
    status, body = post(server, "/tagger/v1/tag", {"texts": ["ok"], "max_layers": 99})
    assert status == 422 and body["error"]["field"] == "max_layers"


# -- malformed input, through the proxy and the replica ---------------------------------------------


@pytest.mark.parametrize("raw, status, field", [case for case in BAD_BODIES if case[1] != 413])
def test_every_malformed_body_answers_4xx_json_over_http(server, raw, status, field):
    got, body, headers = call(server + "/v1/classify", raw, with_headers=True)
    assert (got, body["error"]["field"]) == (status, field)
    assert headers["content-type"].startswith("application/json")


def test_deep_nesting_and_a_5000_digit_max_layers_are_400(server):
    status, body = call(server + "/v1/classify", b"[" * 50_000 + b"]" * 50_000)
    assert status == 400 and "nested too deeply" in body["error"]["message"]
    status, body = call(server + "/v1/classify", b'{"texts": ["ok"], "max_layers": ' + b"7" * 5000 + b"}")
    assert status == 400 and "digits" in body["error"]["message"]


def test_content_type_404_405_and_head(server):
    status, body = call(server + "/v1/classify", b'{"texts": ["ok"]}', headers={"Content-Type": "text/plain"})
    assert status == 415 and body["error"]["reason"] == "unsupported_media_type"
    assert call(server + "/no/such/route")[0] == 404 and call(server + "/no/such/route")[1]["error"]["field"] == "path"
    status, body, headers = call(server + "/v1/classify", method="GET", with_headers=True)
    assert status == 405 and body["error"]["reason"] == "method_not_allowed" and "POST" in headers["allow"]
    assert call(server + "/healthz", method="HEAD")[0] == 200


def test_openapi_matches_the_served_limits(server):
    spec = call(server + "/openapi.json")[1]
    body = spec["components"]["schemas"]["ClassifyRequest"]
    assert body["properties"]["texts"]["maxItems"] == LIMITS["max_texts"]
    assert body["properties"]["texts"]["items"]["maxLength"] == LIMITS["max_text_chars"]
    assert body["properties"]["max_layers"]["maximum"] == 4
    assert {"400", "413", "415", "422", "503"} <= set(spec["paths"]["/v1/classify"]["post"]["responses"])
    # Each app carries its own model's depth: the tagger's schema is built from its replica too.
    tagger = call(server + "/tagger/openapi.json")[1]["components"]["schemas"]["TagRequest"]
    assert tagger["properties"]["max_layers"]["maximum"] == 4


# -- no request can harm another -------------------------------------------------------------------


def test_one_poisoned_request_in_eight_fails_only_itself(server):
    """The red-team's case: a lone surrogate used to fail its whole batch (49 of 160 valid requests)."""
    poisoned = b'{"texts": ["fine text", "bad \\ud800 text"]}'
    valid = json.dumps({"texts": TEXTS[:2]}).encode()
    bodies = [poisoned if i % 8 == 3 else valid for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: call_as_a_client_would(server + "/v1/classify", body), bodies))
    for body, (status, payload) in zip(bodies, answers, strict=True):
        if body is poisoned:
            assert status == 422 and payload["error"]["field"] == "texts[1]"
            assert payload["error"]["reason"] == "text_not_encodable"
        else:
            assert status == 200 and len(payload["results"]) == 2


def test_poisoned_tag_requests_fail_alone(server):
    poisoned = b'{"texts": ["Peter \\udfff visited"]}'
    valid = json.dumps({"texts": ["Peter Blackburn visited Brussels"]}).encode()
    bodies = [poisoned if i % 8 == 0 else valid for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: call_as_a_client_would(server + "/tagger/v1/tag", body), bodies))
    assert [status for status, _ in answers] == [422 if body is poisoned else 200 for body in bodies]


# -- cost limits -----------------------------------------------------------------------------------


def test_token_cost_limits_name_the_limit(server):
    status, body = post(server, "/v1/classify", {"texts": [" ".join(["a"] * 45)]})
    assert (status, body["error"]["field"], body["error"]["limit"]) == (422, "texts[0]", 40)
    assert body["error"]["reason"] == "too_many_tokens"
    status, body = post(server, "/v1/classify", {"texts": [" ".join(["a"] * 30)] * 4})
    assert (status, body["error"]["field"], body["error"]["limit"]) == (413, "texts", 100)
    status, body = post(server, "/tagger/v1/tag", {"texts": [" ".join(["Brussels"] * 400)] * 4})
    assert status == 413 and body["error"]["limit"] == 1024 and "1024" in body["error"]["message"]


def test_a_big_tag_request_does_not_starve_a_small_one(server):
    """The tagger app takes batches of 2 and waits 300 ms to fill one. Queued whole, the big request's
    four texts would fill two batches ahead of the small one; in 64-token waves it holds one text at a
    time, so the small one (sent 0.1 s later) shares the big one's first or second batch."""
    big = {"texts": [" ".join(["Peter Blackburn visited Brussels"] * 50)] * 4}  # 4 x 204 tokens (2 windows of 128)
    small = {"texts": ["German advice"]}
    done: dict[str, float] = {}

    def send(name, payload, delay):
        time.sleep(delay)
        status, _ = post(server, "/tagger/v1/tag", payload)
        done[name] = time.perf_counter()
        return status

    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(send, ["big", "small"], [big, small], [0.0, 0.1]))
    assert statuses == [200, 200]
    assert done["small"] < done["big"]  # the big one's later waves queued behind the small one


# -- overload: shedding, deadlines, cancelled requests ------------------------------------------------


def queued(server: str, app: str = "/slow") -> int:
    return call(server + app + "/v1/model")[1]["queue"]["queued_texts"]


def test_a_full_queue_answers_503_with_retry_after_and_old_texts_are_shed(server):
    four = {"texts": TEXTS[:4]}
    with ThreadPoolExecutor(2) as pool:
        first = [pool.submit(post, server, "/slow/v1/classify", four) for _ in range(2)]
        deadline = time.monotonic() + 10
        while queued(server) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, body, headers = call(server + "/slow/v1/classify", json.dumps(four).encode(), with_headers=True)
        assert status == 503 and body["error"]["reason"] == "overloaded" and int(headers["retry-after"]) >= 1
        assert "queued" in body["error"]["message"]
        # The two admitted requests waited 1.5 s for their batch, past the 200 ms deadline: shed, not computed.
        for future in first:
            status, body = future.result()
            assert status == 503 and "deadline" in body["error"]["message"]
    assert queued(server) == 0


def test_a_cancelled_request_leaves_the_backlog(server):
    payload = json.dumps({"texts": TEXTS[:3]}).encode()
    head = (f"POST /slow/v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + payload)
        deadline = time.monotonic() + 5
        while queued(server) != 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        seen = time.monotonic()
        assert queued(server) == 3
    # The client hung up well before the batch (1.5 s wait) would take its texts: Serve cancels the
    # request, and its texts must leave the count the controller and the shedding read.
    while queued(server) != 0 and time.monotonic() < seen + 3:
        time.sleep(0.02)
    assert queued(server) == 0 and time.monotonic() - seen < 1.2


# -- fuzz (opt-in) -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RAYEXIT_FUZZ"), reason="opt-in: RAYEXIT_FUZZ=<inputs> (seed RAYEXIT_FUZZ_SEED)")
def test_schema_based_fuzz_never_gets_a_5xx(server):
    """Inputs derived from the served /openapi.json; every answer is 2xx or a 4xx in the JSON error shape."""
    from serve_fuzz import cases

    count, seed = int(os.environ["RAYEXIT_FUZZ"]), int(os.environ.get("RAYEXIT_FUZZ_SEED", "0"))
    tally: dict[str, int] = {}
    failures = []
    for base in (server, server + "/tagger"):
        spec = call(base + "/openapi.json")[1]
        for method, path, headers, raw in cases(spec, count // 2, seed):
            status, body = call(base + path, raw, headers=headers, method=method)
            family = f"{status // 100}xx"
            tally[family] = tally.get(family, 0) + 1
            well_formed = status < 300 or (isinstance(body, dict) and set(body) == {"error"}
                                           and {"field", "message", "reason"} <= set(body["error"]))
            if status >= 500 or not well_formed:
                failures.append((method, path, headers, raw[:200], status, body))
    print(f"fuzz seed {seed}: {sum(tally.values())} inputs, " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    assert not failures, failures[:5]
