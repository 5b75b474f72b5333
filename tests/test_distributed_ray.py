"""Ray Train end to end: 2 workers == 1 process, a killed worker resumes, too many workers fail fast.

Both tasks: sentence classification, and token tagging's two stages (joint, then self-sampling).

Tiny random models on the shared Ray session (2 CPUs). Every run writes its checkpoints to a
temporary storage folder.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import tiny_backbone
from test_distributed import (
    PER_WORKER,
    SEED,
    TOKEN_PER_WORKER,
    settings_for,
    tagged_sentences,
    token_settings,
    toy_data,
    toy_model,
)

from rayexit.config import TrainSettings
from rayexit.errors import RayexitError
from rayexit.model_dir import ModelDir
from rayexit.tasks import task_named
from rayexit.train.checkpoints import read_checkpoint
from rayexit.train.distributed import fit_distributed, fit_prepared
from rayexit.train.loop import train_model
from rayexit.train.recipe import PreparedRun, train_to_directory


def prepared(n: int = 16) -> PreparedRun:
    data = toy_data(n=n)
    return PreparedRun(task_named("sequence"), toy_model(), None, data, data)


def reference_weights(method: str, n: int, epochs: float) -> dict[str, torch.Tensor]:
    settings = settings_for(method, PER_WORKER * 2)
    settings.epochs = epochs
    model = toy_model()
    train_model(model, toy_data(n=n), settings, show_progress=False)
    return model.state_dict()


def assert_same_weights(model, expected: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_two_ray_workers_match_one_process(ray_session, tmp_path):
    run = prepared()
    settings = settings_for("romebert", PER_WORKER)
    result = fit_prepared(run, settings, num_workers=2, storage_path=str(tmp_path), name="eq", show_progress=False)
    assert result.steps == 4  # 16 examples / global batch 8 = 2 steps per epoch, 2 epochs
    assert result.conflict_rate is not None and result.conflict_rate > 0, "the projection never acted"
    assert_same_weights(run.model, reference_weights("romebert", 16, 2))
    # per-epoch metrics reached Ray's results and TensorBoard
    assert [row["epoch"] for row in result.metrics] == [1, 2]
    assert all("exit3_accuracy" in row and "loss" in row for row in result.metrics)
    assert list((tmp_path / "eq" / "tensorboard").glob("events.out.tfevents.*"))
    # the checkpoint is a model directory plus resume state
    state, extra = read_checkpoint(result.checkpoint, toy_model())
    assert state.stage == 1 and state.steps_before == 4 and extra["settings"] == settings.to_dict()


def test_killed_worker_resumes_from_checkpoint_and_finishes(ray_session, tmp_path):
    run = prepared()
    settings = settings_for("joint", PER_WORKER)
    settings.epochs = 3
    marker = tmp_path / "killed"
    result = fit_prepared(
        run,
        settings,
        num_workers=2,
        storage_path=str(tmp_path),
        name="ft",
        max_failures=1,
        show_progress=False,
        fault={"rank": 1, "step": 3, "marker": str(marker)},  # step 3: after the epoch-1 checkpoint
    )
    assert marker.exists(), "the worker was never killed; the test proved nothing"
    assert result.steps == 6
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    # every epoch's row, though Ray keeps 2 checkpoints (and, in its own results, only their rows)
    assert [(row["epoch"], row["global_step"]) for row in result.metrics] == [(1, 2), (2, 4), (3, 6)]
    # resumed from the epoch-1 checkpoint: the same weights as a run that was never interrupted
    assert_same_weights(run.model, reference_weights("joint", 16, 3))


def test_resume_from_names_another_runs_checkpoint_and_training_continues_from_it(ray_session, tmp_path):
    settings = settings_for("joint", PER_WORKER)
    fit_prepared(prepared(), settings, num_workers=2, storage_path=str(tmp_path), name="first", num_to_keep=None,
                 show_progress=False)
    checkpoints = sorted(p for p in (tmp_path / "first").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # one per epoch, all kept
    after_one = next(path for path in checkpoints if read_checkpoint(path, toy_model())[0].step == 2)  # 2 steps/epoch
    run = prepared()
    resumed = fit_prepared(run, settings, num_workers=2, storage_path=str(tmp_path), name="second",
                           resume_from=str(after_one), show_progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2]  # epoch 1 came with the checkpoint
    assert_same_weights(run.model, reference_weights("joint", 16, 2))
    # refused before Ray starts any worker: another worker count, other settings, not a checkpoint
    with pytest.raises(RayexitError, match=r"--resume-from: .* 2 worker\(s\), this run has 1; .*--num-workers 2"):
        fit_prepared(prepared(), settings, num_workers=1, resume_from=str(after_one))
    other = settings_for("joint", PER_WORKER)
    other.lr = 0.5
    with pytest.raises(RayexitError, match=r"--resume-from: .* was trained with other settings \(lr: .* -> 0.5\)"):
        fit_prepared(prepared(), other, num_workers=2, resume_from=str(after_one))
    with pytest.raises(RayexitError, match="--resume-from: .* is not a training checkpoint"):
        fit_prepared(prepared(), settings, num_workers=2, resume_from=str(tmp_path / "first"))


def test_several_nodes_without_storage_path_are_refused_before_training(ray_session, monkeypatch):
    import ray

    node = {"Alive": True, "Resources": {"CPU": 1.0}}
    monkeypatch.setattr(ray, "nodes", lambda: [dict(node, NodeID="a"), dict(node, NodeID="b")])
    with pytest.raises(RayexitError, match="--storage-path: the Ray cluster has 2 nodes"):
        fit_prepared(prepared(), settings_for("joint", PER_WORKER), num_workers=1, show_progress=False)


def test_more_workers_than_the_cluster_has_fails_fast(ray_session, tmp_path):
    started = time.monotonic()
    with pytest.raises(RayexitError, match=r"asked for 5 worker\(s\) x 1 CPU.*2 CPU\(s\)"):
        fit_prepared(prepared(n=40), settings_for("joint", PER_WORKER), num_workers=5, storage_path=str(tmp_path))
    if not ray_session.cluster_resources().get("GPU"):
        with pytest.raises(RayexitError, match=r"1 GPU.*0 GPU\(s\)"):
            fit_prepared(prepared(), settings_for("joint", PER_WORKER), num_workers=1, use_gpu=True,
                         storage_path=str(tmp_path))
    assert time.monotonic() - started < 60


# -- token tagging: both stages on Ray Train -------------------------------------------------------


def token_settings_for(method: str, batch_size: int, epochs: float = 2) -> TrainSettings:
    settings = token_settings(method, batch_size)
    settings.epochs = epochs
    return settings


def write_conll(path: Path, sentences) -> Path:
    pairs = zip(sentences.words, sentences.tags)
    blocks = ["\n".join(f"{w} {t}" for w, t in zip(words, tags)) for words, tags in pairs]
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def encoder_folder(folder: Path, tokenizer) -> Path:
    """A tiny random encoder with the packaged tokenizer; no dropout, so halves and whole see one net."""
    backbone = tiny_backbone(layers=4, seed=SEED)
    backbone.config.hidden_dropout_prob = 0.0
    backbone.config.attention_probs_dropout_prob = 0.0
    backbone.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_token_stages_on_two_ray_workers_match_one_process(ray_session, tmp_path, minilm_tokenizer, monkeypatch):
    """`fit_distributed(task="token")`: stage 1, then self-sampling from it with a worker killed mid-run;
    each writes a token model directory with the weights of one process on the whole batch."""
    import rayexit.train.distributed as distributed

    encoder = encoder_folder(tmp_path / "encoder", minilm_tokenizer)
    conll = write_conll(tmp_path / "train.conll", tagged_sentences())
    ray_args = {"num_workers": 2, "storage_path": str(tmp_path / "runs"), "show_progress": False, "task": "token"}

    stage1 = tmp_path / "stage1"
    joint = token_settings_for("joint", TOKEN_PER_WORKER)
    result = fit_distributed(str(encoder), str(conll), str(conll), joint, stage1, name="tok1", **ray_args)
    assert result.steps == 4  # 12 sentences / global batch 6 = 2 steps an epoch, 2 epochs
    assert [row["epoch"] for row in result.metrics] == [1, 2]
    assert all("exit4_f1" in row and "loss" in row for row in result.metrics)
    trained = ModelDir(stage1)
    assert trained.task == "token" and trained.training()["num_workers"] == 2
    _, one = train_to_directory(str(encoder), str(conll), None, token_settings_for("joint", 2 * TOKEN_PER_WORKER),
                                tmp_path / "one1", task="token", show_progress=False)
    assert one.steps == result.steps
    # the epoch loss Ray reports (mean of the ranks' shares) is the one-process epoch loss
    assert result.history[-1]["loss"] == pytest.approx(one.history[-1]["loss"], rel=1e-4)
    first = trained.load_model()
    assert_same_token_weights(first, ModelDir(tmp_path / "one1").load_model(), None)
    untrained = tiny_backbone(layers=4, seed=SEED).state_dict()
    moved = [k for k, v in first.backbone.state_dict().items() if not torch.equal(v, untrained[k])]
    assert moved, "stage 1 did not change the encoder; the comparison would prove nothing"

    # stage 2: rank 1 kills itself at its 3rd step (after the epoch-1 checkpoint); the group restarts from it
    marker = tmp_path / "killed"
    monkeypatch.setattr(distributed, "fit_prepared",
                        partial(fit_prepared, fault={"rank": 1, "step": 3, "marker": str(marker)}))
    stage2 = tmp_path / "stage2"
    sampling = token_settings_for("self-sampling", TOKEN_PER_WORKER)
    result = fit_distributed(None, str(conll), None, sampling, stage2, name="tok2", init=str(stage1), max_failures=1,
                             **ray_args)
    assert marker.exists(), "the worker was never killed; the test proved nothing"
    assert result.steps == 4 and [h["epoch"] for h in result.history] == [1, 2]
    second = ModelDir(stage2)
    assert second.exit_config().method == "self-sampling"
    train_to_directory(None, str(conll), None, token_settings_for("self-sampling", 2 * TOKEN_PER_WORKER),
                       tmp_path / "one2", task="token", init=str(stage1), show_progress=False)
    assert_same_token_weights(second.load_model(), ModelDir(tmp_path / "one2").load_model(), stage1)


def assert_same_token_weights(model, expected, start_dir: Path | None) -> None:
    start = ModelDir(start_dir).load_model() if start_dir is not None else None
    moved = False
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected.state_dict()[key], rtol=1e-4, atol=1e-5, msg=key)
        if start is not None:
            moved |= not torch.equal(value, start.state_dict()[key])
    assert start is None or moved, "training did not change the weights; the comparison would prove nothing"
