"""The real deployment class with `rebatch: true`, in this process (no Ray cluster), driven over ASGI:
same answers as the runner, per-request depth caps, rows per layer execution reported, and a model
failure inside a merged working batch failing only its own request."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import in_process_replica
from test_serve_validation import TEXTS, confident_tiny_model


@pytest.fixture(scope="module")
def replica(tmp_path_factory, minilm_tokenizer):
    directory = tmp_path_factory.mktemp("rebatch-replica") / "model"
    confident_tiny_model().save_pretrained(directory, minilm_tokenizer)
    settings = {"model_dir": str(directory), "max_texts": 8, "adaptive": False, "max_batch_size": 4,
                "batch_wait_ms": 5, "max_queue_wait_ms": 5000, "rebatch": True, "policy_kind": "entropy",
                "thresholds": 0.15}
    # One event loop for every request: @serve.batch binds its queue to the loop of its first call.
    loop = asyncio.new_event_loop()
    with in_process_replica(settings, loop) as obj:
        obj.test_loop = loop
        yield obj
        obj.rebatched.close()
    # @serve.batch leaves its queue-draining task waiting on this loop; closing the loop under it
    # makes its later clean-up raise "Event loop is closed", so end it here first.
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


def post_all(replica, bodies):
    async def send_all():
        api = replica.__serve_build_asgi_app__()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://replica") as client:
            return await asyncio.gather(*(client.post("/v1/classify", json=b) for b in bodies))

    return replica.test_loop.run_until_complete(asyncio.wait_for(send_all(), timeout=120))


def test_rebatched_replica_answers_as_the_runner_does(replica):
    bodies = [{"texts": TEXTS[i % 5: i % 5 + 1 + i % 3]} for i in range(12)]
    for i in (2, 7):
        bodies[i]["max_layers"] = 2
    before = replica.layer_runs
    answers = post_all(replica, bodies)
    layers_seen = set()
    for body, answer in zip(bodies, answers, strict=True):
        assert answer.status_code == 200, answer.text
        expected, _ = replica.engine.classify(body["texts"], [body.get("max_layers")] * len(body["texts"]))
        results = answer.json()["results"]
        assert [(r["label"], r["exit_layer"]) for r in results] == [(a.label, a.exit_layer) for a in expected]
        assert [r["probability"] for r in results] == pytest.approx([a.probability for a in expected], abs=1e-5)
        layers_seen |= {r["exit_layer"] for r in results}
        if "max_layers" in body:
            assert all(r["exit_layer"] <= 2 for r in results)
    assert len(layers_seen) > 1, "the test needs texts leaving at different layers"
    assert replica.layer_runs > before and replica.rebatched.scheduler.pending() == 0
    info = replica.model_info()["batching"]
    assert info["rebatch"] is True and info["rows_per_layer_run"] > 1
    assert replica.metrics.layer_rows.values  # the metric saw every layer execution
    assert replica.admission.queued_texts == 0


def test_a_model_failure_in_a_merged_batch_fails_only_its_request(replica, minilm_tokenizer, monkeypatch):
    poison_id = minilm_tokenizer("poison", add_special_tokens=False)["input_ids"][0]
    model = replica.engine.model
    embed = model.embed

    def fragile(ids):
        if (ids == poison_id).any():
            raise RuntimeError("simulated kernel failure")
        return embed(ids)

    bodies = [{"texts": TEXTS[i % 5: i % 5 + 2]} for i in range(8)]
    bodies[3] = {"texts": ["fine text", "poison pill"]}
    monkeypatch.setattr(model, "embed", fragile)
    answers = post_all(replica, bodies)
    monkeypatch.undo()
    for body, answer in zip(bodies, answers, strict=True):
        if body is bodies[3]:
            error = answer.json()["error"]
            assert answer.status_code == 500 and error["reason"] == "model_error" and error["field"] == "texts[1]"
        else:
            expected, _ = replica.engine.classify(body["texts"])
            assert answer.status_code == 200
            assert [r["label"] for r in answer.json()["results"]] == [a.label for a in expected]
    assert replica.admission.queued_texts == 0
    assert any(t == {"reason": "model_error"} for t in replica.metrics.failed.tags)


def test_load_relief_applies_per_row(replica):
    """Rows admitted under a relaxed policy exit by it, as the runner's relaxed batches do."""
    sequences = replica.engine.encode(TEXTS)
    relaxed, _ = replica.test_loop.run_until_complete(
        replica.rebatched.classify_encoded(sequences, None, relax_level=3)
    )
    expected, _ = replica.engine.classify_encoded(sequences, None, relax_level=3)
    assert [(a.label, a.exit_layer) for a in relaxed] == [(a.label, a.exit_layer) for a in expected]


def test_controller_reads_the_model_time_of_rebatched_batches_not_their_wall_time(replica, monkeypatch):
    """A rebatched batch's wall time holds its rows' waits behind other batches' layers; the controller must
    see what the rows cost the model (the sum of their shares), or it shrinks entry batches under load."""
    charged, recorded = [], []
    classify = replica.rebatched.classify_encoded
    record = replica.controller.record_batch

    async def spy_classify(*args, **kwargs):
        answers, model_s = await classify(*args, **kwargs)
        charged.append(sum(model_s))
        return answers, model_s

    def spy_record(size, compute_s, backlog):
        recorded.append(compute_s)
        return record(size, compute_s, backlog)

    monkeypatch.setattr(replica.rebatched, "classify_encoded", spy_classify)
    monkeypatch.setattr(replica.controller, "record_batch", spy_record)
    answers = post_all(replica, [{"texts": TEXTS[i % 5: i % 5 + 2]} for i in range(10)])
    assert all(a.status_code == 200 for a in answers)
    assert len(recorded) == len(charged) > 1
    assert sorted(recorded) == pytest.approx(sorted(charged))
    assert all(c > 0 for c in charged)
