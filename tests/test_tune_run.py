"""A real (tiny) Tune experiment: two trials, one interrupted and resumed, results and best/ exported."""

import json
import os
import random
import stat
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rayexit.tune.run import tune_new, tune_resume
from rayexit.tune.space import load_tune_config
from rayexit.tune.trial import run_trial

POSITIVE = "good great fine lovely superb".split()
NEGATIVE = "bad awful poor dull terrible".split()
FILLER = "the a movie film plot it was is and".split()


def write_data(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(count):
        label = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))] + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def flaky_trial(params: dict, job) -> None:
    """The real trial, except that the second trial dies the first time it starts (an interruption)."""
    import optuna

    calls = Path(job.fit_path).parent.parent / "calls.jsonl"
    earlier = calls.read_text().splitlines() if calls.exists() else []
    with calls.open("a") as handle:
        handle.write(json.dumps(params) + "\n")
    # What optuna-dashboard would see at this moment, while the run is still going.
    study = optuna.load_study(study_name="rayexit-tune", storage=f"sqlite:///{calls.parent / 'optuna.db'}")
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    with (calls.parent / "live_study.jsonl").open("a") as handle:
        handle.write(json.dumps(states) + "\n")
    if len(earlier) == 1 and not (calls.parent / "interrupted").exists():
        (calls.parent / "interrupted").write_text("once")
        raise RuntimeError("interrupted on purpose")
    run_trial(params, job)


