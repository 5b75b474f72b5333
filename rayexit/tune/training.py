"""How a trial trains its model: the one place that says which trainer does it.

`distributed` goes through the Ray Train trainer (`rayexit.train.distributed.fit_distributed`);
`local` trains in the trial's own process with the same loop (`rayexit.train.loop`), which
also lets the trial report after every epoch so that ASHA can stop poor trials early.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from rayexit.config import TrainSettings

# Called after each epoch of local training with the model as it stands and the epoch record.
EpochHook = Callable[[object, dict], None]


def train_trial_model(
    model_name: str,
    train_path: str,
    validation_path: str,
    settings: TrainSettings,
    output: Path,
    *,
    trainer: str = "distributed",
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    use_gpu: bool = False,
    storage_path: str | None = None,
    on_epoch: EpochHook | None = None,
    task: str = "sequence",
    init: str | None = None,
) -> tuple[Path, dict]:
    """Train one model into `output`; returns the model directory and what training recorded.

    Token stage 2 (`settings.method` self-sampling) starts from the stage-1 directory `init`.
    """
    if trainer == "distributed":
        from rayexit.train.distributed import fit_distributed

        result = fit_distributed(
            model_name,
            train_path,
            validation_path,
            settings,
            output,
            num_workers=workers,
            cpus_per_worker=cpus_per_worker,
            use_gpu=use_gpu,
            # None inside a trial: Ray Train keeps its run under the trial's own folder.
            storage_path=storage_path,
            name=None,
            show_progress=False,
            task=task,
            init=init,
        )
        recorded = json.loads((Path(result.model_dir) / "training.json").read_text())
        chosen = {"settings": recorded["settings"], "defaults": recorded.get("defaults", {})}
        return Path(result.model_dir), {"seconds": result.seconds, "history": result.history, **chosen}
    return _train_local(model_name, train_path, settings, output, on_epoch, task, init)


def _train_local(model_name, train_path, settings, output, on_epoch, task, init) -> tuple[Path, dict]:
    from rayexit.train.loop import train_model
    from rayexit.train.recipe import prepare

    # No eval set here: the trial measures the validation split itself, on the full cache.
    run = prepare(model_name, train_path, None, settings, task=task, init=init)
    hook = None if on_epoch is None else (lambda record: on_epoch(run.model, record))
    result = train_model(run.model, run.train_data, run.settings, on_epoch_end=hook, show_progress=False)
    run.model.save_pretrained(output, run.tokenizer)
    chosen = {"settings": run.settings.to_dict(), "defaults": run.defaults}  # what trained, unset ones chosen
    return Path(output), {"seconds": result.seconds, "history": result.history, **chosen}
