"""Examples: one type with a stable content id, and the loaders that make them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


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
        return {"id": self.id, "prompt": self.prompt, "response": self.response,
                "source": self.source, "meta": json.dumps(self.meta, sort_keys=True)}
