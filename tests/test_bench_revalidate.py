"""`rayexit bench revalidate`: the disjoint validation set, and every choice of a finished
`bench exit` made again on it with the saved models (tiny random models, a made-up SST-2 folder)."""

import json

import pytest
from conftest import tiny_sequence_model

from rayexit.bench.disjoint import disjoint_validation
from rayexit.bench.revalidate import ordered_keys
from rayexit.cli import main
from rayexit.data import TextExamples
from rayexit.errors import RayexitError
from rayexit.tasks import task_named

SLICE = [
    "the film is a charming and often affecting journey",
    "a gorgeous , witty , seductive movie",
    "dull",
]
AFTER = [
    "it is a charming and often affecting journey for everyone",  # shares 5 words with the slice
    "too short here",  # under 8 words
    "an utterly forgettable piece of work from start to finish",  # kept
    "a gorgeous , witty",  # inside a slice line, and short
    "the acting never rises above the level of a television drama",  # kept
]


def examples(texts, labels=None):
    labels = labels or [str(i % 2) for i in range(len(texts))]
    return TextExamples(list(texts), labels, "made-up", list(range(2, len(texts) + 2)))


def test_disjoint_validation_keeps_long_lines_after_the_slice_sharing_no_five_words_with_it():
    chosen = disjoint_validation(examples(SLICE + AFTER), len(SLICE))
    assert chosen.texts == [AFTER[2], AFTER[4]]
    assert chosen.lines == [2 + len(SLICE) + 2, 2 + len(SLICE) + 4]  # file lines, for error messages
    assert chosen.labels == [str((len(SLICE) + 2) % 2), str((len(SLICE) + 4) % 2)]
    # it shares 7 words in a row with the slice's first line, not 8
    assert AFTER[0] in disjoint_validation(examples(SLICE + AFTER), len(SLICE), ngram=8, min_words=8).texts
    assert AFTER[0] not in disjoint_validation(examples(SLICE + AFTER), len(SLICE), ngram=7, min_words=8).texts


def test_disjoint_validation_refuses_what_cannot_be_built():
    with pytest.raises(RayexitError, match="none after a slice"):
        disjoint_validation(examples(SLICE), len(SLICE))
    with pytest.raises(RayexitError, match="no line after the first 3"):
        disjoint_validation(examples(SLICE + [AFTER[0], AFTER[1]]), len(SLICE))
    with pytest.raises(RayexitError, match="--min-words"):
        disjoint_validation(examples(SLICE + AFTER), len(SLICE), min_words=3, ngram=5)


def test_each_seeds_fine_tune_is_re_chosen_first():
    keys = ["deebert/seed1", "finetune/seed2", "romebert/seed1", "finetune/seed1", "pabee/seed2"]
    assert ordered_keys(dict.fromkeys(keys)) == [
        "finetune/seed1", "deebert/seed1", "romebert/seed1", "finetune/seed2", "pabee/seed2"]


WORDS = "good bad fine awful great dull bright grim warm cold sharp flat".split()


def sentence(i: int, length: int) -> str:
    return " ".join(WORDS[(i * 7 + k * (i % 5 + 1)) % len(WORDS)] + str((i + k) % 3) for k in range(length))


@pytest.fixture
def finished_bench(tmp_path, minilm_tokenizer):
    """A `bench exit` JSON of two runs and the --work folder of their models, on made-up SST-2 lines."""
    sst2 = tmp_path / "datasets" / "sst2"
    sst2.mkdir(parents=True)
    train = [sentence(i, 3 if i < 30 else 9) for i in range(60)]  # a 30-line slice of short lines, then long ones
    (sst2 / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(train)))
    (sst2 / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{sentence(i + 100, 6)}\t{i % 2}\n"
                                                                for i in range(24)))
    task = task_named("sequence")
    dev = task.load(str(sst2 / "dev.tsv"))
    runs = {}
    for method, seed in (("finetune", 0), ("deebert", 1)):
        model = tiny_sequence_model(layers=3, pooling="mean", seed=seed)
        model.save_pretrained(tmp_path / "work" / "seed1" / method, minilm_tokenizer)
        full = task.replay(model, task.encode(minilm_tokenizer, dev, model.labels, 128), 32).exit_scores()[-1]
        runs[f"{method}/seed1"] = {"full": full, "validation_full": 0.9}
        if method == "finetune":
            runs[f"{method}/seed1"]["single_exit"] = True
        else:
            for point in ("at_1.5x", "at_2x", "at_3x", "within_reference"):
                runs[f"{method}/seed1"][point] = {"accuracy": 0.5, "layer_speedup": 2.0}
    bench = {"benchmark": "exit", "train_slice": "SST-2 train.tsv, first 30 examples", "max_drop": 0.01,
             "test_set": "dev", "runs": runs}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    return tmp_path, path, bench


def revalidate(tmp_path, bench_path, out, *extra):
    return main(["bench", "revalidate", "--json", str(bench_path), "--work", str(tmp_path / "work"),
                 "--out", str(out), "--datasets", str(tmp_path / "datasets"), *extra])


