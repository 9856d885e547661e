"""Progress: bars that say what they belong to, and that suit where they are shown.

Labels: a caller running a stage for a part of a larger job (the experiment: profile, an arm and seed) wraps it in
`context("hard seed1")`; every bar a stage opens inside takes its label from `label("train adamw")`, so a bar reads
"hard seed1 | train adamw", not a bare "train".

Where: on a terminal `bar` is tqdm's, redrawn in place. Into a file (a unit's log, output redirected) redraws would
pile up, one per update (10 minutes of the demo made a 400 KB log of about 3,900 of them): there a bar is a plain line
every `LINE_EVERY_S` seconds or every tenth of the way, and at the end.
"""

from __future__ import annotations

import contextvars
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

LINE_EVERY_S = 30.0  # a plain progress line at most this often (and at each tenth of the way)

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


def bar(*, total: int | None = None, desc: str = "", show: bool = True, file=None, **tqdm_options: Any):
    """A progress bar: tqdm on a terminal, plain lines (`LineBar`) elsewhere; nothing shown with `show` false."""
    file = file if file is not None else sys.stderr
    interactive = hasattr(file, "isatty") and file.isatty()
    if interactive or not show:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not show, file=file, **tqdm_options)
    return LineBar(total=total, desc=desc, file=file, initial=tqdm_options.get("initial", 0))


class LineBar:
    """tqdm's interface (update, set_postfix, set_postfix_str, write, close, n, total, a context manager) written as
    a plain line now and then: "desc: 120/375 (32%) 41 s, 2.9/s, loss=0.41"."""

    def __init__(self, *, total: int | None, desc: str, file, initial: int = 0):
        self.total, self.desc, self.file, self.n = total, desc, file, initial
        self.postfix = ""
        self.start = self.last_time = time.monotonic()
        self.last_tenth = self._tenth()
        self.shown = initial
        self.closed = False

    def _tenth(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_time >= LINE_EVERY_S or self._tenth() > self.last_tenth or self.n == self.total:
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        done = f"{self.n}/{self.total} ({self.n / self.total:.0%})" if self.total else f"{self.n}"
        rate = f", {self.n / elapsed:.2f}/s" if elapsed > 0 and self.n else ""
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {elapsed:.0f} s{rate}{tail}", file=self.file, flush=True)
        self.last_time, self.last_tenth, self.shown = now, self._tenth(), self.n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def write(self, text: str, file=None) -> None:
        print(text, file=file or self.file, flush=True)

    def close(self) -> None:
        """A last line, unless the last one already showed where it ended."""
        if not self.closed and self.n != self.shown:
            self._line(time.monotonic())
        self.closed = True

    def __enter__(self) -> LineBar:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
