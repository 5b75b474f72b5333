"""The vectorised token replay against the per-setting simulation and against the live runner."""

from __future__ import annotations

import random
import time

import pytest
import torch
from test_token_exits import SENTENCES, TAGS, tiny_tagger

from rayexit.data.conll import EncodedTokens, TaggedSentences, token_batches
from rayexit.policy import ExitPolicy
from rayexit.tasks import TokenTask, entity_counts
from rayexit.token_exits import TokenCache, cache_token_exits, run_over_tokens, simulate_halting
from rayexit.tune.token_replay import ThresholdSweep, TokenReplayCache, search_token_settings

SCHEME = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def synthetic_cache(sentences: int = 60, layers: int = 4, seed: int = 0, window_words: int = 7):
    """A cache with random uncertainties and tags (half the words keep one tag at every exit), and
    sentences longer than `window_words` cut into several rows, as long sentences are encoded."""
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lengths = [rng.randint(1, 18) for _ in range(sentences)]
    pieces, starts, gold = [], [], []
    for index, count in enumerate(lengths):
        gold.append([rng.choice(SCHEME) if rng.random() < 0.4 else "O" for _ in range(count)])
        for first in range(0, count, window_words):
            pieces.append((index, first))
            starts.append(list(range(1, 1 + min(window_words, count - first))))
    rows, width = len(pieces), max(len(s) for s in starts)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for row, s in enumerate(starts):
        mask[row, : len(s)] = True
    word_pieces = torch.randint(1, 4, (rows, width), generator=generator) * mask
    tokens = word_pieces.sum(1) + 2
    data = EncodedTokens([[0] * int(n) for n in tokens], starts, [], pieces, 0, len(lengths))
    uncertainty = torch.rand(rows, width, layers, generator=generator) ** 2
    tags = torch.randint(0, len(SCHEME), (rows, width, layers), generator=generator)
    stable = torch.rand(rows, width, generator=generator) < 0.5
    tags = torch.where(stable[:, :, None], tags[:, :, -1:], tags)
    return TokenCache(uncertainty, tags, mask, word_pieces, tokens, data, (32, 64, len(SCHEME))), gold


def one_at_a_time(cache: TokenCache, gold, labels, policy: ExitPolicy):
    """The existing per-setting path: simulate_halting, TokenCache's FLOPs, seqeval's entity counts."""
    halt = simulate_halting(cache.uncertainty, cache.word_mask, policy)
    tags, _, _ = cache.simulate(policy)
    counts = entity_counts(gold, [[labels[t] for t in sentence] for sentence in tags])
    return halt, cache._flops(halt), float(TokenTask().score_of(counts)), counts


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_replay_equals_the_per_setting_simulation(seed):
    cache, gold = synthetic_cache(seed=seed)
    replay = TokenReplayCache(cache, SCHEME, gold)
    assert 0 < replay.variable_positions < replay.num_words  # both kinds of segment are exercised
    generator = torch.Generator().manual_seed(seed)
    for kind, window in [("sentee", 1), ("tokee", 1), ("tokee", 2), ("tokee", 3), ("tokee", 5), ("tokee", 9)]:
        per_layer = torch.rand(12, cache.num_layers, generator=generator)
        for thresholds in (per_layer[:, 0], per_layer):  # one threshold for all layers, and one per layer
            result = replay.evaluate(kind, window, thresholds, keep_halting=True, per_sentence=True)
            for k in range(len(thresholds)):
                value = thresholds[k].tolist() if thresholds.dim() == 2 else float(thresholds[k])
                halt, flops, f1, counts = one_at_a_time(cache, gold, SCHEME, ExitPolicy(kind, value, window=window))
                assert torch.equal(result.halting[k], halt), (kind, window, value)
                assert int(result.flops[k]) == flops
                assert float(result.f1[k]) == pytest.approx(f1, abs=1e-12)
                assert torch.equal(result.sentence_counts[k], counts)


