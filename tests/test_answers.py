"""Tests of answer extraction and comparison (answers.py) against hand-worked cases."""

import threading
import time

import pytest

from datalever import answers
from datalever.answers import (
    LAST_VALUE,
    MARKERS,
    WHOLE_TEXT,
    Grade,
    MathVerifier,
    answers_match,
    extract_answer,
    find_answer,
    grade,
    normalize_number,
)

# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        # GSM8K style: the answer after ####, commas dropped, the reasoning's numbers ignored
        ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 1,234", "1234"),
        ("#### 72", "72"),
        ("#### $1,234.50.", "1234.5"),
        ("#### -$3", "-3"),
        ("#### 18 dollars", "18"),
        ("#### 5/6", "5/6"),  # a fraction is an expression, not the number 5
        # the first #### wins over a rambling continuation
        ("#### 18\n\nQuestion: Tom has 5 apples.\n#### 9", "18"),
        ("####\nso 12", "12"),  # an empty #### falls through to the last number
        # "The answer is"
        ("The answer is $42.", "42"),
        ("So the answer is: 50%", "50"),
        ("The final answer is 7.0", "7"),
        ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("The answer is \\boxed{12}.", "12"),
        ("The answer is x = 5.", "x = 5"),
        # \boxed, braces balanced, the last one wins
        ("so we get \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}} is it", "\\frac{\\sqrt{2}}{2}"),
        ("first \\boxed{3}, then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{1,000}", "1000"),
        ("\\boxed{a{b}", None),  # unbalanced: no box, and no number either
        # the last number
        ("I have 3 apples and 4 pears, so 7", "7"),
        ("It is -3 degrees outside.", "-3"),
        ("10 - 13 = -3", "-3"),
        ("5-3 = 2", "2"),
        ("It costs 0.5 dollars", "0.5"),
        ("about .5 of it", "0.5"),
        ("in total 1,234,567.", "1234567"),
        ("it is 7.0", "7"),
        ("point (3,4)", "4"),  # "3,4" is not a thousands group
        ("x2 and y", None),  # digits inside a word are not a number
        ("no answer here", None),
        ("", None),
        # a text that is one expression is the answer as a whole, not its last number
        ("\\frac{7}{8}", "\\frac{7}{8}"),
        ("1/5", "1/5"),
        ("3\\sqrt{2}", "3\\sqrt{2}"),
        ("-\\dfrac{1}{2}", "-\\dfrac{1}{2}"),
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),
        ("(1, 2)", "(1, 2)"),
        ("7/8.", "7/8"),
        ("\\text{Monday}", "\\text{Monday}"),
        ("48/2 = 24", "24"),  # a chain of equalities ends in its value
        # free prose: the last value, a plain fraction whole
        ("A: 1/5", "1/5"),
        ("so each friend gets 3/4 of a pie", "3/4"),
        ("which gives $\\frac{7}{8}$ in the end", "\\frac{7}{8}"),
        ("we get 1/5 so -\\frac{2}{3}", "-\\frac{2}{3}"),
        ("dates like 3/4/5 are not fractions", "5"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, source",
    [
        ("so 3\n#### 4", "####"),
        ("The answer is 4.", "the answer is"),
        ("so \\boxed{4}", "\\boxed"),
        ("\\frac{7}{8}", WHOLE_TEXT),
        ("It is 3.0", LAST_VALUE),
        ("####\nso 12", LAST_VALUE),  # an empty #### states nothing
        ("no idea", None),
    ],
)
def test_where_the_answer_was_found(text, source):
    found = find_answer(text)
    assert found.source == source
    assert found.marked is (source in MARKERS)


