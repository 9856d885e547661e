"""Tests of answer extraction and comparison (answers.py) against hand-worked cases."""

import threading

import pytest

from datalever.answers import answers_match, extract_answer, normalize_number

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
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


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
    ],
)
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


def test_math_verify_failures_are_not_equal(monkeypatch):
    import math_verify
    from math_verify.errors import TimeoutException

    def timeout(*a, **k):
        raise TimeoutException("Operation timed out!")  # a BaseException in math-verify

    monkeypatch.setattr(math_verify, "parse", timeout)
    assert answers_match("\\frac{1}{2}", "0.5") is False

    def broken(*a, **k):
        raise RuntimeError("parser bug")

    monkeypatch.setattr(math_verify, "parse", broken)
    assert answers_match("\\frac{1}{2}", "0.5") is False
    assert answers_match("2", "2.0") is True  # plain numbers never reach math-verify


def test_math_verify_outside_the_main_thread():
    # math-verify's timeout uses SIGALRM, which only the main thread may set.
    result = []
    t = threading.Thread(target=lambda: result.append(answers_match("\\frac{1}{2}", "0.5")))
    t.start()
    t.join()
    assert result == [True]
