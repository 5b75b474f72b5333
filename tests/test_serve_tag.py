"""/v1/tag through the replica's batched, controlled path (no Ray cluster: the deployment class in this
process, its @serve.batch queue driven over ASGI, as in test_serve_replica): answers equal to the
unbatched `predict_tags`, per-request layer caps, load relief that relaxes the token policy, and a
poisoned or oversize request that harms no other one.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import in_process_replica
from test_token_exits import SENTENCES, median_uncertainty, tiny_tagger

from rayexit.config import ExitPolicy
from rayexit.data.conll import encode_tagged
from rayexit.policy import relax
from rayexit.serve.tagging import ServedTagger
from rayexit.token_exits import predict_tags

MAX_LENGTH = 24  # short, so the long sentence below is tagged in several windows
LONG = ("Peter Blackburn visited the European Commission in Brussels on Thursday " * 4).split()
TEXTS = [" ".join(s) for s in SENTENCES] + [" ".join(LONG), "German advice on Thursday", "Peter"]


@pytest.fixture(scope="module")
def tagger_and_policy(minilm_tokenizer):
    model = tiny_tagger()
    model.exit_config.max_length = MAX_LENGTH
    threshold = round(median_uncertainty(model, encode_tagged(minilm_tokenizer, SENTENCES, None, MAX_LENGTH)), 4)
    policy = ExitPolicy("tokee", threshold, window=3)
    model.exit_config.policy = policy
    return model, policy


@pytest.fixture(scope="module")
def tagger_dir(tagger_and_policy, minilm_tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tag-replica") / "tagger"
    tagger_and_policy[0].save_pretrained(directory, minilm_tokenizer)
    return directory


def direct(model, tokenizer, texts, policy: ExitPolicy, cap=None) -> list[dict]:
    """The unbatched reference: predict_tags with the same policy, one call per text."""
    out = []
    for text in texts:
        words = text.split()
        [answer] = predict_tags(model, tokenizer, [words], policy.kind, policy.window, policy.threshold, cap,
                                batch_size=1)
        out.append({"words": words, "tags": answer["tags"], "exit_layers": answer["exit_layers"]})
    return out


def replica(directory, **settings):
    """The real deployment class built in this process, with recording metrics."""
    return in_process_replica({"model_dir": str(directory), "max_queue_wait_ms": 5000, **settings})


def send(obj, rounds: list[list[dict]]) -> list[list[httpx.Response]]:
    """Each round's requests sent together (one event loop for all, as in a replica), rounds one after
    another; a body of None is a GET."""

    async def run():
        api = obj.__serve_build_asgi_app__()
        out = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://replica") as client:
            for bodies in rounds:
                calls = (client.get(path) if b is None else client.post(path, json=b) for path, b in bodies)
                out.append(await asyncio.gather(*calls))
        return out

    return asyncio.run(run())


def test_length_aware_passes_under_a_token_budget_equal_predict_tags(tagger_and_policy, minilm_tokenizer):
    model, policy = tagger_and_policy
    tagger = ServedTagger(model, minilm_tokenizer, policy, token_budget=48)
    caps = [None, 2, None, 1, None, None, 3, 2]
    results, stats = tagger.tag_words([t.split() for t in TEXTS], caps)
    for text, cap, result in zip(TEXTS, caps, results, strict=True):
        assert result == direct(model, minilm_tokenizer, [text], policy, cap)[0]
        assert all(1 <= layer <= (cap or model.num_layers) for layer in result["exit_layers"])
    assert len(results[5]["tags"]) == len(LONG)  # its windows were tagged in different passes and stitched back
    assert min(layer for r in results for layer in r["exit_layers"]) < model.num_layers  # the policy exits early
    assert stats.passes > len(set(caps))  # the budget split cap groups into several passes
    assert stats.padded_tokens <= stats.real_tokens * 1.5  # sorted by length: little padding


def test_tag_requests_share_batches_and_answer_as_predict_tags(tagger_dir, tagger_and_policy, minilm_tokenizer):
    model, policy = tagger_and_policy
    bodies = [{"texts": TEXTS[i % 7 : i % 7 + 2]} for i in range(12)]
    for i in (2, 5, 9):
        bodies[i] = {**bodies[i], "max_layers": 1 + i % 3}
    with replica(tagger_dir, max_batch_size=8, batch_wait_ms=50, token_budget=64) as obj:
        [answers] = send(obj, [[("/v1/tag", b) for b in bodies]])
        for body, answer in zip(bodies, answers, strict=True):
            assert answer.status_code == 200, answer.text
            cap = body.get("max_layers")
            assert answer.json()["results"] == direct(model, minilm_tokenizer, body["texts"], policy, cap)
            if cap is not None:
                assert max(max(r["exit_layers"]) for r in answer.json()["results"]) <= cap
        assert max(obj.metrics.batch_size.values) > 2  # texts of different requests shared a batch
        assert obj.metrics.padding.values and obj.metrics.exit_layer.values  # the classifier's metrics, for tags
        assert len(obj.metrics.exit_layer.values) == sum(len(b["texts"]) for b in bodies)
        assert obj.admission.queued_texts == 0


def test_under_load_the_controller_relaxes_the_token_policy(tagger_dir, tagger_and_policy, minilm_tokenizer):
    """A p99 target no replica can meet: every window is over target, so after two windows the
    controller relaxes one step (max_relax_level 1 holds it there); /v1/model, the gauge and the
    answers all show the relaxed policy."""
    model, policy = tagger_and_policy
    texts = TEXTS[:5]
    settings = dict(relax_under_load=True, max_relax_level=1, target_p99_ms=0.001, window_s=0.0, batch_wait_ms=1)
    with replica(tagger_dir, **settings) as obj:
        load = [("/v1/tag", {"texts": [texts[i % 5]]}) for i in range(25)]  # a window closes after 20 requests
        rounds = send(obj, [load, load, load, [("/v1/model", None)], [("/v1/tag", {"texts": texts})]])
        assert all(a.status_code == 200 for r in rounds[:3] for a in r)
        info = rounds[3][0].json()
        answer = rounds[4][0].json()["results"]
        assert obj.controller.relax_level == 1
        assert info["batching"]["relax_level"] == 1
        loosened = relax(policy, 1, len(model.labels))
        assert info["policy"]["thresholds"][0] == pytest.approx(policy.threshold)
        assert info["policy_in_force"]["thresholds"][0] == pytest.approx(loosened.threshold)
        assert loosened.threshold > policy.threshold
        assert obj.metrics.relax_level.values[0] == 0 and obj.metrics.relax_level.values[-1] == 1
        assert any("relax exits" in reason for d in obj.controller.history for reason in d.reasons)
        assert answer == direct(model, minilm_tokenizer, texts, loosened)
        strict = direct(model, minilm_tokenizer, texts, policy)
        layers = [sum(sum(r["exit_layers"]) for r in rs) for rs in (answer, strict)]
        assert layers[0] < layers[1]  # relaxed: fewer layers computed for the same texts


def test_a_poisoned_or_oversize_tag_request_harms_no_other(tagger_dir, tagger_and_policy, minilm_tokenizer):
    model, policy = tagger_and_policy
    bodies = [{"texts": TEXTS[i % 7 : i % 7 + 2]} for i in range(10)]
    bodies[3] = {"texts": ["fine words", "a poison word"]}
    bodies[6] = {"texts": [" ".join(["Brussels"] * 60)] * 2}  # 124 tokens, over max_request_tokens
    with replica(tagger_dir, max_batch_size=16, batch_wait_ms=50, max_request_tokens=100) as obj:
        original = obj.tagger.tag_words
        calls: list[int] = []

        def fragile(sentences, caps=None, relax_level=0):
            calls.append(len(sentences))
            if any("poison" in words for words in sentences):
                raise RuntimeError("simulated kernel failure")
            return original(sentences, caps, relax_level)

        obj.tagger.tag_words = fragile
        [answers] = send(obj, [[("/v1/tag", b) for b in bodies]])
        assert max(calls) > 2  # the poisoned text shared a batch with other requests' texts
        for i, (body, answer) in enumerate(zip(bodies, answers, strict=True)):
            if i == 3:
                assert answer.status_code == 500 and answer.json()["error"]["field"] == "texts[1]"
            elif i == 6:
                assert answer.status_code == 413 and answer.json()["error"]["limit"] == 100
            else:
                assert answer.status_code == 200
                assert answer.json()["results"] == direct(model, minilm_tokenizer, body["texts"], policy)
        assert obj.admission.queued_texts == 0
        assert any(t == {"reason": "model_error"} for t in obj.metrics.failed.tags)


def test_a_sentence_policy_is_refused_for_a_token_model(tagger_dir):
    from rayexit.errors import RayexitError

    with pytest.raises(RayexitError, match="policy_kind.*token model.*not a token policy"):
        with replica(tagger_dir, policy_kind="entropy"):
            pass


@pytest.mark.parametrize("device, dtype", [("cpu", "bfloat16"), ("cuda", "float16")])
def test_the_tagger_runs_on_the_model_device_in_half_precision(tagger_and_policy, minilm_tokenizer, device, dtype):
    """The token runner builds its tensors on the model's device; answers come back as plain lists."""
    import copy

    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU here")
    model, policy = tagger_and_policy
    half = ServedTagger(copy.deepcopy(model), minilm_tokenizer, ExitPolicy("none"), device, getattr(torch, dtype))
    assert next(half.model.parameters()).device.type == device and half.dtype == getattr(torch, dtype)
    full = ServedTagger(model, minilm_tokenizer, ExitPolicy("none"))
    sentences = [t.split() for t in TEXTS]
    ours, _ = half.tag_words(sentences)
    reference, _ = full.tag_words(sentences)
    pairs = [(a, b) for r, f in zip(ours, reference, strict=True) for a, b in zip(r["tags"], f["tags"], strict=True)]
    assert len(pairs) == sum(len(s) for s in sentences)
    assert sum(a == b for a, b in pairs) >= 0.9 * len(pairs)  # half precision: the same tags, near enough
    assert all(layer == model.num_layers for r in ours for layer in r["exit_layers"])
    early, _ = half.tag_words(sentences, [2] * len(sentences), relax_level=0)
    assert {layer for r in early for layer in r["exit_layers"]} == {2}
