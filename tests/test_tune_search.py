"""Tuning pieces that need no Ray: threshold search on caches, Pareto fronts, spaces, split, export."""

import json
import random

import pytest
import torch
import yaml
from conftest import tiny_sequence_model

from rayexit.config import ExitPolicy
from rayexit.data import TextExamples
from rayexit.data.encode import pad_batch
from rayexit.errors import RayexitError
from rayexit.exits import ExitCache, run_early_exit
from rayexit.metrics import accuracy
from rayexit.models import MultiExitForSequenceClassification, load_tokenizer
from rayexit.tune.export import export_model, serve_config, write_serve_config
from rayexit.tune.pareto import dominates, fastest_within, pareto_front
from rayexit.tune.space import TuneSpec, load_tune_config
from rayexit.tune.split import carve_validation
from rayexit.tune.thresholds import Point, evaluate_many, evaluate_points, search_thresholds


@pytest.fixture(scope="module")
def sharp_model():
    # Scaled-up heads so that entropies spread across samples and layers (a plain random head is flat).
    model = tiny_sequence_model(layers=4, labels=["0", "1", "2"], seed=5)
    with torch.no_grad():
        for head in model.heads.exits:
            head.classifier.weight.mul_(40)
    return model


def random_batch(seed=3, size=40, vocab=30522):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (size,), generator=generator).tolist()
    sequences = [[101] + torch.randint(1000, vocab, (n - 2,), generator=generator).tolist() + [102] for n in lengths]
    labels = torch.randint(0, 3, (size,), generator=generator)
    return (*pad_batch(sequences, 0), labels)


def test_search_on_cache_equals_the_runner(sharp_model):
    ids, mask, labels = random_batch()
    cache = ExitCache(torch.stack(sharp_model(ids, mask), dim=1))
    result = search_thresholds(cache, labels, samples=600, seed=1)
    kinds = {p.policy for p in result.points}
    shapes = {isinstance(p.thresholds, list) for p in result.points}
    assert len(result.points) >= 3 and result.settings > 600
    checked = result.points + evaluate_points(cache, labels, _random_per_layer(cache, labels))
    for point in checked:
        ran = run_early_exit(sharp_model, ids, mask, point.to_policy())
        assert accuracy(ran.predictions, labels) == pytest.approx(point.accuracy, abs=1e-12)
        assert ran.layer_speedup(sharp_model.num_layers) == pytest.approx(point.layer_speedup, rel=1e-9)
    speedups = {round(p.layer_speedup, 6) for p in checked}
    assert len(speedups) > 3, f"test needs points that exit at different depths (policies {kinds}, {shapes})"


def _random_per_layer(cache, labels):
    rng = random.Random(0)
    points = []
    for _ in range(10):
        points.append(Point("entropy", [rng.uniform(0, 1.1) for _ in range(cache.num_layers - 1)], 0, 0))
        points.append(Point("maxprob", [rng.uniform(0.34, 1) for _ in range(cache.num_layers - 1)], 0, 0))
    return points


def test_many_settings_at_once_equal_one_at_a_time():
    generator = torch.Generator().manual_seed(0)
    cache = ExitCache(torch.randn(300, 6, 2, generator=generator) * 3)
    labels = torch.randint(0, 2, (300,), generator=generator)
    grid = torch.rand(700, 6, generator=generator) * 0.7
    grid[:, :2] = grid[:, :2] + 0.3
    acc, exit_layer = evaluate_many(cache, labels, "entropy", grid)
    for row in (0, 1, 99, 511, 512, 699):  # 512: the second chunk
        replay = cache.simulate(ExitPolicy("entropy", grid[row].tolist()))
        assert acc[row].item() == pytest.approx(accuracy(replay.predictions, labels), abs=1e-12)
        assert exit_layer[row].item() == pytest.approx(replay.exit_layers.double().mean().item(), abs=1e-12)
    maxprob = torch.full((1, 6), 0.9)
    acc, exit_layer = evaluate_many(cache, labels, "maxprob", maxprob)
    replay = cache.simulate(ExitPolicy("maxprob", 0.9))
    assert exit_layer.item() == pytest.approx(replay.exit_layers.double().mean().item())


def test_search_rate_is_over_a_thousand_settings_a_second():
    generator = torch.Generator().manual_seed(1)
    cache = ExitCache(torch.randn(2000, 6, 2, generator=generator))
    labels = torch.randint(0, 2, (2000,), generator=generator)
    result = search_thresholds(cache, labels, samples=3000)
    assert result.settings >= 3000
    assert result.settings_per_second >= 1000, result.settings_per_second


def test_pareto_front_has_no_dominated_point():
    rng = random.Random(4)
    points = [(round(rng.random(), 2), round(rng.uniform(1, 4), 1)) for _ in range(400)]
    points += points[:20]  # exact duplicates
    front = pareto_front(points, key=lambda p: p)
    assert 2 < len(front) < 60
    for p in front:
        assert not any(dominates(q, p) for q in points)
    assert len(set(front)) == len(front)
    for p in points:  # everything left out is dominated by, or equal to, a point on the front
        assert p in front or any(dominates(f, p) or f == p for f in front)
    speeds = [p[1] for p in front]
    assert speeds == sorted(speeds, reverse=True)


def test_fastest_within_budget():
    points = [(0.90, 1.0), (0.895, 1.5), (0.889, 2.5), (0.80, 4.0)]
    key = lambda p: p  # noqa: E731
    assert fastest_within(points, key, reference=0.90, max_drop=0.01) == (0.895, 1.5)
    assert fastest_within(points, key, reference=0.90, max_drop=0.011) == (0.889, 2.5)
    assert fastest_within(points, key, reference=0.99, max_drop=0.0) is None


