import pytest
import torch
from conftest import tiny_sequence_model

from rayexit.config import ExitPolicy
from rayexit.data.encode import pad_batch
from rayexit.exits import ExitCache, run_early_exit


def random_batch(seed=1, size=12, vocab=30522, pad_id=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 17, (size,), generator=generator).tolist()
    sequences = [[101] + torch.randint(1000, vocab, (n - 2,), generator=generator).tolist() + [102] for n in lengths]
    return sequences, *pad_batch(sequences, pad_id)


def sharp_model(kind="bert", pooling="mean"):
    # 6 labels and a sharp head so that entropy differs across samples and layers
    m = tiny_sequence_model(kind, layers=4, labels=[str(i) for i in range(6)], pooling=pooling, seed=3)
    with torch.no_grad():
        for exit_head in m.heads.exits:
            exit_head.classifier.weight.mul_(40)
        if pooling == "attention":  # scorers away from their zero start, so the padding mask matters
            for scorer in m.heads.scorers:
                scorer.weight.normal_(0.0, 1.0)
    return m


@pytest.fixture(scope="module")
def model():
    return sharp_model()


def median_entropy_policy(model, ids, mask):
    """A threshold that sends about half the batch out at layer 1 and the rest deeper."""
    with torch.no_grad():
        cache = ExitCache(torch.stack(model(ids, mask), dim=1))
    # midway between two samples, so no sample sits on the threshold where rounding decides
    ordered = cache.entropy[:, 0].sort().values
    middle = len(ordered) // 2
    return ExitPolicy("entropy", float(ordered[middle - 1] + ordered[middle]) / 2)


@pytest.mark.parametrize("kind,pooling", [("bert", "mean"), ("roberta", "mean"), ("bert", "attention")])
def test_batched_runner_equals_per_sample_runner(kind, pooling):
    model = sharp_model(kind, pooling)
    pad_id = 1 if kind == "roberta" else 0  # RoBERTa's positions count from its padding id
    sequences, ids, mask = random_batch(pad_id=pad_id)
    policy = median_entropy_policy(model, ids, mask)
    batched = run_early_exit(model, ids, mask, policy)
    assert len(set(batched.exit_layers.tolist())) > 1, "test needs samples leaving at different layers"
    for row, seq in enumerate(sequences):
        one_ids, one_mask = pad_batch([seq], pad_id)
        single = run_early_exit(model, one_ids, one_mask, policy)
        assert single.exit_layers.item() == batched.exit_layers[row].item()
        assert single.predictions.item() == batched.predictions[row].item()
        assert torch.allclose(single.confidences, batched.confidences[row : row + 1], atol=1e-5)


@pytest.mark.parametrize(
    "policy",
    [
        ExitPolicy("entropy", 0.9),
        ExitPolicy("maxprob", 0.5),
        ExitPolicy("patience", 1),
        ExitPolicy("entropy", [0.5, 1.0, 1.5]),
    ],
)
def test_runner_matches_replay_on_cached_logits(model, policy):
    _, ids, mask = random_batch(seed=5)
    runner = run_early_exit(model, ids, mask, policy)
    replay = ExitCache(torch.stack(model(ids, mask), dim=1)).simulate(policy)
    assert torch.equal(runner.exit_layers, replay.exit_layers)
    assert torch.equal(runner.predictions, replay.predictions)


def test_threshold_extremes(model):
    _, ids, mask = random_batch(seed=7)
    with torch.no_grad():
        full_logits = model(ids, mask)
    everyone_early = run_early_exit(model, ids, mask, ExitPolicy("entropy", 100.0))
    assert everyone_early.exit_layers.tolist() == [1] * ids.shape[0]
    assert torch.equal(everyone_early.predictions, full_logits[0].argmax(-1))
    nobody_early = run_early_exit(model, ids, mask, ExitPolicy("entropy", 0.0))
    assert nobody_early.exit_layers.tolist() == [model.num_layers] * ids.shape[0]
    disabled = run_early_exit(model, ids, mask, ExitPolicy("none", 0.0))
    assert torch.equal(disabled.predictions, full_logits[-1].argmax(-1))
    assert torch.allclose(disabled.confidences, full_logits[-1].softmax(-1).max(-1).values, atol=1e-6)


def test_layer_cap_bounds_depth(model):
    _, ids, mask = random_batch(seed=9)
    capped = run_early_exit(model, ids, mask, ExitPolicy("entropy", 0.0), layer_cap=2)
    assert capped.exit_layers.max().item() == 2
    assert torch.equal(capped.predictions, model(ids, mask)[1].argmax(-1))


def test_patience_waits_for_agreeing_layers(model):
    logits = torch.zeros(1, 4, 2)
    logits[0, :, 1] = torch.tensor([1.0, -1.0, -1.0, -1.0])  # argmax: 1, 0, 0, 0
    result = ExitCache(logits).simulate(ExitPolicy("patience", 2))
    assert result.exit_layers.item() == 4  # layers 2,3 agree at layer 3 (count 1), layer 4 count 2
    assert ExitCache(logits).simulate(ExitPolicy("patience", 1)).exit_layers.item() == 3


def test_oracle_is_earliest_layer_matching_final():
    logits = torch.zeros(2, 3, 2)
    logits[0, :, 0] = torch.tensor([1.0, -1.0, -1.0])  # argmax 0,1,1 -> oracle layer 2
    logits[1, :, 0] = torch.tensor([1.0, 1.0, 1.0])  # argmax 0,0,0 -> oracle layer 1
    assert ExitCache(logits).oracle_exit_layers().tolist() == [2, 1]
