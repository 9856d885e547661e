"""Each epoch's order over a multiplicity-weighted dataset, without copying the data.

Epoch e lists index i exactly ``multiplicities[i]`` times, in a permutation seeded by ``seed + e``:
a fresh order every epoch, the same order for the same seed and epoch (so a resumed run draws what
an uninterrupted one draws).
"""

from __future__ import annotations

from typing import Sequence

import torch


def epoch_order(multiplicities: Sequence[int], seed: int, epoch: int) -> list[int]:
    """The indices of epoch `epoch`: index i `multiplicities[i]` times, shuffled with seed `seed + epoch`."""
    if any(int(m) != m or m < 0 for m in multiplicities):
        raise ValueError("multiplicities must be non-negative integers")
    counts = torch.tensor([int(m) for m in multiplicities], dtype=torch.long)
    repeated = torch.repeat_interleave(torch.arange(len(counts)), counts)
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return repeated[torch.randperm(len(repeated), generator=generator)].tolist()
