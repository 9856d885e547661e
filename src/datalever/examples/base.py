"""The example type and what every part of datalever says about examples: the content id, the error for data
that cannot become examples, the name of a missing source, and the difficulty columns and levels."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

NO_SOURCE = "(none)"  # how an example without a source is named in summaries and per-source metrics

# Meta columns that describe how hard a problem is, where a dataset has them (the embedded data has
# level and steps): split summaries and evaluation metrics break results down by each one present.
DIFFICULTY_KEYS = ("difficulty", "level", "steps", "n_steps", "num_steps", "digits", "hops")
# The difficulty levels of the embedded data (synth.py), easiest first: reports and audits rank a `level` column
# by this order.
LEVELS = ("easy", "medium", "hard")


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
