"""Settings chosen from the encoder's own files when the user leaves them unset (pooling, rates), and recorded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_backbone

from rayexit.config import TrainSettings, train_settings
from rayexit.data.packaged import minilm_path
from rayexit.models.backbone import describe_backbone
from rayexit.train.recipe import prepare, train_to_directory

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def encoder_folder(path, *, trained_pooler: bool):
    """A small BERT folder; a 'trained' pooler is one whose bias moved off its zero initialisation."""
    backbone = tiny_backbone(layers=2)
    if trained_pooler:
        with torch.no_grad():
            backbone.pooler.dense.bias.uniform_(-0.1, 0.1)
    backbone.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, path / name)
    return path


def sentence_transformers_folder(path, mode: str, *, trained_pooler: bool = True):
    """What sentence-transformers saves: the encoder at the top, then a Pooling module's folder."""
    encoder_folder(path, trained_pooler=trained_pooler)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    flags = {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (path / "1_Pooling" / "config.json").write_text(json.dumps(flags))
    return path


@pytest.fixture
def sentences(tmp_path):
    path = tmp_path / "train.tsv"
    rows = [("a fine film", 1), ("a dull film", 0)] * 8
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return path


def test_packaged_minilm_reads_mean_from_its_pooling_config():
    facts = describe_backbone("minilm")
    assert facts.pooling == "mean"
    assert "1_Pooling/config.json" in facts.pooling_source
    assert facts.trained_pooler is False  # all-MiniLM's pooler bias is still all zeros


@pytest.mark.parametrize("mode,chosen", [("mean", "attention"), ("cls", "cls")])
def test_sentence_transformers_folder_gets_its_own_pooling(tmp_path, sentences, mode, chosen):
    # The trained pooler would say cls; the Pooling module's config is the stronger word. Its
    # mean becomes attention, which starts as the mean and learns a weighting per exit.
    folder = sentence_transformers_folder(tmp_path / "st", mode, trained_pooler=True)
    run = prepare(str(folder), str(sentences), None, TrainSettings(max_length=16))
    assert run.model.exit_config.pooling == chosen
    assert run.model.heads.pooling == chosen
    assert run.settings.pooling == chosen
    if chosen == "attention":  # its scorers start at zero: every exit begins by reading the mean
        assert all(not sc.weight.any() and not sc.bias.any() for sc in run.model.heads.scorers)
    assert "sentence-transformers" in run.defaults["pooling"]["why"]


def test_bert_with_trained_pooler_keeps_cls_and_random_one_gets_mean(tmp_path, sentences):
    settings = TrainSettings(max_length=16)
    trained = prepare(str(encoder_folder(tmp_path / "bert", trained_pooler=True)), str(sentences), None, settings)
    assert trained.model.exit_config.pooling == "cls"
    assert "pooler was trained" in trained.defaults["pooling"]["why"]
    fresh = prepare(str(encoder_folder(tmp_path / "random", trained_pooler=False)), str(sentences), None, settings)
    # measured: on a random-initialised BERT attention lost ~2 points on SST-2 (docs/defaults.md)
    assert fresh.model.exit_config.pooling == "mean"
    assert "never trained" in fresh.defaults["pooling"]["why"]


def test_explicit_pooling_wins_from_python_yaml_and_flags(tmp_path, sentences):
    folder = sentence_transformers_folder(tmp_path / "st", "mean")
    run = prepare(str(folder), str(sentences), None, TrainSettings(max_length=16, pooling="cls"))
    assert run.model.exit_config.pooling == "cls"
    assert "pooling" not in run.defaults
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  pooling: cls\n")
    assert train_settings(config, {}).pooling == "cls"
    assert train_settings(config, {"pooling": "mean"}).pooling == "mean"  # a flag over the file
    assert train_settings(None, {}).pooling is None  # unset: chosen when the model is built


def test_choice_and_reason_recorded_in_training_and_rayexit_json(tmp_path, sentences):
    folder = sentence_transformers_folder(tmp_path / "st", "mean", trained_pooler=True)
    out = tmp_path / "model"
    settings = TrainSettings(max_length=16, epochs=1, batch_size=8)
    train_to_directory(str(folder), str(sentences), None, settings, out, show_progress=False)
    training = json.loads((out / "training.json").read_text())
    assert training["settings"]["pooling"] == "attention"
    assert training["defaults"]["pooling"]["value"] == "attention"
    assert "1_Pooling/config.json" in training["defaults"]["pooling"]["why"]
    record = json.loads((out / "rayexit.json").read_text())
    assert record["pooling"] == "attention"
    assert record["extra"]["defaults"]["pooling"]["value"] == "attention"
    assert settings.pooling is None  # the caller's settings object is left as it was


def test_a_rayexit_directory_as_the_encoder_passes_its_own_pooling_on(tmp_path, sentences):
    # Its backbone was fine-tuned under the mean: that is kept, not turned into attention.
    folder = sentence_transformers_folder(tmp_path / "st", "mean")
    first = tmp_path / "first"
    settings = TrainSettings(max_length=16, epochs=1, batch_size=8, pooling="mean")
    train_to_directory(str(folder), str(sentences), None, settings, first, show_progress=False)
    from rayexit.models.backbone import describe_backbone

    assert describe_backbone(str(first)).rayexit_model
    assert not describe_backbone(str(folder)).rayexit_model
    again = prepare(str(first), str(sentences), None, TrainSettings(max_length=16))
    assert again.model.exit_config.pooling == "mean"
    assert again.defaults["pooling"]["why"] == "rayexit.json says mean"


def test_rates_follow_the_backbone_and_the_users_own_win(tmp_path):
    from rayexit.tasks import PAPER_RATES, SENTENCE_RATES, TOKEN_RATES, task_named
    from rayexit.train.recipe import fill_defaults

    sentence, token = task_named("sequence"), task_named("token")
    bert = str(encoder_folder(tmp_path / "bert", trained_pooler=True))
    fresh = str(encoder_folder(tmp_path / "fresh", trained_pooler=False))
    settings, chosen = fill_defaults(TrainSettings(), sentence, fresh)
    assert (settings.lr, settings.head_lr) == SENTENCE_RATES
    settings, _ = fill_defaults(TrainSettings(), token, fresh)
    assert (settings.lr, settings.head_lr) == TOKEN_RATES
    assert settings.pooling is None  # token exits read every word: no pooling to choose
    # A pretrained BERT keeps RomeBERT's rate, heads at the encoder's rate (the user's if given).
    settings, chosen = fill_defaults(TrainSettings(), sentence, bert)
    assert (settings.lr, settings.head_lr) == PAPER_RATES
    settings, chosen = fill_defaults(TrainSettings(lr=3e-5), sentence, bert)
    assert (settings.lr, settings.head_lr) == (3e-5, 3e-5)
    assert "lr" not in chosen
    settings, chosen = fill_defaults(TrainSettings(lr=5e-5, head_lr=5e-4, pooling="cls"), sentence, fresh)
    assert (settings.lr, settings.head_lr, settings.pooling, chosen) == (5e-5, 5e-4, "cls", {})
