"""Stage-1 loss, self-sampling halting masks, and the train -> self-sampling -> eval commands."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_backbone
from test_token_exits import SENTENCES, tiny_tagger

from rayexit.cli import main
from rayexit.data.conll import encode_tagged, make_batch
from rayexit.losses import weighted_token_loss
from rayexit.policy import ExitPolicy
from rayexit.token_exits import run_token_exit, simulate_halting
from rayexit.train.steps import word_logits

TOKEE = ExitPolicy("tokee", 0.1)


def halting(u, mask, window: int, threshold: float):
    return simulate_halting(u, mask, ExitPolicy("tokee", threshold, window=window))

CONLL = (
    "-DOCSTART- O\n\n"
    "Peter B-PER\nBlackburn I-PER\nvisited O\nBrussels B-LOC\n\n"
    "The O\nEuropean B-ORG\nCommission I-ORG\nsaid O\n\n"
    "German B-MISC\nadvice O\n\n"
    "Hi O\n"
)


def test_weighted_loss_weighs_deeper_exits_more(minilm_tokenizer):
    data = encode_tagged(minilm_tokenizer, [["a", "b"]], None, 16)
    batch = make_batch(data, [0])
    batch.labels[0] = torch.tensor([0, 1])
    width = batch.input_ids.shape[1]
    sure = torch.zeros(1, width, 2)
    sure[..., 0] = 10.0
    sure[0, 2, 1] = 20.0  # word 2's first piece sits at position 2
    unsure = torch.zeros(1, width, 2)
    ce_sure = torch.nn.functional.cross_entropy(word_logits(sure, batch)[0], batch.labels[0])
    ce_unsure = torch.tensor(2.0).log()
    loss = weighted_token_loss([word_logits(unsure, batch), word_logits(sure, batch)], batch.labels)
    assert torch.allclose(loss, (1 * ce_unsure + 2 * ce_sure) / 3)
    # with halting masks, exit 2 no longer scores a word that halted at layer 1
    both = [word_logits(unsure, batch), word_logits(sure, batch)]
    halted = weighted_token_loss(both, batch.labels, torch.tensor([[1, 2]]))
    ce_second = torch.nn.functional.cross_entropy(word_logits(sure, batch)[0, 1:], batch.labels[0, 1:])
    assert torch.allclose(halted, (1 * ce_unsure + 2 * ce_second) / 3)


def test_simulated_halting_on_hand_made_uncertainties():
    # 1 sentence, 4 words, 3 layers
    u = torch.tensor([[[0.5, 0.05, 0.0], [0.05, 0.5, 0.0], [0.5, 0.5, 0.0], [0.05, 0.05, 0.0]]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    alone = halting(u, mask, 1, 0.1)
    assert alone.tolist() == [[2, 1, 3, 1]]
    # window 3: word 2 halts at layer 1 and its frozen 0.05 (not its layer-2 value 0.9) is what
    # its neighbours see at layer 2, so all the rest halt there
    u = torch.tensor([[[0.5, 0.05, 0.0], [0.05, 0.05, 0.0], [0.05, 0.9, 0.0], [0.05, 0.05, 0.0], [0.5, 0.05, 0.0]]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    windowed = halting(u, mask, 3, 0.1)
    assert windowed.tolist() == [[2, 2, 1, 2, 2]]
    assert halting(u, mask, 1, 0.1).tolist() == [[2, 1, 1, 1, 2]]
    # per-sentence windows and thresholds (self-sampling's draws) give each row its own setting
    two = torch.cat([u, u])
    drawn = simulate_halting(two, torch.ones(2, 5, dtype=torch.bool), TOKEE, torch.tensor([0.1, 0.1]),
                             torch.tensor([3, 1]))
    assert drawn.tolist() == [[2, 2, 1, 2, 2], [2, 1, 1, 1, 2]]


@torch.no_grad()
def test_training_form_matches_the_runner(minilm_tokenizer):
    model = tiny_tagger(seed=3)
    data = encode_tagged(minilm_tokenizer, SENTENCES, None, 64)
    batch = make_batch(data, list(range(len(data))))
    result = run_token_exit(model, batch, ExitPolicy("tokee", 0.6, window=1))
    halt = result.exit_layers
    assert halt[batch.word_mask].min() < model.num_layers  # some words halt early
    states = model.halting_layer_states(batch.input_ids, batch.attention_mask, batch.piece_word, halt)
    for b in range(len(data)):
        for w in range(int(batch.word_mask[b].sum())):
            layer = int(halt[b, w]) - 1
            state = states[layer][b, batch.word_starts[b, w]]
            assert int(model.exit_logits(layer, state).argmax()) == int(result.predictions[b, w])
            # frozen from its halting layer on
            assert torch.equal(states[-1][b, batch.word_starts[b, w]], state)


def test_train_self_sample_and_eval_commands(tmp_path, minilm_tokenizer, capsys):
    encoder = tmp_path / "encoder"
    tiny_backbone(layers=3).save_pretrained(encoder)
    minilm_tokenizer.save_pretrained(encoder)
    data = tmp_path / "train.txt"
    data.write_text(CONLL)
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    common = ["--train", str(data), "--epochs", "1", "--batch-size", "2"]
    assert main(["train", "--task", "token", "--model", str(encoder), "--eval", str(data), "--output", str(stage1),
                 *common]) == 0
    config = json.loads((stage1 / "rayexit.json").read_text())
    assert config["task"] == "token" and config["labels"][0] == "O" and "B-MISC" in config["labels"]
    assert main(["train", "--task", "token", "--method", "self-sampling", "--init", str(stage1),
                 "--output", str(stage2), *common]) == 0
    assert json.loads((stage2 / "rayexit.json").read_text())["method"] == "self-sampling"
    report_path = tmp_path / "report.json"
    assert main(["eval", "--model", str(stage2), "--data", str(data), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert len(report["exit_f1"]) == 3 and report["full"] == report["exit_f1"][-1]
    assert {p["policy"]["kind"] for p in report["curve"]} == {"sentee", "tokee"}
    # With nothing halted a run computes full depth plus the inner exits' heads on every word, so
    # it costs more than a plain forward (speed-up below 1); a word that halts skips rows and heads.
    still = [p["flops_speedup"] for p in report["curve"] if p["layer_speedup"] == pytest.approx(1.0)]
    for point in report["curve"]:
        assert 0.0 <= point["f1"] <= 1.0
    if still:
        assert max(still) == pytest.approx(min(still), rel=1e-12) and still[0] < 1.0
    # a given policy is measured and reported as `selected`, live, with its timing spread; a
    # threshold just under the largest uncertainty halts every word at exit 1
    assert main(["eval", "--model", str(stage2), "--data", str(data), "--json", str(report_path),
                 "--policy", "tokee", "--threshold", "0.9999", "--window", "1", "--repeats", "2"]) == 0
    selected = json.loads(report_path.read_text())["selected"]
    assert selected["policy"] == {"kind": "tokee", "thresholds": 0.9999, "window": 1} and selected["how"] == "given"
    assert selected["layer_speedup"] == pytest.approx(3.0)  # every word left at exit 1 of 3
    assert selected["flops_speedup"] > 2.0 and (not still or selected["flops_speedup"] > still[0])
    low, high = selected["wallclock_spread"]
    assert low <= selected["wallclock_speedup"] <= high


def test_token_command_errors(tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text(CONLL)
    out = str(tmp_path / "out")
    assert main(["train", "--task", "token", "--method", "self-sampling", "--train", str(data), "--output", out]) == 2
    assert "needs --init" in capsys.readouterr().err
    assert main(["train", "--model", "x", "--init", out, "--train", str(data), "--output", out]) == 2
    assert "--task token" in capsys.readouterr().err
    assert main(["train", "--task", "token", "--method", "romebert", "--model", "x", "--train", str(data),
                 "--output", out]) == 2
    assert "token tasks train stage 1" in capsys.readouterr().err


def test_a_sentence_only_setting_is_refused_for_a_token_task_everywhere(tmp_path, capsys):
    from rayexit.config import TrainSettings
    from rayexit.errors import RayexitError
    from rayexit.train.recipe import prepare
    from rayexit.tune.space import load_tune_config

    data = tmp_path / "train.txt"
    data.write_text(CONLL)
    out = tmp_path / "out"
    assert main(["train", "--task", "token", "--pooling", "attention", "--model", "minilm", "--train", str(data),
                 "--output", str(out)]) == 2
    assert "pooling: got 'attention' for a token task" in capsys.readouterr().err
    assert not out.exists()  # refused before any output was made
    with pytest.raises(RayexitError, match="pooling: got 'mean' for a token task"):
        prepare("minilm", str(data), None, TrainSettings(pooling="mean"), task="token")
    with pytest.raises(RayexitError, match="pooling: got 'cls' for a token task"):
        load_tune_config(None, {"pooling": "cls"}, {"task": "token"})
    # the same setting is one a sentence task reads, so there it is kept
    assert load_tune_config(None, {"pooling": "cls"}, {}).train.pooling == "cls"


def test_a_token_run_keeps_a_token_policy_refuses_a_sentence_one_and_defaults_to_tokee(tmp_path, capsys):
    from rayexit.config import TrainSettings
    from rayexit.errors import RayexitError
    from rayexit.tasks import TASKS
    from rayexit.train.recipe import prepare
    from rayexit.tune.space import load_tune_config

    token, sentence = TASKS["token"], TASKS["sequence"]
    labels = ["O", "B-PER"]
    assert token.exit_config(labels, TrainSettings()).policy == ExitPolicy("tokee", 0.1, window=3)
    given = ExitPolicy("sentee", 0.2, reduce="mean")
    assert token.exit_config(labels, TrainSettings(policy=given.to_dict())).policy == given
    # a sentence task's default is still its own entropy policy
    assert sentence.exit_config(["0", "1"], TrainSettings(pooling="mean")).policy == ExitPolicy("entropy", 0.1)
    with pytest.raises(RayexitError, match="policy.kind: 'entropy' is not a token policy"):
        token.exit_config(labels, TrainSettings(policy={"kind": "entropy", "thresholds": 0.1}))

    data = tmp_path / "train.txt"
    data.write_text(CONLL)
    config = tmp_path / "entropy.yaml"
    config.write_text("train:\n  policy:\n    kind: entropy\n    thresholds: 0.2\n")
    out = tmp_path / "out"
    assert main(["train", "--task", "token", "--config", str(config), "--model", "minilm", "--train", str(data),
                 "--output", str(out)]) == 2
    assert "policy.kind: 'entropy' is not a token policy" in capsys.readouterr().err
    assert not out.exists()  # refused before any output was made
    with pytest.raises(RayexitError, match="'maxprob' is not a token policy"):
        prepare("minilm", str(data), None, TrainSettings(policy={"kind": "maxprob", "thresholds": 0.9}), task="token")
    with pytest.raises(RayexitError, match="'tokee' is not a sequence policy"):
        load_tune_config(None, {"policy": {"kind": "tokee", "thresholds": 0.1}}, {})
    with pytest.raises(RayexitError, match="policy: got 'tokee', expected a mapping"):
        TrainSettings(policy="tokee")
