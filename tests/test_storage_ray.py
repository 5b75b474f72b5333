"""Ray Train checkpoints on a storage URI (file://), and dropped once a Tune trial has its own copy."""

from __future__ import annotations

from pathlib import Path

from test_distributed import PER_WORKER, settings_for, toy_data, toy_model

from rayexit.tasks import task_named
from rayexit.train.distributed import _default_name, fit_prepared
from rayexit.train.recipe import PreparedRun


def test_checkpoints_go_to_a_file_uri_and_can_be_dropped_after_training(ray_session, tmp_path):
    data = toy_data(n=16)
    run = PreparedRun(task_named("sequence"), toy_model(), None, data, data)
    settings = settings_for("joint", PER_WORKER)
    store = tmp_path / "store"
    result = fit_prepared(
        run, settings, num_workers=1, storage_path=f"file://{store}", name="uri", show_progress=False,
        keep_checkpoints=False,
    )
    run_dir = store / "uri"
    assert Path(result.run_path) == run_dir and result.checkpoint.startswith(str(run_dir))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # the epochs, kept
    assert not [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]  # the model is in memory (the caller saves it)
    assert result.steps == 8 and [h["epoch"] for h in result.history] == [1, 2]  # 16 examples / batch 4, 2 epochs
    # Ray's list of the dropped checkpoints goes too: a run of the same name (a trial rerun) would
    # find it naming folders that are gone and refuse the folder as corrupted
    assert not (run_dir / "checkpoint_manager_snapshot.json").exists()
    again = fit_prepared(
        PreparedRun(task_named("sequence"), toy_model(), None, data, data), settings, num_workers=1,
        storage_path=f"file://{store}", name="uri", show_progress=False, keep_checkpoints=False,
    )
    assert again.steps == 8 and [h["epoch"] for h in again.history] == [1, 2]  # afresh


def train_in_trial(config: dict) -> None:
    """A Tune trial that trains with Ray Train, as rayexit's distributed trials do, and keeps its own copy."""
    import tempfile

    from ray import tune

    data = toy_data(n=16)
    run = PreparedRun(task_named("sequence"), toy_model(), None, data, data)
    result = fit_prepared(run, settings_for("joint", PER_WORKER), num_workers=1, name="train", show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.txt").write_text("the trial's one checkpoint")
        metrics = {"run_path": result.run_path, "steps": result.steps, "default_name": _default_name("out/model")}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def test_a_trial_keeps_one_checkpoint_and_its_train_run_lives_in_the_experiment(ray_session, tmp_path):
    import sys

    import ray.cloudpickle
    from ray import tune

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    for name in ("test_distributed", "conftest"):
        ray.cloudpickle.register_pickle_by_value(sys.modules[name])
    store = tmp_path / "store"
    tuner = tune.Tuner(
        tune.with_resources(train_in_trial, {"cpu": 0.01}),
        run_config=tune.RunConfig(name="exp", storage_path=f"file://{store}", verbose=0),
    )
    result = tuner.fit()[0]
    assert result.error is None and result.metrics["steps"] == 8
    trial_dir = Path(result.path)
    assert trial_dir.parent == store / "exp"
    run_dir = Path(result.metrics["run_path"])
    assert run_dir == trial_dir / "train"  # in the experiment's storage, not the trial's local working dir
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]  # Ray Train's copy dropped after training
    assert [p.name for p in trial_dir.glob("checkpoint_*/model.txt")] == ["model.txt"]
    # a trial's run is named after the trial, not the clock: Tuner.restore's rerun of it resumes that run
    assert result.metrics["default_name"] == f"train-{result.metrics['trial_id']}"
    assert _default_name("out/model").startswith("rayexit-model-")  # outside a trial: a new run each time
