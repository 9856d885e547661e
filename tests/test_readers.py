"""Readers: files, directories of split files, saved datasets and the Hub, and every malformed file: one DataError
naming the file and the line, never another exception (test_loaders_fuzz.py tries random files)."""

from __future__ import annotations

import codecs
import csv
import json
import re

import pytest

from datalever.examples import DataError, load_examples
from example_files import GSM, WRITERS, bad, sha_id, write_csv, write_jsonl


def test_dataset_dict_split_is_chosen_by_name(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(GSM[:2]), "test": datasets.Dataset.from_list(GSM[2:])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    (ex,) = load_examples(str(tmp_path / "dd"), split="test")
    assert ex.prompt == "Question: What is 6 times 7?\nAnswer:\n"
    assert len(load_examples(str(tmp_path / "dd"), split="train")) == 2
    with pytest.raises(DataError, match=r"holds the splits \['train', 'test'\]; choose one with --split"):
        load_examples(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"has no split 'dev'"):
        load_examples(str(tmp_path / "dd"), split="dev")
    # a stage's role picks its split when none is named: training reads train, evaluation test
    assert len(load_examples(str(tmp_path / "dd"), default_split="train")) == 2
    assert len(load_examples(str(tmp_path / "dd"), default_split="test")) == 1
    with pytest.raises(DataError, match="choose one with --split"):
        load_examples(str(tmp_path / "dd"), default_split="validation")


def test_directory_of_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM[:2])
    write_jsonl(tmp_path / "test.jsonl", GSM[2:])
    assert len(load_examples(str(tmp_path), split="train")) == 2
    with pytest.raises(DataError, match=r"holds the splits \['test', 'train'\]; choose one with --split"):
        load_examples(str(tmp_path))
    assert len(load_examples(str(tmp_path), default_split="test")) == 1


def test_missing_path_and_unreachable_hub(tmp_path, monkeypatch):
    import datasets

    assert "no such file" in bad(tmp_path / "missing.jsonl")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/data' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    msg = bad("someone/data")
    assert "someone/data" in msg and "Hub" in msg and "Couldn't reach" in msg


def test_unreadable_path_is_a_data_error(tmp_path):
    assert "cannot access" in bad(tmp_path / ("x" * 5000 + ".jsonl"))


# ---- malformed files: one DataError naming the file and the line, never another exception ----


def test_malformed_json_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(GSM[0]) + "\n\n" + '{"question": "x", "answer": \n')
    msg = bad(p)
    assert str(p) in msg and "line 3" in msg and "malformed JSON" in msg


def test_malformed_json_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"question": "x",\n  "answer": }\n]')
    msg = bad(p)
    assert str(p) in msg and "line 3" in msg and "malformed JSON" in msg


def test_record_that_is_not_an_object(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(GSM[0]) + "\n[1, 2]\n")
    assert re.search(r"bad\.jsonl: line 2: expected a JSON object", bad(p))


def test_csv_row_with_missing_cells(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("question,answer\nq1?,a1\nq2?\n")
    assert re.search(r"bad\.csv: row 2 \(line 3\): the number of cells differs", bad(p))


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("latin1.jsonl", json.dumps(GSM[0]) + '\n{"question": "Caf\xe9?", "answer": "a"}\n', "line 2"),
        ("latin1.json", '[\n {"question": "Caf\xe9?", "answer": "a"}\n]', "line 2"),
        ("latin1.csv", "question,answer\nq1?,a1\nCaf\xe9?,a2\n", "line 3"),
    ],
)
def test_bytes_that_are_not_utf8_name_the_line_and_the_byte(tmp_path, name, text, where):
    p = tmp_path / name
    p.write_bytes(text.encode("latin-1"))
    msg = bad(p)
    assert msg.startswith(f"{p}: {where}: not UTF-8 text (byte 0xe9 at column ")
    assert "save the file as UTF-8" in msg


@pytest.mark.parametrize("fmt, name", [("jsonl", "d.jsonl.gz"), ("json", "d.json.gz"), ("csv", "d.csv.gz")])
def test_gzip_files_are_read_transparently(tmp_path, fmt, name):
    import gzip

    plain = load_examples(WRITERS[fmt][0](tmp_path / f"plain.{fmt}", GSM))
    (tmp_path / name).write_bytes(gzip.compress((tmp_path / f"plain.{fmt}").read_bytes()))
    assert load_examples(str(tmp_path / name)) == plain
    assert [e.meta for e in load_examples(str(tmp_path / name))] == [e.meta for e in plain]


def test_gzip_bytes_under_a_plain_name_are_read_too(tmp_path):
    import gzip

    plain = load_examples(write_jsonl(tmp_path / "plain.jsonl", GSM))
    (tmp_path / "d.jsonl").write_bytes(gzip.compress((tmp_path / "plain.jsonl").read_bytes()))
    assert load_examples(str(tmp_path / "d.jsonl")) == plain