def test_revalidate_re_chooses_every_point_on_the_disjoint_lines_and_resumes(finished_bench, capsys):
    tmp_path, bench_path, bench = finished_bench
    out = tmp_path / "out.json"
    assert revalidate(tmp_path, bench_path, out) == 0
    figures = json.loads(out.read_text())
    assert figures["validation_examples"] == 30  # the 30 long lines after the slice share no 5 words with it
    fine, dee = figures["runs"]["finetune/seed1"], figures["runs"]["deebert/seed1"]
    assert fine["full"] == bench["runs"]["finetune/seed1"]["full"] and fine["as_benchmarked_validation_full"] == 0.9
    for point in ("at_1.5x", "at_2x", "at_3x", "within_reference"):
        assert dee[point]["validation"]["examples"] == 30  # chosen on the disjoint lines
        assert dee["as_benchmarked"][point] == {"accuracy": 0.5, "layer_speedup": 2.0}
    # the "within 1 point" bar is the fine-tune's score on the same disjoint lines
    assert dee["within_reference"]["validation"]["full"] == fine["validation_full"]
    assert set(figures["summary"]) == {"finetune", "deebert"}
    within = dee["within_reference"]
    assert within["oracle_fraction"] == pytest.approx(within["layer_speedup"] / dee["oracle_layer_speedup"])
    row = figures["summary"]["deebert"]["within_reference"]
    assert row["oracle_fraction"] == pytest.approx(within["oracle_fraction"])  # one seed: its own
    printed = capsys.readouterr().out
    assert "| deebert | 1 |" in printed and f"| {100 * within['oracle_fraction']:.0f}% |" in printed
    assert revalidate(tmp_path, bench_path, out) == 0
    assert "deebert/seed1: already re-chosen, skipped" in capsys.readouterr().out
    assert "wallclock_speedup" not in dee["at_2x"] or dee["at_2x"]["wallclock_speedup"] is None
    # timed: every chosen point gets a wall-clock speed-up; an untimed file is not resumed timed
    assert revalidate(tmp_path, bench_path, out, "--repeats", "1") != 0
    assert "was written with repeats 0" in capsys.readouterr().err
    assert revalidate(tmp_path, bench_path, tmp_path / "timed.json", "--repeats", "1") == 0
    timed = json.loads((tmp_path / "timed.json").read_text())["runs"]["deebert/seed1"]
    assert all(timed[p]["wallclock_speedup"] > 0 for p in ("at_1.5x", "at_2x", "at_3x", "within_reference"))
    assert timed["full_depth_seconds"] > 0


def test_revalidate_refuses_models_that_are_not_the_jsons(finished_bench, capsys):
    tmp_path, bench_path, bench = finished_bench
    bench["runs"]["deebert/seed1"]["full"] += 0.25
    bench_path.write_text(json.dumps(bench))
    assert revalidate(tmp_path, bench_path, tmp_path / "out.json") != 0
    assert "is --work the folder this JSON was made with" in capsys.readouterr().err
    bench["runs"]["deebert/seed1"]["full"] -= 0.25
    bench["runs"]["pabee/seed1"] = dict(bench["runs"]["deebert/seed1"])
    bench_path.write_text(json.dumps(bench))
    assert revalidate(tmp_path, bench_path, tmp_path / "other.json") != 0
    assert "seed1/pabee: no model folder for pabee/seed1" in capsys.readouterr().err
    # what was re-chosen before the failure is kept, and a rerun resumes from it
    assert set(json.loads((tmp_path / "other.json").read_text())["runs"]) == {"finetune/seed1", "deebert/seed1"}
    # a seed with no run of the wanted methods needs no fine-tune model (seed 2 has none here)
    bench["runs"]["finetune/seed2"] = dict(bench["runs"]["finetune/seed1"])
    bench_path.write_text(json.dumps(bench))
    assert revalidate(tmp_path, bench_path, tmp_path / "only.json", "--methods", "deebert") == 0
    assert set(json.loads((tmp_path / "only.json").read_text())["runs"]) == {"finetune/seed1", "deebert/seed1"}
    assert revalidate(tmp_path, bench_path, tmp_path / "third.json", "--methods", "romebrt") != 0
    assert "--methods: got 'romebrt', expected some of deebert, finetune, pabee" in capsys.readouterr().err
    assert revalidate(tmp_path, tmp_path / "missing.json", tmp_path / "third.json") != 0
    assert "cannot read it as a `rayexit bench exit` JSON" in capsys.readouterr().err


