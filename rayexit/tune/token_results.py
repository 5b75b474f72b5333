"""A token search's finished trials to what the user keeps: the choice, pareto.json/png, best/, serve.yaml.

The same rule as the sentence search (`rayexit.tune.results`) and `rayexit.sweep.select`: the
reference is the best full-depth validation F1 of any trial, and the choice is the candidate
with the highest FLOPs speed-up whose F1 at 95% confidence (its own full depth minus the
bootstrap bound of its drop) stays within `max_drop` of that reference. Every figure written as
`f1` / `flops_speedup` is measured on --eval. `best/` is then run live, on validation and on
eval, so the report shows how far the replayed figures were from the runner's (TOKEE replay
is not exact, see docs/token.md).
"""

from __future__ import annotations

from pathlib import Path

from rayexit.errors import RayexitError
from rayexit.files import write_json
from rayexit.policy import ExitPolicy
from rayexit.tune.export import export_model, write_serve_config
from rayexit.tune.pareto import fastest_within, pareto_front
from rayexit.tune.results import per_trial, plot_pareto, runner_check, threshold_rate
from rayexit.tune.space import TuneSpec

VALIDATION = lambda c: (c["validation"]["f1"], c["validation"]["flops_speedup"])  # noqa: E731
BOUNDED = lambda c: (c["validation_full"] - c["validation"]["drop_bound"], c["validation"]["flops_speedup"])  # noqa: E731


def _candidate(record: dict, point: dict, index: int) -> dict:
    return {
        "trial": index,
        "trial_id": record["trial_id"],
        "params": record["params"],
        "policy": point["policy"],
        "window": point["window"],
        "thresholds": point["thresholds"],
        "f1": point["eval"]["f1"],
        "flops_speedup": point["eval"]["flops_speedup"],
        "layer_speedup": point["eval"]["layer_speedup"],
        "full_f1": record["eval_exit_f1"][-1],
        "validation": point["validation"],
        "validation_full": record["validation_exit_f1"][-1],
    }


def policy_of(candidate: dict) -> ExitPolicy:
    window = int(candidate["window"]) if candidate["policy"] == "tokee" else 3
    return ExitPolicy(candidate["policy"], candidate["thresholds"], window=window)


def confirmed(candidates: list[dict], trials: list[dict], reference: float, spec: TuneSpec, live_check) -> dict | None:
    """The fastest candidate within the drop, with TOKEE candidates confirmed live on validation.

    TOKEE replayed from a full pass is not what the runner does (running words attend to halted
    words' frozen states), so up to `spec.live_checks` TOKEE candidates, fastest first, are run
    live on validation and kept only if their live drop bound stays within `max_drop`; SENTEE
    replays exactly and needs no live run. `live_check(candidate)` returns the live validation
    figures with `drop_bound`; None skips the check (e.g. in unit tests of the rule).
    """
    bar = reference - spec.max_drop - 1e-12
    eligible = sorted(
        (c for c in candidates if BOUNDED(c)[0] >= bar), key=lambda c: (-BOUNDED(c)[1], -BOUNDED(c)[0])
    )
    checks = spec.live_checks
    for candidate in eligible:
        if candidate["policy"] != "tokee" or live_check is None:
            return candidate
        if checks <= 0:
            continue  # out of live runs: only exact (SENTEE) candidates remain choosable
        checks -= 1
        live = live_check(candidate)
        candidate["validation_live"] = live
        if candidate["validation_full"] - live["drop_bound"] >= bar:
            return candidate
    return None


