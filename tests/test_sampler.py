"""MultiplicitySampler: counts per epoch, seeded reshuffling, distributed shards, mid-epoch resume."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from datalever.sampler import MultiplicitySampler

MULT = [1, 3, 0, 2, 1, 1, 4, 1]  # 13 per epoch; index 2 never drawn


def test_counts_per_epoch_equal_multiplicities():
    s = MultiplicitySampler(MULT, seed=0)
    for epoch in range(3):
        s.set_epoch(epoch)
        got = Counter(s)
        assert got == Counter({i: m for i, m in enumerate(MULT) if m})
    assert len(s) == sum(MULT)


def test_order_changes_between_epochs_and_is_seeded():
    a, b = MultiplicitySampler(MULT, seed=7), MultiplicitySampler(MULT, seed=7)
    orders = []
    for epoch in range(4):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        oa = list(a)
        assert oa == list(b)
        assert list(a) == oa  # iterating twice in one epoch gives the same order
        orders.append(tuple(oa))
    assert len(set(orders)) == 4
    assert list(MultiplicitySampler(MULT, seed=8)) != list(MultiplicitySampler(MULT, seed=7))


@pytest.mark.parametrize("replicas", [2, 3, 5, 20])
def test_distributed_shards_partition_padded_epoch(replicas):
    full = list(MultiplicitySampler(MULT, seed=3))  # the unpadded epoch, one replica
    total = -(-len(full) // replicas) * replicas
    padded = (full * (total // len(full) + 1))[:total]  # repeat from the start, like DistributedSampler
    shards = []
    for rank in range(replicas):
        s = MultiplicitySampler(MULT, seed=3, num_replicas=replicas, rank=rank)
        shard = list(s)
        assert len(shard) == len(s) == total // replicas
        shards.append(shard)
    assert Counter(i for sh in shards for i in sh) == Counter(padded)
    interleaved = [shards[p % replicas][p // replicas] for p in range(total)]
    assert interleaved == padded


@pytest.mark.parametrize("replicas, rank", [(1, 0), (3, 1)])
def test_resume_mid_epoch_continues_identically(replicas, rank):
    ref = MultiplicitySampler(MULT, seed=11, num_replicas=replicas, rank=rank)
    ref.set_epoch(2)
    expected = list(ref)

    s = MultiplicitySampler(MULT, seed=11, num_replicas=replicas, rank=rank)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    assert state == {"epoch": 2, "consumed": 3}

    resumed = MultiplicitySampler(MULT, seed=11, num_replicas=replicas, rank=rank)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop calls set_epoch again: the resume position stays
    assert head + list(resumed) == expected
    # the next epoch starts from its beginning
    resumed.set_epoch(3)
    ref.set_epoch(3)
    assert list(resumed) == list(ref)


def test_state_dict_explicit_consumed_and_validation():
    s = MultiplicitySampler(MULT)
    assert s.state_dict(consumed=5) == {"epoch": 0, "consumed": 5}
    with pytest.raises(ValueError):
        s.load_state_dict({"epoch": 0, "consumed": 99})
    with pytest.raises(ValueError):
        MultiplicitySampler([1, -1])
    with pytest.raises(ValueError):
        MultiplicitySampler([1, 1], num_replicas=2, rank=2)


def test_works_in_a_dataloader_without_copying():
    data = torch.arange(len(MULT)) * 10
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=MultiplicitySampler(MULT, seed=1))
    seen = torch.cat(list(loader)).tolist()
    assert Counter(seen) == Counter({i * 10: m for i, m in enumerate(MULT) if m})