def test_revalidate_on_the_carved_split_re_draws_it_and_needs_no_fine_tune_model(finished_bench, capsys):
    import shutil

    tmp_path, bench_path, bench = finished_bench
    out = tmp_path / "carved.json"
    # a JSON from a --choose-on disjoint benchmark has no carved split to re-draw
    bench["validation"] = "3343 train.tsv lines after the slice with 8+ words sharing no 5-word run with it"
    bench_path.write_text(json.dumps(bench))
    assert revalidate(tmp_path, bench_path, out, "--choose-on", "carved") != 0
    assert "not a carved split" in capsys.readouterr().err
    bench["validation"] = "0.2 of the train slice, stratified by label, seeded by the run's seed"
    bench_path.write_text(json.dumps(bench))
    shutil.rmtree(tmp_path / "work" / "seed1" / "finetune")  # its figures come from the JSON
    assert revalidate(tmp_path, bench_path, out, "--choose-on", "carved") == 0
    figures = json.loads(out.read_text())
    task = task_named("sequence")
    slice_ = task.load(str(tmp_path / "datasets" / "sst2" / "train.tsv"), 30)
    carved = task.split(slice_, 0.2, 1)[1]  # what `bench exit` carved for seed 1
    assert figures["choose_on"] == "carved" and figures["validation_examples"] == len(carved)
    dee = figures["runs"]["deebert/seed1"]
    assert all(dee[p]["validation"]["examples"] == len(carved) for p in ("at_1.5x", "at_2x", "within_reference"))
    assert dee["within_reference"]["validation"]["full"] == 0.9  # the fine-tune's bar, as the JSON has it
    assert figures["runs"]["finetune/seed1"]["validation_full"] == 0.9
    assert "validation full: carved, re-chosen / as benchmarked" in capsys.readouterr().out
    # a file re-chosen on one validation is not resumed on the other
    assert revalidate(tmp_path, bench_path, out) != 0
    assert "was written with choose_on 'carved'" in capsys.readouterr().err


def test_revalidate_reports_carved_choices_on_the_disjoint_lines_as_a_second_test_set(finished_bench, capsys):
    from rayexit.model_dir import ModelDir
    from rayexit.policy import FULL_DEPTH

    tmp_path, bench_path, bench = finished_bench
    out = tmp_path / "second.json"
    # choosing and reporting on the same lines is refused before anything is loaded
    assert revalidate(tmp_path, bench_path, out, "--report-on", "disjoint") != 0
    assert "pass --choose-on carved" in capsys.readouterr().err and not out.exists()
    task = task_named("sequence")
    sst2 = tmp_path / "datasets" / "sst2"
    carved = task.split(task.load(str(sst2 / "train.tsv"), 30), 0.2, 1)[1]
    disjoint = disjoint_validation(task.load(str(sst2 / "train.tsv")), 30)
    scores = {}
    for method in ("finetune", "deebert"):
        folder = ModelDir(tmp_path / "work" / "seed1" / method)
        model, tokenizer = folder.load_model(expected_task="sequence"), folder.load_tokenizer()
        length = model.exit_config.max_length
        scores[method] = [task.replay(model, task.encode(tokenizer, data, model.labels, length), 32)
                          for data in (carved, disjoint)]
        bench["runs"][f"{method}/seed1"]["validation_full"] = scores[method][0].outcome(FULL_DEPTH).score
    bench["validation"] = "0.2 of the train slice, stratified by label, seeded by the run's seed"
    bench_path.write_text(json.dumps(bench))
    assert revalidate(tmp_path, bench_path, out, "--choose-on", "carved", "--report-on", "disjoint") == 0
    figures = json.loads(out.read_text())
    assert figures["report_on"] == "disjoint" and figures["test_examples"] == len(disjoint) == 30
    assert "nothing is chosen on it" in figures["test_set"]
    fine, dee = figures["runs"]["finetune/seed1"], figures["runs"]["deebert/seed1"]
    # the fine-tune is measured on the second test set too; every full-depth figure is the disjoint lines'
    assert fine["full"] == scores["finetune"][1].exit_scores()[-1]
    assert dee["full"] == scores["deebert"][1].exit_scores()[-1]
    assert dee["dev_full"] == bench["runs"]["deebert/seed1"]["full"]
    for point in ("at_1.5x", "at_2x", "within_reference"):
        assert dee[point]["validation"]["examples"] == len(carved)  # chosen where the benchmark chose
    assert dee["within_reference"]["validation"]["full"] == bench["runs"]["finetune/seed1"]["validation_full"]
    printed = capsys.readouterr().out
    assert "deebert/seed1: disjoint full" in printed and "(dev, as benchmarked:" in printed
    assert "| method | seeds | disjoint lines full |" in printed
    # a model that is not the JSON's is caught on the carved split, where both scored it
    bench["runs"]["deebert/seed1"]["validation_full"] += 0.25
    bench_path.write_text(json.dumps(bench))
    assert revalidate(tmp_path, bench_path, tmp_path / "other.json", "--choose-on", "carved",
                      "--report-on", "disjoint") != 0
    assert "carved-split accuracy" in capsys.readouterr().err
    # a file reported on dev is not resumed on the disjoint lines
    assert revalidate(tmp_path, bench_path, tmp_path / "carved.json", "--choose-on", "carved") == 0
    capsys.readouterr()
    assert revalidate(tmp_path, bench_path, tmp_path / "carved.json", "--choose-on", "carved",
                      "--report-on", "disjoint") != 0
    assert "was written with report_on 'dev'" in capsys.readouterr().err
