"""CoNLL reader, tag sets and word-piece label alignment."""

from __future__ import annotations

import logging

import pytest

from rayexit.data.conll import (
    IGNORE,
    encode_tagged,
    load_tagged,
    make_batch,
    read_conll,
    tag_set,
    tagged_token_counts,
)
from rayexit.errors import RayexitError

AWKWARD = (
    "-DOCSTART- -X- -X- O \n"
    "\n"
    "EU B-ORG \n"
    "rejects\tO\n"
    "German   B-MISC   \n"
    "\n"
    "\n"
    "-DOCSTART- O\n"
    "Peter\tB-PER\r\n"
    "Blackburn I-PER\n"
    "-DOCSTART- O\n"
    "BRUSSELS B-LOC \n"
    "\n"
    "\n"
    "   \n"
)


def write(tmp_path, text: str, name: str = "data.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_reader_on_awkward_input(tmp_path):
    sentences = read_conll(write(tmp_path, AWKWARD))
    assert sentences.words == [["EU", "rejects", "German"], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert sentences.tags == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"], ["B-LOC"]]
    # the first word's line of each sentence, so messages can point into the file
    assert sentences.lines == [3, 9, 12]


def test_line_without_tag_names_file_and_line(tmp_path):
    path = write(tmp_path, "EU B-ORG\nrejects\nGerman B-MISC\n")
    with pytest.raises(RayexitError, match=r"data\.txt:2: 'rejects' has no tag"):
        read_conll(path)


def test_unknown_tag_names_file_and_line(tmp_path, minilm_tokenizer):
    path = write(tmp_path, "EU B-ORG\n\nPeter B-PER\nsaid B-DATE\n")
    sentences = load_tagged(str(path))
    with pytest.raises(RayexitError, match=r"data\.txt: line 4: tag 'B-DATE' is not in the model's tag set"):
        encode_tagged(minilm_tokenizer, sentences, ["O", "B-ORG", "B-PER"], 32)


def test_empty_file_and_unknown_source(tmp_path):
    with pytest.raises(RayexitError, match="no sentences found"):
        load_tagged(str(write(tmp_path, "-DOCSTART- O\n\n\n")))
    with pytest.raises(RayexitError, match="no such file"):
        load_tagged("missing-file.txt")


def test_tag_set_puts_o_first_and_groups_types(tmp_path):
    sentences = read_conll(write(tmp_path, "a I-PER\nb B-LOC\nc O\nd B-PER\ne I-LOC\n"))
    assert tag_set(sentences) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_labels_sit_on_first_word_piece(tmp_path, minilm_tokenizer):
    sentences = read_conll(write(tmp_path, "Blackburnian B-PER\nvisited O\nBrussels B-LOC\n"))
    tags = ["O", "B-LOC", "B-PER"]
    data = encode_tagged(minilm_tokenizer, sentences, tags, 64)
    ids, starts = data.input_ids[0], data.word_starts[0]
    pieces = minilm_tokenizer.convert_ids_to_tokens(ids)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert len(pieces) > 5  # "blackburnian" splits into several pieces
    assert [pieces[s].startswith("##") for s in starts] == [False, False, False]
    assert data.labels[0] == [2, 0, 1]
    batch = make_batch(data, [0])
    word_of_piece = batch.piece_word[0].tolist()
    assert word_of_piece[0] == -1 and word_of_piece[-1] == -1
    assert word_of_piece[1 : starts[1]] == [0] * (starts[1] - 1)  # continuation pieces follow word 0
    assert batch.labels[0].tolist() == [2, 0, 1]


def test_long_sentence_is_split_into_windows_with_a_warning(tmp_path, minilm_tokenizer, caplog):
    words = [f"w{i} O" for i in range(30)]
    path = write(tmp_path, "-DOCSTART- O\n\n" + "\n".join(words) + "\n\nshort B-PER\n")
    sentences = load_tagged(str(path))
    with caplog.at_level(logging.WARNING):
        data = encode_tagged(minilm_tokenizer, sentences, ["O", "B-PER"], 16)
    assert "data.txt: line 3: 30 words need more than 16 word-pieces" in caplog.text
    assert all(len(ids) <= 16 for ids in data.input_ids)
    first_sentence = [k for k, (s, _) in enumerate(data.pieces) if s == 0]
    assert len(first_sentence) > 1
    assert sum(len(data.labels[k]) for k in first_sentence) == 30  # no word lost its label
    assert [data.pieces[k][1] for k in first_sentence][0] == 0
    assert data.num_sentences == 2


def test_batch_pads_labels_with_ignore(minilm_tokenizer):
    data = encode_tagged(minilm_tokenizer, [["a", "b", "c"], ["d"]], None, 32)
    batch = make_batch(data, [0, 1])
    assert batch.word_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.labels[1, 1:].tolist() == [IGNORE, IGNORE]
    assert batch.attention_mask.sum(1).tolist() == [5, 3]


def test_conll2003_test_set_reads_whole(datasets_dir):
    sentences = load_tagged(str(datasets_dir / "conll2003" / "test.txt"))
    assert len(sentences) == 3453
    assert set(tag_set(sentences)) == {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"}


def test_packaged_atis_slots():
    try:
        sentences = load_tagged("atis:test")
    except RayexitError as exc:
        pytest.skip(str(exc))
    assert len(sentences) > 800
    assert all(len(w) == len(t) for w, t in zip(sentences.words, sentences.tags, strict=True))
    assert "O" in tag_set(sentences)


def test_hub_dataset_with_class_label_tags(monkeypatch):
    import datasets

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"])),
        }
    )
    table = datasets.Dataset.from_dict(
        {"tokens": [["Peter", "Blackburn", "said"], []], "ner_tags": [[1, 2, 0], []]}, features=features
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: table)
    sentences = load_tagged("someone/ner:validation")
    assert sentences.words == [["Peter", "Blackburn", "said"]]
    assert sentences.tags == [["B-PER", "I-PER", "O"]]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_dict({"text": ["x"]}))
    with pytest.raises(RayexitError, match="expected a tokens column"):
        load_tagged("someone/other")


