"""Leakage between splits: examples one split shares with another, by id or by normalized prompt."""

from __future__ import annotations

import pytest

from datalever.examples import DataError, Example, check_overlap, find_overlap, normalize_prompt, overlap_error


def ex(i, prompt=None, response="r"):
    return Example(f"id{i}", prompt if prompt is not None else f"Question {i}?\n", response)


TRAIN = [ex(i) for i in range(10)]


def test_identical_splits_share_everything():
    (o,) = find_overlap({"train": TRAIN, "test": list(TRAIN)})
    assert (o.first, o.second, o.size, o.count, o.same_id, o.same_prompt) == ("train", "test", 10, 10, 10, 0)
    assert o.samples == (("id0", "Question 0?\n"), ("id1", "Question 1?\n"), ("id2", "Question 2?\n"))


def test_half_of_test_inside_train():
    test = [ex(i) for i in range(5, 15)]
    overlaps = find_overlap({"train": TRAIN, "validation": [ex(20)], "test": test})
    assert [(o.first, o.second, o.count) for o in overlaps] == [("train", "test", 5)]
    assert overlaps[0].to_dict()["count"] == 5 and overlaps[0].to_dict()["samples"][0] == ["id5", "Question 5?\n"]


def test_validation_equal_to_test():
    held = [ex(i) for i in range(20, 24)]
    overlaps = find_overlap({"train": TRAIN, "validation": held, "test": list(held)})
    assert [(o.first, o.second, o.count, o.size) for o in overlaps] == [("validation", "test", 4, 4)]


def test_reworded_duplicate_matches_by_normalized_prompt():
    copy = Example("other-id", "  QUESTION 3?   ", "a different answer")
    (o,) = find_overlap({"train": TRAIN, "validation": [copy, ex(30)], "test": [ex(31)]})
    assert (o.second, o.same_id, o.same_prompt, o.samples) == ("validation", 0, 1, (("other-id", "  QUESTION 3?   "),))
    assert normalize_prompt("  Question\n 3?\t") == "question 3?"


def test_clean_splits_have_no_overlap():
    named = {"train": TRAIN, "validation": [ex(20), ex(21)], "test": [ex(30)]}
    assert find_overlap(named) == []
    assert check_overlap(named) == []


def test_overlap_error_names_the_counts_and_examples():
    named = {
        "train": TRAIN,
        "validation": [ex(1), ex(20)],
        "test": [ex(2), ex(3), Example("reworded", "question 4? ", "r")],
    }
    overlaps = find_overlap(named)
    msg = str(overlap_error(overlaps))
    assert isinstance(overlap_error(overlaps), DataError) and "\n" not in msg
    assert msg.startswith("splits overlap (4 shared examples): validation shares 1 of 2 examples with train")
    assert "test shares 3 of 3 examples with train (2 same id, 1 same prompt up to case and spacing)" in msg
    assert "id2 'Question 2?\\n'" in msg and "allow_overlap" in msg
    with pytest.raises(DataError, match="splits overlap"):
        check_overlap(named)
    assert check_overlap(named, allow_overlap=True) == overlaps
    with pytest.raises(ValueError):
        overlap_error([])
