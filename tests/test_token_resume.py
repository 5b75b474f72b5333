"""Token training runs through the one loop: a run resumed mid-epoch ends where the whole run ends."""

from __future__ import annotations

import copy

import pytest
import torch
from test_token_exits import SENTENCES, tiny_tagger

from rayexit.config import TrainSettings
from rayexit.data.conll import TaggedSentences
from rayexit.tasks import task_named
from rayexit.train.loop import LoopState, train_model

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def tagged_data(tokenizer):
    sentences = SENTENCES * 2
    tags = [[TAGS[(i + j) % len(TAGS)] for j, _ in enumerate(s)] for i, s in enumerate(sentences)]
    return task_named("token").encode(tokenizer, TaggedSentences(sentences, tags, "toy"), TAGS, 64)


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.parametrize("method", ["joint", "self-sampling"])
def test_token_run_resumed_mid_epoch_equals_the_whole_run(method, minilm_tokenizer):
    data = tagged_data(minilm_tokenizer)
    settings = TrainSettings(method=method, epochs=2, batch_size=3, lr=1e-3, warmup_ratio=0.0, seed=5)
    start = no_dropout(tiny_tagger(seed=4))

    whole = copy.deepcopy(start)
    saved: list[tuple[LoopState, dict]] = []

    def keep(state: LoopState, record) -> None:
        if record is None:  # a mid-epoch checkpoint
            saved.append((copy.deepcopy(state), copy.deepcopy(whole.state_dict())))

    full = train_model(whole, data, settings, show_progress=False, on_checkpoint=keep, checkpoint_every=3)
    assert full.steps == 8  # 10 windows, batch 3 -> 4 steps an epoch
    state, weights = next((s, w) for s, w in saved if s.batch > 0 and s.epoch == 1)  # inside the second epoch

    resumed = copy.deepcopy(start)
    resumed.load_state_dict(weights)
    again = train_model(resumed, data, settings, show_progress=False, resume=state)
    assert again.steps == full.steps
    moved = False
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6)
        moved |= not torch.equal(value, start.state_dict()[key])
    assert moved, "training did not change the weights; the comparison would prove nothing"
    assert "exit_f1" not in full.history[-1]  # no eval data given


def test_token_epoch_records_carry_exit_f1(minilm_tokenizer):
    data = tagged_data(minilm_tokenizer)
    settings = TrainSettings(method="joint", epochs=1, batch_size=4, lr=1e-3, seed=1)
    result = train_model(tiny_tagger(seed=2), data, settings, eval_data=data, show_progress=False)
    scores = result.history[-1]["exit_f1"]
    assert len(scores) == 4 and all(0.0 <= f <= 1.0 for f in scores)