@pytest.mark.parametrize(
    "s, expected",
    [
        ("1,234", "1234"),
        ("7.0", "7"),
        ("7.", "7"),
        ("$5", "5"),
        ("\\$5", "5"),
        ("-$3", "-3"),
        ("$-3", "-3"),
        ("50%", "50"),
        ("50\\%", "50"),
        (".5", "0.5"),
        ("0.50", "0.5"),
        ("-0", "0"),
        ("700", "700"),
        ("−2", "-2"),
        ("+4", "4"),
        (" 12 ", "12"),
        ("1e3", None),
        ("nan", None),
        ("Infinity", None),
        ("abc", None),
        ("1/2", None),
        ("", None),
    ],
)
def test_normalize_number(s, expected):
    assert normalize_number(s) == expected


# ----------------------------------------------------------------------------- comparison


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("7", "7", True),
        ("7.0", "7", True),
        ("1,234", "1234", True),
        ("0.5", ".5", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("7", "8", False),
        ("0.33", "1/3", False),
        (None, "3", False),
        ("3", None, False),
        (None, None, False),
        # not plain numbers: math-verify decides (its verdicts checked by hand, math-verify 0.9)
        ("\\frac{1}{2}", "0.5", True),
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "0.5", True),
        ("\\sqrt{4}", "2", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("\\dfrac{3}{4}", "0.75", True),
        ("x = 5", "5", True),
        ("\\text{Monday}", "Monday", True),
        ("\\frac{1}{3}", "0.33", False),
        ("\\sqrt{3}", "2", False),
        ("\\pi", "3.14159", False),
        ("A", "A", True),
        ("A", "B", False),
        # plain fractions are exact values: 1/5 = 0.2 = 2/10, 7/8 = 0.875, 1/3 is no finite decimal
        ("1/5", "0.2", True),
        ("\\dfrac{1}{5}", "\\frac{1}{5}", True),
        ("2/10", "\\frac{1}{5}", True),
        ("0.875", "\\frac{7}{8}", True),
        ("-\\frac{1}{2}", "-0.5", True),
        ("\\frac{-1}{2}", "-1/2", True),
        ("8", "\\frac{7}{8}", False),
        ("5", "1/5", False),
        ("0.333333", "1/3", False),  # math-verify rounds to 6 places and would call these equal
        ("1/0", "1/0", True),  # no value, but the same text
        ("1/0", "2/0", False),
    ],
)
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


@pytest.mark.parametrize(
    "generation, response, expected",
    [
        # hand-worked: 7/8 = 0.875, not 8; 1/5 = 0.2, not 5; 3*sqrt(2) = sqrt(18), not 2
        ("8", "\\frac{7}{8}", False),
        ("The answer is 0.875", "\\frac{7}{8}", True),
        ("#### 5", "1/5", False),
        ("A: 1/5", "1/5", True),
        ("A: 1/5", "#### 5", False),
        ("\\boxed{0.2}", "\\dfrac{1}{5}", True),
        ("#### 2", "3\\sqrt{2}", False),
        ("\\boxed{\\sqrt{18}}", "3\\sqrt{2}", True),
        ("(1, 2)", "(1, 2)", True),
        ("#### 2", "(1, 2)", False),
    ],
)
def test_a_bare_gold_is_graded_as_a_whole_value(generation, response, expected):
    """A bare gold was once cut to its last number: `\\frac{7}{8}` became 8, and "8" was graded correct."""
    assert answers_match(extract_answer(generation), extract_answer(response)) is expected


def test_numbers_past_the_int_conversion_limit():
    """Python refuses int <-> str conversions past 4,300 digits: one such answer once aborted a whole eval."""
    big = "9" * 5000
    assert normalize_number(big) == big and normalize_number(big + ".50") == big + ".5"
    assert extract_answer(f"so\n#### {big}") == big and extract_answer(f"it is {big} apples") == big
    assert answers_match(big, big) is True
    assert answers_match(big, "9" * 4999 + "8") is False
    assert answers_match(f"{big}/3", f"{big}/3") is True  # the same text
    assert grade(big, "\\frac{1}{2}") == Grade(False)
    # decimals are compared exactly, not to 28 significant digits: these differ in the 40th place
    assert answers_match("0." + "1" * 40, "0." + "1" * 39 + "2") is False


