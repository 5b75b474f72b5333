"""One policy, one replay, one selection rule: hand-worked cases and replay-against-runner checks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_sequence_model
from seqeval.metrics import f1_score
from test_token_exits import SENTENCES, tiny_tagger

from rayexit.data.conll import encode_tagged
from rayexit.data.encode import EncodedSet
from rayexit.errors import RayexitError
from rayexit.models import ExitConfig
from rayexit.policy import FULL_DEPTH, ExitPolicy, passes
from rayexit.sweep import drop_bounds, select
from rayexit.tasks import Outcome, entity_counts, task_named

SENTENCE, TOKEN = task_named("sequence"), task_named("token")


# -- the policy and its criterion ------------------------------------------------------------


def test_policy_round_trip_and_the_token_task_first_format():
    for policy in (ExitPolicy("entropy", [0.1, 0.2]), ExitPolicy("tokee", 0.3, window=5), ExitPolicy("sentee", 0.2)):
        assert ExitPolicy.from_dict(policy.to_dict()) == policy
    legacy = {"policy": "tokee", "window": 5, "threshold": 0.2, "reduce": "max"}
    assert ExitPolicy.from_dict(legacy) == ExitPolicy("tokee", 0.2, window=5)
    config = ExitConfig.from_dict({"task": "token", "labels": ["O", "B-X"], "extra": {"token_policy": legacy}})
    assert config.policy == ExitPolicy("tokee", 0.2, window=5) and "token_policy" not in config.extra


def test_policy_refuses_what_its_task_cannot_run():
    with pytest.raises(RayexitError, match="not a sequence policy"):
        ExitPolicy("tokee", 0.1).check_task("sequence")
    with pytest.raises(RayexitError, match="not a token policy"):
        ExitPolicy("entropy", 0.1).check_task("token")
    with pytest.raises(RayexitError, match="policy.window"):
        ExitPolicy("tokee", 0.1, window=0)
    with pytest.raises(RayexitError, match="finite"):
        ExitPolicy("entropy", float("nan"))


def test_criterion_direction_per_kind():
    stat = torch.tensor([0.1, 0.5, 0.9])
    assert passes("entropy", stat, 0.5).tolist() == [True, False, False]  # uncertainty: lower is surer
    assert passes("tokee", stat, 0.5).tolist() == [True, False, False]
    assert passes("maxprob", stat, 0.5).tolist() == [False, True, True]  # confidence: higher is surer
    assert passes("patience", torch.tensor([1.0, 2.0, 3.0]), 2).tolist() == [False, True, True]
    assert not passes("none", stat, 0.0).any()


# -- replays agree with the live runners -------------------------------------------------------


def sentence_data(count: int = 21, seed: int = 0) -> EncodedSet:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 14, (count,), generator=generator).tolist()
    ids = [[101] + torch.randint(1000, 5000, (n - 2,), generator=generator).tolist() + [102] for n in lengths]
    return EncodedSet(ids, torch.randint(0, 2, (count,), generator=generator).tolist(), 0)


@pytest.mark.parametrize("kind", ["entropy", "maxprob", "patience", "none"])
def test_sentence_replay_equals_the_runner_in_answers_layers_and_flops(kind):
    model = tiny_sequence_model(layers=4, seed=2)
    data = sentence_data()
    replay = SENTENCE.replay(model, data, batch_size=8)
    # thresholds at the median of the inner exits' own statistic, so some examples leave early
    inner = replay.cache.statistic(kind)[:, :-1] if kind != "none" else torch.zeros(1)
    policy = ExitPolicy(kind, float(inner.median()) if kind != "patience" else 1.0)
    replayed = replay.outcome(policy)
    live = SENTENCE.run_live(model, data, SENTENCE.eval_batches(data, 8), policy)
    assert replayed.exit_layers == live.exit_layers
    assert torch.equal(replayed.stats, live.stats)
    assert replayed.flops_speedup == pytest.approx(live.flops_speedup, rel=1e-12)
    if policy.kind != "none":
        assert min(live.exit_layers) < model.num_layers  # the case really exits early somewhere


def test_flops_count_the_rows_and_columns_the_runner_keeps():
    model = tiny_sequence_model(layers=4, seed=2)
    data = EncodedSet([[101, 5, 6, 7, 8, 9, 102], [101, 5, 102]], [0, 1], 0)
    hidden, inter = 32, 64

    def layer(rows: int, width: int) -> int:  # one layer + its pooler exit, by hand
        per_row = 4 * width * hidden * hidden * 2 + 4 * width * width * hidden + 4 * width * hidden * inter
        return rows * per_row + 2 * rows * (hidden * hidden + hidden * 2)

    from rayexit.flops import replay_sentence_flops

    # row 0 (7 tokens) leaves after layer 1; row 1 (3 tokens) runs on alone, its width trimmed to 3
    computed = replay_sentence_flops(model, torch.tensor([1, 4]), torch.tensor([7, 3]), [[0, 1]])
    assert computed == layer(2, 7) + 3 * layer(1, 3)
    # and if the long row stays, nothing is trimmed
    kept = replay_sentence_flops(model, torch.tensor([4, 1]), torch.tensor([7, 3]), [[0, 1]])
    assert kept == layer(2, 7) + 3 * layer(1, 7)
    # the live runner counts the same on a batch built that way
    from rayexit.data.encode import pad_batch
    from rayexit.exits import run_early_exit

    ids, mask = pad_batch(data.input_ids, 0)
    full = run_early_exit(model, ids, mask, FULL_DEPTH)
    assert full.flops == 4 * layer(2, 7)  # the runner computes every exit on the way
    head = 2 * 2 * (hidden * hidden + hidden * 2)
    assert full.full_flops == full.flops - 3 * head  # a plain forward computes the final exit only


def test_sentee_replay_equals_the_runner(minilm_tokenizer):
    model = tiny_tagger(seed=1)
    data = TOKEN.encode(minilm_tokenizer, _tagged(SENTENCES), model.labels, 64)
    replay = TOKEN.replay(model, data, batch_size=2)
    batches = TOKEN.eval_batches(data, 2)
    uncertainties = replay.cache.uncertainty[replay.cache.word_mask]
    threshold = float(uncertainties.max(-1).values.median())  # some sentences leave early, some not
    policy = ExitPolicy("sentee", threshold)
    replayed, live = replay.outcome(policy), TOKEN.run_live(model, data, batches, policy)
    assert replayed.exit_layers == live.exit_layers
    assert torch.equal(replayed.stats, live.stats)
    assert replayed.flops_speedup == pytest.approx(live.flops_speedup, rel=1e-12)
    assert 1.0 < live.flops_speedup  # the threshold made someone leave


def test_entity_counts_give_seqeval_f1():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"], ["I-MISC", "O"]]
    guess = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "I-ORG"], ["I-MISC", "O"]]
    counts = entity_counts(gold, guess)
    assert counts.tolist() == [[1, 0, 1], [0, 1, 1], [1, 0, 0]]
    assert float(TOKEN.score_of(counts)) == pytest.approx(f1_score(gold, guess))


# -- the selection rule ------------------------------------------------------------------------


def outcome(correct: list[int], speed: float, name: float | None = None) -> Outcome:
    """An outcome with per-example correctness `correct`; `name` None is full depth."""
    stats = torch.tensor(correct, dtype=torch.float64)[:, None]
    policy = FULL_DEPTH if name is None else ExitPolicy("entropy", name)
    return Outcome(policy, stats, float(stats.mean()), speed, speed)


def test_selection_needs_the_drop_to_hold_at_confidence_not_just_on_average():
    full = outcome([1] * 100, 1.0)
    one_wrong = outcome([0] + [1] * 99, 2.0, 0.2)  # drop 0.01: within 0.01 on average only
    none_wrong = outcome([1] * 100, 1.5, 0.3)
    choice = select(SENTENCE, full, [one_wrong, none_wrong], max_drop=0.01)
    assert choice.outcome is none_wrong and choice.drop_bound == 0.0
    # one example in 100 lost: a draw holds it k ~ Binomial(100, 0.01) times, P(k <= 2) ~ 0.92 < 0.95,
    # so the 95% bound is 3 in 100 (0.02 or 0.04 would need a very unusual set of draws)
    assert drop_bounds(SENTENCE, full, [one_wrong])[0] == pytest.approx(0.03)


def test_selection_on_a_large_set_takes_the_fastest_within_the_budget():
    full = outcome([1] * 5000, 1.0)
    fast = outcome([0] * 10 + [1] * 4990, 3.0, 0.5)  # drop 0.002, bound well under 0.01
    faster_but_worse = outcome([0] * 100 + [1] * 4900, 4.0, 0.6)  # drop 0.02
    choice = select(SENTENCE, full, [fast, faster_but_worse], max_drop=0.01)
    assert choice.outcome is fast
    # with a speed-up floor instead: the best score at that speed or more
    assert select(SENTENCE, full, [fast, faster_but_worse], min_speedup=3.5).outcome is faster_but_worse
    assert select(SENTENCE, full, [fast], min_speedup=5.0).outcome.policy == FULL_DEPTH


def test_oracle_is_the_earliest_layer_agreeing_with_the_last():
    from rayexit.exits import ExitCache

    # 3 examples x 3 layers, two classes; argmax per layer: [1,0,0] -> 2; [0,0,0] -> 1; [0,1,0] -> 1
    picks = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0]])
    logits = torch.nn.functional.one_hot(picks, 2).float() * 5
    assert ExitCache(logits).oracle_exit_layers().tolist() == [2, 1, 1]


def _tagged(sentences):
    from rayexit.data.conll import TaggedSentences

    tags = [["B-PER" if i == 0 else "O" for i, _ in enumerate(s)] for s in sentences]
    return TaggedSentences(sentences, tags, "test")


def test_encoding_keeps_gold_tags_for_scoring(minilm_tokenizer):
    data = TOKEN.encode(minilm_tokenizer, _tagged(SENTENCES), ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], 64)
    assert data.gold[0][0] == "B-PER" and len(data.gold) == len(SENTENCES)
    assert data.input_ids == encode_tagged(minilm_tokenizer, SENTENCES, None, 64).input_ids


def test_eval_times_on_a_subset_but_scores_on_all_the_data():
    from rayexit.sweep import evaluate

    model = tiny_sequence_model(layers=4, seed=2)
    data = sentence_data()
    rows = list(range(0, len(data), 3))
    subset = EncodedSet([data.input_ids[i] for i in rows], [data.labels[i] for i in rows], data.pad_id)
    policy = ExitPolicy("patience", 1.0)
    whole = evaluate(SENTENCE, model, data, policy=policy, batch_size=8, repeats=1, time_front=0,
                     show_progress=False)
    timed = evaluate(SENTENCE, model, data, policy=policy, batch_size=8, repeats=1, time_front=0,
                     time_on=subset, show_progress=False)
    assert whole["timing"]["examples"] == len(data) and timed["timing"]["examples"] == len(subset) < len(data)
    for field in ("accuracy", "layer_speedup", "flops_speedup"):
        assert timed["selected"][field] == whole["selected"][field]
    assert timed["selected"]["accuracy"] == SENTENCE.run_live(model, data, SENTENCE.eval_batches(data, 8), policy).score


def test_precision_thresholds_hold_each_exit_to_the_precision_by_hand():
    from rayexit.policy import NEVER_SURE, precision_thresholds

    # exit 1 ranked by confidence: right, right, wrong, right -> running precision 1, 1, 2/3, 3/4
    # exit 2: wrong at the top, so no top run reaches 0.9 -> it never answers early
    confidence = torch.tensor([[0.95, 0.99, 0.9], [0.90, 0.80, 0.9], [0.85, 0.70, 0.9], [0.60, 0.60, 0.9]])
    correct = torch.tensor([[True, False, True], [True, True, True], [False, True, True], [True, True, True]])
    assert precision_thresholds(confidence, correct, 0.9) == pytest.approx([0.90, NEVER_SURE])
    assert precision_thresholds(confidence, correct, 0.7) == pytest.approx([0.60, 0.60])
    # a threshold cannot split a tie: at 0.90 both tied examples leave, one of them wrong (1/2)
    tied = torch.tensor([[0.95, 0.5], [0.90, 0.5], [0.90, 0.5], [0.50, 0.5]])
    right = torch.tensor([[True, True], [True, True], [False, True], [False, True]])
    assert precision_thresholds(tied, right, 0.9) == pytest.approx([0.95])
    assert precision_thresholds(tied, right, 0.6) == pytest.approx([0.90])


def test_the_precision_grid_comes_from_validation_and_meets_its_precision_there():
    from types import SimpleNamespace

    from rayexit.exits import ExitCache

    torch.manual_seed(0)
    labels = torch.randint(0, 2, (400,))
    # deeper exits are right more often and sure of it; shallow ones are right only when very sure
    logits = torch.randn(400, 4, 2)
    for layer in range(4):
        margin = logits[:, layer, 1] - logits[:, layer, 0]
        flip = (margin.abs() < 1.5 - 0.4 * layer) & (torch.rand(400) < 0.5)
        logits[flip, layer] = logits[flip, layer].flip(-1)
    for row, label in enumerate(labels.tolist()):  # align the answers with the labels
        logits[row] = logits[row].flip(-1) if label == 0 else logits[row]
    cache = ExitCache(logits)
    replay = SimpleNamespace(cache=cache, labels=labels)
    task = task_named("sequence")
    grid = task.precision_grid(replay)
    assert grid and all(p.kind == "maxprob" and len(p.thresholds) == 3 for p in grid)
    correct = cache.argmax == labels[:, None]
    final = correct[:, -1].double().mean().item()
    for policy in grid:
        for layer, threshold in enumerate(policy.thresholds):
            leaving = cache.confidence[:, layer] >= threshold
            if leaving.any():  # each exit, on its own, is at least as right as the final exit asks
                assert correct[leaving, layer].double().mean().item() >= final - 0.2 * (1 - final) - 1e-3
    # stricter targets never lower a threshold
    for looser, stricter in zip(grid, grid[1:]):
        assert all(s >= lo for lo, s in zip(looser.thresholds, stricter.thresholds))
    assert all(p in task.default_grid(replay) for p in grid)
