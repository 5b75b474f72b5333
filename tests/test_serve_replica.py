"""The real deployment class in this process (no Ray cluster): its @serve.batch queue, admission and the
FastAPI app it builds, driven over ASGI. Here the model can be made to fail on purpose, which no
HTTP input can do once validation works, to show that a failure inside a batch fails only its own request.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import in_process_replica
from test_serve_validation import TEXTS, confident_tiny_model


@pytest.fixture(scope="module")
def replica(tmp_path_factory, minilm_tokenizer):
    directory = tmp_path_factory.mktemp("replica") / "model"
    confident_tiny_model().save_pretrained(directory, minilm_tokenizer)
    settings = {"model_dir": str(directory), "max_texts": 8, "adaptive": False, "max_batch_size": 16,
                "batch_wait_ms": 50, "max_queue_wait_ms": 5000}
    with in_process_replica(settings) as obj:
        yield obj


def test_every_gauge_has_a_value_from_startup(replica):
    gauges = [replica.metrics.max_batch_size, replica.metrics.batch_wait, replica.metrics.relax_level,
              replica.metrics.queued_texts]
    assert all(g.values for g in gauges)
    assert replica.metrics.max_batch_size.values[0] == 16 and replica.metrics.queued_texts.values[0] == 0


def test_a_model_failure_in_a_batch_fails_only_the_request_that_caused_it(replica, minilm_tokenizer):
    poison_id = minilm_tokenizer("poison", add_special_tokens=False)["input_ids"][0]
    engine = replica.engine
    original = engine.classify_encoded
    calls: list[int] = []

    def fragile(sequences, caps=None, relax_level=0):
        calls.append(len(sequences))
        if any(poison_id in s for s in sequences):
            raise RuntimeError("simulated kernel failure")
        return original(sequences, caps, relax_level)

    bodies = [{"texts": TEXTS[i % 5 : i % 5 + 2]} for i in range(8)]
    bodies[3] = {"texts": ["fine text", "poison pill"]}

    async def send_all():
        api = replica.__serve_build_asgi_app__()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://replica") as client:
            return await asyncio.gather(*(client.post("/v1/classify", json=b) for b in bodies))

    engine.classify_encoded = fragile
    try:
        answers = asyncio.run(send_all())
    finally:
        engine.classify_encoded = original
    assert max(calls) > 2  # the poisoned text shared a batch with other requests' texts
    for body, answer in zip(bodies, answers, strict=True):
        if body is bodies[3]:
            error = answer.json()["error"]
            assert answer.status_code == 500 and error["reason"] == "model_error" and error["field"] == "texts[1]"
        else:
            expected, _ = engine.classify(body["texts"])
            assert answer.status_code == 200
            assert [r["label"] for r in answer.json()["results"]] == [a.label for a in expected]
    assert replica.admission.queued_texts == 0  # everything taken or released
    assert any(t == {"reason": "model_error"} for t in replica.metrics.failed.tags)
