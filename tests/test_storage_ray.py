"""Ray Train checkpoints on a storage URI (file://), and dropped once a Tune trial has its own copy."""

from __future__ import annotations

from pathlib import Path

from test_distributed import PER_WORKER, settings_for, toy_data, toy_model

from rayexit.train.distributed import fit_prepared
from rayexit.train.recipe import PreparedRun


def test_checkpoints_go_to_a_file_uri_and_can_be_dropped_after_training(ray_session, tmp_path):
    data = toy_data(n=16)
    run = PreparedRun(toy_model(), None, data, data)
    settings = settings_for("joint", PER_WORKER)
    store = tmp_path / "store"
    result = fit_prepared(
        run, settings, num_workers=1, storage_path=f"file://{store}", name="uri", show_progress=False,
        keep_checkpoints=False,
    )
    run_dir = store / "uri"
    assert Path(result.run_path) == run_dir and result.checkpoint.startswith(str(run_dir))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # the epochs, kept
    assert not list(run_dir.glob("checkpoint_*"))  # the model is in memory (and saved by the caller)
    assert result.steps == 4 and [h["epoch"] for h in result.history] == [1, 2]
