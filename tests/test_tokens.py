"""collate/pack against a brute-force reference built row by row in plain Python."""

import random

import pytest
import torch

from datalever.tokens import FIELDS, IGNORE, Encoded, collate, pack, unpack


def reference_collate(batch, pad_id):
    """Each row on its own: the ids then padding; mask 1 on real tokens; labels = ids from max(n_prompt, 1)."""
    width = max(len(e.input_ids) for e in batch)
    out = {name: [] for name in FIELDS}
    for e in batch:
        n, start = len(e.input_ids), max(e.n_prompt, 1)
        out["input_ids"].append(e.input_ids + [pad_id] * (width - n))
        out["attention_mask"].append([1] * n + [0] * (width - n))
        response = [tok if j >= start else IGNORE for j, tok in enumerate(e.input_ids)]
        out["labels"].append(response + [IGNORE] * (width - n))
    return {name: torch.tensor(rows, dtype=torch.long) for name, rows in out.items()}


def random_batch(rng: random.Random) -> list[Encoded]:
    """Rows of mixed lengths, with the edge cases: one token, no prompt, a prompt that fills or overruns
    the row (cut by max_length), ids up to a large vocabulary's."""
    batch = []
    for i in range(rng.randint(1, 12)):
        n = rng.choice([1, 2, rng.randint(1, 40), rng.randint(1, 300)])
        n_prompt = rng.choice([0, 1, n, n + 5, rng.randint(0, n)])
        ids = [rng.randrange(0, 262_144) for _ in range(n)]
        batch.append(Encoded(f"e{i}", ids, n_prompt, max(n - n_prompt, 1)))
    return batch


def assert_same_batch(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == torch.long, name
        assert got[name].shape == want[name].shape, name
        assert got[name].is_contiguous(), name
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("seed", range(200))
def test_collate_matches_row_by_row_reference(seed):
    rng = random.Random(seed)
    batch = random_batch(rng)
    pad_id = rng.choice([0, 2, 50_000, batch[0].input_ids[0]])  # a pad id that is also a real token
    assert_same_batch(collate(batch, pad_id), reference_collate(batch, pad_id))


def test_pack_is_collate_in_one_buffer():
    batch = random_batch(random.Random(0))
    packed = pack(batch, 7)
    assert packed.shape == (3, len(batch), max(len(e.input_ids) for e in batch)) and packed.dtype == torch.long
    assert_same_batch(unpack(packed), reference_collate(batch, 7))


def test_collate_empty_batch_is_an_error():
    with pytest.raises(ValueError):
        collate([], 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_pack_reaches_the_device_unchanged():
    batch = random_batch(random.Random(1))
    packed = pack(batch, 3, pin_memory=True)
    assert packed.is_pinned()
    on_device = {k: v.cpu() for k, v in unpack(packed.to("cuda", non_blocking=True)).items()}
    assert_same_batch(on_device, reference_collate(batch, 3))
