"""Reading records: a file, a directory of split files, a `save_to_disk` directory or a Hub dataset -> the
records it holds, each located ("line 3", "row 3", "record 3"), and every way the input can be malformed.

Bad input raises DataError naming the file, the line or row (1-based) and what is wrong, and
nothing else: not a UnicodeDecodeError, RecursionError, csv.Error or a library's own exception.
Text files may be gzip-compressed (read transparently) and UTF-8, or UTF-16/UTF-32 with a
byte-order mark (decoded); any other encoding or compression is refused by name (see _open_text).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, TextIO

from datalever.examples.base import DataError

Located = tuple[str, dict[str, Any]]

FILE_READERS = {  # file suffix -> reader (a .gz suffix after a text format is read through gzip)
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}

# Byte-order marks, UTF-32 first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)
_GZIP_MAGIC = b"\x1f\x8b"
# Other compressions are named, not guessed at: their bytes would otherwise read as garbled text.
_OTHER_COMPRESSIONS = {b"PK\x03\x04": "zip", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_BZIP2_MAGIC = re.compile(rb"BZh[1-9]1AY&SY")
_CSV_FIELD_LIMIT = 2**31 - 1  # the largest value csv.field_size_limit accepts on every platform (a C long)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800 .. \udfff


@dataclass(frozen=True)
class SplitRequest:
    """Which split of a source to read: the one asked for (`split`), else the stage's role default (train, test);
    `option` is the option that sets it for this source (--val_split for validation data), which errors name."""

    split: str | None = None
    default: str | None = None
    option: str = "--split"


def read_records(path: str, request: SplitRequest) -> tuple[str, list[Located]]:
    """Dispatch on what `path` is; returns a display name and the located records."""
    p = Path(path).expanduser()
    try:
        is_dir, is_file = p.is_dir(), p.is_file()
    except (OSError, ValueError) as e:  # e.g. a name too long for the file system
        raise DataError(f"{path}: cannot access ({_one_line(e)})") from None
    if is_dir:
        return _read_directory(p, request)
    if is_file:
        if request.split is not None:
            raise DataError(f"{path}: {request.option} {request.split} was given, but a single file has no splits")
        return str(p), list(_read_file(p))
    if format_of(p)[0] is not None or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or directory")
    return _read_hub(path, request)


def format_of(p: Path) -> tuple[str | None, bool]:
    """The reader a file name asks for, and whether the name ends in .gz: "d.jsonl.gz" -> ("jsonl", True)."""
    name = p.name.lower()
    gzipped = name.endswith(".gz")
    suffix = Path(name.removesuffix(".gz")).suffix if gzipped else p.suffix.lower()
    return FILE_READERS.get(suffix), gzipped


def _split_of(p: Path) -> str:
    """The split a file in a directory of split files holds: "train.jsonl" and "train.jsonl.gz" -> "train"."""
    name = p.name[:-3] if p.name.lower().endswith(".gz") else p.name
    return Path(name).stem


def _read_file(p: Path) -> Iterable[Located]:
    kind, gzipped = format_of(p)
    if kind is None:
        shown = "".join(p.suffixes[-2:]) if gzipped else p.suffix
        raise DataError(
            f"{p}: unsupported file type {shown!r}; expected one of "
            f"{', '.join(sorted(FILE_READERS))} (text formats optionally .gz), or a directory"
        )
    if kind == "parquet":
        if gzipped:
            raise DataError(f"{p}: a gzip-compressed Parquet file; decompress it (Parquet compresses its own columns)")
        return _read_parquet(p)
    if kind == "json":
        return _read_json(p)
    if kind == "jsonl":
        return _read_jsonl(p)
    return _read_csv(p, delimiter="\t" if kind == "tsv" else ",")


@contextmanager
def _open_text(p: Path, newline: str | None = None) -> Iterator[tuple[TextIO, str]]:
    """The file as a text stream, and the name of its encoding. What the first bytes say decides,
    not the file name:

    - gzip (magic bytes 1f 8b; data.jsonl.gz, or a gzipped file under any name) is decompressed
      transparently, as `datasets` does; zip, xz, zstd and bzip2 are refused, named.
    - A byte-order mark decides the encoding: UTF-8 (the mark is skipped), UTF-16 or UTF-32
      (decoded: Excel's "Unicode text" export is UTF-16, and the mark makes that unambiguous).
    - Without a mark the text must be UTF-8. Mostly-NUL bytes (UTF-16/32 without a mark) are refused
      at once; any other byte that is not UTF-8 (Latin-1, Windows-1252) is refused with its line,
      column and value by _text_lines.
    """
    binary = _open_binary(p)
    try:
        encoding, label = _encoding(p, _peek(p, binary, 4096))
        # surrogateescape: a byte that is not UTF-8 surfaces in the line that holds it, where
        # _check_utf8 names it; strict decoding would fail a whole read-ahead chunk, lines early.
        errors = "surrogateescape" if label == "UTF-8" else "strict"
        text = io.TextIOWrapper(binary, encoding=encoding, errors=errors, newline=newline)
    except BaseException:
        binary.close()
        raise
    with text:
        yield text, label


def _open_binary(p: Path) -> BinaryIO:
    """The file's bytes, decompressed when they are gzip."""
    try:
        f = open(p, "rb")
        head = f.peek(16)[:16]
    except OSError as e:
        raise DataError(f"{p}: cannot read the file ({e.strerror or _one_line(e)})") from None
    if head.startswith(_GZIP_MAGIC):
        f.close()
        return gzip.open(p, "rb")
    compression = _compression(head)
    if compression is not None:
        f.close()
        raise DataError(f"{p}: compressed with {compression} (by its first bytes); decompress it, or use gzip")
    return f


def _compression(head: bytes) -> str | None:
    if _BZIP2_MAGIC.match(head):
        return "bzip2"
    return next((name for magic, name in _OTHER_COMPRESSIONS.items() if head.startswith(magic)), None)


def _peek(p: Path, binary: BinaryIO, n: int) -> bytes:
    try:
        return binary.peek(n)[:n]  # type: ignore[attr-defined]  # BufferedReader and GzipFile peek
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{p}: {_read_problem(e)}") from None


def _encoding(p: Path, head: bytes) -> tuple[str, str]:
    """(codec, name) for the text, from its first bytes."""
    for bom, codec, label in _BOMS:
        if head.startswith(bom):
            return codec, label
    if head and head.count(0) * 4 >= len(head):
        raise DataError(
            f"{p}: not UTF-8 text: NUL bytes in the first {len(head)} bytes, as in UTF-16 or UTF-32 "
            f"without a byte-order mark; save the file as UTF-8"
        )
    return "utf-8", "UTF-8"


def _text_lines(p: Path, newline: str | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file. A byte that does not decode, or gzip data that does not
    decompress, is a DataError naming the line."""
    with _open_text(p, newline) as (f, encoding):
        lines = iter(f)
        lineno = 0
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError as e:  # only the strict UTF-16/UTF-32 decoders raise this
                raise DataError(f"{p}: near line {lineno + 1}: not valid {encoding} text ({e.reason})") from None
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{p}: near line {lineno + 1}: {_read_problem(e)}") from None
            lineno += 1
            if encoding == "UTF-8":
                _check_utf8(p, lineno, line)
            yield lineno, line


def _read_problem(e: BaseException) -> str:
    if isinstance(e, (gzip.BadGzipFile, EOFError, zlib.error)):
        return f"corrupt or truncated gzip data ({_one_line(e)})"
    return f"cannot read the file ({_one_line(e)})"


def _check_utf8(p: Path, lineno: int, line: str) -> None:
    """Bytes that are not UTF-8 were decoded as lone surrogates U+DC80..U+DCFF (surrogateescape)."""
    if line.isascii():
        return
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(line[e.start]) - 0xDC00
        raise DataError(
            f"{p}: line {lineno}: not UTF-8 text (byte 0x{byte:02x} at column {e.start + 1}); save the file as UTF-8"
        ) from None


class JSONProblem(Exception):
    """JSON that json.loads refuses for a reason other than its syntax, or that holds no valid text."""


def parse_json(text: str) -> Any:
    """json.loads. A JSONDecodeError passes through (callers name its line and column); every
    other way it fails becomes a JSONProblem."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise JSONProblem(
            f"JSON nested too deeply to read (Python's recursion limit is {sys.getrecursionlimit()})"
        ) from None
    except ValueError as e:
        raise JSONProblem(_number_problem(e)) from None
    # a \udXXX escape without its pair decodes to a lone surrogate, which cannot be hashed into an
    # id, tokenized or written back as UTF-8; only text with such an escape needs the walk
    bad = _lone_surrogate(value) if _SURROGATE_ESCAPE.search(text) else None
    if bad is not None:
        raise JSONProblem(f"the \\u escape {bad} is a lone surrogate (half of a UTF-16 pair), not a character")
    return value


def _number_problem(e: ValueError) -> str:
    if "integer string conversion" in str(e):  # sys.get_int_max_str_digits, against quadratic-time parsing
        return (
            f"a JSON integer longer than {sys.get_int_max_str_digits()} digits (Python's limit on "
            f"converting text to int); store it as a string"
        )
    return f"cannot read JSON ({_one_line(e)})"


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in a parsed JSON value's strings and keys, as a \\u escape."""
    stack = [value]
    while stack:  # a loop, not recursion: the value may nest nearly as deep as the recursion limit
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str) and not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"\\u{ord(v[e.start]):04x}"
    return None


