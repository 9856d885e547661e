"""Each epoch's order (train.order.epoch_order) and the training stream built on it, against counts and orders
written out independently."""

from __future__ import annotations

from collections import Counter

import pytest

from datalever.train.order import ExampleStream, epoch_order

MULT = [1, 3, 0, 2, 1, 1, 4, 1]  # 13 per epoch; index 2 never drawn
EXPECTED_COUNTS = Counter({0: 1, 1: 3, 3: 2, 4: 1, 5: 1, 6: 4, 7: 1})


def test_counts_per_epoch_equal_multiplicities():
    for epoch in range(3):
        order = epoch_order(MULT, seed=0, epoch=epoch)
        assert len(order) == 13
        assert Counter(order) == EXPECTED_COUNTS


def test_order_changes_between_epochs_and_is_seeded():
    orders = [tuple(epoch_order(MULT, seed=7, epoch=epoch)) for epoch in range(4)]
    assert orders == [tuple(epoch_order(MULT, seed=7, epoch=epoch)) for epoch in range(4)]  # same seed, same order
    assert len(set(orders)) == 4  # reshuffled every epoch
    assert epoch_order(MULT, seed=8, epoch=0) != epoch_order(MULT, seed=7, epoch=0)


def test_rejects_negative_or_fractional_multiplicities():
    with pytest.raises(ValueError):
        epoch_order([1, -1], seed=0, epoch=0)
    with pytest.raises(ValueError):
        epoch_order([1, 1.5], seed=0, epoch=0)


def test_stream_runs_through_the_epochs_in_order():
    """Position p of the stream is item p of epoch 0, then epoch 1, ... written one after the other; any
    window (as a resumed run takes it) reads the same items."""
    stream = ExampleStream(MULT, seed=3)
    assert stream.epoch_len == 13
    epochs = [i for e in range(3) for i in epoch_order(MULT, seed=3, epoch=e)]
    assert stream.take(0, 39) == epochs
    assert stream.take(10, 8) == epochs[10:18]  # across the end of epoch 0
    assert ExampleStream(MULT, seed=3).take(20, 19) == epochs[20:]


def test_stream_needs_an_example():
    with pytest.raises(ValueError):
        ExampleStream([0, 0], seed=0)
