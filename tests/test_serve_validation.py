"""Request models and the served engine, without Ray: every bad body, and answers equal to the runner's."""

from __future__ import annotations

import json

import pydantic
import pytest
import torch
from conftest import tiny_sequence_model

from rayexit.config import ExitPolicy
from rayexit.data.encode import pad_batch
from rayexit.errors import RayexitError
from rayexit.exits import run_early_exit
from rayexit.serve.engine import ServedClassifier, token_budget_chunks
from rayexit.serve.settings import ServeSettings
from rayexit.serve.validation import (
    REASONS,
    Limits,
    RequestError,
    check_content_type,
    check_declared_size,
    from_validation_errors,
    texts_model,
)

LIMITS = Limits(max_texts=3, max_text_chars=20, max_body_bytes=200)
MODEL = texts_model(LIMITS, num_layers=4, name="Body", example=["hi"])


def rejected(data) -> RequestError:
    with pytest.raises(pydantic.ValidationError) as info:
        MODEL.model_validate(data)
    return from_validation_errors(info.value.errors(), num_layers=4)


@pytest.mark.parametrize(
    "body, status, field, limit",
    [
        ('{"texts": []}', 422, "texts", 1),
        ('{"texts": [""]}', 422, "texts[0]", None),
        ('{"texts": ["ok", "   "]}', 422, "texts[1]", None),
        ('{"texts": ["ok", 5]}', 422, "texts[1]", None),
        ('{"texts": ["a", "b", "c", "d"]}', 422, "texts", 3),
        ('{"texts": ["' + "x" * 21 + '"]}', 422, "texts[0]", 20),
        ('{"texts": "just one string"}', 422, "texts", None),
        ('{"text": ["typo"]}', 422, "text", None),
        ('{"texts": ["ok"], "\u00e9": 1}', 422, "\u00e9", None),
        ("{}", 422, "texts", None),
        ('["a list"]', 422, "body", None),
        ('{"texts": ["ok"], "max_layers": 0}', 422, "max_layers", 4),
        ('{"texts": ["ok"], "max_layers": 5}', 422, "max_layers", 4),
        ('{"texts": ["ok"], "max_layers": true}', 422, "max_layers", 4),
        ('{"texts": ["ok"], "max_layers": null}', 422, "max_layers", 4),
        ('{"texts": ["ok"], "max_layers": 3.0}', 422, "max_layers", 4),
        ('{"texts": ["bad \ud800 text"]}', 422, "texts[0]", None),
    ],
)
def test_every_bad_body_names_its_field_and_limit(body, status, field, limit):
    error = rejected(json.loads(body))
    assert (error.status, error.field, error.limit) == (status, field, limit)
    payload = error.to_json()["error"]
    assert payload["field"] == field and payload["message"] and payload["reason"] in REASONS
    if limit is not None and limit > 1:
        assert payload["limit"] == limit and str(limit) in payload["message"]


def test_reasons_separate_unknown_keys_and_unencodable_text():
    assert rejected({"texts": ["ok"], "extra": 1}).reason == "unknown_field"
    assert rejected({"texts": ["a\ud800"]}).reason == "text_not_encodable"
    assert rejected({"texts": ["ok"], "\ud800": 1}).field == "\\ud800"  # escaped, so it can be echoed
    with pytest.raises(AssertionError):
        RequestError(422, "x", "m", reason="made-up")  # reasons are a closed set (metric label values)


def test_a_good_body_parses():
    parsed = MODEL.model_validate({"texts": ["hello", "world"], "max_layers": 2})
    assert parsed.texts == ["hello", "world"] and parsed.max_layers == 2
    assert MODEL.model_validate({"texts": ["hi"]}).max_layers is None


def test_declared_size_is_checked_before_reading():
    check_declared_size(None, LIMITS)
    check_declared_size("200", LIMITS)
    with pytest.raises(RequestError) as info:
        check_declared_size("201", LIMITS)
    assert info.value.status == 413 and info.value.reason == "body_too_large"
    with pytest.raises(RequestError) as info:
        check_declared_size("lots", LIMITS)
    assert info.value.status == 400 and info.value.field == "content-length"


@pytest.mark.parametrize("value", ["application/json", "Application/JSON; charset=utf-8"])
def test_json_content_types_pass(value):
    check_content_type(value)


@pytest.mark.parametrize("value", [None, "", "text/plain", "application/jsonx", "multipart/form-data; boundary=x"])
def test_other_content_types_are_415(value):
    with pytest.raises(RequestError) as info:
        check_content_type(value)
    assert info.value.status == 415 and info.value.field == "content-type"


def test_token_budget_chunks_sort_by_length_and_bound_padding():
    rows = [10, 11, 12, 13, 14]
    lengths = [50, 3, 40, 4, 5]
    chunks = token_budget_chunks(rows, lengths, budget=90)
    assert sorted(r for c in chunks for r in c) == rows
    assert chunks[0] == [11, 13, 14]  # the three short ones together
    width = dict(zip(rows, lengths, strict=True))
    for chunk in chunks:
        assert len(chunk) == 1 or len(chunk) * max(width[r] for r in chunk) <= 90
    assert token_budget_chunks([7], [500], budget=10) == [[7]]  # over budget alone still runs


