"""Data formats: the schemas (which columns hold which roles), their default prompt templates, the plain
rendering of a conversation, schema detection, and a record -> Example (with the duplicate check over a source).

A record is mapped to an Example in three steps: detect the schema from the columns (or take the
one given), read the schema's *roles* (e.g. question/answer) from their columns, and render the
prompt with a format-string template. The id is a hash of the raw role values, taken before the
template is applied, so it survives row order, reruns and template changes.
"""

from __future__ import annotations

import json
import logging
import reprlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from datalever.examples.base import DataError, Example, content_id
from datalever.examples.readers import JSONProblem, parse_json

log = logging.getLogger(__name__)

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
# Records to examples
# --------------------------------------------------------------------------------------------


def choose_schema(name: str, columns: list[str], schema: str, fields: dict[str, str] | None) -> Schema:
    """The schema to read source `name` with: detected from its columns ("auto"), or the one given, checked
    against the roles `fields` maps."""
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


def check_fields(name: str, columns: list[str], fields: dict[str, str] | None) -> None:
    """A mapping that names an unknown role or a missing column is a typo, not an optional field."""
    all_roles = {r for s in SCHEMAS.values() for r in s.roles}
    for role, col in (fields or {}).items():
        if role not in all_roles:
            raise ValueError(f"fields: unknown role {role!r}; roles are {sorted(all_roles)}")
        if col not in columns:
            raise DataError(
                f"{name}: fields maps {role!r} to column {col!r}, which is not in the data (columns: {columns})"
            )


def to_example(
    name: str, where: str, rec: dict[str, Any], schema: Schema, fields: dict[str, str], template: str | None
) -> Example:
    """One record (at `where` in source `name`) as an Example; a problem is a DataError naming both."""

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
            value = parse_json(value)
        except (json.JSONDecodeError, JSONProblem) as e:
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
            stored = parse_json(stored)
        except json.JSONDecodeError as e:
            raise fail(f"field 'meta' is not valid JSON ({e.msg})") from None
        except JSONProblem as e:
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


def handle_duplicates(name: str, examples: list[Example], wheres: list[str], on_duplicate: str) -> list[Example]:
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
        f"{unit} {place_numbers(wheres, firsts)}{more} (copies of {unit} {place_numbers(wheres, originals)}{more})"
    )
    if on_duplicate == "error":
        raise DataError(msg + "; pass on_duplicate='keep_first' to keep the first copy of each")
    log.warning("%s; keeping the first copy of each", msg)
    dropped = {i for v in dup_rows.values() for i in v}
    return [ex for i, ex in enumerate(examples) if i not in dropped]


def place_numbers(wheres: list[str], indices: list[int]) -> str:
    """ "4", "4 and 9", "4, 6 and 9" from locations like "row 4"."""
    nums = [wheres[i].split()[1] for i in indices]
    return " and ".join(filter(None, [", ".join(nums[:-1]), nums[-1]]))
