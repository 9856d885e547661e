"""Answers in model and reference text: extraction and comparison.

- `find_answer` / `extract_answer`: the final answer in a text — after the first `####`, else after the
  first "the answer is", else the content of the last `\\boxed{...}` (these three state the answer
  explicitly: `Found.marked`), else the whole text when it is one expression (`\\frac{7}{8}`, `1/5`,
  `3\\sqrt{2}`, `(1, 2)`), else the last value in free prose (a number or a plain fraction: `1/5`,
  `\\frac{7}{8}`). The gold answer comes from the example's response through the same function.
- `grade` / `answers_match`: plain numbers are compared as exact decimals after normalization (`1,234` =
  `1234`, `7.0` = `7`, `$5` = `5`, `50%` = `50`, `.5` = `0.5`); plain fractions as exact fractions
  (`1/5` = `0.2` = `\\frac{1}{5}` = `\\dfrac{1}{5}`); anything else (roots, LaTeX, sets) goes to
  math-verify under a wall-clock limit that holds in any thread (`MathVerifier`). A timeout or a failure
  there means "not equal", and the `Grade` says which it was, so that an evaluation can count them.

- `is_program`: whether a generation answers with a program (program of thought, as MathInstruct teaches:
  Python that prints its answer) rather than stating the answer; such answers are counted, never run.

Model output is only ever parsed: no eval/exec/sympify of generated text, except through
math-verify's own LaTeX/expression parser (in a worker process of its own).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from typing import NamedTuple

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- answer extraction

# A number as written in text: optional sign and currency sign, digits with proper thousands
# groups ("1,234", not "3,4"), an optional decimal part; ".5" too. ASCII digits only.
_NUM_BODY = r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
# At the start of an answer segment: "$-3", "-$3", "42", "1,234.50" followed by a unit, a space,
# punctuation or the end (not by "/", "^", "\" ...: "1/2" is an expression, not the number 1).
_LEAD_NUM = re.compile(rf"^\s*(?:\\?\$\s*)?([-−+]?\s*(?:\\?\$\s*)?{_NUM_BODY})\s*(?:\\?%)?(?=$|[\s.,;:!?)\]$])")
# A plain fraction in prose: "1/5" (not part of "1/5/2020" or "1/5x"), "\frac{7}{8}", "\dfrac{-1}{2}".
_SLASH_FRACTION = rf"(?<!/){_NUM_BODY}\s*/\s*{_NUM_BODY}(?![\w/])"
_LATEX_FRACTION = rf"\\[dt]?frac\s*\{{\s*[-−]?{_NUM_BODY}\s*\}}\s*\{{\s*[-−]?{_NUM_BODY}\s*\}}"
# Anywhere in a text (the last-value fallback): a fraction or a number; a minus sign only when it is
# not a subtraction ("5-3" gives 5 and 3), no match inside a word ("x2") or after a decimal point.
_ANY_VALUE = re.compile(
    rf"(?<![\w.])(?:(?<![\w)\]}}])[-−])?(?:\\?\$)?(?:{_LATEX_FRACTION}|{_SLASH_FRACTION}|{_NUM_BODY})", re.ASCII
)
_PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_HASH_MARK = re.compile(r"####")
_ANSWER_IS = re.compile(r"\banswer\s+is\b\s*:?", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MATH_DELIMS = [("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")]
# What a text that is one expression is made of: no newline, no ":", ";", "?", "#", quotes ... (prose).
_EXPRESSION = re.compile(r"[\w \t+\-−*/^=()\[\]{},.!|<>'\\%°π√∞≤≥≠×÷·]+", re.ASCII)
_PROSE_WORD = re.compile(r"[A-Za-z]{2,}")
_LATEX_TEXT_ARG = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{[^{}]*\}")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")

# How a text can state its answer explicitly (`Found.source`); the other sources are guesses.
MARKERS = ("####", "the answer is", "\\boxed")
WHOLE_TEXT, LAST_VALUE = "whole text", "last value"


class Found(NamedTuple):
    """An answer found in a text and where it was found (one of MARKERS, WHOLE_TEXT, LAST_VALUE; None: no answer)."""

    answer: str | None
    source: str | None

    @property
    def marked(self) -> bool:
        """Whether the text states its answer explicitly (####, "the answer is", \\boxed)."""
        return self.source in MARKERS


def _canonical_decimal(t: str) -> str:
    """A plain decimal without leading/trailing zeros, by string work alone: exact for any number of
    digits (Python's int-string conversion refuses more than 4,300, and Decimal rounds to 28)."""
    sign = "-" if t.startswith("-") else ""
    whole, _, frac = t.lstrip("+-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    if whole == "0" and not frac:
        sign = ""  # -0 is 0
    return sign + whole + ("." + frac if frac else "")


def normalize_number(s: str) -> str | None:
    """The canonical form of a plain number, or None if `s` is not one.

    Commas, spaces, `$`/`\\$`, `%`/`\\%` and a trailing period are dropped; the value is printed
    without trailing zeros or exponent: `"1,234"` -> `"1234"`, `"7.0"` -> `"7"`, `".5"` -> `"0.5"`,
    `"$-3"` -> `"-3"`, `"-0"` -> `"0"`. Words, fractions and expressions give None. Exact at any length.
    """
    if s is None:
        return None
    t = s.strip()
    for old, new in (("\\!", ""), ("{,}", ","), ("\\,", ""), ("\\$", "$"), ("\\%", "%"), ("−", "-")):
        t = t.replace(old, new)
    t = re.sub(r"[\s,$%]", "", t).rstrip(".")
    if not _PLAIN_NUMBER.fullmatch(t):
        return None
    return _canonical_decimal(t)


def _boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` (and `\\fbox{...}`) in `text`, braces balanced."""
    out = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def _strip_math_delims(s: str) -> str:
    for left, right in _MATH_DELIMS:
        if s.startswith(left):
            end = s.find(right, len(left))
            if end > 0:
                return s[len(left) : end].strip()
    return s


def _unwrap_math(s: str) -> str:
    """`s` without math delimiters that enclose all of it (`$\\frac{1}{2}$` -> `\\frac{1}{2}`)."""
    for left, right in _MATH_DELIMS:
        if s.startswith(left) and s.find(right, len(left)) == len(s) - len(right) > len(left) - 1:
            return s[len(left) : len(s) - len(right)].strip()
    return s


def _candidate(segment: str) -> str | None:
    """The answer at the start of a segment of text (the rest of a line after a marker)."""
    s = segment.strip().lstrip(":").strip()
    if not s:
        return None
    boxed = _boxed_contents(s)
    if boxed:
        return _candidate(boxed[0]) if boxed[0].strip() else None
    m = _LEAD_NUM.match(s)
    if m:
        return normalize_number(m.group(1))
    s = _strip_math_delims(s)
    s = re.split(r"\.(?=\s|$)", s, maxsplit=1)[0]  # cut at the end of the sentence
    s = s.strip().rstrip(".,;:!?").strip()
    if not s:
        return None
    return normalize_number(s) or s


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


def _whole_text_answer(text: str) -> str | None:
    """The whole text when it is one expression (`\\frac{7}{8}`, `1/5`, `3\\sqrt{2}`, `(1, 2)`), else None.

    A bare gold answer is the whole answer, not its last number. Prose (a word of two letters or more
    outside LaTeX commands and `\\text{...}`), several lines or unbalanced braces are not one expression.
    A chain of equalities ("10 - 13 = -3") ends in its value.
    """
    s = _unwrap_math(text.strip()).strip().rstrip(".").strip()
    if not s or len(s) > _MATH_VERIFY_MAX_CHARS:
        return None
    number = normalize_number(s)
    if number is not None:
        return number
    if not _EXPRESSION.fullmatch(s) or not _balanced(s) or _BOXED.search(s):
        return None
    if _PROSE_WORD.search(_LATEX_COMMAND.sub(" ", _LATEX_TEXT_ARG.sub(" ", s))):
        return None
    s = s.rsplit("=", 1)[-1].strip()
    if not re.search(r"[0-9A-Za-z]", s):
        return None
    return normalize_number(s) or s


def _as_written(value: str) -> str:
    """A value found in prose, cleaned: a number normalized, a fraction without spaces or currency signs."""
    number = normalize_number(value)
    if number is not None:
        return number
    return re.sub(r"\s+|\\?\$", "", value).replace("−", "-")


def _last_value(text: str) -> str | None:
    values = _ANY_VALUE.findall(text)
    return _as_written(values[-1]) if values else None


def find_answer(text: str) -> Found:
    """The final answer stated in `text`, and where it was found.

    Order: the first `#### ...`, the first "the answer is ...", the last `\\boxed{...}` (balanced
    braces), the whole text when it is one expression, the last value (number or plain fraction).
    A plain number comes back normalized (`normalize_number`); anything else (a fraction, a LaTeX
    expression) comes back as written, math delimiters removed.
    The first `####` and "answer is" win because an untrained model tends to ramble on after its
    answer (a new question with its own `####`); the last `\\boxed` wins by MATH convention.
    """
    if not text:
        return Found(None, None)
    for pattern, source in ((_HASH_MARK, "####"), (_ANSWER_IS, "the answer is")):
        for m in pattern.finditer(text):
            found = _candidate(text[m.end() :].split("\n", 1)[0])
            if found is not None:
                return Found(found, source)
    boxed = [b for b in _boxed_contents(text) if b.strip()]
    if boxed:
        found = _candidate(boxed[-1])
        if found is not None:
            return Found(found, "\\boxed")
    whole = _whole_text_answer(text)
    if whole is not None:
        return Found(whole, WHOLE_TEXT)
    last = _last_value(text)
    return Found(last, LAST_VALUE if last is not None else None)


def extract_answer(text: str) -> str | None:
    """The final answer stated in `text`, or None (see `find_answer`)."""
    return find_answer(text).answer


# ----------------------------------------------------------------------------- program answers

# Lines that only a program has: a print call, a function definition, an import; each at the start of a line
# (after indentation), as Python writes them. Prose that mentions print(...) in a sentence is not a program.
_PROGRAM_LINE = re.compile(
    r"^[ \t]*(?:print[ \t]*\("
    r"|def[ \t]+[A-Za-z_]\w*[ \t]*\(.*\)[ \t]*(?:->.*)?:[ \t]*$"
    r"|import[ \t]+[A-Za-z_][\w.]*(?:[ \t]+as[ \t]+[A-Za-z_]\w*)?[ \t]*(?:,[ \t]*[A-Za-z_][\w.]*)*[ \t]*$"
    r"|from[ \t]+[A-Za-z_][\w.]*[ \t]+import[ \t]+[A-Za-z_*(])",
    re.MULTILINE,
)
_PYTHON_FENCE = re.compile(r"^[ \t]*```[ \t]*(?:python3?|py)\b", re.MULTILINE | re.IGNORECASE)


def is_program(text: str | None) -> bool:
    """Whether `text` answers with a program (program of thought) rather than by stating its answer.

    The rule: a line, after any indentation, that begins a Python print call (`print(`), defines a function
    (`def name(...):`) or imports (`import math`, `from sympy import *`); or a code fence opened as Python
    (```python, ```py). MathInstruct's program-of-thought answers end in `print(...)` (`print(answer)`,
    `print(solution())`), so a program cut by the generation cap before its print still counts when it began
    with an import or a def. A sentence that mentions print( after other words is prose, not a program.
    The text is only matched, never run: a program answer's value is unknown to datalever, which grades what
    `find_answer` finds in it (usually a number from the code, so it counts as wrong); the prototype ran it.
    """
    if not text:
        return False
    return bool(_PROGRAM_LINE.search(text) or _PYTHON_FENCE.search(text))


# ----------------------------------------------------------------------------- answer comparison

_MATH_VERIFY_MAX_CHARS = 500  # longer "answers" are rambling, not expressions: not parsed
_MAX_EXACT_DIGITS = 4000  # below Python's int-string conversion limit (4,300 digits)
GRADING_TIME_LIMIT_S = 10.0
"""Wall-clock limit of one math-verify comparison; past it the answers count as not equal (a timeout)."""

_LATEX_RATIO = re.compile(r"([-+−]?)\s*\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_SLASH_RATIO = re.compile(r"([-+−]?)([^/]+)/([^/]+)")

GRADED, TIMEOUT, ERROR = "graded", "timeout", "error"


class Grade(NamedTuple):
    """Whether a prediction equals the gold answer, and whether that verdict is a real one.

    status: "graded"; "timeout" (math-verify ran past the time limit) or "error" (the comparison
    failed): then `correct` is False and the example could not be graded.
    """

    correct: bool
    status: str = GRADED


def _exact(number: str) -> Fraction | None:
    if len(number) > _MAX_EXACT_DIGITS:
        return None  # compared as a normalized string instead (exact too)
    try:
        return Fraction(number)
    except ValueError:  # e.g. a lowered int-string conversion limit
        return None


def exact_value(s: str) -> Fraction | None:
    """The exact value of a plain number or fraction (`0.2`, `1/5`, `-\\frac{1}{5}`, `\\dfrac{2}{10}`), else None."""
    t = _unwrap_math(s.strip()).rstrip(".").strip()
    number = normalize_number(t)
    if number is not None:
        return _exact(number)
    m = _LATEX_RATIO.fullmatch(t) or _SLASH_RATIO.fullmatch(t)
    if not m:
        return None
    sign, top, bottom = m.groups()
    top, bottom = normalize_number(top), normalize_number(bottom)
    if top is None or bottom is None:
        return None
    a, b = _exact(top), _exact(bottom)
    if a is None or b is None or b == 0:
        return None
    return -a / b if sign in ("-", "−") else a / b


def grade(pred: str | None, gold: str | None, *, time_limit_s: float | None = None) -> Grade:
    """Whether a predicted answer equals the gold answer, compared as values.

    Two plain numbers: equal normalized decimals. Two plain numbers or fractions: equal exact fractions
    (`1/5` = `0.2` = `\\frac{1}{5}`; `0.33` != `1/3`). Otherwise: equal strings (whitespace ignored), else
    math-verify's verdict (`\\sqrt{4}` = `2`, `x = 5` = `5`) within `time_limit_s` (default
    GRADING_TIME_LIMIT_S) of wall-clock time, in any thread. No answer never matches.
    """
    if pred is None or gold is None:
        return Grade(False)
    np_, ng = normalize_number(pred), normalize_number(gold)
    if np_ is not None and ng is not None:
        return Grade(np_ == ng)
    vp, vg = exact_value(pred), exact_value(gold)
    if vp is not None and vg is not None:
        return Grade(vp == vg)
    if re.sub(r"\s+", "", pred) == re.sub(r"\s+", "", gold):
        return Grade(True)
    if len(pred) > _MATH_VERIFY_MAX_CHARS or len(gold) > _MATH_VERIFY_MAX_CHARS:
        return Grade(False)
    return _VERIFIER.compare(pred, gold, GRADING_TIME_LIMIT_S if time_limit_s is None else time_limit_s)


def answers_match(pred: str | None, gold: str | None, *, time_limit_s: float | None = None) -> bool:
    """Whether a predicted answer equals the gold answer (`grade`'s verdict; a timeout or failure is "not equal")."""
    return grade(pred, gold, time_limit_s=time_limit_s).correct


# ----------------------------------------------------------------------------- math-verify, time-limited

# The worker: reads one JSON request a line, answers one JSON line. It runs each comparison in its own
# main thread, under a SIGALRM of its own (math-verify's timeouts are off: they would catch the alarm).
_WORKER_PROGRAM = r"""
import json, signal, sys


class TimeUp(BaseException):
    # A BaseException, so that math-verify's `except Exception` does not swallow it.
    pass


def on_alarm(signum, frame):
    raise TimeUp()


signal.signal(signal.SIGALRM, on_alarm)
from math_verify import parse, verify


def equal(pred, gold):
    # Wrapped in $...$ so that math-verify's LaTeX extractor reads bare expressions ("\sqrt{4}", "x+1").
    g = parse("$" + gold + "$", parsing_timeout=None)
    p = parse("$" + pred + "$", parsing_timeout=None)
    return bool(g and p and verify(g, p, timeout_seconds=None))


def answer(request):
    signal.setitimer(signal.ITIMER_REAL, request["time_limit_s"])
    try:
        return {"equal": equal(request["pred"], request["gold"]), "status": "graded"}
    except TimeUp:
        return {"equal": False, "status": "timeout"}
    except Exception:
        return {"equal": False, "status": "graded"}  # math-verify could not read or compare them: not equal
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


# One comparison before saying ready: math-verify's first call loads its parsers (seconds on a loaded
# machine), which must not count against the first real comparison's time limit.
equal("\\frac{1}{2}", "0.5")
print("ready", flush=True)
for line in sys.stdin:
    try:
        reply = answer(json.loads(line))
    except TimeUp:  # the alarm went off while it was being disarmed
        reply = {"equal": False, "status": "timeout"}
    print(json.dumps(reply), flush=True)
"""
_KILL_GRACE_S = 1.0  # past the worker's own alarm: the comparison is stuck where an alarm cannot interrupt it


class _WorkerError(RuntimeError):
    pass


class MathVerifier:
    """math-verify in a worker process, under a wall-clock limit that holds in whichever thread asks.

    math-verify's own timeouts use SIGALRM, which only a main thread may set: in another thread a hung
    comparison could not be stopped, and a thread cannot be killed. The worker runs each comparison in
    its main thread under an alarm; when even that does not stop it (a long computation inside C code),
    the worker is killed, the answer counts as a timeout, and the next comparison starts a fresh worker.
    Comparisons from several threads take turns. POSIX only (select on a pipe).
    """

    def __init__(self, program: str = _WORKER_PROGRAM, start_timeout_s: float = 120.0):
        self._program, self._start_timeout_s = program, start_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner_pid = 0
        self._pending = b""
        self._unavailable: str | None = None  # why the worker could not start, once it could not

    def compare(self, pred: str, gold: str, time_limit_s: float) -> Grade:
        """math-verify's verdict on pred == gold, within time_limit_s (+ a second's grace) of wall-clock time."""
        with self._lock:
            if self._unavailable is not None:
                return Grade(False, ERROR)
            try:
                self._ensure_started()
            except (OSError, _WorkerError) as e:
                self._unavailable = str(e)
                log.warning("math-verify is unavailable (%s): non-numeric answers count as ungradable", e)
                return Grade(False, ERROR)
            try:
                self._send({"pred": pred, "gold": gold, "time_limit_s": float(time_limit_s)})
                reply = json.loads(self._receive(time_limit_s + _KILL_GRACE_S))
                return Grade(bool(reply["equal"]), str(reply["status"]))
            except TimeoutError:
                self._stop()  # stuck: it will not read the next request
                return Grade(False, TIMEOUT)
            except (OSError, ValueError, KeyError, TypeError, _WorkerError) as e:
                log.warning("math-verify worker failed (%s): the answer counts as ungradable", e)
                self._stop()
                return Grade(False, ERROR)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ensure_started(self) -> None:
        if self._proc is not None and self._owner_pid == os.getpid() and self._proc.poll() is None:
            return
        self._stop()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", self._program],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # math-verify's warnings about its disabled timeouts
        )
        self._owner_pid, self._pending = os.getpid(), b""
        try:
            line = self._receive(self._start_timeout_s)
        except TimeoutError:
            self._stop()
            raise _WorkerError(f"the worker did not start within {self._start_timeout_s:g} s") from None
        if line != "ready":
            self._stop()
            raise _WorkerError(f"the worker said {line[:200]!r} instead of 'ready'")

    def _send(self, request: dict) -> None:
        self._proc.stdin.write((json.dumps(request) + "\n").encode())  # ASCII: json escapes the rest
        self._proc.stdin.flush()

    def _receive(self, timeout_s: float) -> str:
        """One line from the worker; TimeoutError past timeout_s, _WorkerError if it exited."""
        deadline = time.monotonic() + timeout_s
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if not select.select([fd], [], [], remaining)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self._proc.wait()
                raise _WorkerError(f"the worker exited with code {code}")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode().strip()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or self._owner_pid != os.getpid():
            return  # none, or the parent's worker seen from a forked child: not ours to stop
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


_VERIFIER = MathVerifier()
atexit.register(_VERIFIER.close)
