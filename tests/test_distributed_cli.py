"""The CLI and job entry point route to the distributed path only when asked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


def test_token_task_refuses_num_workers(capsys):
    code = main(["train", "--task", "token", "--model", "m", "--train", "t", "--output", "o", "--num-workers", "2"])
    assert code == 2
    assert "--num-workers" in capsys.readouterr().err
