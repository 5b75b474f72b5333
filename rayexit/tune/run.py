"""`rayexit tune` end to end: a new search or a resumed one, then the results written out."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rayexit.tune.experiment import Trainable, build_tuner, load_job, output_folder, prepare_job, restore_tuner
from rayexit.tune.results import collect, write_results
from rayexit.tune.space import TuneConfig

TIMING_FILE = "timing.json"


def tune_new(
    model: str,
    train: str,
    eval_source: str,
    output: str | Path,
    config: TuneConfig,
    max_examples: int | None = None,
    trainable: Trainable | None = None,
    storage_path: str | None = None,
    valid: str | None = None,
) -> dict:
    output = output_folder(output)
    job = prepare_job(model, train, eval_source, output, config, max_examples, storage_path, valid)
    return _fit(build_tuner(job, output, trainable), output)


def tune_resume(output: str | Path, trainable: Trainable | None = None) -> dict:
    output = output_folder(output, "--resume")
    _, tuner = restore_tuner(output, trainable)
    return _fit(tuner, output)


def _fit(tuner, output: str | Path) -> dict:
    output = Path(output)
    start = time.perf_counter()
    grid = tuner.fit()
    # Search time adds up over resumed sessions, so an interrupted run reports its whole cost.
    timing_path = output / TIMING_FILE
    earlier = json.loads(timing_path.read_text())["seconds"] if timing_path.exists() else 0.0
    seconds = earlier + time.perf_counter() - start
    timing_path.write_text(json.dumps({"seconds": seconds}))
    job, job_data = load_job(output)
    if job.config.tune.task == "token":
        from rayexit.tune.token_results import write_token_results

        return write_token_results(output, collect(grid), job.config.tune, job_data, seconds)
    return write_results(output, collect(grid), job.config.tune, job_data, seconds)
