"""Loaders: every format and schema, stable ids, templates, field mapping, and every bad input.

Expected prompts and ids are written by hand (ids via hashlib directly), not taken from the code.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import re

import pytest

from datalever.examples import (
    DEFAULT_TEMPLATES,
    DataError,
    Example,
    check_overlap,
    detect_schema,
    find_overlap,
    load_examples,
    normalize_prompt,
    overlap_error,
    save_examples,
)

GSM = [
    {
        "question": "Tom has 3 apples and buys 4 more. How many apples?",
        "answer": "3 + 4 = 7\n#### 7",
        "difficulty": "easy",
    },
    {
        "question": "Ann has 10 pens and loses 2. How many are left?",
        "answer": "10 - 2 = 8\n#### 8",
        "difficulty": "easy",
    },
    {"question": "What is 6 times 7?", "answer": "6 * 7 = 42\n#### 42", "difficulty": "medium"},
]
ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 5", "output": "7", "source": "mathinstruct/add"},
    {"instruction": "Name a prime number.", "input": "", "output": "13", "source": "mathinstruct/prime"},
]
PLAIN = [{"prompt": "2+2=", "response": "4"}, {"prompt": "3+3=", "response": "6"}]


def sha_id(*parts: str) -> str:
    """The id as the spec defines it: SHA-256 over the raw fields, each followed by 0x1F."""
    return hashlib.sha256("".join(p + "\x1f" for p in parts).encode()).hexdigest()[:16]


# ---- writers for every format -------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_json(path, rows):
    path.write_text(json.dumps(rows, indent=1))
    return str(path)


def write_json_data(path, rows):
    path.write_text(json.dumps({"version": 1, "data": rows}))
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def write_dataset(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


WRITERS = {
    "jsonl": (write_jsonl, "d.jsonl"),
    "json": (write_json, "d.json"),
    "json_data": (write_json_data, "d.json"),
    "parquet": (write_parquet, "d.parquet"),
    "csv": (write_csv, "d.csv"),
    "save_to_disk": (write_dataset, "ds"),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_gsm8k_loads_from_every_format(tmp_path, fmt):
    writer, name = WRITERS[fmt]
    exs = load_examples(writer(tmp_path / name, GSM))
    assert [e.prompt for e in exs] == [
        "Question: Tom has 3 apples and buys 4 more. How many apples?\nAnswer:\n",
        "Question: Ann has 10 pens and loses 2. How many are left?\nAnswer:\n",
        "Question: What is 6 times 7?\nAnswer:\n",
    ]
    assert [e.response for e in exs] == ["3 + 4 = 7\n#### 7", "10 - 2 = 8\n#### 8", "6 * 7 = 42\n#### 42"]
    assert exs[0].id == sha_id(GSM[0]["question"], GSM[0]["answer"])
    assert [e.meta for e in exs] == [{"difficulty": "easy"}, {"difficulty": "easy"}, {"difficulty": "medium"}]
    assert all(e.source is None for e in exs)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "save_to_disk"])
def test_alpaca_loads_with_and_without_input(tmp_path, fmt):
    writer, name = WRITERS[fmt]
    a, b = load_examples(writer(tmp_path / name, ALPACA))
    assert a.prompt == "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 5\n\n### Response:\n"
    assert b.prompt == "### Instruction:\nName a prime number.\n\n### Response:\n"
    assert (a.response, b.response) == ("7", "13")
    assert (a.source, b.source) == ("mathinstruct/add", "mathinstruct/prime")
    assert a.id == sha_id("Add the numbers.", "2 and 5", "7")
    assert b.id == sha_id("Name a prime number.", "", "13")


def test_alpaca_without_input_column_has_the_same_id_as_with_an_empty_one(tmp_path):
    rows = [{"instruction": "Name a prime number.", "output": "13"}]
    (ex,) = load_examples(write_jsonl(tmp_path / "a.jsonl", rows))
    assert ex.id == sha_id("Name a prime number.", "", "13")
    assert ex.source is None and ex.meta == {}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_prompt_response_loads_as_is(tmp_path, fmt):
    writer, name = WRITERS[fmt]
    exs = load_examples(writer(tmp_path / name, PLAIN))
    assert [(e.prompt, e.response) for e in exs] == [("2+2=", "4"), ("3+3=", "6")]
    assert exs[1].id == sha_id("3+3=", "6")


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


def test_ids_survive_row_order_reruns_and_template_changes(tmp_path):
    first = load_examples(write_jsonl(tmp_path / "a.jsonl", GSM))
    shuffled = load_examples(write_jsonl(tmp_path / "b.jsonl", GSM[::-1]))
    again = load_examples(str(tmp_path / "a.jsonl"))
    other = load_examples(str(tmp_path / "a.jsonl"), template="Q: {question}\nA:")
    ids = [e.id for e in first]
    assert len(set(ids)) == 3
    assert [e.id for e in shuffled] == ids[::-1]
    assert [e.id for e in again] == ids == [e.id for e in other]
    assert other[0].prompt == "Q: Tom has 3 apples and buys 4 more. How many apples?\nA:"


def test_custom_templates_may_use_extra_columns(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", GSM[:1])
    (ex,) = load_examples(path, template="[{difficulty}] {question}\n")
    assert ex.prompt == "[easy] Tom has 3 apples and buys 4 more. How many apples?\n"
    assert ex.prompt + ex.response == (
        "[easy] Tom has 3 apples and buys 4 more. How many apples?\n3 + 4 = 7\n#### 7"
    )  # the boundary is len(prompt)


def test_default_templates_are_the_documented_ones():
    assert DEFAULT_TEMPLATES["gsm8k"].format(question="Q?") == "Question: Q?\nAnswer:\n"
    assert DEFAULT_TEMPLATES["prompt_response"].format(prompt="p") == "p"


def test_field_mapping_overrides_detection(tmp_path):
    rows = [{"question": "decoy?", "answer": "decoy", "q": "What is 1+1?", "a": "2", "src": "toy"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    assert load_examples(path)[0].response == "decoy"  # detection alone picks gsm8k
    (ex,) = load_examples(path, fields={"prompt": "q", "response": "a", "source": "src"})
    assert (ex.prompt, ex.response, ex.source) == ("What is 1+1?", "2", "toy")
    assert ex.id == sha_id("What is 1+1?", "2")
    assert ex.meta == {"question": "decoy?", "answer": "decoy"}  # unused columns are kept
    (g,) = load_examples(path, fields={"question": "q", "answer": "a"})
    assert g.prompt == "Question: What is 1+1?\nAnswer:\n"


def test_detect_schema():
    assert detect_schema(["question", "answer"]) == "gsm8k"
    assert detect_schema(["instruction", "output", "source"]) == "alpaca"
    assert detect_schema(["prompt", "response", "x"]) == "prompt_response"
    assert detect_schema(["id", "prompt", "response", "source", "meta"]) == "datalever"
    assert detect_schema(["q", "a"], {"prompt": "q", "response": "a"}) == "prompt_response"
    with pytest.raises(DataError, match=r"\['q', 'a'\]"):
        detect_schema(["q", "a"])
    with pytest.raises(DataError, match="several schemas"):
        detect_schema(["question", "answer", "instruction", "output"])


def test_save_examples_round_trips(tmp_path):
    exs = [
        Example("custom-1", "P1\n", "R1", "s", {"steps": 2, "level": "easy"}),
        Example("custom-2", "P2\n", "R2", None, {}),
    ]
    save_examples(str(tmp_path / "out.jsonl"), exs)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert list(rows[0]) == ["id", "prompt", "response", "source", "meta"]
    back = load_examples(str(tmp_path / "out.jsonl"))
    assert [e.to_record() for e in back] == [e.to_record() for e in exs]  # ids kept, meta parsed
    assert back[0].meta == {"steps": 2, "level": "easy"}
    assert load_examples(str(tmp_path / "out.jsonl"), schema="datalever")[1].id == "custom-2"
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_loaded_then_saved_examples_keep_their_ids(tmp_path):
    exs = load_examples(write_jsonl(tmp_path / "g.jsonl", GSM))
    save_examples(str(tmp_path / "out.jsonl"), exs)
    assert [e.id for e in load_examples(str(tmp_path / "out.jsonl"))] == [e.id for e in exs]


# ---- bad input: file, line/row and the reason, always -----------------------------------------


def bad(path, **kw) -> str:
    with pytest.raises(DataError) as err:
        load_examples(str(path), **kw)
    return str(err.value)


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


def test_missing_field(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [GSM[0], {"question": "no answer here?"}])
    assert re.search(r"bad\.jsonl: line 2: missing field 'answer'", bad(p))


@pytest.mark.parametrize("value, shown", [(None, "null"), (7, "int 7"), (["a"], "list"), (2.5, "float")])
def test_non_text_value(tmp_path, value, shown):
    p = write_jsonl(tmp_path / "bad.jsonl", [GSM[0], GSM[1], {"question": "q?", "answer": value}])
    msg = bad(p)
    assert re.search(r"bad\.jsonl: line 3: field 'answer' must be text", msg) and shown in msg


def test_non_text_value_in_parquet_names_the_row(tmp_path):
    p = write_parquet(
        tmp_path / "bad.parquet",
        [{"prompt": "a", "response": "b", "source": None}, {"prompt": "c", "response": "d", "source": 3}],
    )
    p2 = write_parquet(tmp_path / "bad2.parquet", [{"prompt": "a", "response": 1}])
    assert re.search(r"bad\.parquet: row 2: field 'source' must be text, got int 3", bad(p))
    assert re.search(r"bad2\.parquet: row 1: field 'response' must be text, got int", bad(p2))


def test_empty_text_is_an_error(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [GSM[0], {"question": "q?", "answer": "  "}])
    assert re.search(r"bad\.jsonl: line 2: field 'answer' is empty", bad(p))


@pytest.mark.parametrize(
    "name, text",
    [("e.jsonl", ""), ("e2.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "question,answer\n"), ("e2.csv", "")],
)
def test_empty_file(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    msg = bad(p)
    assert str(p) in msg and "empty file" in msg


def test_csv_row_with_missing_cells(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("question,answer\nq1?,a1\nq2?\n")
    assert re.search(r"bad\.csv: row 2 \(line 3\): the number of cells differs", bad(p))


def test_unknown_schema_lists_the_columns(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hello", "label": 1}])
    msg = bad(p)
    assert str(p) in msg and "['text', 'label']" in msg and "gsm8k (question, answer)" in msg


def test_mapping_to_a_missing_column(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", PLAIN)
    msg = bad(p, fields={"prompt": "q", "response": "response"})
    assert "a.jsonl" in msg and "'q'" in msg and "not in the data" in msg


def test_bad_template_field(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", GSM)
    assert re.search(r"a\.jsonl: line 1: template field 'nope'", bad(p, template="{nope}"))


def test_missing_path_and_unreachable_hub(tmp_path, monkeypatch):
    import datasets

    assert "no such file" in bad(tmp_path / "missing.jsonl")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/data' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    msg = bad("someone/data")
    assert "someone/data" in msg and "Hub" in msg and "Couldn't reach" in msg


def test_duplicates_are_reported_with_counts(tmp_path):
    rows = [GSM[0], GSM[1], GSM[2], GSM[0], GSM[0], GSM[2] | {"difficulty": "hard"}]
    p = write_jsonl(tmp_path / "dup.jsonl", rows)
    msg = bad(p)
    assert "dup.jsonl: 3 duplicate examples (2 distinct ids), first at lines 4 and 6" in msg
    assert "copies of lines 1 and 3" in msg and "keep_first" in msg


def test_duplicates_keep_first_warns_and_keeps_the_first_copy(tmp_path, caplog):
    rows = [GSM[0], GSM[1], GSM[0] | {"difficulty": "second copy"}]
    p = write_csv(tmp_path / "dup.csv", rows)
    with caplog.at_level(logging.WARNING):
        exs = load_examples(p, on_duplicate="keep_first")
    assert [e.meta["difficulty"] for e in exs] == ["easy", "easy"]
    assert "1 duplicate examples (1 distinct ids), first at rows 3" in caplog.text
    with pytest.raises(ValueError, match="on_duplicate"):
        load_examples(p, on_duplicate="drop")


# ---- malformed files: one DataError naming the file and the line, never another exception -------


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


def test_unreadable_path_is_a_data_error(tmp_path):
    assert "cannot access" in bad(tmp_path / ("x" * 5000 + ".jsonl"))


# ---- leakage between splits ---------------------------------------------------------------------


def ex(i, prompt=None, response="r"):
    return Example(f"id{i}", prompt if prompt is not None else f"Question {i}?\n", response)


TRAIN = [ex(i) for i in range(10)]


def test_identical_splits_share_everything():
    (o,) = find_overlap({"train": TRAIN, "test": list(TRAIN)})
    assert (o.first, o.second, o.size, o.count, o.same_id, o.same_prompt) == ("train", "test", 10, 10, 10, 0)
    assert o.samples == (("id0", "Question 0?\n"), ("id1", "Question 1?\n"), ("id2", "Question 2?\n"))


def test_half_of_test_inside_train():
    test = [ex(i) for i in range(5, 15)]
    overlaps = find_overlap({"train": TRAIN, "validation": [ex(20)], "test": test})
    assert [(o.first, o.second, o.count) for o in overlaps] == [("train", "test", 5)]
    assert overlaps[0].to_dict()["count"] == 5 and overlaps[0].to_dict()["samples"][0] == ["id5", "Question 5?\n"]


def test_validation_equal_to_test():
    held = [ex(i) for i in range(20, 24)]
    overlaps = find_overlap({"train": TRAIN, "validation": held, "test": list(held)})
    assert [(o.first, o.second, o.count, o.size) for o in overlaps] == [("validation", "test", 4, 4)]


def test_reworded_duplicate_matches_by_normalized_prompt():
    copy = Example("other-id", "  QUESTION 3?   ", "a different answer")
    (o,) = find_overlap({"train": TRAIN, "validation": [copy, ex(30)], "test": [ex(31)]})
    assert (o.second, o.same_id, o.same_prompt, o.samples) == ("validation", 0, 1, (("other-id", "  QUESTION 3?   "),))
    assert normalize_prompt("  Question\n 3?\t") == "question 3?"


def test_clean_splits_have_no_overlap():
    named = {"train": TRAIN, "validation": [ex(20), ex(21)], "test": [ex(30)]}
    assert find_overlap(named) == []
    assert check_overlap(named) == []


def test_overlap_error_names_the_counts_and_examples():
    named = {
        "train": TRAIN,
        "validation": [ex(1), ex(20)],
        "test": [ex(2), ex(3), Example("reworded", "question 4? ", "r")],
    }
    overlaps = find_overlap(named)
    msg = str(overlap_error(overlaps))
    assert isinstance(overlap_error(overlaps), DataError) and "\n" not in msg
    assert msg.startswith("splits overlap (4 shared examples): validation shares 1 of 2 examples with train")
    assert "test shares 3 of 3 examples with train (2 same id, 1 same prompt up to case and spacing)" in msg
    assert "id2 'Question 2?\\n'" in msg and "allow_overlap" in msg
    with pytest.raises(DataError, match="splits overlap"):
        check_overlap(named)
    assert check_overlap(named, allow_overlap=True) == overlaps
    with pytest.raises(ValueError):
        overlap_error([])


def test_trl_prompt_completion_and_math_problem_solution_are_detected(tmp_path):
    """TRL's prompt/completion and MATH's problem/solution files were refused as 'cannot detect the schema'."""
    from datalever.answers import extract_answer

    trl = tmp_path / "trl.jsonl"
    trl.write_text(json.dumps({"prompt": "What is 2+2?\n", "completion": "It is 4.\n#### 4"}) + "\n")
    (ex,) = load_examples(str(trl))
    assert (ex.prompt, ex.response) == ("What is 2+2?\n", "It is 4.\n#### 4")
    math_file = tmp_path / "math.jsonl"
    row = {
        "problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.",
        "solution": "We get $\\boxed{\\frac{3}{4}}$.",
        "level": "Level 2",
        "type": "Prealgebra",
    }
    math_file.write_text(json.dumps(row) + "\n")
    (ex,) = load_examples(str(math_file))
    assert ex.prompt == "Problem: Compute $\\frac{1}{2}+\\frac{1}{4}$.\nSolution:\n"
    assert ex.meta["level"] == "Level 2" and extract_answer(ex.response) == "\\frac{3}{4}"
