"""Examples: one type with a stable content id, and the loaders that make them.

    load_examples(path) -> list[Example]     JSONL, JSON, Parquet, CSV, a `save_to_disk` directory,
                                            a directory of split files, or a Hub dataset name
    save_examples(path, examples)           JSONL in the "datalever" schema (round-trips)
    find_overlap(named_sets) -> list[Overlap]   examples shared by splits (same id or prompt);
                                            overlap_error / check_overlap turn them into a DataError

A record is mapped to an Example in three steps: detect the schema from the columns (or take the
one given), read the schema's *roles* (e.g. question/answer) from their columns, and render the
prompt with a format-string template. The id is a hash of the raw role values, taken before the
template is applied, so it survives row order, reruns and template changes.
Bad input raises DataError naming the file, the line or row (1-based) and what is wrong, and
nothing else: not a UnicodeDecodeError, RecursionError, csv.Error or a library's own exception.
Text files may be gzip-compressed (read transparently) and UTF-8, or UTF-16/UTF-32 with a
byte-order mark (decoded); any other encoding or compression is refused by name (see _open_text).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
import reprlib
import sys
import zlib
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Sequence, TextIO

from datalever import checks, rundir

log = logging.getLogger(__name__)

NO_SOURCE = "(none)"  # how an example without a source is named in summaries and per-source metrics

# Meta columns that describe how hard a problem is, where a dataset has them (the embedded data has
# level and steps): split summaries and evaluation metrics break results down by each one present.
DIFFICULTY_KEYS = ("difficulty", "level", "steps", "n_steps", "num_steps", "digits", "hops")


def content_id(*parts: str) -> str:
    """A stable id from an example's content (not its row number): 16 hex digits of SHA-256."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x1f")  # unit separator, so ("ab","c") and ("a","bc") differ
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    `prompt` is the rendered prompt (template applied); `response` is the text the model must produce.
    The loss is taken over the response tokens only.
    """

    id: str
    prompt: str
    response: str
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # A conversation (role, content) turns, ending with the assistant's, for data in the messages format: a
    # chat template renders it, and the loss is taken over every assistant turn. `prompt` and `response` then
    # hold its plain rendering up to the final assistant turn, and that turn's content (the gold answer).
    messages: tuple[tuple[str, str], ...] | None = field(default=None, hash=False, compare=False)

    def to_record(self) -> dict[str, Any]:
        record = {
            "id": self.id,
            "prompt": self.prompt,
            "response": self.response,
            "source": self.source,
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        if self.messages is not None:  # only then: files of other examples stay as they were, byte for byte
            record["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        return record


class DataError(ValueError):
    """Input data that cannot become examples; the message names the file, the line or row, and why."""


# --------------------------------------------------------------------------------------------
# Schemas and templates
# --------------------------------------------------------------------------------------------

# Prompts end in a newline, not a space: BPE tokenizers attach the space to the next word, so a
# prompt ending in " " would split the response's first token unnaturally at the boundary.
DEFAULT_TEMPLATES: dict[str, str] = {
    "gsm8k": "Question: {question}\nAnswer:\n",
    "alpaca": "### Instruction:\n{instruction}\n\n### Response:\n",
    "alpaca_input": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "prompt_response": "{prompt}",
    "prompt_completion": "{prompt}",  # TRL's format: the prompt is used as written
    "math": "Problem: {problem}\nSolution:\n",
    "datalever": "{prompt}",  # the prompt was rendered when the file was written
}

ROLES = ("system", "user", "assistant")  # the turns a conversation (the messages format) may hold


def plain_turn(role: str, content: str) -> str:
    """A conversation turn as plain text, for models without a chat template: "User: ...\n"."""
    return f"{role.capitalize()}: {content}\n"


PLAIN_ASSISTANT = "Assistant:\n"  # what a plain rendering puts before each assistant turn's content


def plain_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """The plain rendering of a conversation up to its final assistant turn (whose content is the response)."""
    parts = []
    for role, content in messages[:-1]:
        parts.append(PLAIN_ASSISTANT + content + "\n" if role == "assistant" else plain_turn(role, content))
    return "".join(parts) + PLAIN_ASSISTANT


@dataclass(frozen=True)
class Schema:
    name: str
    required: tuple[str, ...]  # roles that must hold non-empty text
    optional: tuple[str, ...]  # roles that may be missing or null
    response: str  # the role whose text the model must produce
    id_parts: tuple[str, ...]  # roles hashed into the content id, in this order

    @property
    def roles(self) -> tuple[str, ...]:
        return self.required + self.optional


# Detection order matters only for "datalever" vs "prompt_response" (a superset of columns).
SCHEMAS: dict[str, Schema] = {
    s.name: s
    for s in [
        Schema("datalever", ("id", "prompt", "response"), ("source", "meta", "messages"), "response", ("id",)),
        Schema("gsm8k", ("question", "answer"), ("source",), "answer", ("question", "answer")),
        # Alpaca and MathInstruct; `input` is always hashed ("" when absent) so adding an empty
        # input column does not change ids.
        Schema("alpaca", ("instruction", "output"), ("input", "source"), "output", ("instruction", "input", "output")),
        Schema("prompt_response", ("prompt", "response"), ("source",), "response", ("prompt", "response")),
        Schema("prompt_completion", ("prompt", "completion"), ("source",), "completion", ("prompt", "completion")),
        # MATH (Hendrycks et al.): the gold answer is the solution's last \boxed{...}.
        Schema("math", ("problem", "solution"), ("source",), "solution", ("problem", "solution")),
        # Conversations (TRL's conversational format, OpenAI's chat format): a list of {role, content} turns
        # ending with the assistant's. The response is the final assistant turn's content.
        Schema("messages", ("messages",), ("source",), "messages", ("messages",)),
    ]
}
STRUCTURED_ROLES = ("meta", "messages")  # roles that hold JSON values, not text


def detect_schema(columns: Iterable[str], fields: dict[str, str] | None = None) -> str:
    """The schema whose required columns are present; with `fields` (role -> column), the schema
    whose roles include every mapped role, so an explicit mapping overrides what detection
    would pick from the raw column names."""
    columns = list(columns)
    mapped = _mapped_columns(columns, fields or {})
    matches = [s.name for s in SCHEMAS.values() if set(fields or {}) <= set(s.roles) and set(s.required) <= mapped]
    if "datalever" in matches and "prompt_response" in matches:
        matches.remove("prompt_response")  # a datalever file also has prompt/response columns
    if len(matches) == 1:
        return matches[0]
    expected = "; ".join(f"{s.name} ({', '.join(s.required)})" for s in SCHEMAS.values())
    if matches:
        raise DataError(
            f"columns {columns} match several schemas ({', '.join(matches)}); choose one with --schema, or map "
            f"columns with --fields"
        )
    raise DataError(
        f"cannot detect the schema from columns {columns}; expected one of: {expected}; "
        f"or map your columns with --fields '{{prompt: COLUMN, response: COLUMN}}' (or --schema and --fields)"
    )


def _mapped_columns(columns: list[str], fields: dict[str, str]) -> set[str]:
    """Column names as roles: a mapped column is seen under its role's name."""
    renamed = {col: role for role, col in fields.items()}
    return {renamed.get(c, c) for c in columns}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass
