"""Rows, writers for every data format and a bad-input helper, shared by the loader tests (test_examples.py,
test_readers.py). Ids are computed here by hand (hashlib directly), not taken from the code."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest

from datalever.examples import DataError, load_examples

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


def sha_id(*parts: str) -> str:
    """The id as the spec defines it: SHA-256 over the raw fields, each followed by 0x1F."""
    return hashlib.sha256("".join(p + "\x1f" for p in parts).encode()).hexdigest()[:16]


# ---- writers for every format ----------------------------------------------------------------


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


def bad(path, **kw) -> str:
    with pytest.raises(DataError) as err:
        load_examples(str(path), **kw)
    return str(err.value)
