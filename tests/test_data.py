import pytest

from rayexit.data import encode_examples, iterate_batches, load_text_classification
from rayexit.data.encode import EncodedSet
from rayexit.errors import RayexitError


def test_reads_shared_sst2_dev(datasets_dir):
    examples = load_text_classification(str(datasets_dir / "sst2" / "dev.tsv"))
    assert len(examples) == 872
    assert set(examples.labels) == {"0", "1"}
    assert examples.lines[0] == 2  # line numbers count the header


def test_reads_tsv_csv_and_jsonl(tmp_path):
    (tmp_path / "a.tsv").write_text('sentence\tlabel\nit "works" well\t1\nnot at all\t0\n')
    (tmp_path / "a.csv").write_text("text,label\nhello,pos\n")
    (tmp_path / "a.jsonl").write_text('{"text": "hi", "label": "x"}\n\n{"text": "yo", "label": "y"}\n')
    assert load_text_classification(str(tmp_path / "a.tsv")).texts[0] == 'it "works" well'
    assert load_text_classification(str(tmp_path / "a.csv")).labels == ["pos"]
    assert load_text_classification(str(tmp_path / "a.jsonl")).labels == ["x", "y"]


def test_packaged_atis_intents():
    examples = load_text_classification("atis")
    assert len(examples) == 4978
    assert examples.labels[0] == "atis_flight"
    assert examples.texts[0].startswith("i want to fly from baltimore")


@pytest.mark.parametrize(
    "content,message",
    [
        ("sentence\tnope\nhi\t1\n", "missing a `label` column; found columns: sentence, nope"),
        ("words\tlabel\nhi\t1\n", "missing a text column"),
        ("", "empty file"),
        ("sentence\tlabel\n", "no examples"),
        ("sentence\tlabel\nfine\t1\n\t0\n", "line 3: empty `sentence`"),
    ],
)
def test_bad_files_name_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(RayexitError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_text_classification(str(path))
    assert str(path) in str(info.value)


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": 1}\n{"text": oops}\n')
    with pytest.raises(RayexitError, match=r"bad.jsonl:2: not valid JSON"):
        load_text_classification(str(path))


def test_label_outside_the_model_label_set_names_the_line(tmp_path, minilm_tokenizer):
    path = tmp_path / "eval.tsv"
    path.write_text("sentence\tlabel\ngood\t1\nodd\t7\n")
    examples = load_text_classification(str(path))
    with pytest.raises(RayexitError, match=r"line 3: label '7' is not in the model's label set"):
        encode_examples(minilm_tokenizer, examples, ["0", "1"], 32)


def test_missing_source_says_what_is_accepted():
    with pytest.raises(RayexitError, match="no such file"):
        load_text_classification("no-such-file.tsv")


def test_sharded_batches_cover_each_global_batch_once():
    data = EncodedSet([[i, i] for i in range(20)], list(range(20)), 0)
    whole = [b[2].tolist() for b in iterate_batches(data, 4, shuffle_seed=3)]
    rank0 = [b[2].tolist() for b in iterate_batches(data, 2, shuffle_seed=3, rank=0, world_size=2)]
    rank1 = [b[2].tolist() for b in iterate_batches(data, 2, shuffle_seed=3, rank=1, world_size=2)]
    assert [a + b for a, b in zip(rank0, rank1)] == whole
