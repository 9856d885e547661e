"""Examples: one type with a stable content id, and the loaders that make them.

    load_examples(path) -> list[Example]     JSONL, JSON, Parquet, CSV, a `save_to_disk` directory,
                                            a directory of split files, or a Hub dataset name
    save_examples(path, examples)           JSONL in the "datalever" schema (round-trips)

A record is mapped to an Example in three steps: detect the schema from the columns (or take the
one given), read the schema's *roles* (e.g. question/answer) from their columns, and render the
prompt with a format-string template. The id is a hash of the raw role values, taken before the
template is applied, so it survives row order, reruns and template changes.
Bad input raises DataError naming the file, the line or row (1-based) and what is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from datalever import rundir

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

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "response": self.response,
            "source": self.source,
            "meta": json.dumps(self.meta, sort_keys=True),
        }


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
    "datalever": "{prompt}",  # the prompt was rendered when the file was written
}


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
        Schema("datalever", ("id", "prompt", "response"), ("source", "meta"), "response", ("id",)),
        Schema("gsm8k", ("question", "answer"), ("source",), "answer", ("question", "answer")),
        # Alpaca and MathInstruct; `input` is always hashed ("" when absent) so adding an empty
        # input column does not change ids.
        Schema("alpaca", ("instruction", "output"), ("input", "source"), "output", ("instruction", "input", "output")),
        Schema("prompt_response", ("prompt", "response"), ("source",), "response", ("prompt", "response")),
    ]
}


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
            f"columns {columns} match several schemas ({', '.join(matches)}); pass schema= or fields= to choose"
        )
    raise DataError(
        f"cannot detect the schema from columns {columns}; expected one of: {expected}; "
        f"or pass fields={{'prompt': ..., 'response': ...}}"
    )


def _mapped_columns(columns: list[str], fields: dict[str, str]) -> set[str]:
    """Column names as roles: a mapped column is seen under its role's name."""
    renamed = {col: role for role, col in fields.items()}
    return {renamed.get(c, c) for c in columns}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_examples(
    path: str,
    *,
    schema: str = "auto",
    fields: dict[str, str] | None = None,
    template: str | None = None,
    split: str | None = None,
    on_duplicate: str = "error",
) -> list[Example]:
    """Load examples from a file, a directory or a Hub dataset name.

    schema: "auto" (detect from columns) or one of SCHEMAS.
    fields: role -> column, e.g. {"prompt": "q", "response": "a", "source": "src"}; overrides detection.
    template: a format string over the roles and the record's text columns, e.g.
        "Question: {question}\\nAnswer:\\n"; default DEFAULT_TEMPLATES[schema].
    split: the split of a DatasetDict, a directory of split files, or a Hub dataset.
    on_duplicate: "error" (default) or "keep_first" (drops later copies, with a warning).
    """
    if on_duplicate not in ("error", "keep_first"):
        raise ValueError(f"on_duplicate must be 'error' or 'keep_first', not {on_duplicate!r}")
    name, records = _read_records(os.fspath(path), split)
    columns = _columns(records)
    if not records:
        raise DataError(f"{name}: empty file (no records)")
    _check_fields(name, columns, fields)
    chosen = _choose_schema(name, columns, schema, fields)
    examples = [_to_example(name, where, rec, chosen, fields or {}, template) for where, rec in records]
    return _handle_duplicates(name, examples, [w for w, _ in records], on_duplicate)


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

_FILE_READERS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}


def _read_records(path: str, split: str | None) -> tuple[str, list[Located]]:
    """Dispatch on what `path` is; returns a display name and the located records."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _read_directory(p, split)
    if p.is_file():
        if split is not None:
            raise DataError(f"{path}: split={split!r} was given, but a single file has no splits")
        return str(p), list(_read_file(p))
    if p.suffix.lower() in _FILE_READERS or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or directory")
    return _read_hub(path, split)


def _read_file(p: Path) -> Iterator[Located]:
    kind = _FILE_READERS.get(p.suffix.lower())
    if kind is None:
        raise DataError(
            f"{p}: unsupported file type {p.suffix!r}; expected one of "
            f"{', '.join(sorted(_FILE_READERS))}, or a directory"
        )
    reader = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv, "tsv": _read_csv}[
        kind
    ]
    return reader(p)


def _read_jsonl(p: Path) -> Iterator[Located]:
    with p.open(encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) carry no record
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            yield f"line {lineno}", _as_record(p, f"line {lineno}", rec)


def _read_json(p: Path) -> Iterator[Located]:
    """A list of records, or {"<key>": [records]}; a .json file that holds JSON lines (as
    `Dataset.to_json` writes by default) is read as JSONL."""
    text = p.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _read_jsonl(p)
            return
        raise DataError(f"{p}: line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
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


def _read_parquet(p: Path) -> Iterator[Located]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{p}: cannot read Parquet ({e})") from None
    for i, rec in enumerate(table.to_pylist(), start=1):
        yield f"row {i}", rec


def _read_csv(p: Path) -> Iterator[Located]:
    """Every CSV value is text; an empty cell is "" (a missing optional value)."""
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    with p.open(encoding="utf-8-sig", newline="") as f:  # spreadsheets often write a BOM
        reader = csv.DictReader(f, delimiter=delimiter)
        for i, rec in enumerate(reader, start=1):
            # DictReader puts surplus cells under the key None, and fills missing cells with None
            if None in rec or None in rec.values():
                raise DataError(
                    f"{p}: row {i} (line {reader.line_num}): the number of cells "
                    f"differs from the header's {len(reader.fieldnames)} columns"
                )
            yield f"row {i}", rec


def _as_record(p: Path, where: str, rec: Any) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise DataError(f"{p}: {where}: expected a JSON object (a record), got {type(rec).__name__}")
    return rec


def _read_directory(p: Path, split: str | None) -> tuple[str, list[Located]]:
    """A `save_to_disk` directory (Dataset or DatasetDict), or a directory of split files
    such as synth.write_splits writes (train.jsonl, validation.jsonl, test.jsonl)."""
    if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise DataError(f"{p}: cannot load the saved dataset ({e})") from None
        return _from_hf(str(p), ds, split)
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in _FILE_READERS)
    names = sorted({f.stem for f in files})
    if split is None:
        raise DataError(f"{p}: a directory of split files needs split= (found {names})")
    chosen = [f for f in files if f.stem == split]
    if len(chosen) != 1:
        raise DataError(
            f"{p}: expected one file for split {split!r}, found {[f.name for f in chosen]} (splits: {names})"
        )
    return str(chosen[0]), list(_read_file(chosen[0]))


def _from_hf(name: str, ds: Any, split: str | None) -> tuple[str, list[Located]]:
    """Records from a datasets.Dataset, or from the chosen split of a DatasetDict."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in ds:
            need = "needs split=" if split is None else f"has no split {split!r}"
            raise DataError(f"{name}: this DatasetDict {need}; its splits are {splits}")
        ds, name = ds[split], f"{name}[{split}]"
    elif split is not None:
        raise DataError(f"{name}: split={split!r} was given, but this is a single Dataset")
    return name, [(f"row {i}", rec) for i, rec in enumerate(ds.to_list(), start=1)]


