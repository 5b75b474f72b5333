"""YAML settings files: numbers as users write them, and sections read by the command they belong to."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayexit.cli import main
from rayexit.config import load_yaml, train_settings
from rayexit.errors import RayexitError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_exponent_without_a_dot_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads these as strings; YAML 1.2 and users read them as numbers.
    path = write(tmp_path, "train:\n  lr: 1e-4\n  head_lr: 5E-3\n  epochs: 2e0\n  temperature: +3e0\n")
    settings = train_settings(path, {})
    assert (settings.lr, settings.head_lr, settings.epochs, settings.temperature) == (1e-4, 5e-3, 2.0, 3.0)
    assert isinstance(settings.lr, float)


def test_other_scalars_keep_their_yaml_meaning(tmp_path):
    data = load_yaml(write(tmp_path, "a: 1_000\nb: 1.5e+3\nc: 1e\nd: e5\ne: '1e-4'\nf: 0x10\ng: .5\n"))
    assert data == {"a": 1000, "b": 1500.0, "c": "1e", "d": "e5", "e": "1e-4", "f": 16, "g": 0.5}


def test_quoted_number_for_a_float_setting_is_accepted(tmp_path):
    settings = train_settings(write(tmp_path, "train:\n  lr: '1e-4'\n  gamma: ' 0.5 '\n"), {})
    assert (settings.lr, settings.gamma) == (1e-4, 0.5)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  lr: fast\n", "lr: got 'fast', expected a finite number > 0"),
        ("train:\n  lr: 'nan'\n", "lr: got 'nan', expected a finite number > 0"),
        ("train:\n  batch_size: '32'\n", "batch_size: got '32'"),  # whole-number settings are not coerced
    ],
)
def test_strings_that_are_not_numbers_are_still_refused(tmp_path, text, message):
    with pytest.raises(RayexitError, match=message):
        train_settings(write(tmp_path, text), {})


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  epochs: .inf\n", r"epochs: got inf, expected a finite number > 0"),
        ("train:\n  lr: .nan\n", r"lr: got nan, expected a finite number > 0"),
        ("train:\n  temperature: .inf\n", r"temperature: got inf"),
        ("train:\n  final_weight: .nan\n", r"final_weight: got nan"),
        ("train:\n  deebert_stage2_epochs: -1\n", r"deebert_stage2_epochs: got -1, expected a finite number > 0"),
        ("train:\n  weight_decay: -1\n", r"weight_decay: got -1, expected a finite number >= 0"),
        ("train:\n  weight_decay: abc\n", r"weight_decay: got 'abc'"),
        ("train:\n  batch_size: 2.5\n", r"batch_size: got 2.5, expected a whole number >= 1"),
        ("train:\n  max_examples: 2.5\n", r"max_examples: got 2.5, expected a whole number >= 1"),
        ("train:\n  seed: x\n", r"seed: got 'x', expected a whole number >= 0"),
        ("train:\n  gamma: null\n", r"gamma: got None, expected a value in \[0, 1\]"),
        ("train:\n  dropout: .nan\n", r"dropout: got nan, expected a value in \[0, 1\)"),
    ],
)
def test_non_finite_negative_and_mistyped_settings_are_refused_by_name(tmp_path, text, message):
    # NaN and inf pass a plain "> 0"; before, they failed steps later in math.ceil or AdamW, or trained silently
    with pytest.raises(RayexitError, match=message):
        train_settings(write(tmp_path, text), {})


def test_tune_config_reads_exponents_too(tmp_path):
    from rayexit.tune.space import load_tune_config

    path = write(tmp_path, "train:\n  lr: 1e-4\ntune:\n  space:\n    lr: [1e-5, 1e-4]\n    gamma: 0.9\n")
    config = load_tune_config(path, {}, {})
    assert config.train.lr == 1e-4
    assert (config.tune.space["lr"].low, config.tune.space["lr"].high) == (1e-5, 1e-4)


@pytest.mark.parametrize("text, message", [
    ("tune: fast\n", r"`tune:` is str, expected a mapping"),
    ("tune:\n  - trials\n", r"`tune:` is list, expected a mapping"),
    ("train: [1, 2]\n", r"`train:` is list, expected a mapping"),
    ("tune: {trials: 2, 1: x}\n", r"tune: unknown setting\(s\) 1; known"),
    ("1: x\ntune: {trials: 2}\n", r"unknown section\(s\) 1; expected train: and tune:"),
])
def test_a_tune_config_whose_sections_are_not_settings_is_named(tmp_path, text, message):
    from rayexit.tune.space import load_tune_config

    with pytest.raises(RayexitError, match=message):
        load_tune_config(write(tmp_path, text), {}, {})


@pytest.mark.parametrize("text", ["train:\n  lr: 1e-4\ntune:\n  trials: 4\n", "lr: 1e-4\ntune:\n  trials: 4\n"])
def test_train_refuses_a_tune_section_instead_of_ignoring_it(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(RayexitError, match=r"has a `tune:` section, which only `rayexit tune --config .*` reads"):
        train_settings(path, {})


def test_train_refuses_unknown_sections(tmp_path):
    with pytest.raises(RayexitError, match=r"unknown section\(s\) serve; expected `train:`"):
        train_settings(write(tmp_path, "train:\n  lr: 1e-4\nserve:\n  port: 1\n"), {})


def test_cli_train_with_a_tune_config_is_one_line_exit_2(tmp_path, capsys):
    path = write(tmp_path, "train:\n  epochs: 1\ntune:\n  trials: 2\n")
    (tmp_path / "t.tsv").write_text("sentence\tlabel\nyes\t1\nno\t0\n")
    args = ["train", "--model", "minilm", "--train", str(tmp_path / "t.tsv"), "--output", str(tmp_path / "o")]
    assert main(args + ["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: has a `tune:` section") and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content, message",
    [(b"train:\n  lr: \x00\x01\n", "binary data"), (b"train:\n  lr: caf\xe9\n", "not UTF-8 text"),
     (b"[" * 50_000 + b"]" * 50_000, "YAML nested too deeply"), (b"train: [1\n", "not valid YAML")],
)
def test_unreadable_yaml_is_one_line(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(RayexitError, match=message) as info:
        load_yaml(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_packaged_configs_still_load():
    assert train_settings(CONFIGS / "demo.yaml", {}).lr == 1e-4
    assert train_settings(CONFIGS / "romebert-bert-base.yaml", {}).lr == 2e-5
