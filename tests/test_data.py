import json
import random
import tracemalloc

import pytest

from rayexit.data import encode_examples, iterate_batches, load_text_classification
from rayexit.data.encode import EncodedSet
from rayexit.errors import RayexitError
from rayexit.reading import FILE_LIMIT_ENV, LINE_LIMIT_ENV


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
        # a space typed for the tab: the short first row named at its line, not "missing a `label` column"
        ("sentence\tlabel\nhello there 1\nfine\t0\n", "line 2: empty `label`"),
        ("sentence\tlabel\tlabel\nhi\t1\t0\n", "bad.tsv:1: the header names label more than once"),
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


# -- damaged and oversized files: one line naming the file, memory bounded -----------------------

RANDOM = random.Random(0).randbytes(4096)


def one_line_error(source: str) -> str:
    with pytest.raises(RayexitError) as info:
        load_text_classification(source)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".json", ".jsonl"])
def test_binary_files_are_refused_with_one_line(tmp_path, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(RANDOM)
    assert b"\x00" in RANDOM
    message = one_line_error(str(path))
    assert message.startswith(f"{path}:1: ") and ("binary data" in message or "not UTF-8 text" in message)
    assert "expected" in message


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_text_that_is_not_utf8_names_the_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    header = {".tsv": b"sentence\tlabel\n", ".csv": b"sentence,label\n", ".jsonl": b'{"text": "ok", "label": 1}\n'}
    path.write_bytes(header[suffix] + b'caf\xe9 au lait\t1\n')
    assert f"{path}:2: not UTF-8 text" in one_line_error(str(path))


def test_random_bytes_named_parquet_are_refused(tmp_path):
    path = tmp_path / "random.parquet"
    path.write_bytes(RANDOM)
    message = one_line_error(str(path))
    assert message.startswith(f"{path}: not a readable Parquet file")


def test_parquet_still_reads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b", "c d"], "label": [0, 1]}), tmp_path / "ok.parquet")
    examples = load_text_classification(str(tmp_path / "ok.parquet"))
    assert examples.texts == ["a b", "c d"] and examples.labels == ["0", "1"]


@pytest.mark.parametrize("dictionary, how", [(False, "once decompressed"), (True, "once decoded")])
def test_parquet_that_inflates_past_the_limit_is_refused(tmp_path, monkeypatch, dictionary, how):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "big.parquet"
    table = pa.table({"text": ["same words " * 50] * 4000, "label": [0] * 4000})
    pq.write_table(table, path, use_dictionary=dictionary, compression="zstd")
    monkeypatch.setenv(FILE_LIMIT_ENV, str(path.stat().st_size * 20))  # the file fits; its contents do not
    assert how in one_line_error(str(path))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_nested_100k_deep_is_refused(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    deep = "[" * 100_000 + "]" * 100_000
    path.write_text(deep if suffix == ".json" else '{"text": ' + deep + ', "label": 1}\n')
    message = one_line_error(str(path))
    assert "JSON nested too deeply" in message
    assert message.startswith(f"{path}:1:" if suffix == ".jsonl" else f"{path}:")


def test_json_array_and_single_line_arrays_above_the_line_limit_still_read(tmp_path, monkeypatch):
    monkeypatch.setenv(LINE_LIMIT_ENV, "64")  # whole-file JSON is bounded by the file limit, not the line limit
    rows = [{"text": f"example number {i}", "label": i % 2} for i in range(20)]
    (tmp_path / "a.json").write_text("\ufeff  " + json.dumps(rows))
    assert len(load_text_classification(str(tmp_path / "a.json"))) == 20


def test_values_that_are_not_text_are_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": {"nested": 1}, "label": 0}\n')
    assert "line 2: `text` is dict, expected a string" in one_line_error(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.json").write_text('[{"text": "fine", "label": [1]}]')
    assert "example 1: `label` is list" in one_line_error(str(tmp_path / "b.json"))


def test_extra_fields_beyond_the_header_are_refused(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nok\t1\ntoo\tmany\t0\n")
    assert "a.tsv:3: 3 fields, but the header names 2" in one_line_error(str(tmp_path / "a.tsv"))


def test_unclosed_csv_quote_is_bounded_by_the_field_limit(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('text,label\n"never closed,1\n' + "more words,0\n" * 20_000)
    assert "unreadable CSV (field larger than field limit" in one_line_error(str(path))


def test_byte_order_mark_is_not_part_of_the_header(tmp_path):
    (tmp_path / "a.csv").write_bytes("\ufefftext,label\nhi,1\nyo,0\n".encode())
    assert load_text_classification(str(tmp_path / "a.csv")).texts == ["hi", "yo"]


def sparse_file(path, head: bytes, size: int, tail: bytes) -> None:
    """`head`, a hole of zeros up to `size` bytes, then `tail`: a 1 GB line that costs no disk."""
    with open(path, "wb") as handle:
        handle.write(head)
        handle.seek(size)
        handle.write(tail)


GIGABYTE = 1_000_000_000
ONE_GB_LINES = {
    ".tsv": (b"sentence\tlabel\nok\t1\n" + b"x" * 1000, b"\t1\n"),
    ".csv": (b"text,label\nok,1\n" + b"x" * 1000, b",1\n"),
    ".jsonl": (b'{"text": "ok", "label": 1}\n{"text": "' + b"x" * 1000, b'", "label": 1}\n'),
}


@pytest.mark.parametrize("suffix", sorted(ONE_GB_LINES))
def test_one_gigabyte_line_is_refused_with_bounded_memory(tmp_path, suffix):
    path = tmp_path / f"long{suffix}"
    head, tail = ONE_GB_LINES[suffix]
    sparse_file(path, head, GIGABYTE, tail)
    tracemalloc.start()
    try:
        message = one_line_error(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"{path}:" in message and "line longer than 1048576 bytes" in message and LINE_LIMIT_ENV in message
    assert peak < 16 * 2**20, f"peak {peak} bytes while refusing a 1 GB line"


def test_line_limit_is_a_setting(tmp_path, monkeypatch):
    path = tmp_path / "a.tsv"
    path.write_text("sentence\tlabel\n" + "word " * 100 + "\t1\n")
    assert len(load_text_classification(str(path))) == 1
    monkeypatch.setenv(LINE_LIMIT_ENV, "100")
    assert f"{path}:2: line longer than 100 bytes" in one_line_error(str(path))
    monkeypatch.setenv(LINE_LIMIT_ENV, "lots")
    assert f"{LINE_LIMIT_ENV}: got 'lots'" in one_line_error(str(path))


def test_file_size_limit_is_checked_before_and_while_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    sparse_file(path, b"[", 3 * 2**30, b"]")  # a 3 GiB JSON array, refused before one byte is parsed
    tracemalloc.start()
    try:
        message = one_line_error(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "more than the 1073741824-byte limit" in message and peak < 2**20
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a", "label": 1}\n' * 100)
    monkeypatch.setenv(FILE_LIMIT_ENV, "1000")
    assert "more than the 1000-byte limit" in one_line_error(str(rows))


def test_cli_train_on_a_binary_file_is_one_line_exit_2(tmp_path, capsys):
    from rayexit.cli import main

    path = tmp_path / "random.tsv"
    path.write_bytes(RANDOM)
    assert main(["train", "--model", "minilm", "--train", str(path), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:1: ") and "\n" not in err and "UTF-8" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("count", [0, -1])
def test_a_count_of_examples_below_one_is_refused(tmp_path, count):
    path = tmp_path / "d.tsv"
    path.write_text("sentence\tlabel\na\t1\nb\t0\n")
    with pytest.raises(RayexitError, match=f"max_examples: got {count}, expected a whole number >= 1"):
        load_text_classification(str(path), count)