def choose(trials: list[dict], spec: TuneSpec, default_params: dict | None = None, live_check=None) -> dict:
    if not trials:
        raise RayexitError("no trial finished with a model; see the Tune experiment folder for the errors")
    candidates = [_candidate(r, p, i) for i, r in enumerate(trials) for p in r["front"]]
    reference = max(r["validation_exit_f1"][-1] for r in trials)
    front = pareto_front(candidates, key=VALIDATION)
    chosen = confirmed(candidates, trials, reference, spec, live_check)
    if chosen is None:  # every trial falls short of the best one's full depth: that trial at full depth
        best = max(range(len(trials)), key=lambda i: trials[i]["validation_exit_f1"][-1])
        chosen = next(c for c in candidates if c["trial"] == best and c["validation"]["layer_speedup"] == 1.0)
    if chosen not in front:
        front.append(chosen)
    summary = {
        "reference_validation_f1": reference,
        "max_drop": spec.max_drop,
        "front": front,
        "candidates": candidates,
        "chosen": chosen,
        "best_full_eval_f1": max(r["eval_exit_f1"][-1] for r in trials),
    }
    if default_params:
        for index, record in enumerate(trials):
            if all(abs(float(record["params"].get(k, float("nan"))) - v) < 1e-12 for k, v in default_params.items()):
                own = [_candidate(record, p, index) for p in record["front"]]
                summary["default"] = fastest_within(own, BOUNDED, record["validation_exit_f1"][-1], spec.max_drop)
                break
    return summary


def write_token_results(
    output: str | Path, trials: list[dict], spec: TuneSpec, job_data: dict, seconds: float
) -> dict:
    output = Path(output)
    default_params = job_data.get("default_params") if spec.include_default else None
    summary = choose(trials, spec, default_params, live_checker(trials, job_data["validation_path"]))
    chosen = summary["chosen"]
    write_json(output / "pareto.json", [dict(p, chosen=p is chosen) for p in summary["front"]])
    plot_pareto(summary, output / "pareto.png", task="token")
    record = {k: v for k, v in chosen.items() if k != "trial"}
    with trials[chosen["trial"]]["checkpoint"].as_directory() as source:
        best = export_model(source, output / "best", policy_of(chosen), record)
    write_serve_config(best, output / "serve.yaml", name="rayexit-tuned")
    live_eval = runner_check(best, job_data["eval"])
    live_valid = runner_check(best, job_data["validation_path"])
    report = {
        "task": "token",
        "split": job_data["split"],
        "eval": job_data["eval"],
        "trials": len(trials),
        "seconds": seconds,
        "reference_validation_f1": summary["reference_validation_f1"],
        "max_drop": spec.max_drop,
        "best_full_eval_f1": summary["best_full_eval_f1"],
        "chosen": chosen,
        "default": summary.get("default"),
        "best_runner_eval": _live(live_eval),
        "best_runner_validation": _live(live_valid),
        # replayed minus live, on validation: 0 for SENTEE; TOKEE's live runner freezes halted words
        "replay_minus_live_validation": {
            "f1": chosen["validation"]["f1"] - live_valid["accuracy"],
            "flops_speedup": chosen["validation"]["flops_speedup"] - live_valid["flops_speedup"],
        },
        "threshold_settings_per_second": threshold_rate(trials),
        "per_trial": per_trial(trials, "token"),
    }
    write_json(output / "tune.json", report)
    return report


def live_checker(trials: list[dict], source: str):
    """`candidate -> live validation figures`: its trial's model through the runner, with the drop's bound."""
    import torch

    from rayexit.model_dir import ModelDir
    from rayexit.sweep import drop_bounds
    from rayexit.tasks import task_named

    task = task_named("token")
    loaded: dict[int, tuple] = {}

    @torch.no_grad()
    def check(candidate: dict) -> dict:
        index = candidate["trial"]
        if index not in loaded:
            with trials[index]["checkpoint"].as_directory() as folder:
                directory = ModelDir(folder)
                model, tokenizer = directory.load_model(), directory.load_tokenizer()
            data = task.encode(tokenizer, task.load(source, known=model.labels), model.labels,
                               model.exit_config.max_length)
            batches = task.eval_batches(data, 32)
            loaded[index] = (model, data, batches, task.run_live(model, data, batches, ExitPolicy("none", 0.0)))
        model, data, batches, full = loaded[index]
        live = task.run_live(model, data, batches, policy_of(candidate))
        bound = drop_bounds(task, full, [live])[0]
        return {"f1": live.score, "flops_speedup": live.flops_speedup, "full_f1": full.score, "drop_bound": bound}

    return check


def _live(check: dict) -> dict:
    """`runner_check` names the task's score `accuracy`; here it is entity F1."""
    return {"f1": check["accuracy"], **{k: v for k, v in check.items() if k != "accuracy"}}
