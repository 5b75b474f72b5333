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


def _post(replica, path: str, body: dict, loop: asyncio.AbstractEventLoop | None = None) -> httpx.Response:
    """One request over ASGI; `loop`: the replica's own (its batch queue is bound to the loop of its first call)."""
    async def send():
        api = replica.__serve_build_asgi_app__()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://replica") as client:
            return await client.post(path, json=body)

    return asyncio.run(send()) if loop is None else loop.run_until_complete(send())


@pytest.mark.parametrize("wordless", ["\x00", "\u200b", "\ufeff", "\u0301"])
def test_a_text_the_tokenizer_drops_entirely_is_a_422_not_a_made_up_label(replica, wordless):
    # non-blank to the schema, yet nothing but [CLS] [SEP] once tokenized; refused before any batch
    answer = _post(replica, "/v1/classify", {"texts": ["a fine text", wordless]})
    error = answer.json()["error"]
    assert answer.status_code == 422 and error["field"] == "texts[1]" and error["reason"] == "no_words"
    engine = replica.engine  # an emoji is not dropped: it is [UNK], a word the model reads
    assert len(engine.encode(["\U0001f600"])[0]) == engine.special_tokens + 1 == len(engine.encode(["a"])[0])


@pytest.fixture(scope="module")
def tagger_replica(tmp_path_factory, minilm_tokenizer):
    from test_token_exits import tiny_tagger

    directory = tmp_path_factory.mktemp("replica") / "tagger"
    tiny_tagger().save_pretrained(directory, minilm_tokenizer)
    settings = {"model_dir": str(directory), "max_texts": 8, "adaptive": False, "max_batch_size": 16,
                "batch_wait_ms": 5, "max_queue_wait_ms": 5000, "max_text_tokens": 40}
    loop = asyncio.new_event_loop()
    try:
        with in_process_replica(settings, loop) as obj:
            yield obj, loop
    finally:  # the batch queue's task still waits for work: end it before the loop closes
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


def test_tagging_counts_the_slots_that_stripped_words_take(tagger_replica):
    replica, loop = tagger_replica
    # 45 words the tokenizer strips to nothing: 45 [UNK] slots to tag, not the 0 pieces the tokenizer reports
    answer = _post(replica, "/v1/tag", {"texts": [" ".join(["\x01"] * 45)]}, loop)
    error = answer.json()["error"]
    assert answer.status_code == 422 and error["reason"] == "too_many_tokens" and error["limit"] == 40
    answer = _post(replica, "/v1/tag", {"texts": [" ".join(["\x01"] * 5)]}, loop)
    assert answer.status_code == 200 and len(answer.json()["results"][0]["words"]) == 5


def test_a_tag_text_with_no_words_is_a_422(tagger_replica):
    replica, loop = tagger_replica
    answer = _post(replica, "/v1/tag", {"texts": ["Peter visited Brussels", "\x1c"]}, loop)  # split() drops \x1c
    error = answer.json()["error"]
    assert answer.status_code == 422 and error["field"] == "texts[1]" and error["reason"] == "no_words"


def test_model_info_runs_on_the_event_loop_that_writes_the_state_it_reads(replica):
    # A plain `def` route runs in a worker thread, where it could read the guard's window mid-write.
    import inspect

    api = replica.__serve_build_asgi_app__()
    route = next(r for r in api.routes if getattr(r, "path", None) == "/v1/model")
    assert inspect.iscoroutinefunction(route.endpoint)
