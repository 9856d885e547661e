"""Answers in model and reference text: extraction and comparison.

- `extract_answer`: the final answer in a text — after the first `####`, else after the first
  "the answer is", else the content of the last `\\boxed{...}`, else the last number in the text.
  The gold answer comes from the example's response through the same function.
- `answers_match`: plain numbers are compared after normalization (`1,234` = `1234`, `7.0` = `7`,
  `$5` = `5`, `50%` = `50`, `.5` = `0.5`); anything else (fractions, roots, LaTeX) goes to
  math-verify, whose errors and timeouts count as "not equal".

Model output is only ever parsed: no eval/exec/sympify of generated text, except through
math-verify's own LaTeX/expression parser.
"""

from __future__ import annotations

import logging
import re
import threading
from decimal import Decimal, InvalidOperation

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- answer extraction

# A number as written in text: optional sign and currency sign, digits with proper thousands
# groups ("1,234", not "3,4"), an optional decimal part; ".5" too. ASCII digits only.
_NUM_BODY = r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
# At the start of an answer segment: "$-3", "-$3", "42", "1,234.50" followed by a unit, a space,
# punctuation or the end (not by "/", "^", "\" ...: "1/2" is an expression, not the number 1).
_LEAD_NUM = re.compile(rf"^\s*(?:\\?\$\s*)?([-−+]?\s*(?:\\?\$\s*)?{_NUM_BODY})\s*(?:\\?%)?(?=$|[\s.,;:!?)\]$])")
# Anywhere in a text (the last-number fallback): a minus sign only when it is not a subtraction
# ("5-3" gives 5 and 3), no match inside a word ("x2") or after a decimal point.
_ANY_NUM = re.compile(rf"(?<![\w.])(?:(?<![\w)\]}}])[-−])?(?:\\?\$)?{_NUM_BODY}", re.ASCII)
_PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_HASH_MARK = re.compile(r"####")
_ANSWER_IS = re.compile(r"\banswer\s+is\b\s*:?", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MATH_DELIMS = [("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")]


def normalize_number(s: str) -> str | None:
    """The canonical form of a plain number, or None if `s` is not one.

    Commas, spaces, `$`/`\\$`, `%`/`\\%` and a trailing period are dropped; the value is printed
    without trailing zeros or exponent: `"1,234"` -> `"1234"`, `"7.0"` -> `"7"`, `".5"` -> `"0.5"`,
    `"$-3"` -> `"-3"`, `"-0"` -> `"0"`. Words, fractions and expressions give None.
    """
    if s is None:
        return None
    t = s.strip()
    for old, new in (("\\!", ""), ("{,}", ","), ("\\,", ""), ("\\$", "$"), ("\\%", "%"), ("−", "-")):
        t = t.replace(old, new)
    t = re.sub(r"[\s,$%]", "", t).rstrip(".")
    if not _PLAIN_NUMBER.fullmatch(t):
        return None
    try:
        d = Decimal(t)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


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


def extract_answer(text: str) -> str | None:
    """The final answer stated in `text`, or None.

    Order: the first `#### ...`, the first "the answer is ...", the last `\\boxed{...}` (balanced
    braces), the last number. A plain number comes back normalized (`normalize_number`); anything
    else (a fraction, a LaTeX expression) comes back as written, math delimiters removed.
    The first `####` and "answer is" win because an untrained model tends to ramble on after its
    answer (a new question with its own `####`); the last `\\boxed` wins by MATH convention.
    """
    if not text:
        return None
    for pattern in (_HASH_MARK, _ANSWER_IS):
        for m in pattern.finditer(text):
            line = text[m.end() :].split("\n", 1)[0]
            found = _candidate(line)
            if found is not None:
                return found
    boxed = [b for b in _boxed_contents(text) if b.strip()]
    if boxed:
        found = _candidate(boxed[-1])
        if found is not None:
            return found
    numbers = _ANY_NUM.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


# ----------------------------------------------------------------------------- answer comparison

_MATH_VERIFY_MAX_CHARS = 500  # longer "answers" are rambling, not expressions: not parsed


def _math_verify_equal(pred: str, gold: str, timeout_s: int = 5) -> bool:
    try:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except ImportError:  # pragma: no cover - math-verify is a dependency
        log.warning("math-verify is not installed: LaTeX answers compare as strings")
        return False
    if len(pred) > _MATH_VERIFY_MAX_CHARS or len(gold) > _MATH_VERIFY_MAX_CHARS:
        return False
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        # Wrapped in $...$ so that its LaTeX extractor reads bare expressions ("\sqrt{4}", "x+1").
        g = parse(f"${gold}$", parsing_timeout=timeout)
        p = parse(f"${pred}$", parsing_timeout=timeout)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        return False


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Whether a predicted answer equals the gold answer.

    Two plain numbers: equal values after normalization. Otherwise: equal strings (whitespace
    ignored), else math-verify's verdict (`\\frac{1}{2}` = `0.5`, `\\sqrt{4}` = `2`); a parse
    failure, an error or a timeout there means "not equal". No answer never matches.
    """
    if pred is None or gold is None:
        return False
    np_, ng = normalize_number(pred), normalize_number(gold)
    if np_ is not None and ng is not None:
        return np_ == ng
    if re.sub(r"\s+", "", pred) == re.sub(r"\s+", "", gold):
        return True
    return _math_verify_equal(pred, gold)