# -- column layout and damaged files ---------------------------------------------------------


def test_line_with_another_column_count_is_refused_with_file_and_line(tmp_path):
    path = write(tmp_path, "EU B-ORG\nrejects O\n\nPeter NNP B-NP\nBlackburn I-PER\n")
    with pytest.raises(RayexitError, match=r"data\.txt:4: 3 columns, but line 1 has 2; expected the same columns"):
        read_conll(path)


def test_extra_last_column_is_refused_naming_the_tag_column(tmp_path):
    path = write(tmp_path, "EU NNP B-ORG extra-col\nrejects VBZ O extra-col\n")
    with pytest.raises(RayexitError) as info:
        read_conll(path)
    message = str(info.value)
    assert message.startswith(f"{path}:1: 'extra-col' in the tag column (column 4, the last) is not a tag")
    assert "column 3 looks like a tag" in message


def test_pos_tags_in_the_last_column_are_refused(tmp_path):
    path = write(tmp_path, "EU B-ORG NNP\nrejects O VBZ\n")
    with pytest.raises(RayexitError, match=r"data\.txt:1: 'NNP' in the tag column .* column 2 looks like a tag"):
        read_conll(path)


def test_conll2003_four_column_layout_reads_the_entity_tags(tmp_path):
    text = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n"
    sentences = read_conll(write(tmp_path, text))
    assert sentences.tags == [["B-ORG", "O", "B-MISC"]]


def test_binary_and_undecodable_conll_files_are_one_line(tmp_path):
    path = tmp_path / "random.txt"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(RayexitError, match=r"random\.txt:1: (binary data|not UTF-8 text)"):
        load_tagged(str(path))
    path.write_bytes(b"EU B-ORG\nK\xf6ln B-LOC\n")
    with pytest.raises(RayexitError, match=r"random\.txt:2: not UTF-8 text"):
        load_tagged(str(path))


def test_one_gigabyte_conll_line_is_refused_with_bounded_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "long.txt"
    with open(path, "wb") as handle:
        handle.write(b"EU B-ORG\n" + b"x" * 1000)
        handle.seek(1_000_000_000)  # a hole: the line is 1 GB long but takes no disk
        handle.write(b" O\n")
    tracemalloc.start()
    try:
        with pytest.raises(RayexitError, match=r"long\.txt:2: line longer than 1048576 bytes"):
            load_tagged(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_cli_train_on_a_wrong_layout_is_one_line_exit_2(tmp_path, capsys):
    from rayexit.cli import main

    path = write(tmp_path, "EU B-ORG\nrejects O\nGerman NNP B-MISC\n")
    output = tmp_path / "o"
    assert main(["train", "--task", "token", "--model", "minilm", "--train", str(path), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    expected = "3 columns, but line 1 has 2; expected the same columns on every line (token first, tag last)"
    assert err == f"error: {path}:3: {expected}"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("max_length", [8, 16, 64])
def test_token_counts_are_what_encode_tagged_lays_out(minilm_tokenizer, max_length):
    sentences = [
        ["Peter", "Blackburn", "visited", "Brussels"],
        ["\x01"] * 5,  # the tokenizer strips these to nothing; each still takes an [UNK] slot
        ["\u200b", "a", "\ufe0f"],
        [f"w{i}" for i in range(30)],  # split into windows, each with its special tokens
        ["Pneumonoultramicroscopicsilicovolcanoconiosis"],  # one word longer than a small window
    ]
    data = encode_tagged(minilm_tokenizer, sentences, None, max_length)
    laid_out = [0] * len(sentences)
    for ids, (sentence, _) in zip(data.input_ids, data.pieces, strict=True):
        laid_out[sentence] += len(ids)
    assert tagged_token_counts(minilm_tokenizer, sentences, max_length) == laid_out
    assert laid_out[1] == 5 + 2  # a count of the tokenizer's own pieces would say 0 + 2