def test_threshold_sweep_equals_the_replay_at_every_threshold():
    cache, gold = synthetic_cache(sentences=80, seed=3)
    replay = TokenReplayCache(cache, SCHEME, gold)
    # thresholds on observed values (the boundary case), between them, below all and above all
    observed = replay.u_words[:40, : cache.num_layers - 1].reshape(-1)
    thresholds = torch.cat([observed, torch.rand(40), torch.tensor([0.0, 1.0, 5.0])])
    for kind, window in [("sentee", 1), ("tokee", 1), ("tokee", 3), ("tokee", 4), ("tokee", 7)]:
        swept = ThresholdSweep(replay, kind, window)(thresholds)
        direct = replay.evaluate(kind, window, thresholds)
        assert torch.equal(swept.flops, direct.flops)
        assert torch.equal(swept.f1, direct.f1)
        assert torch.equal(swept.layer_speedup, direct.layer_speedup)


def test_search_front_and_rate():
    cache, gold = synthetic_cache(sentences=800, layers=6, seed=4, window_words=40)
    replay = TokenReplayCache(cache, SCHEME, gold)
    start = time.perf_counter()
    result = search_token_settings(replay, windows=(1, 3, 5, 7, 9, 15), thresholds=2048)
    elapsed = time.perf_counter() - start
    assert result.settings >= 7 * 2000  # up to 2048 cuts of the observed uncertainties, for each of 7 groups
    # generous: measured tens of thousands a second on the shared 2-core machine under load
    assert result.settings / elapsed >= 1000
    scores = [(p.f1, p.flops_speedup) for p in result.points]
    for a in scores:
        assert not any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in scores)
    for point in result.points[:5]:  # each front point is what the per-setting path gives
        _, flops, f1, _ = one_at_a_time(cache, gold, SCHEME, point.to_policy())
        assert point.f1 == pytest.approx(f1, abs=1e-12)
        assert point.flops_speedup == pytest.approx(cache._full_flops() / flops, rel=1e-12)


# -- against the live runner -------------------------------------------------------------------

GOLD = [[random.Random(i).choice(TAGS) for _ in sentence] for i, sentence in enumerate(SENTENCES)]


@pytest.fixture(scope="module")
def tagged(minilm_tokenizer):
    model = tiny_tagger(seed=1, sharp=25.0)
    task = TokenTask()
    data = task.encode(minilm_tokenizer, TaggedSentences(SENTENCES * 4, GOLD * 4, "test"), TAGS, 64)
    return model, data


def live(model, data, policy: ExitPolicy, batch_size: int = 3):
    run = run_over_tokens(model, data, policy, batches=list(token_batches(data, batch_size)))
    halt = torch.zeros(len(data), max(len(s) for s in data.word_starts), dtype=torch.long)
    for row, (sentence, first) in enumerate(data.pieces):
        count = len(data.word_starts[row])
        halt[row, :count] = torch.tensor(run.exit_layers[sentence][first : first + count])
    return run, halt


def away_from_values(values: torch.Tensor, count: int, margin: float = 1e-4) -> list[float]:
    """Thresholds at quantiles of `values`, each at least `margin` from every value (float noise
    between the runner's arithmetic and a plain forward pass must not flip a decision)."""
    picks = []
    for q in torch.linspace(0.1, 0.9, count):
        t = float(torch.quantile(values, q))
        while (values - t).abs().min() < margin:
            t += margin
        picks.append(t)
    return picks


def test_sentee_replay_equals_the_live_runner(tagged):
    model, data = tagged
    cache = cache_token_exits(model, data)
    replay = TokenReplayCache(cache, TAGS, data.gold)
    scores = replay.row_scores["max"][:, :-1].reshape(-1)
    for threshold in away_from_values(scores, 6):
        run, halt = live(model, data, ExitPolicy("sentee", threshold))
        result = replay.evaluate("sentee", 1, torch.tensor([threshold]), keep_halting=True)
        assert torch.equal(result.halting[0], halt)
        assert int(result.flops[0]) == run.flops
        stats = entity_counts(data.gold, [[TAGS[t] for t in s] for s in run.predictions])
        assert float(result.f1[0]) == pytest.approx(float(TokenTask().score_of(stats)), abs=1e-12)


def recording(model):
    """Wrap the model's exit heads to keep, per layer, the logits of the words the live runner asked about."""
    seen: list[tuple[int, torch.Tensor]] = []
    original = model.exit_logits

    def exit_logits(layer, states):
        logits = original(layer, states)
        seen.append((layer, logits))
        return logits

    model.exit_logits = exit_logits
    return seen, original