def test_serve_settings_refuse_unknown_and_bad_fields(tmp_path):
    with pytest.raises(RayexitError, match="unknown setting.*max_batch"):
        ServeSettings.from_args({"model_dir": "x", "max_batch": 4})
    with pytest.raises(RayexitError, match="model_dir: missing"):
        ServeSettings.from_args({})
    with pytest.raises(RayexitError, match="max_texts"):
        ServeSettings.from_args({"model_dir": "x", "max_texts": 0})
    with pytest.raises(RayexitError, match="not a rayexit model directory"):
        ServeSettings.from_args({"model_dir": str(tmp_path)}).resolved()


@pytest.mark.parametrize("name, value", [
    ("target_p99_ms", float("nan")), ("rebatch_hold_ms", float("nan")), ("window_s", float("inf")),
    ("batch_wait_ms", float("inf")), ("max_queue_wait_ms", float("inf")), ("max_queue_wait_ms", float("nan")),
    ("guard_boost", float("inf")), ("guard_boost", float("nan")), ("overload_layer_cap", 2.5),
    ("overload_layer_cap", True),
])
def test_serve_settings_refuse_nan_infinity_and_non_whole_caps(name, value):
    # NaN passes every "< 0" check and would switch shedding (target_p99_ms) or rebatching off unseen;
    # either would also make /v1/model answer 500, since it echoes the settings as strict JSON.
    with pytest.raises(RayexitError, match=f"serve args.{name}: got .*expected a (finite number|whole number)"):
        ServeSettings.from_args({"model_dir": "x", name: value})


def confident_tiny_model(seed: int = 3):
    """A tiny random model whose exits are not all uniform (fresh heads start near zero), so texts leave
    at different layers under a 0.15 entropy threshold."""
    model = tiny_sequence_model(layers=4, labels=("neg", "pos", "neutral"), seed=seed, pooling="mean")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.heads.exits:
            head.pooler.weight.copy_(torch.randn(head.pooler.weight.shape, generator=generator) * 0.5)
            head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def tiny_served(minilm_tokenizer):
    return ServedClassifier(confident_tiny_model(), minilm_tokenizer, ExitPolicy("entropy", 0.15), token_budget=64)


TEXTS = [
    "a short one",
    "show me the flights from boston to denver on monday morning please",
    "cheap",
    "what is the cheapest fare between pittsburgh and atlanta with a stop in dallas",
    "list airlines",
    "i would like to book a round trip ticket",
]


def test_served_answers_equal_the_runner_on_each_text_alone(tiny_served):
    answers, stats = tiny_served.classify(TEXTS, [None, 2, None, None, 3, None])
    assert stats.passes >= 2  # the 64-token budget split the batch
    caps = [None, 2, None, None, 3, None]
    layers_seen = set()
    for text, cap, answer in zip(TEXTS, caps, answers, strict=True):
        ids, mask = pad_batch(tiny_served.encode([text]), tiny_served.pad_id)
        alone = run_early_exit(tiny_served.model, ids, mask, tiny_served.policy, layer_cap=cap)
        assert answer.label == tiny_served.labels[int(alone.predictions[0])]
        assert answer.exit_layer == int(alone.exit_layers[0])
        assert answer.probability == pytest.approx(float(alone.confidences[0]), abs=1e-4)
        if cap is not None:
            assert answer.exit_layer <= cap
        layers_seen.add(answer.exit_layer)
    assert len(layers_seen) > 1  # the threshold was chosen so texts leave at different layers


def test_relaxed_policy_and_overload_cap_make_answers_shallower(tiny_served):
    base, _ = tiny_served.classify(TEXTS)
    relaxed, _ = tiny_served.classify(TEXTS, relax_level=3)
    assert sum(a.exit_layer for a in relaxed) < sum(a.exit_layer for a in base)
    tiny_served.overload_layer_cap = 1
    try:
        capped, _ = tiny_served.classify(TEXTS, relax_level=1)
    finally:
        tiny_served.overload_layer_cap = None
    assert all(a.exit_layer == 1 for a in capped)


def test_full_depth_policy_runs_every_layer(tiny_served):
    full = ServedClassifier(tiny_served.model, tiny_served.tokenizer, ExitPolicy("none", 0.0))
    answers, _ = full.classify(TEXTS[:3])
    assert [a.exit_layer for a in answers] == [4, 4, 4]
    assert all(0.0 < a.probability <= 1.0 for a in answers)
    assert torch.get_default_dtype() == torch.float32


def test_fixed_batching_pins_the_controller_and_adaptive_leaves_it_room():
    fixed = ServeSettings.from_args({"model_dir": "m", "adaptive": False, "max_batch_size": 8, "batch_wait_ms": 3})
    config = fixed.controller_config()
    assert (config.min_batch_size, config.max_batch_size, config.initial_batch_size) == (8, 8, 8)
    assert config.min_wait_s == config.max_wait_s == pytest.approx(0.003)
    adaptive = ServeSettings.from_args({"model_dir": "m", "max_batch_size": 8}).controller_config()
    assert (adaptive.min_batch_size, adaptive.max_batch_size) == (1, 64)
