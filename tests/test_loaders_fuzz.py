"""Property: whatever a file holds, load_examples returns Examples or raises one DataError that names
the file, on one line; never another exception. Random bytes, random JSON structures (nested
lists and objects, huge integers, NaN, lone surrogates), CSV and Parquet tables.

Derandomized, so CI sees the same cases every run; hypothesis shrinks any failure to a small file.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datalever.examples import DataError, Example, load_examples

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SUFFIXES = [".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz", ".csv.gz"]
# Schema columns, so that random records often get past schema detection to the field checks.
KEYS = ["question", "answer", "prompt", "response", "instruction", "output", "input", "id", "source", "meta"]
PREFIXES = [
    b"",
    codecs.BOM_UTF8,
    codecs.BOM_UTF16_LE,
    codecs.BOM_UTF16_BE,
    codecs.BOM_UTF32_LE,
    b"\x1f\x8b",  # gzip magic over garbage
    b"PK\x03\x04",
    b"PAR1",
    b'{"question": "q", "answer": "a"}\n',
    b"question,answer\n",
]
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1"]
# Integers past Python's 4,300-digit conversion limit cannot be made by json.dumps (nor repr'd by
# hypothesis), so records hold a marker that dumps() swaps for the digits.
HUGE = {'"<huge 5000>"': "9" * 5000, '"<huge -4301>"': "-" + "1" * 4301, '"<huge 20>"': "1" * 20}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def outcome(path) -> list[Example] | str:
    """Load `path`; the property's two allowed outcomes, asserted."""
    try:
        examples = load_examples(str(path))
    except DataError as e:
        msg = str(e)
        assert str(path) in msg, msg
        assert "\n" not in msg, msg
        return msg
    assert isinstance(examples, list) and examples
    assert all(isinstance(ex, Example) for ex in examples)
    return examples


def write_text(path, text: str, encoding: str) -> None:
    """Encode as asked; surrogatepass lets lone surrogates reach the file as the bytes an encoder makes."""
    errors = "replace" if encoding == "latin-1" else "surrogatepass"
    data = text.encode(encoding, errors=errors)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def dumps(value, ensure_ascii: bool) -> str:
    """json.dumps, with the huge-integer markers replaced by their digits."""
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    for marker, digits in HUGE.items():
        text = text.replace(marker, digits)
    return text


# ---- strategies -------------------------------------------------------------------------------

texts = st.text(max_size=12) | st.sampled_from(["", " ", "x\ud800y", "\udfff", "{question}", "a\r\nb", "\x00"])
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([m.strip('"') for m in HUGE])
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts
)
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | texts, inner, max_size=5),
    max_leaves=20,
)
records = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), json_values, max_size=6)
# A record now and then is replaced by a deeply nested array (past the recursion limit, or nearly).
deep = st.integers(min_value=1, max_value=3000).map(lambda d: "[" * d + "]" * d)


@FUZZ
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes(folder, prefix, body, suffix):
    path = folder / f"bytes{suffix}"
    path.write_bytes(prefix + body)  # not compressed: a .gz name over raw bytes is a case in itself
    outcome(path)


@FUZZ
@given(
    rows=st.lists(records | json_values, min_size=0, max_size=6),
    nested=st.none() | deep,
    wrap=st.sampled_from(["list", "data", "other", "bare"]),
    ensure_ascii=st.booleans(),
    encoding=st.sampled_from(ENCODINGS),
    gz=st.booleans(),
)
def test_random_json(folder, rows, nested, wrap, ensure_ascii, encoding, gz):
    body = "[" + ", ".join([dumps(r, ensure_ascii) for r in rows] + ([nested] if nested else [])) + "]"
    text = {"list": body, "data": f'{{"data": {body}}}', "other": f'{{"n": 1, "rows": {body}}}', "bare": body[1:-1]}
    path = folder / ("d.json.gz" if gz else "d.json")
    write_text(path, text[wrap], encoding)
    outcome(path)


@FUZZ
@given(
    rows=st.lists(records | json_values, min_size=0, max_size=6),
    nested=st.none() | deep,
    blank=st.sampled_from(["\n", "\r\n", "\n\n", "\r"]),
    ensure_ascii=st.booleans(),
    encoding=st.sampled_from(ENCODINGS),
    gz=st.booleans(),
)
def test_random_jsonl(folder, rows, nested, blank, ensure_ascii, encoding, gz):
    lines = [dumps(r, ensure_ascii) for r in rows] + ([nested] if nested else [])
    path = folder / ("d.jsonl.gz" if gz else "d.jsonl")
    write_text(path, blank.join(lines) + "\n", encoding)
    outcome(path)


cells = texts | st.sampled_from(["a" * 140_000, '"', '""', "a,b", "a\tb", "\n"])


@FUZZ
@given(
    header=st.lists(st.sampled_from(KEYS) | texts, min_size=0, max_size=5),
    rows=st.lists(st.lists(cells, max_size=6), max_size=5),
    raw_tail=st.sampled_from(["", '"unclosed', "\x00", "a,b,c,d,e,f,g\n"]),
    delimiter=st.sampled_from([",", "\t"]),
    encoding=st.sampled_from(ENCODINGS),
    gz=st.booleans(),
)
def test_random_csv(folder, header, rows, raw_tail, delimiter, encoding, gz):
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter)
    writer.writerows([header, *rows])
    suffix = ".csv" if delimiter == "," else ".tsv"
    path = folder / (f"d{suffix}.gz" if gz else f"d{suffix}")
    write_text(path, buf.getvalue() + raw_tail, encoding)
    outcome(path)


column_types = st.sampled_from(["text", "int", "float", "bool", "list", "null"])
VALUES = {
    "text": st.none() | st.text(max_size=10),
    "int": st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "float": st.none() | st.floats(allow_nan=True),
    "bool": st.none() | st.booleans(),
    "list": st.none() | st.lists(st.text(max_size=4), max_size=3),
    "null": st.none(),
}


@st.composite
def tables(draw):
    """Columns of one type each (Parquet holds typed columns), named like schema roles or not."""
    n = draw(st.integers(min_value=1, max_value=5))
    names = draw(st.lists(st.sampled_from(KEYS) | st.text(min_size=1, max_size=6), max_size=5, unique=True))
    types = [draw(column_types) for _ in names]
    return [{c: draw(VALUES[t]) for c, t in zip(names, types)} for _ in range(n)]


@settings(FUZZ, max_examples=100)
@given(rows=tables())
def test_random_parquet(folder, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    outcome(path)


# ---- valid data reads the same however it is encoded or compressed ----------------------------

questions = st.text(min_size=1, max_size=20).filter(str.strip)


@settings(FUZZ, max_examples=50)
@given(
    pairs=st.lists(st.tuples(questions, questions), min_size=1, max_size=5, unique=True),
    encoding=st.sampled_from(["utf-8-sig", "utf-16", "utf-16-be", "utf-32"]),
    gz=st.booleans(),
)
def test_encoding_and_compression_do_not_change_valid_examples(folder, pairs, encoding, gz):
    text = "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs)
    (folder / "plain.jsonl").write_text(text, encoding="utf-8")
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = codecs.BOM_UTF16_BE + data
    path = folder / ("enc.jsonl.gz" if gz else "enc.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    expected = load_examples(str(folder / "plain.jsonl"))
    assert load_examples(str(path)) == expected
    assert [ex.prompt for ex in expected] == [f"Question: {q}\nAnswer:\n" for q, _ in pairs]
