"""Data-parallel arithmetic: 2 workers on the halves of a batch == 1 worker on the whole batch.

Two gloo processes (torch.multiprocessing, no Ray) run the real step functions and the real
training loop with `allreduce_mean`; the parent runs the same steps in one process on the whole
batch. Checked at two levels: the combined gradient of one step (Adam is scale-invariant, so
weights alone would not catch a gradient summed instead of averaged) and the weights after two
full optimizer steps, which must also be identical on both workers.

The token task's losses are means over words (over the words still live at each exit, for
self-sampling), and the halves of a batch hold different numbers of them: the token checks use
data where they do, and a control shows that averaging the halves' plain means would be wrong.
"""

from __future__ import annotations

import os
import random
import socket

import pytest
import torch
from conftest import tiny_sequence_model
from safetensors.torch import load_file, save_file
from test_token_exits import TAGS, tiny_tagger

from rayexit.config import TrainSettings
from rayexit.data.conll import TaggedSentences, make_batch, token_batches
from rayexit.data.encode import EncodedSet, iterate_batches
from rayexit.errors import RayexitError
from rayexit.losses import live_word_counts, weighted_token_loss
from rayexit.tasks import task_named
from rayexit.train.loop import train_model
from rayexit.train.steps import build_stages, sampling_cache

SEED = 2  # model and data seed with a gradient conflict at the first RomeBERT step (asserted below)
PER_WORKER = 4
SENTENCE_METHODS = ("joint", "romebert", "romebert-hidden", "romebert-hidden_per_example")
# gr_scope hidden judges conflicts on each layer's output: at SEED's first step none conflicts there
SEEDS = {"romebert-hidden": 3}


