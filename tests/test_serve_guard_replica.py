"""The accuracy guard inside the real deployment class (no Ray cluster), driven over ASGI as in test_serve_replica:
checks never delay the answer they sample, /v1/model shows the guard, and moved thresholds are what is served."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import build_replica, replica_patches
from test_serve_validation import TEXTS, confident_tiny_model
from test_token_exits import tiny_tagger

from rayexit.config import ExitPolicy

TUNED = 0.9  # loose enough that this random model's early answers often differ from its last layer's


@pytest.fixture()
def make_replica(tmp_path_factory, minilm_tokenizer):
    model = confident_tiny_model()
    model.exit_config.policy = ExitPolicy("entropy", TUNED)
    directory = tmp_path_factory.mktemp("guarded") / "model"
    model.save_pretrained(directory, minilm_tokenizer)
    tagger = tiny_tagger()
    tagger.exit_config.policy = ExitPolicy("tokee", 0.5, window=3)
    tagger_dir = tmp_path_factory.mktemp("guarded") / "tagger"
    tagger.save_pretrained(tagger_dir, minilm_tokenizer)

    def make(tagging: bool = False, **guard):
        settings = {"model_dir": str(tagger_dir if tagging else directory), "max_texts": 8, "adaptive": False,
                    "max_batch_size": 16, "batch_wait_ms": 5, "max_queue_wait_ms": 5000, "guard_target": 0.99,
                    "guard_sample": 1.0, "guard_max_overhead": 1.0, **guard}  # the budget: test_serve_guard.py
        return build_replica(settings)

    with replica_patches():
        yield make


async def _post_all(replica, bodies: list[dict], path: str = "/v1/classify") -> list[httpx.Response]:
    api = replica.__serve_build_asgi_app__()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://replica") as client:
        return await asyncio.gather(*(client.post(path, json=b) for b in bodies))


async def _until_idle(replica, timeout_s: float = 60.0) -> None:  # generous: a loaded 2-core machine
    deadline = time.monotonic() + timeout_s
    while replica._checking is not None or replica.guard.pending:
        assert time.monotonic() < deadline, "the guard's checks did not finish"
        await asyncio.sleep(0.01)


def test_a_slow_check_does_not_delay_the_answer_of_the_request_it_samples(make_replica):
    replica = make_replica()
    original = replica.engine.exit_logits_encoded
    check_ended: list[float] = []

    def slow(sequences):
        time.sleep(1.5)
        check_ended.append(time.perf_counter())
        return original(sequences)

    replica.engine.exit_logits_encoded = slow

    async def scenario():
        [answer] = await _post_all(replica, [{"texts": TEXTS[:3]}])
        answered = time.perf_counter()
        assert replica._checking is not None  # the check was still running when the answer came back
        await _until_idle(replica)
        return answer, answered

    answer, answered = asyncio.run(scenario())
    assert answer.status_code == 200 and len(answer.json()["results"]) == 3
    assert answered < check_ended[0]  # the answer came back while the check of its own texts still ran
    assert replica.guard.samples == 3  # sample 1.0: every text was checked afterwards


def test_model_info_and_metrics_show_the_guard(make_replica):
    replica = make_replica()

    async def scenario():
        await _post_all(replica, [{"texts": TEXTS[i % 4: i % 4 + 3]} for i in range(6)])
        await _until_idle(replica)
        api = replica.__serve_build_asgi_app__()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://replica") as client:
            return (await client.get("/v1/model")).json()

    info = asyncio.run(scenario())
    guard = info["guard"]
    assert {"target", "agreement", "agreement_by_layer", "samples", "thresholds"} <= set(guard)
    assert guard["target"] == 0.99 and guard["samples"] == 18
    assert set(guard["agreement_by_layer"]) == {"1", "2", "3"} and len(guard["thresholds"]) == 4
    assert info["policy"]["thresholds"] == guard["thresholds"]  # what the guard holds is what is served
    assert replica.metrics.guard_samples.values[-1] == 18
    assert replica.metrics.guard_threshold.values  # one value per exit, from start-up on


def test_disagreeing_exits_are_tightened_and_the_tighter_thresholds_are_served(make_replica):
    replica = make_replica(guard_window=60, guard_min_samples=5)
    texts = [f"{TEXTS[i % len(TEXTS)]} {word}" for i, word in enumerate("abcdefghijklmnopqrstuvwxyz" * 2)]

    async def scenario():
        for start in range(0, len(texts), 4):
            await _post_all(replica, [{"texts": texts[start:start + 4]}])
            await _until_idle(replica)

    asyncio.run(scenario())
    guard = replica.guard
    assert guard.samples == len(texts)
    assert any(m["direction"] == "tighten" for m in guard.moves)
    assert min(guard.thresholds()[:-1]) < TUNED
    assert replica.engine.policy.thresholds == guard.thresholds()
    for layer in range(3):
        count, agreement = guard.layer_agreement(layer)
        assert count < 5 or agreement >= 0.99  # every exit with evidence now meets the target on the window


def test_checks_wait_while_load_relief_is_on(make_replica):
    replica = make_replica()
    replica.controller.relax_level = 1

    async def scenario():
        await _post_all(replica, [{"texts": TEXTS[:2]}])
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert replica.guard.samples == 0 and len(replica.guard.pending) == 2 and replica._checking is None


def test_the_guard_is_off_unless_a_target_is_set(make_replica):
    replica = make_replica(guard_target=None)
    assert replica.guard is None and replica.model_info()["guard"] is None


def test_tagging_is_guarded_per_word(make_replica):
    replica = make_replica(tagging=True, guard_window=400, guard_min_samples=5)
    bodies = [{"texts": TEXTS[i:i + 2]} for i in range(4)]

    async def scenario():
        answers = await _post_all(replica, bodies, "/v1/tag")
        await _until_idle(replica)
        return answers

    answers = asyncio.run(scenario())
    assert all(a.status_code == 200 for a in answers)
    words = sum(len(text.split()) for body in bodies for text in body["texts"])
    assert replica.guard.samples == words  # one checked unit per word
    info = replica.model_info()["guard"]
    assert info["thresholds"] == replica.tagger.policy.per_layer(replica.num_layers)
    for layer in range(replica.num_layers - 1):  # the rule ran on words: every exit with evidence meets the target
        count, agreement = replica.guard.layer_agreement(layer)
        assert count < 5 or agreement >= 0.99
