"""Training checkpoints without Ray: resume equals never stopping; damaged checkpoints are refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_distributed import SEED, toy_data, toy_model

from rayexit.config import TrainSettings
from rayexit.errors import RayexitError
from rayexit.train.checkpoints import OPTIMIZER_FILE, STATE_FILE, read_checkpoint, write_checkpoint
from rayexit.train.loop import LoopState, train_model


def train(settings, **kwargs):
    model = toy_model()
    result = train_model(model, toy_data(n=24), settings, show_progress=False, **kwargs)
    return model, result


def other_model():
    """Different starting weights, so that only the checkpoint can make the runs agree."""
    from conftest import tiny_sequence_model

    model = tiny_sequence_model(layers=3, labels=("a", "b", "c"), seed=SEED + 1)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.parametrize(
    "method, when",
    [
        ("romebert", lambda s: s.stage == 0 and s.step == 4 and s.batch == 4),  # mid-epoch 1 (6 steps/epoch)
        ("deebert", lambda s: s.stage == 1 and s.step == 0),  # between DeeBERT's two stages
    ],
)
def test_resume_equals_an_uninterrupted_run(tmp_path, method, when):
    settings = TrainSettings(method=method, batch_size=4, epochs=2, lr=1e-3, dropout=0.0, head_lr=3e-3)
    settings.deebert_stage2_epochs = 1
    model = toy_model()

    def checkpoint_once(state, record):
        if when(state) and not (tmp_path / "ckpt").exists():
            write_checkpoint(tmp_path / "ckpt", model, state, extra={"settings": settings.to_dict()})

    full = train_model(model, toy_data(n=24), settings, show_progress=False, on_checkpoint=checkpoint_once,
                       checkpoint_every=4)
    assert (tmp_path / "ckpt").is_dir(), "the hook never saw the state the test resumes from"

    resumed_model = other_model()
    state, extra = read_checkpoint(tmp_path / "ckpt", resumed_model)
    assert extra["settings"] == settings.to_dict()
    resumed = train_model(resumed_model, toy_data(n=24), settings, show_progress=False, resume=state)
    assert resumed.steps == full.steps
    assert [h["epoch"] for h in resumed.history] == [h["epoch"] for h in full.history]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_damaged_or_cut_off_checkpoints_are_refused(tmp_path):
    settings = TrainSettings(method="joint", batch_size=4, epochs=1, lr=1e-3, dropout=0.0)
    states = []
    model, _ = train(settings, on_checkpoint=lambda state, record: states.append(state), checkpoint_every=2)
    directory = write_checkpoint(tmp_path / "ckpt", model, states[0])
    assert (directory / OPTIMIZER_FILE).is_file()
    read_checkpoint(directory, toy_model())  # intact: loads

    weights = directory / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(RayexitError, match="does not match"):
        read_checkpoint(directory, toy_model())

    (directory / STATE_FILE).unlink()
    with pytest.raises(RayexitError, match="not a training checkpoint"):
        read_checkpoint(directory, toy_model())


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint with real optimizer tensors, written without a training run."""
    model = toy_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.tensor([[101, 2000, 102]])
    sum(logits.sum() for logits in model(ids, torch.ones_like(ids))).backward()
    optimizer.step()
    state = LoopState(step=1, batch=1, optimizer=optimizer.state_dict(), scheduler={"last_epoch": 1})
    return write_checkpoint(tmp_path / "ckpt", model, state)


def edit_state(directory, change):
    path = directory / STATE_FILE
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("sha256"), "no `sha256`; the checkpoint is damaged or cut off"),
        (lambda r: r.update(sha256={}), "`sha256` has no digest for model.safetensors"),
        (lambda r: r["sha256"].pop(OPTIMIZER_FILE), f"`sha256` has no digest for {OPTIMIZER_FILE}"),
        (lambda r: r["sha256"].update({"model.safetensors": "0" * 63}), "expected model.safetensors or"),
        (lambda r: r["sha256"].update({"../elsewhere": "0" * 64}), "entry '../elsewhere'"),
        (lambda r: r.pop("step"), "no `step`"),
        (lambda r: r.update(history="all of it"), "`history` is str, expected list"),
        (lambda r: r.update(format_version=9), "format_version 9, expected 1"),
        (lambda r: r["optimizer"]["state"]["0"]["exp_avg"].update(tensor="nope"), "optimizer state does not fit"),
    ],
)
def test_damaged_train_state_is_one_line(checkpoint, change, message):
    read_checkpoint(checkpoint, toy_model())  # intact: loads
    edit_state(checkpoint, change)
    with pytest.raises(RayexitError, match=re.escape(message)) as info:
        read_checkpoint(checkpoint, toy_model())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x80\x04\x95binary\x00state", "binary data"),
        (b'{"format_version": 1, "note": "caf\xe9"}', "not UTF-8 text"),
        (b"[" * 100_000, "JSON nested too deeply"),
        (b'"just a string"', "expected a JSON object"),
    ],
)
def test_binary_or_unreadable_train_state_is_one_line(checkpoint, content, message):
    (checkpoint / STATE_FILE).write_bytes(content)
    with pytest.raises(RayexitError, match=f"{STATE_FILE}: {message}"):
        read_checkpoint(checkpoint, toy_model())


def test_damaged_optimizer_file_is_refused(checkpoint):
    raw = bytearray((checkpoint / OPTIMIZER_FILE).read_bytes())
    raw[-1] ^= 0x01
    (checkpoint / OPTIMIZER_FILE).write_bytes(bytes(raw))
    with pytest.raises(RayexitError, match=f"{OPTIMIZER_FILE}: missing or does not match"):
        read_checkpoint(checkpoint, toy_model())


def test_fresh_optimizer_without_tensors_needs_no_optimizer_file(tmp_path):
    model = toy_model()
    fresh = torch.optim.AdamW(model.parameters()).state_dict()  # no step yet: no tensors to save
    directory = write_checkpoint(tmp_path / "ckpt", model, LoopState(optimizer=fresh))
    assert not (directory / OPTIMIZER_FILE).exists()
    state, _ = read_checkpoint(directory, toy_model())
    assert state.optimizer["state"] == {} and len(state.optimizer["param_groups"]) == 1


def test_resume_from_ignores_the_saved_policy_and_names_the_settings_that_differ(tmp_path):
    # A checkpoint written when an unset policy still meant entropy 0.1 recorded that dict; the
    # policy is only saved with the model once training is over, so it must not block resuming.
    from rayexit.policy import ExitPolicy
    from rayexit.train.distributed import _resume_source

    settings = TrainSettings(method="joint", lr=1e-4)
    recorded = dict(settings.to_dict(), policy=ExitPolicy("entropy", [0.1]).to_dict(), log_every=5)
    state = tmp_path / STATE_FILE

    def record(changes):
        state.write_text(json.dumps({"extra": {"settings": dict(recorded, **changes), "world_size": 1}}))

    record({})
    assert _resume_source(str(tmp_path), settings, 1) == str(tmp_path.absolute())
    record({"lr": 2e-5, "gamma": 0.5})
    with pytest.raises(RayexitError, match=re.escape("other settings (gamma: 0.5 -> 0.9; lr: 2e-05 -> 0.0001)")):
        _resume_source(str(tmp_path), settings, 1)