def toy_data(seed: int = SEED, n: int = 8) -> EncodedSet:
    """Token-id lists of varied lengths, so the halves are padded differently from the whole."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids.append([101] + torch.randint(1000, 3000, (length,), generator=g).tolist() + [102])
    return EncodedSet(ids, torch.randint(0, 3, (n,), generator=g).tolist(), 0)


def toy_model(seed: int = SEED):
    """No dropout anywhere (the backbone's config has 0.1): halves and whole must see the same net."""
    model = tiny_sequence_model(layers=3, labels=("a", "b", "c"), seed=seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def settings_for(method: str, batch_size: int) -> TrainSettings:
    """`romebert` projects on the parameters (`gr_scope: encoder`), `romebert-SCOPE` on the hidden
    states (per example: no sums over workers, each example's rule is local to its worker)."""
    method, _, scope = method.partition("-")
    return TrainSettings(method=method, batch_size=batch_size, epochs=2, lr=1e-3, dropout=0.0, warmup_ratio=0.0,
                         gr_scope=scope or "encoder")


def one_step_grads(model, data, settings, rank=0, world_size=1, average=None):
    stage = build_stages(model, settings)[0]
    ids, mask, labels = next(iterate_batches(data, settings.batch_size, shuffle_seed=settings.seed, rank=rank,
                                             world_size=world_size))
    flat, _, combine = stage.step(model, (ids, mask, labels), stage.params, settings, 0)
    grads, conflict = combine(average(flat) if average else flat)
    return grads, conflict


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from rayexit.train.distributed import allreduce_mean

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for method in SENTENCE_METHODS:
            seed = SEEDS.get(method, SEED)
            data = toy_data(seed)
            settings = settings_for(method, PER_WORKER)
            model = toy_model(seed).train()
            grads, _ = one_step_grads(model, data, settings, rank, world_size, allreduce_mean)
            tensors = {f"grad.{i}": g.contiguous() for i, g in enumerate(grads)}
            model = toy_model(seed)
            train_model(model, data, settings, rank=rank, world_size=world_size, average=allreduce_mean,
                        show_progress=False)
            tensors.update({f"weight.{k}": v.contiguous() for k, v in model.state_dict().items()})
            save_file(tensors, os.path.join(out_dir, f"{method}-rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_worker_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("method", SENTENCE_METHODS)
def test_two_workers_on_halves_equal_one_worker_on_whole(method, two_worker_results):
    seed = SEEDS.get(method, SEED)
    data = toy_data(seed)
    settings = settings_for(method, PER_WORKER * 2)
    model = toy_model(seed).train()
    grads, conflict = one_step_grads(model, data, settings)
    if method.startswith("romebert"):
        assert conflict is True, "the test needs a gradient conflict so that the projection acts"
    reference = toy_model(seed)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    result = train_model(reference, data, settings, show_progress=False)
    assert result.steps == 2

    ranks = [load_file(str(two_worker_results / f"{method}-rank{r}.safetensors")) for r in (0, 1)]
    for i, g in enumerate(grads):
        for rank in ranks:
            torch.testing.assert_close(rank[f"grad.{i}"], g, rtol=1e-4, atol=1e-6)
    moved = False
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ranks[0][f"weight.{key}"], ranks[1][f"weight.{key}"], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][f"weight.{key}"], value, rtol=1e-4, atol=1e-5)
        moved |= not torch.equal(value, initial[key])
    assert moved, "training did not change the weights; the comparison would prove nothing"


def test_halves_alone_differ_from_the_whole():
    """Control: without the all-reduce a half's gradient is not the whole batch's."""
    data = toy_data()
    whole, _ = one_step_grads(toy_model().train(), data, settings_for("joint", PER_WORKER * 2))
    half, _ = one_step_grads(toy_model().train(), data, settings_for("joint", PER_WORKER), 0, 2)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(whole, half))


# -- token tagging: losses are means over (live) words, which the halves share unequally -------------

TOKEN_METHODS = ("joint", "self-sampling")
TOKEN_PER_WORKER = 3
WORDS = ["Peter", "Blackburn", "visited", "Brusselsian", "markets", "today", "The", "European", "Commission",
         "said", "on", "Thursday", "German", "advice", "Hi"]


def tagged_sentences(n: int = 12, seed: int = SEED) -> TaggedSentences:
    """Sentences of 1 to 9 words, so two slices of a batch hold different numbers of words."""
    draw = random.Random(seed)
    words = [[draw.choice(WORDS) for _ in range(draw.randint(1, 9))] for _ in range(n)]
    tags = [[TAGS[(i + j) % len(TAGS)] for j, _ in enumerate(s)] for i, s in enumerate(words)]
    return TaggedSentences(words, tags, "toy")


def token_model():
    model = tiny_tagger(seed=SEED)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def token_data(tokenizer, n: int = 12):
    """Encoded toy sentences with the self-sampling cache of `token_model()` already on them."""
    data = task_named("token").encode(tokenizer, tagged_sentences(n), TAGS, 64)
    sampling_cache(token_model(), data, 8)
    return data


def token_settings(method: str, batch_size: int) -> TrainSettings:
    return TrainSettings(method=method, batch_size=batch_size, epochs=2, lr=1e-3, dropout=0.0, warmup_ratio=0.0,
                         seed=SEED)


def token_step(model, data, settings, batch=None, average=None):
    """One step's gradients and loss on `batch` (default: the first batch of epoch 0, unsliced)."""
    stage = build_stages(model, settings, data)[0]
    if batch is None:
        batch = next(token_batches(data, settings.batch_size, settings.seed))
    flat, loss, combine = stage.step(model, batch, stage.params, settings, 0)
    grads, _ = combine(average(flat) if average else flat)
    return grads, loss


def _token_worker(rank: int, world_size: int, port: int, out_dir: str, data) -> None:
    import torch.distributed as dist

    from rayexit.train.distributed import allreduce_mean

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for method in TOKEN_METHODS:
            settings = token_settings(method, TOKEN_PER_WORKER)
            batch = next(token_batches(data, TOKEN_PER_WORKER, settings.seed, rank=rank, world_size=world_size))
            grads, loss = token_step(token_model().train(), data, settings, batch, allreduce_mean)
            tensors = {f"grad.{i}": g.contiguous() for i, g in enumerate(grads)}
            tensors["loss"] = torch.tensor([loss], dtype=torch.float64)
            model = token_model()
            result = train_model(model, data, settings, rank=rank, world_size=world_size, average=allreduce_mean,
                                 show_progress=False)
            tensors["steps"] = torch.tensor([result.steps])
            tensors.update({f"weight.{k}": v.contiguous() for k, v in model.state_dict().items()})
            save_file(tensors, os.path.join(out_dir, f"token-{method}-rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def token_two_workers(tmp_path_factory, minilm_tokenizer):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp-token")
    data = token_data(minilm_tokenizer)
    mp.spawn(_token_worker, args=(2, free_port(), str(out), data), nprocs=2, join=True)
    return out, data


def first_halves(data, settings_whole: TrainSettings) -> list:
    """The first global batch's two slices, each carrying the global batch (as rank 0 and 1 get them)."""
    half = settings_whole.batch_size // 2
    return [next(token_batches(data, half, settings_whole.seed, rank=r, world_size=2)) for r in (0, 1)]


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_token_two_workers_on_halves_equal_one_worker_on_whole(method, token_two_workers):
    out, data = token_two_workers
    settings = token_settings(method, TOKEN_PER_WORKER * 2)
    halves = first_halves(data, settings)
    words = [int(b.word_mask.sum()) for b in halves]
    assert words[0] != words[1], f"the halves hold {words} words; equal counts would let a plain mean pass"

    grads, loss = token_step(token_model().train(), data, settings)
    reference = token_model()
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    result = train_model(reference, data, settings, show_progress=False)
    assert result.steps == 4  # 12 sentences, global batch 6, 2 epochs

    ranks = [load_file(str(out / f"token-{method}-rank{r}.safetensors")) for r in (0, 1)]
    # each rank's loss is its share of the global mean: their average is the whole batch's loss
    assert (ranks[0]["loss"].item() + ranks[1]["loss"].item()) / 2 == pytest.approx(loss, rel=1e-5)
    for i, g in enumerate(grads):
        for rank in ranks:
            torch.testing.assert_close(rank[f"grad.{i}"], g, rtol=1e-4, atol=1e-6)
    moved = False
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ranks[0][f"weight.{key}"], ranks[1][f"weight.{key}"], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][f"weight.{key}"], value, rtol=1e-4, atol=1e-5)
        moved |= not torch.equal(value, initial[key])
    assert all(int(rank["steps"]) == 4 for rank in ranks)
    assert moved, "training did not change the weights; the comparison would prove nothing"


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_token_halves_plain_means_differ_from_the_whole(method, minilm_tokenizer):
    """Control: the halves' own per-word means, averaged, are not the whole batch's; the global counts fix it."""
    data = token_data(minilm_tokenizer)
    settings = token_settings(method, TOKEN_PER_WORKER * 2)
    whole, whole_loss = token_step(token_model().train(), data, settings)
    halves = first_halves(data, settings)
    plain = [token_step(token_model().train(), data, settings, make_batch(data, b.rows)) for b in halves]
    plain_loss = (plain[0][1] + plain[1][1]) / 2
    assert plain_loss != pytest.approx(whole_loss, rel=1e-4)
    plain_grads = [(a + b) / 2 for a, b in zip(plain[0][0], plain[1][0])]
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(whole, plain_grads))
    # the same halves normalised by the global batch's counts average to the whole, in one process
    shared = [token_step(token_model().train(), data, settings, b) for b in halves]
    assert (shared[0][1] + shared[1][1]) / 2 == pytest.approx(whole_loss, rel=1e-5)
    for g, a, b in zip(whole, shared[0][0], shared[1][0]):
        torch.testing.assert_close((a + b) / 2, g, rtol=1e-4, atol=1e-6)