class DataFormat:
    """How the records of a data source become examples: the options every command that reads data shares.

    Files datalever wrote itself (columns id, prompt, response: an arm's examples.jsonl, `data synth`'s splits)
    are read as written; these options apply to the others."""

    schema: str = "auto"
    """Data format: auto (detect from the columns) | gsm8k (question/answer) | alpaca (instruction/input/output, as
    MathInstruct) | prompt_response | prompt_completion (TRL) | math (problem/solution, gold from \\boxed{}) |
    messages (a list of {role, content} turns) | datalever."""
    fields: dict[str, str] | None = None
    """Role -> column, for columns named otherwise, e.g. '{question: problem, answer: solution}' or
    '{prompt: q, response: a, source: origin}'."""
    template: str | None = None
    """Prompt template over the roles and text columns, e.g. 'Q: {question}\\nA:\\n'; default: the schema's own."""

    def __post_init__(self) -> None:
        if self.schema != "auto":
            checks.one_of("schema", self.schema, ["auto", *SCHEMAS])
        if self.fields is not None and not (
            isinstance(self.fields, dict) and all(isinstance(v, str) for v in self.fields.values())
        ):
            raise ValueError(f"fields must map roles to column names, e.g. {{question: problem}}; got {self.fields!r}")

    def data_format(self) -> DataFormat:
        """These options alone (a stage config that inherits them passes itself through this)."""
        return DataFormat(self.schema, self.fields, self.template)