def test_gzip_split_files_in_a_directory(tmp_path):
    import gzip

    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in GSM).encode()))
    write_jsonl(tmp_path / "test.jsonl", GSM[:1])
    assert len(load_examples(str(tmp_path), split="train")) == 3
    assert "['test', 'train']" in bad(tmp_path)


def test_truncated_gzip_and_gzipped_parquet_are_refused(tmp_path):
    import gzip

    text = "".join(json.dumps(r) + "\n" for r in GSM * 50)
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(text.encode())[:-20])
    msg = bad(tmp_path / "cut.jsonl.gz")
    assert str(tmp_path / "cut.jsonl.gz") in msg and "near line" in msg and "corrupt or truncated gzip" in msg
    (tmp_path / "d.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    assert "gzip-compressed Parquet" in bad(tmp_path / "d.parquet.gz")
    assert "no such file" in bad(tmp_path / "missing.jsonl.gz")


@pytest.mark.parametrize(
    "magic, name", [(b"PK\x03\x04", "zip"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd")]
)
def test_other_compressions_are_refused_by_name(tmp_path, magic, name):
    p = tmp_path / "d.jsonl"
    p.write_bytes(magic + b"\x00" * 40)
    assert f"compressed with {name}" in bad(p)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-8-sig"])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_a_byte_order_mark_decides_the_encoding(tmp_path, fmt, encoding):
    path = WRITERS[fmt][0](tmp_path / f"plain.{fmt}", GSM + [{"question": "Čau, ¿qué? 😀", "answer": "ok"}])
    text = (tmp_path / f"plain.{fmt}").read_text(encoding="utf-8")
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = codecs.BOM_UTF16_BE + data  # the -be codec writes no mark of its own
    (tmp_path / f"enc.{fmt}").write_bytes(data)
    assert load_examples(str(tmp_path / f"enc.{fmt}")) == load_examples(path)


def test_utf16_without_a_mark_or_cut_short_is_refused_naming_the_encoding(tmp_path):
    (tmp_path / "nomark.csv").write_bytes("question,answer\nq,a\n".encode("utf-16-le"))
    assert "UTF-16 or UTF-32 without a byte-order mark" in bad(tmp_path / "nomark.csv")
    (tmp_path / "cut.jsonl").write_bytes((json.dumps(GSM[0]) + "\n").encode("utf-16")[:-1])
    msg = bad(tmp_path / "cut.jsonl")
    assert str(tmp_path / "cut.jsonl") in msg and "not valid UTF-16 text" in msg


def test_json_nested_too_deeply(tmp_path):
    deep = "[" * 50_000 + "]" * 50_000
    (tmp_path / "deep.jsonl").write_text(json.dumps(GSM[0]) + "\n" + deep + "\n")
    (tmp_path / "deep.json").write_text(deep)
    meta = {"id": "a", "prompt": "p", "response": "r", "meta": deep}
    p = write_jsonl(tmp_path / "meta.jsonl", [meta])
    assert re.search(r"deep\.jsonl: line 2: JSON nested too deeply", bad(tmp_path / "deep.jsonl"))
    assert re.search(r"deep\.json: JSON nested too deeply", bad(tmp_path / "deep.json"))
    assert re.search(r"meta\.jsonl: line 1: field 'meta': JSON nested too deeply", bad(p))


def test_json_integer_over_the_int_conversion_limit(tmp_path):
    huge = "9" * 5000
    (tmp_path / "big.jsonl").write_text(json.dumps(GSM[0]) + '\n{"question": "q", "answer": "a", "n": ' + huge + "}\n")
    (tmp_path / "big.json").write_text('[{"question": "q", "answer": "a", "n": ' + huge + "}]")
    assert re.search(r"big\.jsonl: line 2: a JSON integer longer than 4300 digits", bad(tmp_path / "big.jsonl"))
    assert re.search(r"big\.json: a JSON integer longer than 4300 digits", bad(tmp_path / "big.json"))


def test_csv_cells_longer_than_the_csv_module_default_limit_load(tmp_path):
    long_answer = "7 " * 100_000  # 200,000 characters, over csv's default 131,072
    limit = csv.field_size_limit()
    (ex,) = load_examples(write_csv(tmp_path / "long.csv", [{"question": "q?", "answer": long_answer}]))
    assert ex.response == long_answer and ex.id == sha_id("q?", long_answer)
    assert csv.field_size_limit() == limit  # the process-wide limit is put back


def test_lone_surrogate_escapes_are_refused_and_pairs_decoded(tmp_path):
    (tmp_path / "lone.jsonl").write_text(json.dumps(GSM[0]) + '\n{"question": "x\\ud800", "answer": "a"}\n')
    assert re.search(r"lone\.jsonl: line 2: the \\u escape \\ud800 is a lone surrogate", bad(tmp_path / "lone.jsonl"))
    (tmp_path / "pair.jsonl").write_text('{"question": "smile \\ud83d\\ude00", "answer": "a"}\n')
    assert load_examples(str(tmp_path / "pair.jsonl"))[0].prompt == "Question: smile \U0001f600\nAnswer:\n"