def _read_jsonl(p: Path) -> Iterator[Located]:
    for lineno, line in _text_lines(p):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) carry no record
        try:
            rec = parse_json(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        except JSONProblem as e:
            raise DataError(f"{p}: line {lineno}: {e}") from None
        yield f"line {lineno}", _as_record(p, f"line {lineno}", rec)


def _read_json(p: Path) -> Iterator[Located]:
    """A list of records, or {"<key>": [records]}; a .json file that holds JSON lines (as
    `Dataset.to_json` writes by default) is read as JSONL."""
    text = "".join(line for _, line in _text_lines(p))
    try:
        data = parse_json(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _read_jsonl(p)
            return
        raise DataError(f"{p}: line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except JSONProblem as e:  # no line: json.loads does not say where
        raise DataError(f"{p}: {e}") from None
    for i, rec in enumerate(_json_record_list(p, data), start=1):
        yield f"record {i}", _as_record(p, f"record {i}", rec)


def _json_record_list(p: Path, data: Any) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if "data" in lists or len(lists) == 1:  # {"data": [...]} or one list under another key
            return data["data" if "data" in lists else lists[0]]
        raise DataError(
            f"{p}: a JSON object must hold the records as a list under one key (e.g. 'data'); found list keys {lists}"
        )
    raise DataError(f"{p}: expected a JSON list of records, got {type(data).__name__}")


def _read_parquet(p: Path) -> list[Located]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files, and on invalid UTF-8 strings
        raise DataError(f"{p}: cannot read Parquet ({_one_line(e)})") from None
    return [(f"row {i}", rec) for i, rec in enumerate(rows, start=1)]


def _read_csv(p: Path, delimiter: str) -> list[Located]:
    """Every CSV value is text; an empty cell is "" (a missing optional value). A cell may be as long
    as a JSON string may: csv's default field limit (131,072 characters) is lifted while reading."""
    lines = (line for _, line in _text_lines(p, newline=""))  # csv wants the line endings untranslated
    reader = csv.DictReader(lines, delimiter=delimiter)
    records = []
    with _csv_field_limit(_CSV_FIELD_LIMIT):
        try:
            for i, rec in enumerate(reader, start=1):
                # DictReader puts surplus cells under the key None, and fills missing cells with None
                if None in rec or None in rec.values():
                    raise DataError(
                        f"{p}: row {i} (line {reader.line_num}): the number of cells "
                        f"differs from the header's {len(reader.fieldnames)} columns"
                    )
                records.append((f"row {i}", rec))
        except csv.Error as e:
            raise DataError(f"{p}: line {reader.line_num}: malformed CSV ({_one_line(e)})") from None
    return records


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """csv.field_size_limit is process-wide: raise it for one read, then put it back."""
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _as_record(p: Path, where: str, rec: Any) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise DataError(f"{p}: {where}: expected a JSON object (a record), got {type(rec).__name__}")
    return rec


def _one_line(e: BaseException) -> str:
    """Another library's error text, folded onto one line (a DataError is printed as one line)."""
    return " ".join(str(e).split()) or type(e).__name__


def _read_directory(p: Path, request: SplitRequest) -> tuple[str, list[Located]]:
    """A `save_to_disk` directory (Dataset or DatasetDict), or a directory of split files
    such as synth.write_splits writes (train.jsonl, validation.jsonl, test.jsonl)."""
    if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise DataError(f"{p}: cannot load the saved dataset ({_one_line(e)})") from None
        return _from_hf(str(p), ds, request)
    try:
        files = sorted(f for f in p.iterdir() if format_of(f)[0] is not None)
    except OSError as e:
        raise DataError(f"{p}: cannot list the directory ({e.strerror or _one_line(e)})") from None
    names = sorted({_split_of(f) for f in files})
    split = _choose_split(str(p), names, request)
    chosen = [f for f in files if _split_of(f) == split]
    if len(chosen) != 1:
        raise DataError(
            f"{p}: expected one file for split {split!r}, found {[f.name for f in chosen]} (splits: {names})"
        )
    return str(chosen[0]), list(_read_file(chosen[0]))


def _choose_split(name: str, splits: list[str], request: SplitRequest) -> str:
    """The split to read: the one asked for, else the only one, else the stage's role default (train, test)."""
    if request.split is None:
        if len(splits) == 1:
            return splits[0]
        if request.default in splits:
            return request.default
        raise DataError(f"{name}: holds the splits {splits}; choose one with {request.option}")
    if request.split not in splits:
        raise DataError(f"{name}: has no split {request.split!r}; its splits are {splits} ({request.option})")
    return request.split


def _from_hf(name: str, ds: Any, request: SplitRequest) -> tuple[str, list[Located]]:
    """Records from a datasets.Dataset, or from the chosen split of a DatasetDict."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        split = _choose_split(name, list(ds), request)
        ds, name = ds[split], f"{name}[{split}]"
    elif request.split is not None:
        raise DataError(f"{name}: {request.option} {request.split} was given, but this is a single Dataset")
    try:
        rows = ds.to_list()
    except Exception as e:  # arrow raises several types for corrupt files
        raise DataError(f"{name}: cannot read the rows ({_one_line(e)})") from None
    return name, [(f"row {i}", rec) for i, rec in enumerate(rows, start=1)]


def _read_hub(path: str, request: SplitRequest) -> tuple[str, list[Located]]:
    """A Hub dataset, "name" or "name:config" (e.g. "openai/gsm8k:main"): every split is loaded (they are
    downloaded together anyway), then the split chosen as for a saved DatasetDict."""
    import datasets

    name, _, config = path.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:
        raise DataError(
            f"{path}: not a local file or directory, and loading it from the Hugging "
            f"Face Hub failed ({type(e).__name__}: {_one_line(e)}). Offline? Download it elsewhere "
            f"and pass a saved file or directory instead."
        ) from None
    return _from_hf(path, ds, request)


def columns_of(records: list[Located]) -> list[str]:
    """The union of the records' keys, in order of first appearance."""
    seen: dict[str, None] = {}
    for _, rec in records:
        seen.update(dict.fromkeys(rec))
    return list(seen)
