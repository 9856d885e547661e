"""The public API for data: the data options every stage shares (DataFormat), loading examples from any
source, saving them in datalever's own schema (and telling such a file apart), and whether a data argument
names a local path or a Hub dataset."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from datalever import checks
from datalever.examples.base import DataError, Example
from datalever.examples.conflicts import ON_CONFLICT, Conflicts, check_conflicts, find_conflicts
from datalever.examples.formats import SCHEMAS, check_fields, choose_schema, handle_duplicates, to_example
from datalever.examples.readers import SplitRequest, columns_of, format_of, read_records

log = logging.getLogger(__name__)


@dataclass
class DataFormat:
    """How the records of a data source become examples, and whether conflicting labels among them are refused: the
    options every command that reads data shares.

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
    on_conflict: str = "warn"
    """Examples that ask the same question (the prompt up to case and spacing) with different final answers (as an
    evaluation reads them: 7 and 8; a reworded solution with the same answer is no conflict): warn (one line naming
    a few) | error (refuse the data)."""

    def __post_init__(self) -> None:
        if self.schema != "auto":
            checks.one_of("schema", self.schema, ["auto", *SCHEMAS])
        checks.one_of("on_conflict", self.on_conflict, ON_CONFLICT)
        if self.fields is not None and not (
            isinstance(self.fields, dict) and all(isinstance(v, str) for v in self.fields.values())
        ):
            raise ValueError(f"fields must map roles to column names, e.g. {{question: problem}}; got {self.fields!r}")

    def data_format(self) -> DataFormat:
        """These options alone (a stage config that inherits them passes itself through this)."""
        return DataFormat(self.schema, self.fields, self.template, self.on_conflict)


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
    on_conflict: str = "warn",
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
    on_conflict: examples with the same prompt and different final answers (`conflicts`): "warn" (default: one
        line, once a process), "error" (a DataError naming a few) or "ignore".

    JSONL, JSON, CSV and TSV files may be gzip-compressed (data.jsonl.gz, or gzip bytes under any
    name: read transparently) and must be UTF-8, or UTF-16/UTF-32 with a byte-order mark (decoded).
    Any malformed file raises one DataError naming the file, the line or row where known, and why.
    """
    request = SplitRequest(split, default_split, split_option)
    return load_and_describe(path, schema, fields, template, request, on_duplicate, on_conflict)[0]


def load_and_describe(
    path: str,
    schema: str,
    fields: dict[str, str] | None,
    template: str | None,
    request: SplitRequest,
    on_duplicate: str,
    on_conflict: str = "warn",
) -> tuple[list[Example], str, Conflicts]:
    """The examples of a source, how they were read (`gsm8k (detected; columns: question, answer)`) and their
    conflicting labels (refused or warned about as `on_conflict` says)."""
    if on_duplicate not in ("error", "keep_first"):
        raise ValueError(f"on_duplicate must be 'error' or 'keep_first', not {on_duplicate!r}")
    name, records = read_records(os.fspath(path), request)
    columns = columns_of(records)
    if not records:
        raise DataError(f"{name}: empty file (no records)")
    how = "detected" if schema == "auto" else "given"
    if _written_by_datalever(columns):  # its prompts were rendered when it was written (an arm's examples.jsonl)
        if schema != "auto" or fields or template is not None:
            log.info("%s: written by datalever (id, prompt, response, source, meta): read as written", name)
        schema, fields, template, how = "datalever", None, None, "written by datalever: read as written"
    check_fields(name, columns, fields)
    chosen = choose_schema(name, columns, schema, fields)
    examples = [to_example(name, where, rec, chosen, fields or {}, template) for where, rec in records]
    if chosen.name == "prompt_completion" and examples[0].messages is not None:
        how += "; conversational: read as messages"
    first_at: dict[str, str] = {}
    for (where, _), ex in zip(records, examples):
        first_at.setdefault(ex.id, where)
    examples = handle_duplicates(name, examples, [w for w, _ in records], on_duplicate)
    conflicts = find_conflicts(name, examples, [first_at[ex.id] for ex in examples])
    check_conflicts(conflicts, on_conflict)
    return examples, f"{chosen.name} ({how}; columns: {', '.join(columns)})", conflicts


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
        on_conflict=fmt.on_conflict,
    )


def examples_written_by_datalever(path: str | os.PathLike) -> bool:
    """Whether a local file holds datalever's own columns (id, prompt, response, ...)."""
    try:
        return _written_by_datalever(columns_of(read_records(os.fspath(path), SplitRequest())[1]))
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


def looks_local(data: str) -> bool:
    """Whether `data` names a local file or directory rather than a hub dataset (`openai/gsm8k`): it exists, has
    a data-file extension, starts like a path (".", "/", "~"), or has a parent directory that exists."""
    p = Path(data).expanduser()
    if p.exists() or format_of(p)[0] is not None or data.startswith((".", "/", "~")):
        return True
    return len(p.parts) > 1 and p.parent.is_dir()


def local_data(name: str, value: str | None, *, optional: bool = False) -> None:
    """Data that names a local file or directory must exist; a hub dataset name (`openai/gsm8k:main`) is
    loaded, and checked, when it is read."""
    if optional and value is None:
        return
    if not value or looks_local(value):
        checks.existing_path(name, value)
