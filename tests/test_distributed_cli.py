"""The CLI and job entry point route to the distributed path only when asked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rayexit.cli import build_parser, main

JOB = Path(__file__).resolve().parents[1] / "jobs" / "train.py"


def load_job():
    spec = importlib.util.spec_from_file_location("rayexit_job_train", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_entry_defaults_to_one_ray_worker():
    job = load_job()
    assert job.job_args(["--model", "m"]) == ["train", "--model", "m", "--num-workers", "1"]
    assert job.job_args(["--num-workers", "3"]) == ["train", "--num-workers", "3"]
    assert job.job_args(["--num-workers=2"]) == ["train", "--num-workers=2"]


def test_train_flags_parse_and_default_to_in_process():
    parser = build_parser()
    plain = parser.parse_args(["train", "--model", "m", "--train", "t", "--output", "o"])
    assert plain.num_workers is None and plain.use_gpu is False and plain.max_failures == 0
    ray = parser.parse_args(
        ["train", "--model", "m", "--train", "t", "--output", "o", "--num-workers", "2", "--use-gpu",
         "--address", "auto", "--max-failures", "2", "--checkpoint-every", "50"]
    )
    chosen = (ray.num_workers, ray.use_gpu, ray.address, ray.max_failures, ray.checkpoint_every)
    assert chosen == (2, True, "auto", 2, 50)


def test_token_task_goes_to_ray_train_with_its_task(monkeypatch, tmp_path):
    """`--task token --num-workers N` runs the one distributed path, told which task and init."""
    import rayexit.train.distributed as distributed

    seen = {}

    def fake_fit(model, train, evaluation, settings, output, options, **where):
        seen.update(where, workers=options.num_workers, method=settings.method)
        raise SystemExit(0)

    monkeypatch.setattr(distributed, "fit_distributed", fake_fit)
    with pytest.raises(SystemExit):
        main(["train", "--task", "token", "--method", "self-sampling", "--init", str(tmp_path), "--train", "t",
              "--output", "o", "--num-workers", "2"])
    assert seen == {"task": "token", "init": str(tmp_path), "workers": 2, "method": "self-sampling"}