def load_examples(
    path: str,
    *,
    schema: str = "auto",
    fields: dict[str, str] | None = None,
    template: str | None = None,
    split: str | None = None,
    default_split: str | None = None,
    on_duplicate: str = "error",
    split_option: str = "--split",
) -> list[Example]:
    """Load examples from a file, a directory or a Hub dataset name ("openai/gsm8k:main": name and config).

    schema: "auto" (detect from columns) or one of SCHEMAS.
    fields: role -> column, e.g. {"prompt": "q", "response": "a", "source": "src"}; overrides detection.
    template: a format string over the roles and the record's text columns, e.g.
        "Question: {question}\\nAnswer:\\n"; default DEFAULT_TEMPLATES[schema].
    split: the split of a DatasetDict, a directory of split files, or a Hub dataset.
    default_split: the split to read when `split` is None and the source holds several (a stage passes its
        role's: "train" for training data, "test" for evaluation); a source of one split is read whole.
    on_duplicate: "error" (default) or "keep_first" (drops later copies, with a warning).
    split_option: the option that sets `split` for this source, which errors name (--val_split, ...).

    JSONL, JSON, CSV and TSV files may be gzip-compressed (data.jsonl.gz, or gzip bytes under any
    name: read transparently) and must be UTF-8, or UTF-16/UTF-32 with a byte-order mark (decoded).
    Any malformed file raises one DataError naming the file, the line or row where known, and why.
    """
    request = SplitRequest(split, default_split, split_option)
    return _load(path, schema, fields, template, request, on_duplicate)[0]


def _load(
    path: str,
    schema: str,
    fields: dict[str, str] | None,
    template: str | None,
    request: SplitRequest,
    on_duplicate: str,
) -> tuple[list[Example], str]:
    """The examples of a source, and how they were read: `gsm8k (detected; columns: question, answer)`."""
    if on_duplicate not in ("error", "keep_first"):
        raise ValueError(f"on_duplicate must be 'error' or 'keep_first', not {on_duplicate!r}")
    name, records = _read_records(os.fspath(path), request)
    columns = _columns(records)
    if not records:
        raise DataError(f"{name}: empty file (no records)")
    how = "detected" if schema == "auto" else "given"
    if _written_by_datalever(columns):  # its prompts were rendered when it was written (an arm's examples.jsonl)
        if schema != "auto" or fields or template is not None:
            log.info("%s: written by datalever (id, prompt, response, source, meta): read as written", name)
        schema, fields, template, how = "datalever", None, None, "written by datalever: read as written"
    _check_fields(name, columns, fields)
    chosen = _choose_schema(name, columns, schema, fields)
    examples = [_to_example(name, where, rec, chosen, fields or {}, template) for where, rec in records]
    if chosen.name == "prompt_completion" and examples[0].messages is not None:
        how += "; conversational: read as messages"
    examples = _handle_duplicates(name, examples, [w for w, _ in records], on_duplicate)
    return examples, f"{chosen.name} ({how}; columns: {', '.join(columns)})"


