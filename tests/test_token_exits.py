"""SENTEE/TOKEE runner: exactness at full depth, halting, attention to halted tokens, FLOPs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_backbone

from rayexit.data.conll import encode_tagged, make_batch, token_batches
from rayexit.errors import RayexitError
from rayexit.flops import layer_flops
from rayexit.models import ExitConfig
from rayexit.models.token import MultiExitForTokenClassification
from rayexit.policy import ExitPolicy, token_uncertainty, window_scores
from rayexit.token_exits import (
    full_depth_flops,
    partial_layer,
    predict_tags,
    run_over_tokens,
    run_token_exit,
)

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
SENTENCES = [
    ["Peter", "Blackburn", "visited", "Brusselsian", "markets", "today"],
    ["Hi"],
    ["The", "European", "Commission", "said", "on", "Thursday", "it", "disagreed"],
    ["German", "advice"],
    ["a", "b", "c", "d", "e"],
]


def tiny_tagger(seed: int = 0, sharp: float = 40.0) -> MultiExitForTokenClassification:
    model = MultiExitForTokenClassification(
        tiny_backbone(layers=4, seed=seed), ExitConfig(task="token", labels=TAGS, dropout=0.0)
    )
    with torch.no_grad():  # random heads are near-uniform; sharpen them so uncertainties spread out
        for head in model.heads:
            head.classifier.weight.mul_(sharp)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_tagger()


@pytest.fixture(scope="module")
def data(minilm_tokenizer):
    return encode_tagged(minilm_tokenizer, SENTENCES, None, 64)


@torch.no_grad()
def median_uncertainty(model, data) -> float:
    batch = make_batch(data, list(range(len(data))))
    logits = model(batch.input_ids, batch.attention_mask)[0]
    return float(token_uncertainty(logits)[batch.attention_mask.bool()].median())


@torch.no_grad()
def test_halting_nothing_equals_full_depth(model, data):
    batch = make_batch(data, list(range(len(data))))
    result = run_token_exit(model, batch, ExitPolicy("tokee", thresholds=0.0, window=3))
    final = model(batch.input_ids, batch.attention_mask)[-1]
    expected = final.gather(1, batch.word_starts[:, :, None].expand(-1, -1, len(TAGS))).argmax(-1)
    assert torch.equal(result.predictions[batch.word_mask], expected[batch.word_mask])
    assert (result.exit_layers[batch.word_mask] == model.num_layers).all()
    # and layer by layer, the hand-written arithmetic matches the library's layer
    hidden = model.embed(batch.input_ids)
    valid = batch.attention_mask.bool()
    mask = model.additive_mask(batch.attention_mask, hidden.dtype)
    for index in range(model.num_layers):
        ours = partial_layer(model.backbone.encoder.layer[index], hidden, valid, valid)
        theirs = model.run_layer(index, hidden, mask)
        assert torch.allclose(ours[valid], theirs[valid], atol=1e-5)
        hidden = theirs


def test_window_criterion_on_hand_made_uncertainties():
    u = torch.tensor([[0.05, 0.30, 0.02, 0.01, 0.04, 0.50], [0.02, 0.03, 0.00, 0.00, 0.00, 0.00]])
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    assert torch.equal(window_scores(u, mask, 1), u * mask)
    three = window_scores(u, mask, 3)
    assert torch.allclose(three[0], torch.tensor([0.30, 0.30, 0.30, 0.04, 0.50, 0.50]))
    assert torch.allclose(three[1, :2], torch.tensor([0.03, 0.03]))  # the window stops at the sentence end
    five = window_scores(u, mask, 5)
    assert torch.allclose(five[0], torch.tensor([0.30, 0.30, 0.30, 0.50, 0.50, 0.50]))
    halts = three < 0.1
    assert halts[0].tolist() == [False, False, False, True, False, False]
    assert halts[1, :2].tolist() == [True, True]


def test_halted_token_state_is_unchanged_and_computes_fewer_rows(model):
    torch.manual_seed(1)
    hidden = torch.randn(2, 5, 32)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    active = torch.tensor([[True, False, True, False, True], [False, True, False, False, False]])
    layer = model.backbone.encoder.layer[1]
    rows_seen = []
    handle = layer.attention.self.query.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0]))
    try:
        out = partial_layer(layer, hidden, valid, active)
    finally:
        handle.remove()
    assert rows_seen == [int(active.sum())]  # queries only for the 4 active tokens, not 10 slots
    assert torch.equal(out[~active], hidden[~active])
    assert not torch.allclose(out[active], hidden[active])


def test_active_tokens_attend_to_halted_ones(model):
    torch.manual_seed(2)
    hidden = torch.randn(1, 6, 32)
    valid = torch.ones(1, 6, dtype=torch.bool)
    active = torch.tensor([[True, True, False, False, True, True]])
    layer = model.backbone.encoder.layer[0]
    out = partial_layer(layer, hidden, valid, active)
    # active rows equal the full layer's, which attends to every token, halted ones included
    full = layer(hidden, torch.zeros(1, 1, 1, 6))
    full = full[0] if isinstance(full, tuple) else full
    assert torch.allclose(out[active], full[active], atol=1e-5)
    changed = hidden.clone()
    changed[0, 2] += 3.0  # a halted token's state moves: the active tokens must see it
    moved = partial_layer(layer, changed, valid, active)
    assert not torch.allclose(moved[active], out[active], atol=1e-4)
    assert torch.equal(moved[0, 3], changed[0, 3])


def test_batched_equals_per_sentence(model, data):
    threshold = median_uncertainty(model, data)
    for policy in (ExitPolicy("tokee", threshold, window=3), ExitPolicy("sentee", threshold, reduce="mean")):
        together = run_over_tokens(model, data, policy, batch_size=len(data))
        alone = run_over_tokens(model, data, policy, batch_size=1)
        assert together.predictions == alone.predictions
        assert together.exit_layers == alone.exit_layers
        assert together.flops == alone.flops and together.full_flops == alone.full_flops


def test_tokee_halts_some_words_early_and_saves_flops(model, data):
    threshold = median_uncertainty(model, data)
    run = run_over_tokens(model, data, ExitPolicy("tokee", threshold, window=1), batch_size=8)
    layers = [layer for sentence in run.exit_layers for layer in sentence]
    assert min(layers) < model.num_layers
    assert run.flops < run.full_flops
    capped = run_over_tokens(model, data, ExitPolicy("none"), batch_size=8, layer_cap=2)
    assert {layer for sentence in capped.exit_layers for layer in sentence} == {2}


def test_sentee_exits_whole_sentences(model, data):
    threshold = median_uncertainty(model, data)
    run = run_over_tokens(model, data, ExitPolicy("sentee", threshold * 1.2), batch_size=8)
    assert all(len(set(sentence)) == 1 for sentence in run.exit_layers)


def test_flops_on_a_hand_worked_case():
    # H=4, I=8; one sentence, 2 query rows, 3 key tokens:
    # K,V 2*(2*3*4*4)=192; Q,O 2*(2*2*4*4)=128; scores+context 2*(2*2*3*4)=96; FFN 2*(2*2*4*8)=256
    assert layer_flops(4, 8, torch.tensor([2]), torch.tensor([3])) == 192 + 128 + 96 + 256
    assert layer_flops(4, 8, torch.tensor([2, 0]), torch.tensor([3, 5])) == 672 + 2 * 2 * 5 * 4 * 4


def test_flops_of_a_run_follow_the_rows_computed(model, minilm_tokenizer):
    data = encode_tagged(minilm_tokenizer, [["a", "b"]], None, 16)  # [CLS] a b [SEP]: 4 tokens
    batch = make_batch(data, [0])
    h, i, layers, tags = 32, 64, model.num_layers, len(TAGS)
    full = layers * layer_flops(h, i, torch.tensor([4]), torch.tensor([4])) + 2 * 2 * h * tags
    assert full_depth_flops(model, torch.tensor([4]), torch.tensor([2])) == full
    result = run_token_exit(model, batch, ExitPolicy("none"))
    assert result.full_flops == full
    assert result.flops == full + (layers - 1) * 2 * 2 * h * tags  # plus the inner exits' heads
    # threshold 1 halts every word after layer 1: one layer of 4 rows and one exit on 2 words
    early = run_token_exit(model, batch, ExitPolicy("tokee", 1.0, window=1))
    assert early.exit_layers[0].tolist() == [1, 1]
    assert early.flops == layer_flops(h, i, torch.tensor([4]), torch.tensor([4])) + 2 * 2 * h * tags


def test_predict_tags(model, minilm_tokenizer):
    out = predict_tags(model, minilm_tokenizer, [["Peter", "Blackburn"], [], ["Brussels"]], window=3, threshold=0.5)
    assert [len(o["tags"]) for o in out] == [2, 0, 1]
    assert all(t in TAGS for o in out for t in o["tags"])
    assert all(1 <= layer <= model.num_layers for o in out for layer in o["exit_layers"])
    capped = predict_tags(model, minilm_tokenizer, [["Peter", "Blackburn"]], policy="none", layer_cap=1)
    assert capped[0]["exit_layers"] == [1, 1]
    with pytest.raises(RayexitError, match="window"):
        predict_tags(model, minilm_tokenizer, [["a"]], window=0)
    with pytest.raises(RayexitError, match="sentences\\[0\\]"):
        predict_tags(model, minilm_tokenizer, ["not split"])


def test_batches_keep_every_window(data):
    rows = [row for batch in token_batches(data, 2) for row in batch.rows]
    assert sorted(rows) == list(range(len(data)))
