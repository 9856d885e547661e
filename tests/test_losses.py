"""The loss engine against a brute-force reference: each example alone, the model's own labels= loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from datalever.examples import Example, content_id
from datalever.losses import (
    FLAG_TRUNCATED,
    ResponseLoss,
    _example_losses,
    _send_to_host,
    _sliced_token_nll,
    score_encoded,
    score_examples,
)
from datalever.models import load_model, load_tokenizer
from datalever.tokens import IGNORE, Encoded, collate, encode_example, loss_positions, token_budget_batches
from factories import brute_force_loss


def make_examples(n=13, seed=0):
    rng = torch.Generator().manual_seed(seed)
    words = "apples pears Tom has gives buys each costs how many total left more than".split()
    out = []
    for i in range(n):
        lp, lr = (int(x) for x in torch.randint(1, 25, (2,), generator=rng))
        prompt = " ".join(words[int(j)] for j in torch.randint(0, len(words), (lp,), generator=rng)) + f" {i}?\n"
        response = " ".join(words[int(j)] for j in torch.randint(0, len(words), (lr,), generator=rng)) + f" #### {i}"
        out.append(Example(content_id(prompt, response), prompt, response, source="s" + str(i % 2)))
    return out


@pytest.mark.parametrize("arch", ["tiny", "tiny-neox", "tiny-qwen3"])
def test_engine_matches_brute_force(tiny_checkpoints, arch):
    model = load_model(tiny_checkpoints[arch]).eval()
    tok = load_tokenizer(tiny_checkpoints[arch])
    examples = make_examples()
    # A small budget forces many batches of mixed widths (padding on most rows).
    got = score_examples(model, tok, examples, max_length=256, token_budget=300)
    assert set(got) == {ex.id for ex in examples}
    for ex in examples:
        ref = brute_force_loss(model, tok, ex, 256)
        assert got[ex.id].flag == ""
        assert got[ex.id].loss == pytest.approx(ref, abs=1e-5, rel=1e-5)
        enc = encode_example(tok, ex, 256)
        assert got[ex.id].n_tokens == len(enc.input_ids) - enc.n_prompt


@pytest.mark.parametrize("arch", ["tiny", "tiny-neox", "tiny-qwen3"])
def test_engine_matches_brute_force_across_vocabulary_slices(tiny_checkpoints, arch):
    """Scoring computes the logsumexp a vocabulary slice at a time: 512 rows in slices of 100
    (the last one partial) must give the brute-force loss too."""
    model = load_model(tiny_checkpoints[arch]).eval()
    tok = load_tokenizer(tiny_checkpoints[arch])
    examples = make_examples(7, seed=1)
    got = score_examples(ResponseLoss(model, vocab_slice=100), tok, examples, max_length=256, token_budget=300)
    for ex in examples:
        assert got[ex.id].loss == pytest.approx(brute_force_loss(model, tok, ex, 256), abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sliced_token_nll_matches_cross_entropy(dtype, tol):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16).to(dtype)
    weight = torch.randn(1000, 16).to(dtype)
    bias = torch.randn(1000).to(dtype)
    targets = torch.randint(0, 1000, (37,))
    targets[:3] = torch.tensor([0, 999, 256])  # first row, last row, a slice boundary
    for b in (None, bias):
        ref = F.cross_entropy(F.linear(hidden, weight, b).float(), targets, reduction="none")
        for width in (256, 1000, 4096):
            got = _sliced_token_nll(hidden, weight, b, targets, width)
            assert got.dtype == torch.float32
            assert torch.allclose(got, ref, atol=tol, rtol=tol), (b is None, width)


def test_scoring_runs_without_autograd_or_kv_cache(tiny_checkpoints):
    """score_examples must not record an autograd graph (the parameters require grad) nor build a
    KV cache (an HF model in eval mode defaults to use_cache=True): both only cost time."""
    model = load_model(tiny_checkpoints["tiny"]).eval()
    tok = load_tokenizer(tiny_checkpoints["tiny"])
    seen = []

    def hook(module, args, kwargs):
        seen.append((torch.is_grad_enabled(), kwargs.get("use_cache")))

    handle = getattr(model, model.base_model_prefix).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        score_examples(model, tok, make_examples(3), max_length=128)
    finally:
        handle.remove()
    assert seen and all(s == (False, False) for s in seen)


def test_truncated_response_is_flagged_not_zero(tiny_checkpoints):
    model = load_model(tiny_checkpoints["tiny"]).eval()
    tok = load_tokenizer(tiny_checkpoints["tiny"])
    long_prompt = Example("long", "word " * 200, "#### 1")
    short = Example("short", "2+2?", " #### 4")
    n_prompt = len(tok(long_prompt.prompt)["input_ids"])
    got = score_examples(model, tok, [long_prompt, short], max_length=min(n_prompt, 64))
    assert got["long"].flag == FLAG_TRUNCATED and math.isnan(got["long"].loss) and got["long"].n_tokens == 0
    assert got["short"].flag == "" and got["short"].loss > 0


def test_partially_truncated_response_scores_kept_tokens(tiny_checkpoints):
    model = load_model(tiny_checkpoints["tiny"]).eval()
    tok = load_tokenizer(tiny_checkpoints["tiny"])
    ex = Example("x", "How many?", " one two three four five six seven eight nine ten")
    enc_full = encode_example(tok, ex, 512)
    max_len = enc_full.n_prompt + 3
    got = score_examples(model, tok, [ex], max_length=max_len)
    assert got["x"].n_tokens == 3
    assert got["x"].loss == pytest.approx(brute_force_loss(model, tok, ex, max_len), abs=1e-5)


def test_truncation_counts_cut_responses_and_says_so_above_one_percent(tiny_checkpoints):
    """A response cut part-way once scored what was left with no word said."""
    from datalever.tokens import Truncation

    tok = load_tokenizer(tiny_checkpoints["tiny"])
    whole = Example("w", "How many?", " 4")
    part = Example("p", "How many?", " one two three four five six seven eight nine ten")
    n_prompt, n_resp = encode_example(tok, part, 512).n_prompt, encode_example(tok, part, 512).n_response_full
    max_len = n_prompt + 3
    encoded = [encode_example(tok, ex, max_len) for ex in [whole] * 99 + [part]]
    assert encoded[-1].n_cut == n_resp - 3 and encoded[0].n_cut == 0  # by hand: 3 of the response kept
    report = Truncation.of(encoded, max_len)
    assert (report.n_cut, report.n_cut_whole, report.needed_length) == (1, 0, n_prompt + n_resp)
    assert report.warning() is None  # 1 in 100: not more than 1%
    report = Truncation.of(encoded[-2:], max_len)
    assert report.warning() == (
        f"1 of 2 examples (50.0%) lose response tokens to max_length={max_len} (0 lose all of it); "
        f"max_length={n_prompt + n_resp} keeps every example's answer whole"
    )


def test_collate_masks_exactly_the_prompt(tiny_checkpoints):
    tok = load_tokenizer(tiny_checkpoints["tiny"])
    ex = Example("x", "Q: 3+4?\nA: ", "3 + 4 = 7\n#### 7")
    enc = encode_example(tok, ex, 512)
    batch = collate([enc, encode_example(tok, Example("y", "Q?", "1"), 512)], tok.pad_token_id)
    row = batch["labels"][0]
    kept = row[row != IGNORE].tolist()
    # The supervised tokens decode to the response plus EOS, and nothing of the prompt.
    assert tok.decode(kept, skip_special_tokens=False) == ex.response + tok.eos_token
    assert (row[: enc.n_prompt] == IGNORE).all()
    assert batch["attention_mask"][1].sum() == len(encode_example(tok, Example("y", "Q?", "1"), 512).input_ids)


def test_token_budget_batches_cover_all_and_respect_budget():
    lengths = [5, 50, 7, 33, 12, 50, 1, 70, 9]
    batches = token_budget_batches(lengths, token_budget=100)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert width * len(b) <= 100 or len(b) == 1
        # bucketing: rows in a batch are contiguous in length order
    widths = [max(lengths[i] for i in b) for b in batches]
    assert widths == sorted(widths, reverse=True)


def test_response_loss_gradients_match_labels_loss(tiny_checkpoints):
    """Training uses the same module: its token-mean loss has the gradient of the labels= loss."""
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_checkpoints["tiny"])
    examples = make_examples(3)
    model_a = load_model(tiny_checkpoints["tiny"])
    model_b = load_model(tiny_checkpoints["tiny"])
    batch = collate([encode_example(tok, ex, 128) for ex in examples], tok.pad_token_id)
    sums, counts = ResponseLoss(model_a)(**batch)
    (sums.sum() / counts.sum()).backward()
    model_b(**batch).loss.backward()
    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_engine_is_bit_identical_to_scoring_each_batch_directly(tiny_checkpoints):
    """The pipelined engine (one padded buffer in, one transfer out, the next batch staged before the
    results are read) gives the very floats of a plain loop: collate, forward, sums.tolist() / counts.tolist()."""
    model = load_model(tiny_checkpoints["tiny"]).eval()
    tok = load_tokenizer(tiny_checkpoints["tiny"])
    encoded = [encode_example(tok, ex, 256) for ex in make_examples(17, seed=2)]
    got = score_encoded(model, encoded, pad_id=tok.pad_token_id, token_budget=300)
    scorer = ResponseLoss(model)
    batches = token_budget_batches([len(e.input_ids) for e in encoded], 300)
    assert len(batches) > 2
    with torch.no_grad():
        for b in batches:
            rows = [encoded[i] for i in b]
            sums, counts = scorer(**collate(rows, tok.pad_token_id))
            for e, s, c in zip(rows, sums.tolist(), counts.tolist()):
                assert (got[e.id].loss, got[e.id].n_tokens) == (s / c, c)
                assert type(got[e.id].n_tokens) is int


def test_results_reach_the_host_exactly():
    """Sums travel as float32 bit patterns next to the counts: every float32 (negative zero, subnormal,
    infinity, NaN) and counts far above float32's exact integers come back unchanged."""
    tiny = torch.finfo(torch.float32).tiny / 4  # subnormal
    sums = torch.tensor([1.0, -0.0, tiny, 3.4e38, math.inf, math.nan, 0.1], dtype=torch.float32)
    counts = torch.tensor([1, 2, 3, 2**24 + 1, 5, 6, 2**31 - 1])
    rows = [Encoded(f"e{i}", [0, 1], 1, 1) for i in range(len(sums))]
    got = _example_losses(rows, _send_to_host(sums, counts))
    for (id_, loss, count), e, s, c in zip(got, rows, sums.tolist(), counts.tolist()):
        assert id_ == e.id and count == c and type(count) is int
        assert math.isnan(loss) if math.isnan(s) else (loss == s / c and math.copysign(1, loss) == math.copysign(1, s))


@pytest.mark.parametrize("arch", ["tiny", "tiny-neox"])
def test_positions_found_on_the_host_give_the_same_numbers(tiny_checkpoints, arch):
    """Training sends the loss positions with the batch (no synchronisation in the forward): the same positions,
    in the same order, as the labels' mask, so the same sums to the last bit, and the same gradients."""
    model = load_model(tiny_checkpoints[arch])
    tok = load_tokenizer(tiny_checkpoints[arch])
    batch = collate([encode_example(tok, ex, 64) for ex in make_examples(5)], tok.pad_token_id)
    positions = loss_positions(batch["labels"])
    width = batch["labels"].shape[1] - 1
    by_hand = [r * width + c for r in range(batch["labels"].shape[0]) for c in range(width)
               if batch["labels"][r, c + 1] != IGNORE]  # fmt: skip
    assert positions.tolist() == by_hand
    loss = ResponseLoss(model)
    sums, counts = loss(**batch)
    sums_h, counts_h = loss(**batch, positions=positions)
    assert torch.equal(sums, sums_h) and torch.equal(counts, counts_h)
    grads = []
    for extra in ({}, {"positions": positions}):
        model.zero_grad()
        loss(**batch, **extra)[0].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
