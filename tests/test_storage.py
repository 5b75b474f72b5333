"""Outputs that survive a Ray job and that others can read: job detection, paths and URIs, file modes."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import pytest
from conftest import tiny_sequence_model

from rayexit import storage
from rayexit.cli import main
from rayexit.config import TrainSettings
from rayexit.errors import RayexitError
from rayexit.files import write_json
from rayexit.storage import JOB_ENV, check_job_path, in_ray_job, local_output, local_path, ray_storage_path
from rayexit.tune.space import TuneSpec

ROOT = Path(__file__).resolve().parents[1]
RAY_WORKING_COPY = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ray_job_is_detected_by_its_environment_or_its_working_dir_copy():
    assert in_ray_job({JOB_ENV: "{}"}, "/home/me")
    assert in_ray_job({}, RAY_WORKING_COPY)
    assert not in_ray_job({}, "/home/me/rayexit")


def test_relative_paths_are_refused_only_inside_a_job(monkeypatch):
    monkeypatch.delenv(JOB_ENV, raising=False)
    check_job_path("runs/x", "--output")  # outside a job: the user's own folder, fine
    monkeypatch.setenv(JOB_ENV, "{}")
    with pytest.raises(RayexitError, match=r"--output runs/x: a relative path inside a Ray job.*--output /mnt/shared/"):
        check_job_path("runs/x", "--output")
    for fine in ("/mnt/shared/runs/x", "s3://bucket/runs/x", "file:///mnt/shared/x", "~/runs/x"):
        check_job_path(fine, "--output")


@pytest.mark.parametrize("job", ["train.py", "tune.py"])
def test_job_entry_points_refuse_a_relative_output(job, monkeypatch, capsys):
    monkeypatch.setenv(JOB_ENV, "{}")
    module = load(ROOT / "jobs" / job)
    assert module.run(["--model", "minilm", "--train", "atis", "--output", "runs/job-atis"]) == 2
    assert "--output runs/job-atis: a relative path inside a Ray job" in capsys.readouterr().err
    assert module.run(["--storage-path=ckpt", "--output", "/abs/x"]) == 2
    assert "--storage-path ckpt" in capsys.readouterr().err


def test_rayexit_tune_refuses_a_relative_output_in_a_job(monkeypatch, capsys):
    monkeypatch.setenv(JOB_ENV, "{}")
    assert main(["tune", "--model", "m", "--train", "t", "--eval", "e", "--output", "runs/tune"]) == 2
    assert "--output runs/tune: a relative path inside a Ray job" in capsys.readouterr().err
    assert main(["tune", "--resume", "runs/tune", "--storage-path", "s3://b/x"]) == 2
    assert "drop --storage-path" in capsys.readouterr().err


def test_uris_and_paths(tmp_path):
    assert local_path(f"file://{tmp_path}/x") == tmp_path / "x"
    assert local_path("s3://bucket/x") is None
    assert local_path("relative/x") == Path("relative/x")
    with pytest.raises(RayexitError, match="file:///abs/path"):
        local_path("file://otherhost/x")
    assert ray_storage_path(f"file://{tmp_path}/ckpt") == str(tmp_path / "ckpt")
    assert ray_storage_path("gs://bucket/ckpt") == "gs://bucket/ckpt"
    assert ray_storage_path("rel") == str(Path("rel").resolve())


def test_local_output_copies_a_folder_up_to_a_remote_uri(tmp_path, monkeypatch):
    import pyarrow.fs

    remote_root = tmp_path / "bucket"
    opened = []

    def from_uri(uri):  # stands in for s3:// etc.: a local filesystem rooted elsewhere
        opened.append(uri)
        return pyarrow.fs.LocalFileSystem(), str(remote_root / uri.split("://", 1)[1])

    monkeypatch.setattr(storage, "open_uri", from_uri)
    with local_output("s3://models/atis") as local:
        local.mkdir(parents=True)
        (local / "config.json").write_text("{}")
        assert not (remote_root / "models" / "atis").exists()  # nothing up there until the body succeeds
    assert opened == ["s3://models/atis"]
    assert (remote_root / "models" / "atis" / "config.json").read_text() == "{}"
    assert not local.exists()
    with pytest.raises(RuntimeError), local_output("s3://models/broken") as local:
        local.mkdir(parents=True)
        raise RuntimeError("training failed")
    assert not (remote_root / "models" / "broken").exists()


def test_written_files_and_model_directories_are_readable_by_others(tmp_path, minilm_tokenizer):
    mask = umask()
    path = write_json(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    model_dir = tmp_path / "model"
    tiny_sequence_model().save_pretrained(model_dir, minilm_tokenizer)
    assert stat.S_IMODE(model_dir.stat().st_mode) == 0o777 & ~mask
    for file in model_dir.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file.name


def test_trials_run_side_by_side_as_the_cluster_allows():
    from rayexit.tune.experiment import concurrent_trials

    spec = TuneSpec(workers=2)
    assert concurrent_trials(spec, {"CPU": 3.0}) == 1  # 2 workers + the trial's token share do not fit twice
    assert concurrent_trials(spec, {"CPU": 16.0}) == 7
    # not even once (2 + 0.01 > 2): refused, where Ray Train would wait for the workers without end
    with pytest.raises(RayexitError, match=r"tune.workers: 2 worker\(s\) at 1 CPU\(s\) each need 2 CPU\(s\)"
                       r".*use tune.workers 1 or less, tune.cpus_per_worker 0.99, or trainer: local"):
        concurrent_trials(spec, {"CPU": 2.0})
    # ... which then fits: 2 x 0.99 + 0.01 = 2
    assert concurrent_trials(TuneSpec(workers=2, cpus_per_worker=0.99), {"CPU": 2.0}) == 1
    assert concurrent_trials(TuneSpec(workers=2, cpus_per_worker=0.5), {"CPU": 16.0}) == 15
    with pytest.raises(RayexitError, match="too few for one worker beside the trial; use trainer: local"):
        concurrent_trials(TuneSpec(workers=1), {"CPU": 1.0})
    with pytest.raises(RayexitError, match=r"8 CPU\(s\) and 0 GPU\(s\), too few for one worker with a GPU"):
        concurrent_trials(TuneSpec(workers=1, use_gpu=True), {"CPU": 8.0})
    assert concurrent_trials(TuneSpec(workers=1, use_gpu=True), {"CPU": 32.0, "GPU": 4.0}) == 4
    assert concurrent_trials(TuneSpec(trainer="local"), {"CPU": 16.0}) is None  # its reservation decides
    assert concurrent_trials(TuneSpec(cpus_per_trial=2), {"CPU": 16.0}) is None


def test_train_storage_takes_uris_and_refuses_relative_in_a_job(tmp_path, monkeypatch):
    from rayexit.train.distributed import _storage

    monkeypatch.delenv(JOB_ENV, raising=False)
    path, filesystem, name, in_tune = _storage(f"file://{tmp_path}/ckpt", "run")
    assert (path, filesystem, name, in_tune) == (str(tmp_path / "ckpt"), None, "run", False)
    assert _storage("s3://bucket/ckpt", "run")[0] == "s3://bucket/ckpt"
    monkeypatch.setenv(JOB_ENV, "{}")
    with pytest.raises(RayexitError, match="--storage-path ckpt"):
        _storage("ckpt", "run")


def test_tune_cpus_per_worker_reaches_ray_train_and_is_checked(monkeypatch, tmp_path):
    import rayexit.train.distributed as distributed
    from rayexit.tune.training import train_trial_model

    asked = {}

    def fake_fit(*args, **options):
        asked.update(options)
        raise RuntimeError("stop here")

    monkeypatch.setattr(distributed, "fit_distributed", fake_fit)
    with pytest.raises(RuntimeError, match="stop here"):
        train_trial_model("minilm", "fit.tsv", "valid.tsv", TrainSettings(), tmp_path / "m", workers=2,
                          cpus_per_worker=0.99)
    assert (asked["num_workers"], asked["cpus_per_worker"]) == (2, 0.99)
    for bad in (0, -1.0, float("nan"), "one"):
        with pytest.raises(RayexitError, match="tune.cpus_per_worker"):
            TuneSpec(cpus_per_worker=bad)
