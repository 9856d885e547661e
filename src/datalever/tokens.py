"""From examples to token ids: the prompt/response boundary, truncation, padding and batching."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from datalever.examples import Example

IGNORE = -100  # label of a position that carries no loss (prompt and padding)


@dataclass(frozen=True)
class Encoded:
    """One example as token ids: `input_ids[:n_prompt]` is the prompt, the rest the response."""

    id: str
    input_ids: list[int]
    n_prompt: int
    n_response_full: int  # response tokens before truncation

    @property
    def n_response(self) -> int:
        """Response tokens that carry loss (the first token needs a prompt token before it)."""
        return len(self.input_ids) - max(self.n_prompt, 1)

    @property
    def fully_truncated(self) -> bool:
        """The maximum length cut the whole response away: no loss can be computed."""
        return self.n_response <= 0

    @property
    def full_length(self) -> int:
        """Prompt plus response tokens before truncation: the max_length that keeps this example whole."""
        return self.n_prompt + self.n_response_full

    @property
    def n_cut(self) -> int:
        """Response tokens the maximum length cut away (0: the example is whole; a prompt cut too counts only
        its response)."""
        return min(self.full_length - len(self.input_ids), self.n_response_full)


@dataclass(frozen=True)
class Truncation:
    """How many examples lost response tokens to max_length: a loss over a cut response describes
    another target than the example's, so a run says so when it is more than a few."""

    n_examples: int
    n_cut: int  # examples that lost some of their response
    n_cut_whole: int  # of those, examples that lost all of it (flagged, no loss)
    max_length: int
    needed_length: int  # the max_length that keeps every example whole

    @classmethod
    def of(cls, encoded: Sequence[Encoded], max_length: int) -> Truncation:
        return cls(
            n_examples=len(encoded),
            n_cut=sum(e.n_cut > 0 for e in encoded),
            n_cut_whole=sum(e.fully_truncated for e in encoded),
            max_length=max_length,
            needed_length=max((e.full_length for e in encoded), default=0),
        )

    def warning(self, limit: float = 0.01) -> str | None:
        """One line when more than `limit` of the examples lost response tokens, else None."""
        if self.n_cut <= limit * self.n_examples:
            return None
        return (
            f"{self.n_cut} of {self.n_examples} examples ({self.n_cut / self.n_examples:.1%}) lose response tokens "
            f"to max_length={self.max_length} ({self.n_cut_whole} lose all of it); "
            f"max_length={self.needed_length} keeps every example whole"
        )


def encode_example(tokenizer, ex: Example, max_length: int) -> Encoded:
    """Tokenize prompt and response separately (so the boundary is exact), add EOS, cut from the right.

    The prompt keeps the tokenizer's own special tokens (e.g. a BOS); the response ends with EOS so
    the model learns to stop.
    """
    prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    return Encoded(ex.id, ids, len(prompt_ids), len(response_ids))


FIELDS = ("input_ids", "attention_mask", "labels")  # the planes of `pack`, in order


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels are the input ids on response positions and IGNORE elsewhere.

    Three n x width int64 tensors, views of one `pack` buffer (each contiguous).
    """
    return unpack(pack(batch, pad_id))


def pack(batch: Sequence[Encoded], pad_id: int, *, pin_memory: bool = False) -> torch.Tensor:
    """The batch as one 3 x n x width int64 tensor (planes in `FIELDS` order), padded with numpy.

    One buffer, so a device gets the batch in one host-to-device copy; `pin_memory` (CUDA only)
    allocates it page-locked, so that copy can run asynchronously (`non_blocking=True`). Why numpy:
    one conversion of all the ids and whole-array masks, where a tensor per example and Python
    padding took ~4.5x the host time (~255 vs ~55 ms per million tokens with the engine's other host
    steps, benchmarks/loss_engine.py on 2 CPU threads), ~70 of the ~110 ms of a 2,048-example H200 run.
    """
    lengths = np.fromiter((len(e.input_ids) for e in batch), dtype=np.int64, count=len(batch))
    starts = np.fromiter((max(e.n_prompt, 1) for e in batch), dtype=np.int64, count=len(batch))
    out = torch.empty((3, len(batch), int(lengths.max())), dtype=torch.long, pin_memory=pin_memory)
    input_ids, attention_mask, labels = out.numpy()
    cols = np.arange(input_ids.shape[1])
    real = cols < lengths[:, None]
    input_ids.fill(pad_id)
    # A boolean mask assigns in row-major order: row by row, each row's tokens left-aligned.
    input_ids[real] = np.fromiter(
        itertools.chain.from_iterable(e.input_ids for e in batch), dtype=np.int64, count=int(lengths.sum())
    )
    np.copyto(attention_mask, real)
    labels.fill(IGNORE)
    np.copyto(labels, input_ids, where=real & (cols >= starts[:, None]))
    return out


def unpack(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """`pack`'s buffer (on any device) as collate's dict of views."""
    return dict(zip(FIELDS, packed.unbind(0)))


def token_budget_batches(
    lengths: Sequence[int], token_budget: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Group indices into batches whose padded size (rows x longest row) stays within `token_budget`.

    Indices are sorted by length (longest first, so an out-of-memory shows up at once), which is
    the length bucketing: rows in a batch have similar lengths, so little compute goes to padding.
    A single row longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        new_width = max(width, lengths[i])
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (new_width * (len(current) + 1) > token_budget or full):
            batches.append(current)
            current, new_width = [], lengths[i]
        current.append(i)
        width = new_width
    if current:
        batches.append(current)
    return batches
