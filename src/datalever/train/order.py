"""The order a run draws its examples in, and how many optimizer steps make the run.

Epoch e lists index i exactly ``multiplicities[i]`` times (an upsampled example several times, without copying the
data), in a permutation seeded by ``seed + e``: a fresh order every epoch, the same order for the same seed and epoch.
`ExampleStream` strings the epochs together; its position (how many were drawn) is what a checkpoint saves, so a
resumed run draws what an uninterrupted one draws.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from datalever.train.config import TrainConfig


def epoch_order(multiplicities: Sequence[int], seed: int, epoch: int) -> list[int]:
    """The indices of epoch `epoch`: index i `multiplicities[i]` times, shuffled with seed `seed + epoch`."""
    if any(int(m) != m or m < 0 for m in multiplicities):
        raise ValueError("multiplicities must be non-negative integers")
    counts = torch.tensor([int(m) for m in multiplicities], dtype=torch.long)
    repeated = torch.repeat_interleave(torch.arange(len(counts)), counts)
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return repeated[torch.randperm(len(repeated), generator=generator)].tolist()


class ExampleStream:
    """An endless seeded stream of example indices, epoch after epoch of `epoch_order`; position p says how many
    were drawn so far."""

    def __init__(self, multiplicities: Sequence[int], seed: int):
        self.multiplicities = list(multiplicities)
        self.seed = seed
        self.epoch_len = sum(self.multiplicities)
        if self.epoch_len <= 0:
            raise ValueError("every multiplicity is 0: an epoch would draw no example")
        self._cache: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_order(self.multiplicities, self.seed, epoch))
        return self._cache[1]

    def take(self, position: int, n: int) -> list[int]:
        return [self._order(p // self.epoch_len)[p % self.epoch_len] for p in range(position, position + n)]


def total_steps(cfg: TrainConfig, epoch_len: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * epoch_len / cfg.batch_size))


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    """Warmup length: ceil(warmup_ratio * steps), as transformers' TrainingArguments counts it."""
    return math.ceil(cfg.warmup_ratio * steps)