def test_tune_resumes_without_redoing_finished_trials(ray_session, tmp_path, tiny_encoder):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    train = write_data(tmp_path / "train.tsv", 200, seed=1)
    evaluation = write_data(tmp_path / "eval.tsv", 80, seed=2)
    config = load_tune_config(
        None,
        {"epochs": 3, "batch_size": 16, "lr": 3e-3, "max_length": 16, "head_lr": 3e-3},
        {
            "trials": 2,
            "trainer": "local",
            "threshold_samples": 400,
            "validation_fraction": 0.2,
            "space": {"gamma": [0.5, 1.0], "temperature": [1.0, 5.0], "lr": [1e-3, 5e-3]},
        },
    )
    output = tmp_path / "run"
    store = tmp_path / "store"  # the Tune experiment on a storage URI, as Ray's storage_path takes it
    first = tune_new(
        str(tiny_encoder), str(train), str(evaluation), output, config, trainable=flaky_trial,
        storage_path=f"file://{store}",
    )
    assert first["trials"] == 1  # the second trial failed before finishing
    report = tune_resume(output, trainable=flaky_trial)

    calls = [json.loads(line) for line in (output / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 3, "resume must rerun only the interrupted trial"
    assert calls[0] == {"gamma": 0.9, "temperature": 3.0, "lr": 3e-3}  # the paper's default goes first
    assert calls[1] == calls[2] != calls[0]
    assert report["trials"] == 2
    job = json.loads((output / "job.json").read_text())
    assert job["split"]["validation_examples"] == 40 and job["split"]["fit_examples"] == 160

    pareto = json.loads((output / "pareto.json").read_text())
    assert pareto and sum(p["chosen"] for p in pareto) == 1
    for point in pareto:
        assert {"gamma", "temperature", "lr", "policy", "thresholds", "accuracy", "layer_speedup"} <= set(point)
    validation = [(p["validation"]["accuracy"], p["validation"]["layer_speedup"]) for p in pareto]
    for a in validation:  # chosen on validation: no front point is beaten there on both counts
        assert not any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in validation)
    assert (output / "pareto.png").stat().st_size > 1000

    # The study was in optuna.db while tuning: the second trial saw the first one finished there.
    live = [json.loads(line) for line in (output / "live_study.jsonl").read_text().splitlines()]
    assert live[1].count("COMPLETE") == 1
    # ... and it survived the interruption: both finished trials are in it after the resume.
    import optuna

    study = optuna.load_study(study_name="rayexit-tune", storage=f"sqlite:///{output / 'optuna.db'}")
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    assert len(finished) == 2
    assert sorted(t.params["gamma"] for t in finished) == sorted(c["gamma"] for c in calls[:2])
    # Every Tune result reached Optuna as it came: 3 epoch reports and the final one, for both trials.
    assert [len(t.intermediate_values) for t in finished] == [4, 4]

    # The experiment went to the file:// storage; one checkpoint per trial, and per-epoch results in it.
    experiment = store / "run"
    trial_dirs = sorted(p for p in experiment.iterdir() if p.is_dir() and (p / "result.json").exists())
    checkpoints = {p.name: [c for c in p.glob("checkpoint_*") if c.is_dir()] for p in trial_dirs}
    assert sorted(len(c) for c in checkpoints.values() if c) == [1, 1]  # the interrupted attempt has none
    default = next(p for p in trial_dirs if json.loads((p / "params.json").read_text())["gamma"] == 0.9)
    rows = [json.loads(line) for line in (default / "result.json").read_text().splitlines()]
    assert [r["final"] for r in rows[-4:]] == [0, 0, 0, 1]  # 3 epochs, then the trial's final report
    assert not (output / "experiment").exists()
    assert json.loads((output / "job.json").read_text())["experiment"] == str(experiment)

    chosen = report["chosen"]
    best = json.loads((output / "best" / "rayexit.json").read_text())
    assert best["policy"] == {"kind": chosen["policy"], "thresholds": chosen["thresholds"]}
    # best/ loaded from disk and run through the batched runner gives the figures reported for it
    assert report["best_runner_eval"]["accuracy"] == pytest.approx(chosen["accuracy"], abs=1e-9)
    assert report["best_runner_eval"]["layer_speedup"] == pytest.approx(chosen["layer_speedup"], rel=1e-9)
    # Whether training learns is tests/test_train.py's job: the chosen trial's sampled lr here
    # varies from run to run, and an accuracy bound on it was flaky.
    assert report["threshold_settings_per_second"] >= 1000
    serve = yaml.safe_load((output / "serve.yaml").read_text())
    assert serve["applications"][0]["import_path"] == "rayexit.serve.app:build_app"
    assert serve["applications"][0]["args"]["model_dir"] == str((output / "best").resolve())
    # Readable by other users on shared storage (what mkdtemp/mkstemp alone would not give).
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((output / "best").stat().st_mode) == 0o777 & ~umask
    for path in [output / "serve.yaml", output / "tune.json", output / "pareto.png", *(output / "best").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    torch.set_num_threads(torch.get_num_threads())  # the search restores thread settings it changes


@pytest.mark.parametrize("content, message", [
    ("{\"model\": \"m\"", "not valid JSON"),  # cut short by an interrupt
    ("{\"model\": \"m\"}", "not a tune job record \\(missing train_settings, tune, fit_path"),
    ("[]", "not a tune job record"),
])
def test_a_damaged_job_record_is_named_on_resume(tmp_path, content, message):
    from rayexit.errors import RayexitError
    from rayexit.tune.experiment import JOB_FILE, load_job

    (tmp_path / JOB_FILE).write_text(content)
    with pytest.raises(RayexitError, match=message) as info:
        load_job(tmp_path)
    assert JOB_FILE in str(info.value)


def test_earlier_search_seconds_are_read_back_and_a_damaged_file_is_named(tmp_path):
    from rayexit.errors import RayexitError
    from rayexit.tune.run import _earlier_seconds

    path = tmp_path / "timing.json"
    assert _earlier_seconds(path) == 0.0
    path.write_text('{"seconds": 12.5}')
    assert _earlier_seconds(path) == 12.5
    path.write_text('{"secs": 1}')
    with pytest.raises(RayexitError, match="timing.json: expected"):
        _earlier_seconds(path)
