"""Progress-bar labels that say what a bar belongs to: "hard seed1 | train adamw", not a bare "train".

A caller running a stage for a part of a larger job (the experiment: profile, an arm and seed) wraps it in
`context("hard seed1")`; every bar a stage opens inside takes its label from `label("train adamw")`.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Iterator

_context: contextvars.ContextVar[str] = contextvars.ContextVar("datalever_progress_context", default="")


@contextmanager
def context(text: str) -> Iterator[None]:
    """Label every progress bar opened inside with `text` (nested contexts join: "outer inner")."""
    outer = _context.get()
    token = _context.set(f"{outer} {text}".strip())
    try:
        yield
    finally:
        _context.reset(token)


def label(what: str) -> str:
    """A bar's description: the current context, then what the bar counts."""
    where = _context.get()
    return f"{where} | {what}" if where else what