@pytest.mark.parametrize(
    ("tune", "named"),
    [
        ({"space": {"gamma": [0.9, 0.5]}}, "tune.space.gamma"),
        ({"space": {"temprature": [1, 3]}}, "tune.space.temprature"),
        ({"space": {"gamma": [0.5, 1.5]}}, "tune.space.gamma"),
        ({"space": {"lr": {"low": 1e-5}}}, "tune.space.lr"),
        ({"max_drop": -0.01}, "tune.max_drop"),
        ({"scheduler": "asha", "objective": "pareto"}, "tune.scheduler"),
        ({"policies": ["entropy", "always"]}, "tune.policies"),
        ({"trials": 0}, "tune.trials"),
        ({"budget": 3}, "budget"),
    ],
)
def test_bad_search_spaces_are_refused_naming_the_setting(tmp_path, tune, named):
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 1}, "tune": tune}))
    with pytest.raises(RayexitError, match=named.replace(".", r"\.")) as caught:
        load_tune_config(path, {}, {})
    assert str(path) in str(caught.value)


def test_unknown_training_setting_is_refused(tmp_path):
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({"train": {"gama": 0.5}}))
    with pytest.raises(RayexitError, match="gama"):
        load_tune_config(path, {}, {})


def test_space_forms_and_defaults():
    spec = TuneSpec(space={"gamma": 0.9, "temperature": {"low": 1, "high": 10, "log": True}, "lr": [1e-5, 1e-3]})
    assert spec.fixed() == {"gamma": 0.9}
    assert set(spec.searched()) == {"temperature", "lr"}
    assert spec.space["lr"].log  # two decades: sampled on a log scale
    config = load_tune_config(None, {"lr": 5e-5}, {"space": {"gamma": [0.5, 1.0], "lr": [1e-5, 1e-4]}})
    assert config.default_point() == {"gamma": 0.9, "lr": 5e-5}
    assert config.trial_settings({"gamma": 0.6, "lr": 2e-5}).gamma == 0.6


def test_validation_split_is_deterministic_and_stratified():
    rng = random.Random(0)
    labels = [rng.choice("abc") for _ in range(200)]
    examples = TextExamples([f"text {i}" for i in range(200)], labels, "x.tsv", list(range(2, 202)))
    first = carve_validation(examples, 0.1, seed=3)
    again = carve_validation(examples, 0.1, seed=3)
    other = carve_validation(examples, 0.1, seed=4)
    assert first.validation.texts == again.validation.texts and first.digest == again.digest
    assert first.digest != other.digest
    assert len(first.validation) + len(first.fit) == 200
    assert not set(first.validation.texts) & set(first.fit.texts)
    assert set(first.validation.labels) == {"a", "b", "c"}
    assert 17 <= len(first.validation) <= 23
    assert "fraction=0.1" in first.name and "seed=3" in first.name


def test_exported_best_loads_and_predicts_with_the_chosen_thresholds(tmp_path, sharp_model):
    source = tmp_path / "trial-model"
    sharp_model.save_pretrained(source, load_tokenizer("minilm"))
    (source / "trial_points.json").write_text("{}")
    ids, mask, labels = random_batch(seed=8)
    cache = ExitCache(torch.stack(sharp_model(ids, mask), dim=1))
    point = next(p for p in search_thresholds(cache, labels, kinds=["entropy"], samples=300).points
                 if isinstance(p.thresholds, list) and 1.0 < p.layer_speedup < sharp_model.num_layers)
    best = export_model(source, tmp_path / "best", point.to_policy(), {"why": "test"})
    assert not (best / "trial_points.json").exists()
    loaded = MultiExitForSequenceClassification.from_pretrained(best)
    assert loaded.exit_config.policy.kind == "entropy"
    assert loaded.exit_config.policy.thresholds == point.thresholds
    assert loaded.exit_config.extra["policy_choice"] == {"why": "test"}
    ran = run_early_exit(loaded, ids, mask, loaded.exit_config.policy)
    assert accuracy(ran.predictions, labels) == pytest.approx(point.accuracy, abs=1e-12)
    assert ran.layer_speedup(loaded.num_layers) == pytest.approx(point.layer_speedup)
    config_path = write_serve_config(best, tmp_path / "serve.yaml")
    written = yaml.safe_load(config_path.read_text())
    assert written == serve_config(best)
    app = written["applications"][0]
    assert app["import_path"] == "rayexit.serve.app:build_app"
    assert json.loads((tmp_path / "best" / "rayexit.json").read_text())["policy"]["kind"] == "entropy"
    assert app["args"]["model_dir"] == str(best.resolve())


def test_rayexit_tune_names_a_bad_train_file_before_ray_starts(tmp_path, monkeypatch, capsys):
    import rayexit.tune.experiment as experiment
    from rayexit.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the data was checked")

    monkeypatch.setattr(experiment, "connect", no_ray)
    missing = tmp_path / "missing.tsv"
    argv = ["tune", "--model", "minilm", "--train", str(missing), "--eval", "atis:test",
            "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "missing.tsv" in capsys.readouterr().err
    assert not (tmp_path / "o" / "job.json").exists()


def test_exit_grad_scale_can_be_searched_within_zero_one():
    config = load_tune_config(None, {}, {"space": {"exit_grad_scale": [0.1, 1.0]}})
    assert config.default_point() == {"exit_grad_scale": 0.3}  # the default trial runs today's default
    assert config.trial_settings({"exit_grad_scale": 0.7}).exit_grad_scale == 0.7
    with pytest.raises(RayexitError, match=r"tune\.space\.exit_grad_scale"):
        load_tune_config(None, {}, {"space": {"exit_grad_scale": [0.5, 1.5]}})