def test_window_and_threshold_decisions_equal_the_live_runner(tagged):
    """Given the uncertainties the live runner itself computed, the replay halts every word at
    the same layer, with the same FLOPs and tags: the criterion is the same, only the inputs differ."""
    from rayexit.policy import token_uncertainty

    model, data = tagged
    full = cache_token_exits(model, data)
    for window, threshold in [(1, 0.3), (3, 0.4), (5, 0.5), (2, 0.45)]:
        policy = ExitPolicy("tokee", threshold, window=window)
        seen, original = recording(model)
        try:
            batches = list(token_batches(data, len(data)))  # one batch: the recorded order is the rows' order
            assert len(batches) == 1
            run = run_over_tokens(model, data, policy, batches=batches)
        finally:
            model.exit_logits = original
        rows, width = full.word_mask.shape
        uncertainty = torch.ones(rows, width, model.num_layers)
        tags = torch.zeros(rows, width, model.num_layers, dtype=torch.long)
        order = torch.tensor(batches[0].rows)  # the batch's row order: the runner's masks follow it
        live_halt = torch.zeros(rows, width, dtype=torch.long)
        for row, (sentence, first) in enumerate(data.pieces):
            count = len(data.word_starts[row])
            live_halt[row, :count] = torch.tensor(run.exit_layers[sentence][first : first + count])
        in_batch_u, in_batch_tags = uncertainty[order], tags[order]
        for layer, logits in seen:
            running = full.word_mask[order] & (live_halt[order] > layer)  # the words still running, batch order
            in_batch_u[running, layer] = token_uncertainty(logits)
            in_batch_tags[running, layer] = logits.argmax(-1)
        uncertainty[order], tags[order] = in_batch_u, in_batch_tags
        # what the runner saw equals the full pass up to the first layer at which a word of the row halted
        first = torch.where(full.word_mask, live_halt, model.num_layers + 1).min(1).values  # [R], 1-based
        for layer in range(model.num_layers):
            seen_here = full.word_mask & (live_halt > layer) & (layer < first[:, None])
            gap = (uncertainty[:, :, layer] - full.uncertainty[:, :, layer])[seen_here].abs()
            assert gap.numel() == 0 or float(gap.max()) < 1e-5
        cache = TokenCache(uncertainty, tags, full.word_mask, full.word_pieces, full.lengths, data, full.dims)
        replay = TokenReplayCache(cache, TAGS, data.gold)
        result = replay.evaluate("tokee", window, torch.tensor([threshold]), keep_halting=True)
        assert torch.equal(result.halting[0], live_halt)
        assert int(result.flops[0]) == run.flops
        stats = entity_counts(data.gold, [[TAGS[t] for t in s] for s in run.predictions])
        assert float(result.f1[0]) == pytest.approx(float(TokenTask().score_of(stats)), abs=1e-12)


def test_tokee_replay_from_a_full_pass_is_exact_until_a_row_first_halts_and_close_after(tagged):
    """Live, running words attend to halted words' frozen states; the full pass has their later
    states. Up to and including the first layer at which any word of a row halts, nothing frozen
    has been read yet, so replay and runner agree there exactly; after it they may part."""
    model, data = tagged
    cache = cache_token_exits(model, data)
    replay = TokenReplayCache(cache, TAGS, data.gold)
    values = replay.u_words[:, :-1].reshape(-1)
    for window in (1, 3, 5):
        for threshold in away_from_values(values, 5):
            run, halt = live(model, data, ExitPolicy("tokee", threshold, window=window))
            result = replay.evaluate("tokee", window, torch.tensor([threshold]), keep_halting=True)
            replayed = result.halting[0]
            mask = cache.word_mask
            first = torch.where(mask, halt, model.num_layers + 1).min(1, keepdim=True).values
            assert torch.equal(torch.minimum(replayed, first)[mask], torch.minimum(halt, first)[mask])
            # the rest, bounded on this tiny random model (measured: no decision changed; the runner's
            # later uncertainties differed from the full pass's by up to 6e-5), see docs/token.md
            stats = entity_counts(data.gold, [[TAGS[t] for t in s] for s in run.predictions])
            assert abs(float(result.f1[0]) - float(TokenTask().score_of(stats))) <= 0.02
            assert abs(float(result.flops_speedup[0]) - run.flops_speedup) / run.flops_speedup <= 0.02
