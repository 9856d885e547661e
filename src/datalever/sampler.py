"""MultiplicitySampler: draw each example as many times as its multiplicity, without copying data.

Given ``multiplicities[i]`` for each index i of the base dataset, an epoch is the list in which
index i appears exactly ``multiplicities[i]`` times, in a permutation seeded by ``seed + epoch``
(a fresh order each epoch; the same order for the same seed and epoch). For distributed training
the epoch list is padded to a multiple of ``num_replicas`` by repeating it from its start (as
torch's DistributedSampler does) and replica ``rank`` takes ``[rank::num_replicas]``.

Resuming: ``state_dict()`` is ``{"epoch", "consumed"}``, ``consumed`` counting the indices this
replica has yielded in the current epoch; after ``load_state_dict`` the next iteration continues
from there with the same order. A DataLoader with workers pulls indices ahead of the training loop
(prefetch), so a trainer that knows how many samples it has really used should pass that number:
``state_dict(consumed=n)``.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class MultiplicitySampler(Sampler[int]):
    def __init__(self, multiplicities: Sequence[int], *, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        mult = [int(m) for m in multiplicities]
        if any(m < 0 for m in mult) or any(int(m) != m for m in multiplicities):
            raise ValueError("multiplicities must be non-negative integers")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.multiplicities = torch.tensor(mult, dtype=torch.long)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.epoch_size = int(self.multiplicities.sum())  # before padding, all replicas together
        self.num_samples = math.ceil(self.epoch_size / self.num_replicas)  # per replica
        self.total_size = self.num_samples * self.num_replicas
        self._start = 0  # where the next iteration starts (set by load_state_dict)
        self._yielded = 0  # position reached in the current epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; a new epoch starts from its beginning."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._start = 0
            self._yielded = 0

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """The full, padded epoch list for all replicas (before sharding)."""
        epoch = self.epoch if epoch is None else epoch
        base = torch.repeat_interleave(torch.arange(len(self.multiplicities)), self.multiplicities)
        g = torch.Generator()
        g.manual_seed(self.seed + int(epoch))
        order = base[torch.randperm(len(base), generator=g)].tolist()
        pad = self.total_size - len(order)
        if pad > 0:
            order += (order * math.ceil(pad / len(order)))[:pad]
        return order

    def __iter__(self) -> Iterator[int]:
        mine = self.epoch_indices()[self.rank :: self.num_replicas]
        start, self._start = self._start, 0
        self._yielded = start
        for idx in mine[start:]:
            self._yielded += 1
            yield idx

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self, consumed: int | None = None) -> dict:
        """{"epoch", "consumed"}: `consumed` defaults to the indices yielded so far this epoch."""
        return {"epoch": self.epoch, "consumed": self._yielded if consumed is None else int(consumed)}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed={consumed} is outside this replica's epoch of {self.num_samples}")
        self.epoch = int(state["epoch"])
        self._start = consumed
        self._yielded = consumed
