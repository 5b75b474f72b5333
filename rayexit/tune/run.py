"""`rayexit tune` end to end: a new search or a resumed one, then the results written out."""

from __future__ import annotations

import time
from pathlib import Path

from rayexit.errors import RayexitError
from rayexit.files import write_json
from rayexit.reading import read_json
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
    earlier = _earlier_seconds(timing_path)
    seconds = earlier + time.perf_counter() - start
    write_json(timing_path, {"seconds": seconds})  # atomic: an interrupt leaves the old total, not half a file
    job, job_data = load_job(output)
    if job.config.tune.task == "token":
        from rayexit.tune.token_results import write_token_results

        return write_token_results(output, collect(grid), job.config.tune, job_data, seconds)
    return write_results(output, collect(grid), job.config.tune, job_data, seconds)


def _earlier_seconds(path: Path) -> float:
    """Search seconds of the sessions before this one (0 for the first)."""
    if not path.exists():
        return 0.0
    data = read_json(path)
    seconds = data.get("seconds") if isinstance(data, dict) else None
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        raise RayexitError(f"{path}: expected {{\"seconds\": N}}, the search time of earlier sessions")
    return float(seconds)
