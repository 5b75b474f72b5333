"""`rayexit train` and `rayexit eval` end to end on a tiny encoder folder and a small SST-2 slice."""

import json

import pytest
from conftest import tiny_backbone

from rayexit.cli import main


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, minilm_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-encoder")
    tiny_backbone(layers=3).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sst2_slice(tmp_path_factory, datasets_dir):
    folder = tmp_path_factory.mktemp("data")
    lines = (datasets_dir / "sst2" / "dev.tsv").read_text().splitlines()
    (folder / "train.tsv").write_text("\n".join(lines[:97]) + "\n")
    (folder / "eval.tsv").write_text("\n".join([lines[0]] + lines[97:161]) + "\n")
    (folder / "valid.tsv").write_text("\n".join([lines[0]] + lines[161:241]) + "\n")
    return folder


def oracle_layer_speedup(model_dir, data) -> float:
    """Layers over the mean of each example's earliest layer whose answer is already the final one."""
    import torch

    from rayexit.data import encode_examples, load_text_classification
    from rayexit.data.encode import iterate_batches
    from rayexit.models import MultiExitForSequenceClassification, load_tokenizer

    model = MultiExitForSequenceClassification.from_pretrained(model_dir)
    examples = load_text_classification(str(data))
    encoded = encode_examples(load_tokenizer(model_dir), examples, model.labels, model.exit_config.max_length)
    earliest = []
    with torch.no_grad():
        for ids, mask, _ in iterate_batches(encoded, 16):
            answers = torch.stack([z.argmax(-1) for z in model(ids, mask)], 1).tolist()
            earliest += [next(i for i, a in enumerate(row) if a == row[-1]) + 1 for row in answers]
    return model.num_layers * len(earliest) / sum(earliest)


def test_train_then_eval_writes_the_report(tmp_path, encoder_dir, sst2_slice, capsys):
    model_dir = tmp_path / "model"
    code = main(
        [
            "train",
            "--model",
            str(encoder_dir),
            "--train",
            str(sst2_slice / "train.tsv"),
            "--eval",
            str(sst2_slice / "eval.tsv"),
            "--method",
            "romebert",
            "--epochs",
            "1",
            "--output",
            str(model_dir),
            "--batch-size",
            "16",
            "--max-length",
            "32",
        ]
    )
    assert code == 0
    assert json.loads((model_dir / "rayexit.json").read_text())["labels"] == ["0", "1"]
    code = main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--data",
            str(sst2_slice / "eval.tsv"),
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
            "--batch-size",
            "8",
            "--repeats",
            "2",
            "--select-on",
            str(sst2_slice / "valid.tsv"),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["exit_accuracy"]) == 3
    assert report["full"] == report["exit_accuracy"][-1]
    assert all(0.0 <= a <= 1.0 for a in report["exit_accuracy"])
    point = report["curve"][0]
    assert set(point) >= {"policy", "accuracy", "layer_speedup", "flops_speedup"}
    assert {p["policy"]["kind"] for p in report["curve"]} == {"entropy", "maxprob", "patience"}
    assert report["oracle_layer_speedup"] == pytest.approx(oracle_layer_speedup(model_dir, sst2_slice / "eval.tsv"))
    assert report["saved"]["policy"] == {"kind": "entropy", "thresholds": 0.1}
    selected = report["selected"]
    assert selected["how"] == "chosen on validation" and selected["validation"]["examples"] == 80
    # the validation figures are what chose it; the reported ones are measured on --data
    assert selected["validation"]["drop_bound"] <= 0.01 or selected["policy"]["kind"] == "none"
    assert selected["gap"] == pytest.approx(report["full"] - selected["accuracy"] - selected["validation"]["drop"])
    low, high = selected["wallclock_spread"]
    assert low <= selected["wallclock_speedup"] <= high
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_clear_line_and_leaves_nothing(tmp_path, encoder_dir, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tscore\nhello\t1\n")
    out = tmp_path / "never"
    code = main(["train", "--model", str(encoder_dir), "--train", str(bad), "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.tsv" in err and "label" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_an_output_that_cannot_take_a_model_is_refused_before_anything_loads(tmp_path, capsys, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("notes I keep\n")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("notes I keep\n")
    # the training file does not exist: the output is what is refused, so it was checked first
    code = main(["train", "--model", "minilm", "--train", str(tmp_path / "absent.tsv"), "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(out) in err and ("is a file" if kind == "file" else "not a rayexit model directory") in err
    assert "absent.tsv" not in err
    kept = out if kind == "file" else out / "notes.txt"
    assert kept.read_text() == "notes I keep\n"  # nothing renamed aside or replaced


@pytest.mark.parametrize("flag, value, named", [
    ("--batch-size", "0", "--batch-size: got 0"), ("--max-drop", "nan", "--max-drop: got nan"),
    ("--max-drop", "-1", "--max-drop: got -1.0"), ("--min-speedup", "nan", "--min-speedup: got nan"),
    ("--time-front", "-1", "--time-front: got -1"), ("--json", "FOLDER", "is a folder"),
])
def test_eval_flags_are_checked_before_the_model_loads(tmp_path, capsys, flag, value, named):
    options = {"--model": str(tmp_path / "no-model"), "--data": "x.tsv", "--json": str(tmp_path / "r.json"),
               flag: str(tmp_path) if value == "FOLDER" else value}
    code = main(["eval", *[x for pair in options.items() for x in pair]])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "no-model" not in err  # the flag, not the (missing) model


def test_a_json_written_over_a_folder_is_a_clear_error(tmp_path):
    from rayexit.errors import RayexitError
    from rayexit.files import write_json

    (tmp_path / "report").mkdir()
    with pytest.raises(RayexitError, match="report: is a folder"):
        write_json(tmp_path / "report", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary file left beside it


def test_eval_on_a_folder_that_is_not_a_model(tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path), "--data", "x.tsv", "--json", str(tmp_path / "r.json")])
    assert code == 2
    assert "not a rayexit model directory" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_unknown_config_setting_is_refused(tmp_path, encoder_dir, sst2_slice, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  gama: 0.5\n")
    code = main(
        [
            "train",
            "--model",
            str(encoder_dir),
            "--train",
            str(sst2_slice / "train.tsv"),
            "--output",
            str(tmp_path / "m"),
            "--config",
            str(config),
        ]
    )
    assert code == 2
    assert "unknown setting(s) gama" in capsys.readouterr().err


def test_tune_refuses_a_max_examples_below_one_before_ray_starts(tmp_path, capsys):
    code = main(["tune", "--model", "minilm", "--train", "x.tsv", "--eval", "y.tsv", "--output", str(tmp_path / "t"),
                 "--max-examples", "0"])
    assert code == 2 and "--max-examples: got 0" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