def test_self_sampling_halts_words_unevenly_across_the_halves(minilm_tokenizer):
    """What makes self-sampling's counts per exit matter: words halt early, and not alike in both halves."""
    data = token_data(minilm_tokenizer)
    settings = token_settings("self-sampling", TOKEN_PER_WORKER * 2)
    step = build_stages(token_model(), settings, data)[0].step
    halves = first_halves(data, settings)
    counts = [live_word_counts(step.halting(b.rows, b.word_mask, 0), 4) for b in halves]
    whole = halves[0].whole
    assert torch.equal(counts[0] + counts[1], live_word_counts(step.halting(whole.rows, whole.word_mask(), 0), 4))
    assert counts[0][-1] < counts[0][0] or counts[1][-1] < counts[1][0], "no word halted before the last exit"
    shares = counts[0].double() / (counts[0] + counts[1]).double()
    assert not torch.allclose(shares, shares[0].expand_as(shares)), "both halves lose words alike at every exit"


def test_token_loss_shares_average_to_the_whole_when_a_slice_has_no_live_word_at_an_exit():
    """Slice 0 has no live word at exit 3, no word anywhere is live at exit 4: the shares still add up."""
    g = torch.Generator().manual_seed(SEED)
    logits = [torch.randn(4, 3, 5, generator=g) for _ in range(4)]
    labels = torch.tensor([[1, 2, -100], [0, -100, -100], [3, 4, 1], [2, 0, -100]])
    halt = torch.tensor([[2, 1, 0], [2, 0, 0], [3, 1, 2], [3, 2, 0]])
    whole = weighted_token_loss(logits, labels, halt)
    counts = live_word_counts(halt, 4)
    assert counts.tolist() == [8, 6, 2, 0]
    halves = (slice(0, 2), slice(2, 4))
    shares = [weighted_token_loss([z[h] for z in logits], labels[h], halt[h], exit_words=counts, world_size=2)
              for h in halves]
    torch.testing.assert_close((shares[0] + shares[1]) / 2, whole)
    plain = [weighted_token_loss([z[h] for z in logits], labels[h], halt[h]) for h in halves]
    assert not torch.allclose((plain[0] + plain[1]) / 2, whole)