def read_data(
    path: str,
    data_format: DataFormat | None = None,
    *,
    split: str | None = None,
    default_split: str | None = None,
    on_duplicate: str = "error",
    split_option: str = "--split",
) -> list[Example]:
    """load_examples with a stage's data options."""
    fmt = data_format or DataFormat()
    return load_examples(
        path,
        schema=fmt.schema,
        fields=fmt.fields,
        template=fmt.template,
        split=split,
        default_split=default_split,
        on_duplicate=on_duplicate,
        split_option=split_option,
    )


def examples_written_by_datalever(path: str | os.PathLike) -> bool:
    """Whether a local file holds datalever's own columns (id, prompt, response, ...)."""
    try:
        return _written_by_datalever(_columns(_read_records(os.fspath(path), SplitRequest())[1]))
    except DataError:
        return False


def _written_by_datalever(columns: list[str]) -> bool:
    """Exactly the columns `save_examples` writes (a user's id/prompt/response file has no `meta` and `source`)."""
    written = {"id", "prompt", "response", "source", "meta"}
    return written <= set(columns) <= set(SCHEMAS["datalever"].roles)


def save_examples(path: str, examples: list[Example]) -> None:
    """Write examples as JSONL (columns id, prompt, response, source, meta), atomically.

    load_examples reads the file back as the "datalever" schema, keeping the ids."""
    from datalever.rundir import atomic_write_text

    lines = [json.dumps(ex.to_record(), ensure_ascii=False) for ex in examples]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------------------------
# Reading records: each reader yields (where, record) with `where` like "line 3" or "row 3"
# --------------------------------------------------------------------------------------------

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


def _read_records(path: str, request: SplitRequest) -> tuple[str, list[Located]]:
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
    if _format_of(p)[0] is not None or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or directory")
    return _read_hub(path, request)


def looks_local(data: str) -> bool:
    """Whether `data` names a local file or directory rather than a hub dataset (`openai/gsm8k`): it exists, has
    a data-file extension, starts like a path (".", "/", "~"), or has a parent directory that exists."""
    p = Path(data).expanduser()
    if p.exists() or _format_of(p)[0] is not None or data.startswith((".", "/", "~")):
        return True
    return len(p.parts) > 1 and p.parent.is_dir()


def local_data(name: str, value: str | None, *, optional: bool = False) -> None:
    """Data that names a local file or directory must exist; a hub dataset name (`openai/gsm8k:main`) is
    loaded, and checked, when it is read."""
    if optional and value is None:
        return
    if not value or looks_local(value):
        checks.existing_path(name, value)


def _format_of(p: Path) -> tuple[str | None, bool]:
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
    kind, gzipped = _format_of(p)
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


class _JSONProblem(Exception):
    """JSON that json.loads refuses for a reason other than its syntax, or that holds no valid text."""


def _loads(text: str) -> Any:
    """json.loads. A JSONDecodeError passes through (callers name its line and column); every
    other way it fails becomes a _JSONProblem."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise _JSONProblem(
            f"JSON nested too deeply to read (Python's recursion limit is {sys.getrecursionlimit()})"
        ) from None
    except ValueError as e:
        raise _JSONProblem(_number_problem(e)) from None
    # a \udXXX escape without its pair decodes to a lone surrogate, which cannot be hashed into an
    # id, tokenized or written back as UTF-8; only text with such an escape needs the walk
    bad = _lone_surrogate(value) if _SURROGATE_ESCAPE.search(text) else None
    if bad is not None:
        raise _JSONProblem(f"the \\u escape {bad} is a lone surrogate (half of a UTF-16 pair), not a character")
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
            rec = _loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        except _JSONProblem as e:
            raise DataError(f"{p}: line {lineno}: {e}") from None
        yield f"line {lineno}", _as_record(p, f"line {lineno}", rec)


def _read_json(p: Path) -> Iterator[Located]:
    """A list of records, or {"<key>": [records]}; a .json file that holds JSON lines (as
    `Dataset.to_json` writes by default) is read as JSONL."""
    text = "".join(line for _, line in _text_lines(p))
    try:
        data = _loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _read_jsonl(p)
            return
        raise DataError(f"{p}: line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except _JSONProblem as e:  # no line: json.loads does not say where
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
        files = sorted(f for f in p.iterdir() if _format_of(f)[0] is not None)
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


def _columns(records: list[Located]) -> list[str]:
    """The union of the records' keys, in order of first appearance."""
    seen: dict[str, None] = {}
    for _, rec in records:
        seen.update(dict.fromkeys(rec))
    return list(seen)


