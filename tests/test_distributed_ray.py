"""Ray Train end to end: 2 workers == 1 process, a killed worker resumes, too many workers fail fast.

Tiny random models on the shared Ray session (2 CPUs). Every run writes its checkpoints to a
temporary storage folder.
"""

from __future__ import annotations

import time

import pytest
import torch
from test_distributed import PER_WORKER, settings_for, toy_data, toy_model

from rayexit.errors import RayexitError
from rayexit.tasks import task_named
from rayexit.train.checkpoints import read_checkpoint
from rayexit.train.distributed import fit_prepared
from rayexit.train.loop import train_model
from rayexit.train.recipe import PreparedRun


def prepared(n: int = 16) -> PreparedRun:
    data = toy_data(n=n)
    return PreparedRun(task_named("sequence"), toy_model(), None, data, data)


def reference_weights(method: str, n: int, epochs: float) -> dict[str, torch.Tensor]:
    settings = settings_for(method, PER_WORKER * 2)
    settings.epochs = epochs
    model = toy_model()
    train_model(model, toy_data(n=n), settings, show_progress=False)
    return model.state_dict()


def assert_same_weights(model, expected: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_two_ray_workers_match_one_process(ray_session, tmp_path):
    run = prepared()
    settings = settings_for("romebert", PER_WORKER)
    result = fit_prepared(run, settings, num_workers=2, storage_path=str(tmp_path), name="eq", show_progress=False)
    assert result.steps == 4  # 16 examples / global batch 8 = 2 steps per epoch, 2 epochs
    assert result.conflict_rate is not None and result.conflict_rate > 0, "the projection never acted"
    assert_same_weights(run.model, reference_weights("romebert", 16, 2))
    # per-epoch metrics reached Ray's results and TensorBoard
    assert [row["epoch"] for row in result.metrics] == [1, 2]
    assert all("exit3_accuracy" in row and "loss" in row for row in result.metrics)
    assert list((tmp_path / "eq" / "tensorboard").glob("events.out.tfevents.*"))
    # the checkpoint is a model directory plus resume state
    state, extra = read_checkpoint(result.checkpoint, toy_model())
    assert state.stage == 1 and state.steps_before == 4 and extra["settings"] == settings.to_dict()


def test_killed_worker_resumes_from_checkpoint_and_finishes(ray_session, tmp_path):
    run = prepared()
    settings = settings_for("joint", PER_WORKER)
    settings.epochs = 3
    marker = tmp_path / "killed"
    result = fit_prepared(
        run,
        settings,
        num_workers=2,
        storage_path=str(tmp_path),
        name="ft",
        max_failures=1,
        show_progress=False,
        fault={"rank": 1, "step": 3, "marker": str(marker)},  # step 3: after the epoch-1 checkpoint
    )
    assert marker.exists(), "the worker was never killed; the test proved nothing"
    assert result.steps == 6
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    # resumed from the epoch-1 checkpoint: the same weights as a run that was never interrupted
    assert_same_weights(run.model, reference_weights("joint", 16, 3))


def test_more_workers_than_the_cluster_has_fails_fast(ray_session, tmp_path):
    started = time.monotonic()
    with pytest.raises(RayexitError, match=r"asked for 5 worker\(s\) x 1 CPU.*2 CPU\(s\)"):
        fit_prepared(prepared(n=40), settings_for("joint", PER_WORKER), num_workers=5, storage_path=str(tmp_path))
    if not ray_session.cluster_resources().get("GPU"):
        with pytest.raises(RayexitError, match=r"1 GPU.*0 GPU\(s\)"):
            fit_prepared(prepared(), settings_for("joint", PER_WORKER), num_workers=1, use_gpu=True,
                         storage_path=str(tmp_path))
    assert time.monotonic() - started < 60