# A worker that takes requests and never answers: a comparison stuck where no alarm reaches it.
_STUCK = "import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\ntime.sleep(3600)"
_CRASHES = "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\nsys.exit(3)"
_NO_MATH_VERIFY = "raise SystemExit('no module named math_verify')"


def test_math_verify_failures_are_not_equal_and_said_so(monkeypatch):
    stuck = MathVerifier(program=_STUCK)
    try:
        start = time.monotonic()
        assert stuck.compare("\\sqrt{4}", "2", time_limit_s=0.5) == Grade(False, "timeout")
        assert stuck.compare("\\sqrt{4}", "2", time_limit_s=0.5) == Grade(False, "timeout")  # a fresh worker
        assert time.monotonic() - start < 2 * (0.5 + 1.0) + 10  # the limit, a second's grace, two start-ups
    finally:
        stuck.close()
    crashing = MathVerifier(program=_CRASHES)
    assert crashing.compare("\\sqrt{4}", "2", time_limit_s=5) == Grade(False, "error")
    missing = MathVerifier(program=_NO_MATH_VERIFY)
    assert missing.compare("\\sqrt{4}", "2", time_limit_s=5) == Grade(False, "error")
    monkeypatch.setattr(answers, "_VERIFIER", missing)
    assert grade("\\sqrt{4}", "2") == Grade(False, "error")
    # plain numbers and fractions never reach math-verify
    assert grade("2", "2.0") == Grade(True) and grade("1/2", "\\frac{1}{2}") == Grade(True)


def test_math_verify_outside_the_main_thread():
    # math-verify's own timeout uses SIGALRM, which only the main thread may set.
    result = []
    t = threading.Thread(target=lambda: result.append(answers_match("\\sqrt{4}", "2")))
    t.start()
    t.join()
    assert result == [True]


def test_grading_time_limit_holds_outside_the_main_thread(monkeypatch):
    """In a worker thread math-verify ran without a time limit: 10^(10^8) against 1 hung the thread."""
    monkeypatch.setattr(answers, "GRADING_TIME_LIMIT_S", 2.0)
    result = []
    t = threading.Thread(target=lambda: result.append(grade("10^{10^{8}}", "1")), daemon=True)
    start = time.monotonic()
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "grading in a thread ran past its time limit"
    assert result == [Grade(False, "timeout")]
    assert time.monotonic() - start < 30
    assert answers_match("\\sqrt{4}", "2") is True  # and the next comparison is served


# ----------------------------------------------------------------------------- program answers


@pytest.mark.parametrize(
    "text",
    [
        "n0 = 20.0\nn1 = 5.0\nt0 = n0 * n1\nanswer = t0 / 100.0\nprint(answer)",  # MathInstruct's MathQA-PoT
        "# define the variables\ntotal = 50\nspent = 20\n# print the result\nprint(total - spent)",
        "def solution():\n    apples = 3 + 4\n    return apples\n\nprint(solution())",
        "import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 4, x))",
        "from math import comb\nans = comb(5, 2)",  # cut before its print: still a program
        "import math\nr = math.sqrt(16)",
        "def f(x) -> int:\n    return x",
        "    print (round(7 / 3, 2))",  # indented, a space before the parenthesis
        "```python\nx = 3\n```\nThe answer is 3",
        "```py\nx = 3\n```",
        "Let me write code.\nprint(2 + 2)",
    ],
)
def test_program_answers(text):
    assert answers.is_program(text)


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
        "x = 5\ny = 3\nSo x + y = 8. The answer is 8",  # equations in prose are not code
        "We could print(8) it, but the answer is 8",  # print( inside a sentence
        "The printer printed 8 pages.",
        "Import duties are 5%, so the answer is 5",
        "import duties are 5%",  # a sentence, not an import of one module
        "from the first box we take 3",
        "def f(x) = x^2, so f(3) = 9",  # a definition in math, not Python's
        "```\n3 + 4 = 7\n```",  # a fence that does not say Python
        "\\boxed{\\frac{1}{2}}",
    ],
)
def test_answers_that_are_not_programs(text):
    assert not answers.is_program(text)