def _read_hub(path: str, split: str | None) -> tuple[str, list[Located]]:
    """A Hub dataset, "name" or "name:config" (e.g. "openai/gsm8k:main")."""
    import datasets

    name, _, config = path.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:
        raise DataError(
            f"{path}: not a local file or directory, and loading it from the Hugging "
            f"Face Hub failed ({type(e).__name__}: {e}). Offline? Download it elsewhere "
            f"and pass a saved file or directory instead."
        ) from None
    if split is not None:  # load_dataset returned that split alone
        return _from_hf(f"{path}[{split}]", ds, None)
    return _from_hf(path, ds, None)


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

    roles = _read_roles(rec, schema, fields, fail)
    used = {fields.get(r, r) for r in schema.roles}
    meta = _meta(rec, used, roles.pop("meta", None), fail)
    prompt = _render(rec, roles, schema, template, fail)
    ex_id = roles["id"] if schema.name == "datalever" else content_id(*(roles[r] for r in schema.id_parts))
    return Example(id=ex_id, prompt=prompt, response=roles[schema.response], source=roles.get("source"), meta=meta)


def _read_roles(rec: dict[str, Any], schema: Schema, fields: dict[str, str], fail) -> dict[str, Any]:
    """Role values: required ones non-empty text; optional ones text or missing ("" / None)."""
    roles: dict[str, Any] = {}
    for role in schema.roles:
        col = fields.get(role, role)
        value = rec.get(col)
        if role == "meta":
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
        shown = "null" if value is None else f"{type(value).__name__} {value!r}"[:80]
        raise fail(f"field {col!r} must be text, got {shown}")
    if not allow_empty and not value.strip():
        # an empty response gives a loss over zero tokens (NaN); an empty prompt is a broken row
        raise fail(f"field {col!r} is empty")
    return value


def _meta(rec: dict[str, Any], used: set[str], stored: Any, fail) -> dict[str, Any]:
    """Stored meta (datalever schema: a JSON string or object) plus every column not used by a role."""
    meta: dict[str, Any] = {}
    if isinstance(stored, str) and stored:
        try:
            stored = json.loads(stored)
        except json.JSONDecodeError as e:
            raise fail(f"field 'meta' is not valid JSON ({e.msg})") from None
    if isinstance(stored, dict):
        meta.update(stored)
    elif stored not in (None, ""):
        raise fail(f"field 'meta' must be a JSON object, got {type(stored).__name__}")
    meta.update({k: _jsonable(v) for k, v in rec.items() if k not in used})
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
    except (ValueError, IndexError, AttributeError) as e:
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
# The `data check` command
# --------------------------------------------------------------------------------------------


@dataclass
class CheckConfig:
    """Load a dataset as training would, and report what was found (or exactly what is wrong)."""

    path: str = "runs/demo/data/train.jsonl"
    """Dataset file or directory (JSONL, JSON, Parquet, CSV, a datasets directory) or hub name."""
    schema: str = "auto"
    """auto | gsm8k | alpaca | prompt_response | datalever."""
    split: str | None = None
    """Split to read from a DatasetDict directory or hub dataset."""


def run_check(cfg: CheckConfig) -> str:
    examples = load_examples(cfg.path, schema=cfg.schema, split=cfg.split)
    sources = Counter(ex.source or NO_SOURCE for ex in examples)
    lines = [
        f"{cfg.path}: {len(examples)} examples",
        "sources: " + ", ".join(f"{k}={v}" for k, v in sources.most_common()),
        f"fingerprint: {rundir.fingerprint(examples)}",
    ]
    if examples:
        ex = examples[0]
        lines += ["first example:", f"  id: {ex.id}", f"  prompt: {ex.prompt!r}", f"  response: {ex.response!r}"]
    return "\n".join(lines)