# --------------------------------------------------------------------------------------------
# Records to examples
# --------------------------------------------------------------------------------------------


def _choose_schema(name: str, columns: list[str], schema: str, fields: dict[str, str] | None) -> Schema:
    if schema == "auto":
        try:
            return SCHEMAS[detect_schema(columns, fields)]
        except DataError as e:
            raise DataError(f"{name}: {e}") from None
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; expected 'auto' or one of {list(SCHEMAS)}")
    unknown = set(fields or {}) - set(SCHEMAS[schema].roles)
    if unknown:
        raise ValueError(
            f"fields maps {sorted(unknown)}, which are not roles of schema "
            f"{schema!r} (roles: {list(SCHEMAS[schema].roles)})"
        )
    return SCHEMAS[schema]


def _check_fields(name: str, columns: list[str], fields: dict[str, str] | None) -> None:
    """A mapping that names an unknown role or a missing column is a typo, not an optional field."""
    all_roles = {r for s in SCHEMAS.values() for r in s.roles}
    for role, col in (fields or {}).items():
        if role not in all_roles:
            raise ValueError(f"fields: unknown role {role!r}; roles are {sorted(all_roles)}")
        if col not in columns:
            raise DataError(
                f"{name}: fields maps {role!r} to column {col!r}, which is not in the data (columns: {columns})"
            )


def _to_example(
    name: str, where: str, rec: dict[str, Any], schema: Schema, fields: dict[str, str], template: str | None
) -> Example:
    def fail(msg: str) -> DataError:
        return DataError(f"{name}: {where}: {msg}")

    if schema.name == "prompt_completion" and isinstance(rec.get(fields.get("prompt", "prompt")), list):
        rec, schema, fields = _conversational_prompt_completion(rec, fields), SCHEMAS["messages"], {}
    roles = _read_roles(rec, schema, fields, fail)
    used = {fields.get(r, r) for r in schema.roles}
    meta = _meta(rec, used, roles.pop("meta", None), fail)
    messages = _messages(roles.pop("messages", None), fail)
    if schema.name == "messages" and messages is None:
        raise fail("field 'messages' is empty")
    if schema.name == "messages":
        ex_id = content_id(json.dumps(messages, ensure_ascii=False))
        return Example(ex_id, plain_prompt(messages), messages[-1][1], roles.get("source"), meta, messages)
    prompt = _render(rec, roles, schema, template, fail)
    ex_id = roles["id"] if schema.name == "datalever" else content_id(*(roles[r] for r in schema.id_parts))
    return Example(ex_id, prompt, roles[schema.response], roles.get("source"), meta, messages)