def test_epoch_rows_count_global_steps_across_stages():
    from rayexit.train.distributed import _epoch_rows

    history = [  # DeeBERT: 2 epochs of 3 steps in stage 1, then 2 of 3 in stage 2
        {"stage": "deebert-1", "epoch": 1, "step": 3, "loss": 0.9, "exit_accuracy": [0.5, 0.7]},
        {"stage": "deebert-1", "epoch": 2, "step": 6, "loss": 0.5, "exit_accuracy": [0.5, 0.8]},
        {"stage": "deebert-2", "epoch": 1, "step": 3, "loss": 0.7, "exit_accuracy": [0.6, 0.8]},
        {"stage": "deebert-2", "epoch": 2, "step": 6, "loss": 0.6, "exit_accuracy": [0.7, 0.8]},
    ]
    rows = _epoch_rows(history)
    assert [row["global_step"] for row in rows] == [3, 6, 9, 12]
    assert rows[2]["exit1_accuracy"] == 0.6 and rows[3]["exit2_accuracy"] == 0.8 and rows[1]["loss"] == 0.5
    assert all(row["epoch_end"] for row in rows)


def test_train_v1_switched_on_is_refused_by_name(monkeypatch):
    from rayexit.train.distributed import fit_prepared

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    with pytest.raises(RayexitError, match="RAY_TRAIN_V2_ENABLED.*Train V1"):
        fit_prepared(None, TrainSettings(), num_workers=1)


def test_tune_hears_the_epochs_rows_only_and_no_paths_of_dropped_checkpoints(monkeypatch):
    import ray.tune.integration.ray_train as bridge
    from ray.train import Checkpoint

    from rayexit.train.distributed import epoch_tune_report

    forwarded: list[dict] = []

    class Queue:
        put = forwarded.append

    class Session:
        def _get_or_create_inter_actor_queue(self):
            return Queue()

    monkeypatch.setattr(bridge, "_in_tune_session", lambda: True)
    monkeypatch.setattr(bridge, "get_session", lambda: Session())
    checkpoint = Checkpoint("/somewhere/checkpoint_000001")
    for keep, path in ((True, "/somewhere/checkpoint_000001"), (False, None)):
        forwarded.clear()
        callback = epoch_tune_report(with_checkpoint_paths=keep)
        callback.after_report(None, [{"global_step": 3, "epoch_end": False}], checkpoint)  # mid-epoch
        callback.after_report(None, [{"global_step": 6, "epoch_end": True, "accuracy": 0.8}], checkpoint)
        assert [row["global_step"] for row in forwarded] == [6]
        assert forwarded[0]["accuracy"] == 0.8
        assert forwarded[0].get(bridge.CHECKPOINT_PATH_KEY) == path
