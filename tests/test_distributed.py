"""Data-parallel arithmetic: 2 workers on the halves of a batch == 1 worker on the whole batch.

Two gloo processes (torch.multiprocessing, no Ray) run the real step functions and the real
training loop with `allreduce_mean`; the parent runs the same steps in one process on the whole
batch. Checked at two levels: the combined gradient of one step (Adam is scale-invariant, so
weights alone would not catch a gradient summed instead of averaged) and the weights after two
full optimizer steps, which must also be identical on both workers.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
from conftest import tiny_sequence_model
from safetensors.torch import load_file, save_file

from rayexit.config import TrainSettings
from rayexit.data.encode import EncodedSet, iterate_batches
from rayexit.train.loop import train_model
from rayexit.train.steps import build_stages

SEED = 2  # model and data seed with a gradient conflict at the first RomeBERT step (asserted below)
PER_WORKER = 4


def toy_data(seed: int = SEED, n: int = 8) -> EncodedSet:
    """Token-id lists of varied lengths, so the halves are padded differently from the whole."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids.append([101] + torch.randint(1000, 3000, (length,), generator=g).tolist() + [102])
    return EncodedSet(ids, torch.randint(0, 3, (n,), generator=g).tolist(), 0)


def toy_model():
    """No dropout anywhere (the backbone's config has 0.1): halves and whole must see the same net."""
    model = tiny_sequence_model(layers=3, labels=("a", "b", "c"), seed=SEED)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def settings_for(method: str, batch_size: int) -> TrainSettings:
    return TrainSettings(method=method, batch_size=batch_size, epochs=2, lr=1e-3, dropout=0.0, warmup_ratio=0.0)


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
        data = toy_data()
        for method in ("joint", "romebert"):
            settings = settings_for(method, PER_WORKER)
            model = toy_model().train()
            grads, _ = one_step_grads(model, data, settings, rank, world_size, allreduce_mean)
            tensors = {f"grad.{i}": g.contiguous() for i, g in enumerate(grads)}
            model = toy_model()
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


@pytest.mark.parametrize("method", ["joint", "romebert"])
def test_two_workers_on_halves_equal_one_worker_on_whole(method, two_worker_results):
    data = toy_data()
    settings = settings_for(method, PER_WORKER * 2)
    model = toy_model().train()
    grads, conflict = one_step_grads(model, data, settings)
    if method == "romebert":
        assert conflict is True, "the test needs a gradient conflict so that the projection acts"
    reference = toy_model()
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