def _conversational_prompt_completion(rec: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """TRL's conversational prompt/completion (each a list of turns) as one conversation in `messages`."""
    prompt, completion = fields.get("prompt", "prompt"), fields.get("completion", "completion")
    turns = list(rec[prompt]) + (rec[completion] if isinstance(rec.get(completion), list) else [rec.get(completion)])
    rest = {k: v for k, v in rec.items() if k not in (prompt, completion)}
    return {**rest, "messages": turns, "source": rec.get(fields.get("source", "source"))}


def _messages(value: Any, fail) -> tuple[tuple[str, str], ...] | None:
    """A conversation as (role, content) pairs: a list (or its JSON text) of {role, content} objects, roles among
    ROLES, every content text, ending with a non-empty assistant turn that follows a user turn."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = _loads(value)
        except (json.JSONDecodeError, _JSONProblem) as e:
            raise fail(f"field 'messages' is not valid JSON ({e})") from None
    if not isinstance(value, list) or not value:
        raise fail(f"field 'messages' must be a non-empty list of {{role, content}} turns, got {_short_repr(value)}")
    turns = []
    for i, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise fail(
                f"messages turn {i}: expected {{role: {'|'.join(ROLES)}, content: text}}, got {_short_repr(turn)}"
            )
        turns.append((turn["role"], turn["content"]))
    if turns[-1][0] != "assistant" or not turns[-1][1].strip():
        raise fail("messages must end with a non-empty assistant turn (the response the model learns)")
    first = next((role for role, _ in turns if role != "system"), None)
    if first != "user":
        raise fail("messages must begin with a user turn (after any system turn)")
    return tuple(turns)


def _read_roles(rec: dict[str, Any], schema: Schema, fields: dict[str, str], fail) -> dict[str, Any]:
    """Role values: required ones non-empty text; optional ones text or missing ("" / None)."""
    roles: dict[str, Any] = {}
    for role in schema.roles:
        col = fields.get(role, role)
        value = rec.get(col)
        if role in STRUCTURED_ROLES:
            if role in schema.required and col not in rec:
                raise fail(f"missing field {col!r}")
            roles[role] = value
        elif role in schema.required:
            if col not in rec:
                raise fail(f"missing field {col!r}")
            roles[role] = _text(value, col, fail, allow_empty=False)
        elif value is not None and value != "":
            roles[role] = _text(value, col, fail, allow_empty=True)
        else:  # absent optional: "" where it is hashed or rendered, None for the source
            roles[role] = None if role == "source" else ""
    return roles


def _text(value: Any, col: str, fail, *, allow_empty: bool) -> str:
    if not isinstance(value, str):
        shown = "null" if value is None else f"{type(value).__name__} {_short_repr(value)}"[:80]
        raise fail(f"field {col!r} must be text, got {shown}")
    if not allow_empty and not value.strip():
        # an empty response gives a loss over zero tokens (NaN); an empty prompt is a broken row
        raise fail(f"field {col!r} is empty")
    return value


def _short_repr(value: Any) -> str:
    """repr, bounded in length and depth (a bad value may be a huge or deeply nested list)."""
    try:
        return reprlib.repr(value)
    except (ValueError, RecursionError):  # an int too long to print, a structure too deep
        return "..."


def _meta(rec: dict[str, Any], used: set[str], stored: Any, fail) -> dict[str, Any]:
    """Stored meta (datalever schema: a JSON string or object) plus every column not used by a role."""
    meta: dict[str, Any] = {}
    if isinstance(stored, str) and stored:
        try:
            stored = _loads(stored)
        except json.JSONDecodeError as e:
            raise fail(f"field 'meta' is not valid JSON ({e.msg})") from None
        except _JSONProblem as e:
            raise fail(f"field 'meta': {e}") from None
    if isinstance(stored, dict):
        meta.update(stored)
    elif stored not in (None, ""):
        raise fail(f"field 'meta' must be a JSON object, got {type(stored).__name__}")
    for k, v in rec.items():
        if k not in used:
            try:
                meta[k] = _jsonable(v)
            except RecursionError:  # parsed, but too deep to serialize from here
                raise fail(f"field {k!r} nests too deeply to keep as metadata") from None
    return meta


def _jsonable(value: Any) -> Any:
    """Keep JSON values as they are; anything else (dates, bytes) as text, so save_examples works."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def _render(rec: dict[str, Any], roles: dict[str, Any], schema: Schema, template: str | None, fail) -> str:
    """Format the template over the record's text columns and the roles (roles win)."""
    if template is None:
        key = "alpaca_input" if schema.name == "alpaca" and roles.get("input") else schema.name
        template = DEFAULT_TEMPLATES[key]
    names = {k: v for k, v in rec.items() if isinstance(v, str)}
    names.update({k: ("" if v is None else v) for k, v in roles.items()})
    try:
        return template.format_map(names)
    except KeyError as e:
        raise fail(f"template field {e} is not a column or role (available: {sorted(names)})") from None
    except (ValueError, IndexError, AttributeError, TypeError) as e:
        raise fail(f"bad template {template!r} ({e})") from None


def _handle_duplicates(name: str, examples: list[Example], wheres: list[str], on_duplicate: str) -> list[Example]:
    """Same id twice = same content twice. Report it with counts; never drop it silently."""
    first_at: dict[str, int] = {}
    dup_rows: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        if ex.id in first_at:
            dup_rows[ex.id].append(i)
        else:
            first_at[ex.id] = i
    if not dup_rows:
        return examples
    n_dups = sum(len(v) for v in dup_rows.values())
    firsts = sorted(v[0] for v in dup_rows.values())[:5]
    originals = [first_at[examples[i].id] for i in firsts]
    unit = wheres[0].split()[0] + "s"  # "lines", "rows" or "records"
    more = ", ..." if len(dup_rows) > len(firsts) else ""
    msg = (
        f"{name}: {n_dups} duplicate examples ({len(dup_rows)} distinct ids), first at "
        f"{unit} {_numbers(wheres, firsts)}{more} (copies of {unit} {_numbers(wheres, originals)}{more})"
    )
    if on_duplicate == "error":
        raise DataError(msg + "; pass on_duplicate='keep_first' to keep the first copy of each")
    log.warning("%s; keeping the first copy of each", msg)
    dropped = {i for v in dup_rows.values() for i in v}
    return [ex for i, ex in enumerate(examples) if i not in dropped]


def _numbers(wheres: list[str], indices: list[int]) -> str:
    """ "4", "4 and 9", "4, 6 and 9" from locations like "row 4"."""
    nums = [wheres[i].split()[1] for i in indices]
    return " and ".join(filter(None, [", ".join(nums[:-1]), nums[-1]]))


# --------------------------------------------------------------------------------------------
# Leakage between splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Overlap:
    """The examples of split `second` that also occur in split `first` (e.g. test examples in train).

    same_id: as many share a content id (the same raw question and answer); same_prompt: as many more
    have another id but the same prompt once case and whitespace are folded (a copy with a reworded
    answer, a changed source, or different spacing). Each example of `second` counts once.
    samples: a few of them, as (id, prompt)."""

    first: str
    second: str
    size: int  # examples in `second`
    same_id: int
    same_prompt: int
    samples: tuple[tuple[str, str], ...] = ()

    @property
    def count(self) -> int:
        return self.same_id + self.same_prompt

    def describe(self) -> str:
        """One clause: "test shares 3 of 10 examples with train (2 same id, 1 same prompt), e.g. ..."."""
        shown = ", ".join(f"{i} {_clip(prompt, 50)!r}" for i, prompt in self.samples)
        return (
            f"{self.second} shares {self.count} of {self.size} examples with {self.first} "
            f"({self.same_id} same id, {self.same_prompt} same prompt up to case and spacing), e.g. {shown}"
        )

    def to_dict(self) -> dict[str, Any]:
        """For a report: the fields, the total, and the samples as lists."""
        return {
            "first": self.first,
            "second": self.second,
            "size": self.size,
            "count": self.count,
            "same_id": self.same_id,
            "same_prompt": self.same_prompt,
            "samples": [list(s) for s in self.samples],
        }


def normalize_prompt(prompt: str) -> str:
    """The prompt's own text (out of a default template: the question, not "Question: ...\\nAnswer:") with case
    and whitespace folded: what a copy keeps when it is reworded, respaced or asked in another format (a GSM8K
    test question copied into Alpaca-format training data)."""
    return " ".join(prompt_core(prompt).casefold().split())


def _template_pattern(template: str) -> re.Pattern | None:
    """A default template with one field as a regex capturing that field's text (None for "{prompt}")."""
    parts = re.split(r"\{\w+\}", template)
    if len(parts) != 2 or not (parts[0] or parts[1]):
        return None
    return re.compile(re.escape(parts[0]) + "(.*)" + re.escape(parts[1]), re.DOTALL)


_CORE_PATTERNS = [p for p in map(_template_pattern, DEFAULT_TEMPLATES.values()) if p is not None]


def prompt_core(prompt: str) -> str:
    """The field a default template wrapped ("Question: X\\nAnswer:\\n" -> "X"), else the prompt as it is."""
    for pattern in _CORE_PATTERNS:
        match = pattern.fullmatch(prompt)
        if match:
            return match.group(1)
    return prompt


def find_overlap(named_sets: Mapping[str, Sequence[Example]], *, max_samples: int = 3) -> list[Overlap]:
    """Every pair of splits, in the mapping's order (train/validation, train/test, validation/test),
    whose second split holds examples of the first, by content id or by normalized prompt.
    Pairs that share nothing are left out, so an empty list means the splits are disjoint."""
    names = list(named_sets)
    overlaps = []
    for i, first in enumerate(names):
        ids = {ex.id for ex in named_sets[first]}
        prompts = {normalize_prompt(ex.prompt) for ex in named_sets[first]}
        for second in names[i + 1 :]:
            found = _overlap_of(first, second, ids, prompts, named_sets[second], max_samples)
            if found.count:
                overlaps.append(found)
    return overlaps


def _overlap_of(
    first: str, second: str, ids: set[str], prompts: set[str], examples: Sequence[Example], max_samples: int
) -> Overlap:
    same_id = same_prompt = 0
    samples = []
    for ex in examples:
        if ex.id in ids:
            same_id += 1
        elif normalize_prompt(ex.prompt) in prompts:
            same_prompt += 1
        else:
            continue
        if len(samples) < max_samples:
            samples.append((ex.id, ex.prompt))
    return Overlap(first, second, len(examples), same_id, same_prompt, tuple(samples))


def overlap_error(overlaps: list[Overlap]) -> DataError:
    """find_overlap's non-empty result as one DataError, for the caller to raise."""
    if not overlaps:
        raise ValueError("overlap_error needs at least one overlap; find_overlap found none")
    total = sum(o.count for o in overlaps)
    return DataError(
        f"splits overlap ({total} shared examples): "
        + "; ".join(o.describe() for o in overlaps)
        + ". Shared examples make validation and test scores measure memory; de-duplicate the splits, "
        "or set allow_overlap to proceed anyway"
    )


def check_overlap(named_sets: Mapping[str, Sequence[Example]], *, allow_overlap: bool = False) -> list[Overlap]:
    """find_overlap, raising overlap_error's DataError unless allow_overlap (then a warning).
    Returns the overlaps (empty when the splits are disjoint) for the caller's report."""
    overlaps = find_overlap(named_sets)
    if overlaps and not allow_overlap:
        raise overlap_error(overlaps)
    for o in overlaps:
        log.warning("allow_overlap: %s", o.describe())
    return overlaps


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# The `data check` command
# --------------------------------------------------------------------------------------------


@dataclass
class CheckConfig(DataFormat):
    """Load a dataset as training would, and report what was found (or exactly what is wrong)."""

    data: str | None = None
    """Dataset file or directory (JSONL, JSON, Parquet, CSV, a datasets directory) or hub dataset
    (`openai/gsm8k:main`); required."""
    split: str | None = None
    """Split to read from a DatasetDict directory or hub dataset."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None:
            raise ValueError("data is required: the dataset to check (--data FILE or a hub dataset)")


def run_check(cfg: CheckConfig) -> str:
    request = SplitRequest(cfg.split, None, "--split")  # as read_data reads it, with how it was read
    examples, how = _load(cfg.data, cfg.schema, cfg.fields, cfg.template, request, "error")
    sources = Counter(ex.source or NO_SOURCE for ex in examples)
    lines = [
        f"{cfg.data}: {len(examples)} examples",
        f"schema: {how}",
        "sources: " + ", ".join(f"{k}={v}" for k, v in sources.most_common()),
        f"fingerprint: {rundir.fingerprint(examples)}",
    ]
    if examples:
        ex = examples[0]
        lines += ["first example:", f"  id: {ex.id}", f"  prompt: {ex.prompt!r}", f"  response: {ex.response!r}"]
    return "\n".join(lines)
