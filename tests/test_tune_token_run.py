"""A real (tiny) token Tune experiment: stage 1 + self-sampling per trial, one trial interrupted and
resumed, the exit setting searched on cached uncertainties, best/ exported with its token policy."""

import json
import random
import sys
from pathlib import Path

import pytest
import yaml

import rayexit
from rayexit.tune.run import tune_new, tune_resume
from rayexit.tune.space import load_tune_config
from rayexit.tune.trial import run_trial

PEOPLE = "Peter Anna John Maria Ahmed Li".split()
PLACES = "Paris Berlin Tokyo Lima Cairo Oslo".split()
FILLER = "the a met visited said in on today and it was".split()


def write_conll(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    blocks = []
    for _ in range(count):
        words = [(rng.choice(FILLER), "O") for _ in range(rng.randint(2, 6))]
        words.insert(rng.randint(0, len(words)), (rng.choice(PEOPLE), "B-PER"))
        if rng.random() < 0.6:
            at = rng.randint(0, len(words))
            words[at:at] = [(rng.choice(PLACES), "B-LOC"), (rng.choice(PLACES), "I-LOC")]
        blocks.append("".join(f"{w} {t}\n" for w, t in words))
    path.write_text("\n".join(blocks))
    return path


def flaky_trial(params: dict, job) -> None:
    """The real trial, except that the second trial dies the first time it starts (an interruption)."""
    calls = Path(job.fit_path).parent.parent / "calls.jsonl"
    earlier = calls.read_text().splitlines() if calls.exists() else []
    with calls.open("a") as handle:
        handle.write(json.dumps(params) + "\n")
    if len(earlier) == 1 and not (calls.parent / "interrupted").exists():
        (calls.parent / "interrupted").write_text("once")
        raise RuntimeError("interrupted on purpose")
    run_trial(params, job)


def test_token_tune_runs_resumes_and_exports_a_token_policy(ray_session, tmp_path, tiny_encoder):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    train = write_conll(tmp_path / "train.txt", 60, seed=1)
    evaluation = write_conll(tmp_path / "eval.txt", 20, seed=2)
    config = load_tune_config(
        None,
        {"epochs": 4, "batch_size": 8, "lr": 5e-3, "head_lr": 2e-2, "max_length": 32},
        {
            "task": "token",
            "trials": 2,
            "trainer": "local",
            "threshold_samples": 300,
            "validation_fraction": 0.25,
            "windows": [1, 3],
            "space": {
                "lr": [2e-3, 1e-2],
                "self_sampling_epochs": 1,
                "self_sampling_lr": 2e-3,
                "sampling_max_threshold": [0.2, 0.6],
                "sampling_max_window": [1, 7],
            },
        },
    )
    output = tmp_path / "run"
    first = tune_new(str(tiny_encoder), str(train), str(evaluation), output, config, trainable=flaky_trial)
    assert first["trials"] == 1  # the second trial failed before finishing
    report = tune_resume(output, trainable=flaky_trial)

    calls = [json.loads(line) for line in (output / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 3, "resume must rerun only the interrupted trial"
    # the default goes first: the train section's lr, self-sampling up to 0.4 with windows 1..7
    assert calls[0] == {"lr": 5e-3, "sampling_max_threshold": 0.4, "sampling_max_window": 7}
    assert calls[1] == calls[2] != calls[0]
    assert report["trials"] == 2 and report["task"] == "token"
    job = json.loads((output / "job.json").read_text())
    assert job["task"] == "token" and job["split"]["validation_examples"] + job["split"]["fit_examples"] == 60
    assert (output / "data" / "fit.txt").read_text().count("B-PER") == job["split"]["fit_examples"]

    # every trial trained stage 1 and then self-sampling with its sampled range
    trial_dirs = [p for p in (output / "experiment").iterdir() if p.is_dir() and list(p.glob("checkpoint_*"))]
    assert len(trial_dirs) == 2
    for trial_dir in trial_dirs:
        points = json.loads(next(trial_dir.glob("checkpoint_*/trial_points.json")).read_text())
        params = points["params"]
        stage2 = points["self_sampling"]
        assert stage2["method"] == "self-sampling"
        assert stage2["sampling_max_threshold"] == params["sampling_max_threshold"]
        assert max(stage2["sampling_windows"]) <= params["sampling_max_window"]
        assert points["history"]["self_sampling"]
        assert {p["policy"] for p in points["front"]} <= {"tokee", "sentee"}

    pareto = json.loads((output / "pareto.json").read_text())
    assert pareto and sum(p["chosen"] for p in pareto) == 1
    validation = [(p["validation"]["f1"], p["validation"]["flops_speedup"]) for p in pareto if not p["chosen"]]
    for a in validation:  # chosen on validation: no front point is beaten there on both counts
        assert not any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in validation)
    assert (output / "pareto.png").stat().st_size > 1000

    chosen = report["chosen"]
    best = rayexit.load(output / "best")
    assert best.task == "token" and best.policy.kind == chosen["policy"]
    saved = json.loads((output / "best" / "rayexit.json").read_text())["policy"]
    assert saved["kind"] == chosen["policy"] and saved["thresholds"] == chosen["thresholds"]
    if chosen["policy"] == "tokee":
        assert saved["window"] == chosen["window"]
    tagged = best.tag([["Peter", "visited", "Paris", "Berlin"]])
    assert len(tagged[0]["tags"]) == 4
    # best/ through the live runner: equal to the replay for SENTEE; TOKEE within a small gap
    live = report["best_runner_eval"]
    if chosen["policy"] == "sentee":
        assert live["f1"] == pytest.approx(chosen["f1"], abs=1e-9)
        assert live["flops_speedup"] == pytest.approx(chosen["flops_speedup"], rel=1e-9)
    assert report["threshold_settings_per_second"] > 0
    serve = yaml.safe_load((output / "serve.yaml").read_text())
    assert serve["applications"][0]["args"]["model_dir"] == str((output / "best").resolve())
