"""One `seed` fixes a run: exit heads, dropout, data order and the validation split.

The same `rayexit train` command run in two separate processes must write bit-identical
weights, and so must two Ray Train runs with 2 workers; another seed must give other weights
(otherwise the comparison proves nothing). Dropout stays at its default (0.1) so that its
seeding is exercised too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_backbone
from safetensors.torch import load_file

from rayexit.config import TrainSettings
from rayexit.data.sources import TextExamples

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["good", "bad", "fine", "awful", "great", "poor", "film", "plot", "actor", "scene", "very", "not"]


# -- entry points (re-point these after a restructure) -------------------------------------


def train_command(encoder: Path, data: Path, output: Path, seed: int) -> list[str]:
    """The CLI arguments of one short sequence-classification run."""
    return [
        "train", "--model", str(encoder), "--train", str(data), "--output", str(output), "--method", "romebert",
        "--epochs", "2", "--batch-size", "4", "--max-length", "16", "--lr", "1e-3", "--seed", str(seed),
    ]


def prepare_model(encoder: Path, data: Path, seed: int):
    """The freshly built (untrained) model of a run with this seed."""
    from rayexit.train.recipe import prepare

    return prepare(str(encoder), str(data), None, TrainSettings(seed=seed, max_length=16)).model


def prepare_tagger(encoder: Path, data: Path, seed: int):
    """The freshly built (untrained) tagger of a stage-1 token run with this seed."""
    from rayexit.train.recipe import prepare

    settings = TrainSettings(method="joint", seed=seed, max_length=16)
    return prepare(str(encoder), str(data), None, settings, task="token").model


def fit_two_workers(encoder: Path, data: Path, output: Path, storage: Path, seed: int):
    from rayexit.train.distributed import fit_distributed

    settings = TrainSettings(method="romebert", epochs=1, batch_size=4, max_length=16, lr=1e-3, seed=seed)
    return fit_distributed(
        str(encoder), str(data), None, settings, output, num_workers=2, storage_path=str(storage),
        name=output.name, show_progress=False, cpus_per_worker=0.5,
    )


def carve(examples: TextExamples, seed: int):
    from rayexit.tune.split import carve_validation

    return carve_validation(examples, 0.25, seed)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, minilm_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-encoder")
    tiny_backbone(layers=3).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


def write_data(folder: Path, count: int) -> Path:
    """`count` short two-label sentences; the label follows the first word, so there is signal."""
    generator = torch.Generator().manual_seed(0)
    lines = ["sentence\tlabel"]
    for _ in range(count):
        picks = torch.randint(0, len(WORDS), (5,), generator=generator).tolist()
        words = [WORDS[i] for i in picks]
        lines.append(f"{' '.join(words)}\t{picks[0] % 2}")
    path = folder / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between two runs with the same seed"


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [key for key in a if not torch.equal(a[key], b[key])]


# -- tests ------------------------------------------------------------------------------------


def test_exit_heads_follow_the_seed_not_the_random_state_before(encoder, tmp_path):
    data = write_data(tmp_path, 12)
    first = prepare_model(encoder, data, seed=7).heads.state_dict()
    torch.rand(1000)  # whatever ran before in this process must not matter
    again = prepare_model(encoder, data, seed=7).heads.state_dict()
    other = prepare_model(encoder, data, seed=8).heads.state_dict()
    assert_identical(first, again)
    assert differs(first, other), "another seed gave the same heads"


def test_token_exit_heads_follow_the_seed(encoder, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("Peter B-PER\nvisited O\nBrussels B-LOC\n\nHi O\n")
    first = prepare_tagger(encoder, data, seed=7).heads.state_dict()
    torch.rand(1000)
    again = prepare_tagger(encoder, data, seed=7).heads.state_dict()
    other = prepare_tagger(encoder, data, seed=8).heads.state_dict()
    assert_identical(first, again)
    assert differs(first, other), "another seed gave the same heads"


def test_same_command_in_two_processes_gives_identical_weights(encoder, tmp_path):
    data = write_data(tmp_path, 14)  # 14 / 4: the last batch is a short one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    outputs = [tmp_path / "a", tmp_path / "b"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "rayexit.cli", *train_command(encoder, data, out, seed=7)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for out in outputs
    ]
    for proc in procs:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-2000:]
    first, second = weights(outputs[0]), weights(outputs[1])
    assert_identical(first, second)

    from rayexit.cli import main

    assert main(train_command(encoder, data, tmp_path / "c", seed=8)) == 0
    changed = differs(first, weights(tmp_path / "c"))
    assert any(key.startswith("heads.") for key in changed), "another seed gave the same heads"
    assert any(key.startswith("backbone.encoder.") for key in changed)


def test_two_ray_workers_twice_give_identical_weights(ray_session, encoder, tmp_path):
    data = write_data(tmp_path, 19)  # 19 examples, global batch 8: 2 full steps, 3 examples dropped
    first = fit_two_workers(encoder, data, tmp_path / "one", tmp_path / "ray", seed=3)
    second = fit_two_workers(encoder, data, tmp_path / "two", tmp_path / "ray", seed=3)
    assert first.steps == second.steps == 2
    assert_identical(weights(tmp_path / "one"), weights(tmp_path / "two"))
    fresh = prepare_model(encoder, data, seed=3).state_dict()
    assert differs(fresh, weights(tmp_path / "one")), "training did not move the weights"


def test_validation_split_follows_the_seed():
    labels = [str(i % 3) for i in range(60)]
    examples = TextExamples([f"text {i}" for i in range(60)], labels, "toy")
    first, again, other = carve(examples, 5), carve(examples, 5), carve(examples, 6)
    assert first.validation.texts == again.validation.texts and first.fit.texts == again.fit.texts
    assert first.validation.texts != other.validation.texts
    assert sorted(first.validation.texts + first.fit.texts) == sorted(examples.texts)
