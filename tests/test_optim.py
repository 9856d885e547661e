"""Tests for datalever.optim, each against an independent reference (hand formulas, hand-built torch
optimizers, hand-enumerated parameter names, transformers' own schedule), never against saved output."""

from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datalever.optim import (
    SAM,
    MultiOptimizer,
    OptimConfig,
    build_optimizer,
    fused_adamw,
    lr_factor,
    muon_param_split,
    optimizer_step,
    set_lr,
)

torch.set_num_threads(1)

VOCAB = 64
HIDDEN_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- helpers


def tiny_llama(tied: bool = False, seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


class TinyLM(nn.Module):
    """A bigram LM that is float64 all the way through (HF Llama's RMSNorm computes in float32, so a
    float64 Llama is not float64 enough for 1e-6 comparisons after AdamW's first, sign-like step)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 32)
        self.head = nn.Linear(32, VOCAB, bias=False)
        self.double()

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.head(torch.tanh(self.hidden(self.embed(input_ids)))))


def token_batch(n: int = 8, length: int = 16, seed: int = 1, ragged: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    if ragged:  # right padding with different lengths -> micro-batches with different token counts
        for i in range(n):
            keep = 3 + (i * 5) % (length - 3)
            labels[i, keep:] = -100
            ids[i, keep:] = 0
    return {"input_ids": ids, "labels": labels}


def split(batch: dict, k: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    step = n // k
    return [{key: v[i * step : (i + 1) * step] for key, v in batch.items()} for i in range(k)]


def tokens_in(micro_batches) -> int:
    """The loss-carrying tokens of a step, counted from the data: labelled next tokens of token batches,
    targets of (x, y) batches."""
    return sum(
        len(mb[1]) if isinstance(mb, tuple) else int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches
    )


def take_step(model, opt, micro_batches, loss_fn, **kw):
    """optimizer_step with the step's token count, as the training loop passes it."""
    return optimizer_step(model, opt, micro_batches, loss_fn, n_tokens=tokens_in(micro_batches), **kw)


def lm_loss_fn(model, mb):
    logits = model(input_ids=mb["input_ids"]).logits[:, :-1]
    labels = mb["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def mean_lm_loss(model, batch) -> torch.Tensor:
    """Reference loss: mean token cross-entropy over the whole batch, written independently."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)


def group_params(opt) -> list[nn.Parameter]:
    return [p for g in opt.param_groups for p in g["params"]]


def ids(params) -> set[int]:
    return {id(p) for p in params}


def muon_of(opt):
    base = opt.base if isinstance(opt, SAM) else opt
    return base.optimizers.get("muon")


def torch_states(opt) -> dict:
    """{optimizer name: {parameter index: its state}} of the torch optimizers inside ours."""
    base = opt.base if isinstance(opt, SAM) else opt
    return {name: o.state_dict()["state"] for name, o in base.optimizers.items()}


def adamw_steps(opt) -> set[float]:
    """The AdamW step counts (one per parameter; all equal after a clean run)."""
    return {float(state["step"]) for state in torch_states(opt)["adamw"].values()}


ALL_CONFIGS = {
    "adamw": dict(name="adamw"),
    "muon": dict(name="muon"),
    "sam-adamw": dict(name="sam", sam_base="adamw"),
    "sam-muon": dict(name="sam", sam_base="muon"),
}


# --------------------------------------------------------------------------- parameter split


@pytest.mark.parametrize("tied", [False, True])
def test_muon_split_llama_by_hand(tied):
    model = tiny_llama(tied=tied)
    named = dict(model.named_parameters())
    expect_muon = {n for n in named if n.endswith(tuple(f"{m}.weight" for m in HIDDEN_MATRICES))}
    expect_adamw = {n for n in named if n not in expect_muon}
    assert len(expect_muon) == 2 * 7
    assert "model.embed_tokens.weight" in expect_adamw
    assert ("lm_head.weight" in named) == (not tied)  # tied head is the same tensor as the embedding
    expect_adamw_hand = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{ln}.weight" for i in range(2) for ln in ("input_layernorm", "post_attention_layernorm")
    }
    if not tied:
        expect_adamw_hand.add("lm_head.weight")
    assert expect_adamw == expect_adamw_hand

    muon, adamw = muon_param_split(model)
    assert ids(muon) == ids(named[n] for n in expect_muon)
    assert ids(adamw) == ids(named[n] for n in expect_adamw)
    assert id(model.lm_head.weight) in ids(adamw)  # the head, 2-D, never goes to Muon (tied or not)

    opt = build_optimizer(model, OptimConfig(name="muon"))
    assert ids(group_params(opt.optimizers["muon"])) == ids(muon)
    assert ids(group_params(opt.optimizers["adamw"])) == ids(adamw)
    assert isinstance(opt.optimizers["muon"], torch.optim.Muon)
    assert isinstance(opt.optimizers["adamw"], torch.optim.AdamW)
    assert opt.optimizers["muon"].param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"


def test_muon_split_gpt_neox_with_biases():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = GPTNeoXForCausalLM(cfg)
    named = dict(model.named_parameters())
    hidden = (
        "attention.query_key_value.weight",
        "attention.dense.weight",
        "mlp.dense_h_to_4h.weight",
        "mlp.dense_4h_to_h.weight",
    )
    expect_muon = {n for n in named if n.endswith(hidden)}
    assert len(expect_muon) == 8
    assert sum(n.endswith(".bias") for n in named) > 8
    muon, adamw = muon_param_split(model)
    assert ids(muon) == ids(named[n] for n in expect_muon)
    assert ids(adamw) == ids(p for n, p in named.items() if n not in expect_muon)


class OddNames(nn.Module):
    """Embedding and head under names no heuristic would guess; found only through the accessors."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 8)
        self.pos = nn.Embedding(16, 8)  # any nn.Embedding stays on AdamW
        self.mix = nn.Linear(8, 8)
        self.readout = nn.Linear(8, VOCAB, bias=False)

    def get_input_embeddings(self):
        return self.tok

    def get_output_embeddings(self):
        return self.readout


def test_muon_split_head_found_by_accessor_not_name():
    model = OddNames()
    muon, adamw = muon_param_split(model)
    assert ids(muon) == {id(model.mix.weight)}
    assert ids(adamw) == ids([model.tok.weight, model.pos.weight, model.mix.bias, model.readout.weight])


def test_split_unwraps_data_parallel_wrapper():
    model = tiny_llama()
    wrapped = nn.DataParallel(model)  # same unwrapping path as DistributedDataParallel (.module)
    assert [ids(x) for x in muon_param_split(wrapped)] == [ids(x) for x in muon_param_split(model)]
    assert id(model.lm_head.weight) in ids(muon_param_split(wrapped)[1])


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_lora_only_trainable_params(modules_to_save):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(),
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save
        ),
    )
    named = dict(model.named_parameters())
    lora = {n for n in named if ".lora_A." in n or ".lora_B." in n}
    head = {n for n in named if "modules_to_save" in n and n.endswith("lm_head.modules_to_save.default.weight")}
    assert len(lora) == 2 * 2 * 2
    assert len(head) == (1 if modules_to_save else 0)
    trainable = lora | head
    assert {n for n, p in named.items() if p.requires_grad} == trainable

    for cfg in ALL_CONFIGS.values():
        opt = build_optimizer(model, OptimConfig(**cfg))
        assert ids(group_params(opt)) == ids(named[n] for n in trainable), cfg
    muon, adamw = muon_param_split(model)
    assert ids(muon) == ids(named[n] for n in lora)  # lora_A / lora_B are 2-D hidden matrices
    assert ids(adamw) == ids(named[n] for n in head)  # the trainable head copy stays on AdamW


def test_frozen_params_untouched():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    frozen = {id(model.model.embed_tokens.weight), id(model.model.layers[0].self_attn.q_proj.weight)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = token_batch()
    for cfg in ALL_CONFIGS.values():
        opt = build_optimizer(model, OptimConfig(lr=1e-2, **cfg))
        assert not frozen & ids(group_params(opt))
        take_step(model, opt, [batch], lm_loss_fn)
    after = dict(model.named_parameters())
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )
    assert not torch.equal(
        before["model.layers.0.self_attn.k_proj.weight"], after["model.layers.0.self_attn.k_proj.weight"]
    )


# --------------------------------------------------------------------------- training works


@pytest.mark.parametrize("key", list(ALL_CONFIGS))
def test_each_optimizer_lowers_loss(key):
    model = tiny_llama(tied=key.endswith("muon"))
    batch = token_batch()
    with torch.no_grad():
        start = float(mean_lm_loss(model, batch))
    opt = build_optimizer(model, OptimConfig(lr=1e-2, **ALL_CONFIGS[key]))
    for step in range(12):
        set_lr(opt, lr_factor(step, 12, 2, min_ratio=0.1))
        stats = take_step(model, opt, split(batch, 2), lm_loss_fn)
        assert math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)
    with torch.no_grad():
        end = float(mean_lm_loss(model, batch))
    assert start > math.log(VOCAB) - 0.2  # untrained model: near-uniform predictions
    assert end < start - 0.5, (start, end)


def test_muon_equals_hand_built_muon_plus_adamw():
    """The composite equals Muon + AdamW built by hand from the parameter names and stepped on the mean
    token loss (weight decay on matrices only). One micro-batch: Muon orthogonalizes in bfloat16, so
    accumulation-order rounding would flip bf16 roundings (accumulation is checked with AdamW/SGD below)."""
    model = tiny_llama()
    ref = copy.deepcopy(model)
    batch = token_batch(ragged=True)
    cfg = OptimConfig(name="muon", lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), muon_momentum=0.9)
    opt = build_optimizer(model, cfg)

    named = dict(ref.named_parameters())
    hidden = [p for n, p in named.items() if n.endswith(tuple(f"{m}.weight" for m in HIDDEN_MATRICES))]
    matrices = [named["model.embed_tokens.weight"], named["lm_head.weight"]]
    norms = [p for n, p in named.items() if "norm" in n]
    assert len(hidden) + len(matrices) + len(norms) == len(named)
    ref_muon = torch.optim.Muon(
        hidden, lr=3e-3, weight_decay=0.1, momentum=0.9, nesterov=True, adjust_lr_fn="match_rms_adamw"
    )
    ref_adamw = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": norms, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95)
    )
    for step in range(3):
        take_step(model, opt, [batch], lm_loss_fn, max_grad_norm=None)
        ref_muon.zero_grad()
        ref_adamw.zero_grad()
        mean_lm_loss(ref, batch).backward()
        ref_muon.step()
        ref_adamw.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


# --------------------------------------------------------------------------- SAM


class Toy(nn.Module):
    """A 3-parameter model: prediction tanh(x . w)."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x @ self.w)


def toy_data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def toy_loss_fn(model, mb):
    x, y = mb
    return ((model(x) - y) ** 2).sum(), len(y)


def toy_grad(w, x, y):
    """d/dw mean (tanh(x.w) - y)^2, by hand."""
    t = torch.tanh(x @ w)
    return (2 * (t - y) * (1 - t**2)) @ x / len(y)


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_sam_step_equals_hand_computed_sgd(max_grad_norm):
    w0 = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    x, y = toy_data()
    lr, rho = 0.1, 0.07
    model = Toy(w0.tolist())
    opt = build_optimizer(model, OptimConfig(name="sam", sam_base="sgd", lr=lr, sam_rho=rho))
    stats = take_step(model, opt, [(x, y)], toy_loss_fn, max_grad_norm=max_grad_norm)

    g = toy_grad(w0, x, y)
    g2 = toy_grad(w0 + rho * g / g.norm(), x, y)
    if max_grad_norm is not None:
        g2 = g2 * min(1.0, max_grad_norm / (float(g2.norm()) + 1e-6))
        assert float(toy_grad(w0 + rho * g / g.norm(), x, y).norm()) > max_grad_norm  # clipping is active
    expected = w0 - lr * g2
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-12, atol=1e-12)
    assert stats.loss == pytest.approx(float(((torch.tanh(x @ w0) - y) ** 2).mean()), rel=1e-12)
    assert stats.forwards == 2 and stats.backwards == 2


def test_sam_step_equals_hand_computed_adamw_first_step():
    w0 = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    x, y = toy_data(seed=3)
    lr, rho, wd, eps = 0.01, 0.1, 0.0, 1e-8
    model = Toy(w0.tolist())
    opt = build_optimizer(
        model,
        OptimConfig(name="sam", sam_base="adamw", lr=lr, sam_rho=rho, weight_decay=wd, eps=eps, betas=(0.9, 0.99)),
    )
    take_step(model, opt, [(x, y)], toy_loss_fn, max_grad_norm=None)
    g = toy_grad(w0, x, y)
    g2 = toy_grad(w0 + rho * g / g.norm(), x, y)
    m_hat = (1 - 0.9) * g2 / (1 - 0.9)  # bias-corrected first moment after one step
    v_hat = (1 - 0.99) * g2**2 / (1 - 0.99)
    torch.testing.assert_close(model.w.detach(), w0 - lr * m_hat / (v_hat.sqrt() + eps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("base", ["adamw", "muon", "sgd"])
def test_sam_rho_zero_equals_base(base):
    batch = token_batch()
    models, opts = [], []
    for name in ("sam", base):
        if name == "sgd":
            continue
        m = tiny_llama(seed=2)
        models.append(m)
        opts.append(build_optimizer(m, OptimConfig(name=name, sam_base=base, sam_rho=0.0, lr=1e-2)))
    if base == "sgd":  # the base alone, built as a plain torch.optim.SGD
        m = tiny_llama(seed=2)
        models.append(m)
        opts.append(MultiOptimizer({"sgd": torch.optim.SGD(m.parameters(), lr=1e-2)}))
    forwards = [0, 0]
    for step in range(3):
        for i, (m, o) in enumerate(zip(models, opts)):
            forwards[i] += take_step(m, o, split(batch, 2), lm_loss_fn).forwards
    for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), n
    assert forwards[0] == 2 * forwards[1] == 12


@pytest.mark.parametrize("base", ["adamw", "sgd"])
@pytest.mark.parametrize("k", [2, 4])
def test_sam_accumulation_equals_whole_batch(base, k):
    batch = token_batch(ragged=True)  # micro-batches with different token counts
    assert len({int((mb["labels"][:, 1:] != -100).sum()) for mb in split(batch, k)}) > 1
    runs = []
    for chunks in (1, k):
        m = TinyLM(seed=4)
        opt = build_optimizer(m, OptimConfig(name="sam", sam_base=base, lr=1e-2, sam_rho=0.1))
        for step in range(2):
            stats = take_step(m, opt, split(batch, chunks), lm_loss_fn, max_grad_norm=0.5)
        runs.append((m, stats))
    (a, sa), (b, sb) = runs
    assert sb.forwards == sb.backwards == 2 * k  # (optimizer_step checks each run's token count against n_tokens)
    assert sa.loss == pytest.approx(sb.loss, rel=1e-10)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=n)


def test_accumulation_equals_whole_batch_adamw():
    batch = token_batch(ragged=True)
    a, b = TinyLM(seed=5), TinyLM(seed=5)
    oa, ob = (build_optimizer(m, OptimConfig(lr=1e-2)) for m in (a, b))
    for _ in range(2):
        sa = take_step(a, oa, [batch], lm_loss_fn)
        sb = take_step(b, ob, split(batch, 4), lm_loss_fn)
    assert sa.grad_norm == pytest.approx(sb.grad_norm, rel=1e-10)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_n_tokens_must_be_what_the_loss_function_counts():
    batch = token_batch(ragged=True)
    for cfg in ALL_CONFIGS.values():
        model = TinyLM()
        opt = build_optimizer(model, OptimConfig(**cfg))
        with pytest.raises(ValueError, match="n_tokens"):
            optimizer_step(model, opt, split(batch, 2), lm_loss_fn, n_tokens=tokens_in([batch]) + 1)


def tensor_count_loss_fn(model, mb):
    """lm_loss_fn with its token count left a tensor, as the training loop's loss function returns it."""
    loss, _ = lm_loss_fn(model, mb)
    return loss, (mb["labels"][:, 1:] != -100).sum()


@pytest.mark.parametrize("key", list(ALL_CONFIGS))
def test_token_counts_may_stay_tensors(key):
    batch = token_batch(ragged=True)
    a, b = TinyLM(seed=8), TinyLM(seed=8)
    oa, ob = (build_optimizer(m, OptimConfig(**ALL_CONFIGS[key], lr=1e-2)) for m in (a, b))
    for _ in range(2):
        sa = take_step(a, oa, split(batch, 4), lm_loss_fn)
        sb = take_step(b, ob, split(batch, 4), tensor_count_loss_fn)
    assert (sa.loss, sa.grad_norm) == (sb.loss, sb.grad_norm)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="n_tokens"):
        optimizer_step(b, ob, split(batch, 2), tensor_count_loss_fn, n_tokens=tokens_in([batch]) - 1)


def test_sam_restores_weights_exactly_and_rejects_misuse():
    model = Toy([0.1, 0.2, 0.3])
    opt = build_optimizer(model, OptimConfig(name="sam", sam_base="sgd", lr=0.0, sam_rho=0.5))
    x, y = toy_data()
    w0 = model.w.detach().clone()
    toy_loss_fn(model, (x, y))[0].backward()
    norm = opt.perturb()
    assert norm == pytest.approx(float(model.w.grad.norm()))
    assert float((model.w.detach() - w0).norm()) == pytest.approx(0.5)
    with pytest.raises(RuntimeError):
        opt.step()
    opt.restore()
    assert torch.equal(model.w.detach(), w0)


# --------------------------------------------------------------------------- schedule


def test_lr_factor_hand_values():
    # warmup 10 of 110: linear from 0
    assert lr_factor(0, 110, 10) == 0.0
    assert lr_factor(5, 110, 10) == pytest.approx(0.5)
    assert lr_factor(10, 110, 10) == pytest.approx(1.0)
    # cosine over the remaining 100 steps
    assert lr_factor(60, 110, 10) == pytest.approx(0.5)
    assert lr_factor(35, 110, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, 110, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(200, 110, 10) == pytest.approx(0.0, abs=1e-12)
    # min_ratio: cosine ends at min_ratio, midpoint halfway between
    assert lr_factor(110, 110, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(60, 110, 10, min_ratio=0.1) == pytest.approx(0.55)
    # no warmup
    assert lr_factor(0, 50, 0) == 1.0


def test_lr_factor_matches_transformers_schedule():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=40, min_lr_rate=0.2)
    for step in range(40):
        assert lr_factor(step, 40, 7, min_ratio=0.2) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()


@pytest.mark.parametrize("key", list(ALL_CONFIGS))
def test_set_lr_scales_every_group_from_its_base(key):
    model = tiny_llama()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, muon_lr=4e-3, **ALL_CONFIGS[key]))
    groups = opt.param_groups
    assert len(groups) >= 2
    set_lr(opt, 0.25)
    set_lr(opt, 0.5)  # from the base, not compounding
    for g in groups:
        base = 4e-3 if g.get("group") == "muon" else 1e-3
        assert g["initial_lr"] == base and g["lr"] == pytest.approx(0.5 * base)
    if "muon" in key:
        assert muon_of(opt).param_groups[0]["lr"] == pytest.approx(2e-3)


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("key", list(ALL_CONFIGS))
def test_state_dict_round_trip_resumes_identically(key):
    batches = [token_batch(seed=10 + i) for i in range(6)]
    cfg = OptimConfig(lr=5e-3, weight_decay=0.01, **ALL_CONFIGS[key])
    total = 6

    def run(model, opt, steps) -> int:
        forwards = 0
        for s in steps:
            set_lr(opt, lr_factor(s, total, 2))
            forwards += take_step(model, opt, split(batches[s], 2), lm_loss_fn).forwards
        return forwards

    model = tiny_llama(tied=True)
    opt = build_optimizer(model, cfg)
    forwards = run(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)  # as a killed run would
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = tiny_llama(tied=True, seed=99)
    resumed.load_state_dict(ckpt["model"])
    ropt = build_optimizer(resumed, cfg)
    ropt.load_state_dict(ckpt["optim"])
    control = copy.deepcopy(resumed)  # same weights, fresh optimizer state: must diverge
    copt = build_optimizer(control, cfg)

    if muon_of(opt) is not None:  # momentum buffers came back
        assert len(muon_of(ropt).state) == len(muon_of(opt).state) > 0
    saved, restored = torch_states(opt), torch_states(ropt)  # every moment, buffer and step count came back
    assert saved.keys() == restored.keys()
    for name in saved:
        assert saved[name].keys() == restored[name].keys()
        for i, state in saved[name].items():
            assert state.keys() == restored[name][i].keys()
            assert all(torch.equal(v, restored[name][i][k]) for k, v in state.items()), (name, i)
    assert adamw_steps(ropt) == {3.0}

    forwards += run(model, opt, range(3, 6))
    run(resumed, ropt, range(3, 6))
    run(control, copt, range(3, 6))
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), control.parameters()))
    assert adamw_steps(ropt) == adamw_steps(opt) == {6.0}
    assert forwards == 6 * 2 * (2 if key.startswith("sam") else 1)


def test_load_state_dict_rejects_other_optimizer():
    model = tiny_llama()
    muon = build_optimizer(model, OptimConfig(name="muon"))
    with pytest.raises(ValueError):
        build_optimizer(model, OptimConfig(name="adamw")).load_state_dict(muon.state_dict())
    with pytest.raises(ValueError):
        build_optimizer(model, OptimConfig(name="sam")).load_state_dict(muon.state_dict())


def test_config_validation():
    with pytest.raises(ValueError):
        OptimConfig(name="lion")
    with pytest.raises(ValueError):
        OptimConfig(name="sam", sam_base="lion")
    with pytest.raises(ValueError, match="fused"):
        OptimConfig(fused="yes")


# --------------------------------------------------------------------------- fused AdamW


def adamw_of(opt) -> torch.optim.AdamW | None:
    base = opt.base if isinstance(opt, SAM) else opt
    return base.optimizers.get("adamw")


@pytest.mark.parametrize("key", list(ALL_CONFIGS))
def test_fused_adamw_only_where_the_parameters_train_on_cuda(key):
    model = tiny_llama()
    cfg = OptimConfig(**ALL_CONFIGS[key])
    assert adamw_of(build_optimizer(model, cfg)).defaults["fused"] is None  # a CPU: torch's default, as before
    assert adamw_of(build_optimizer(model, cfg, device="cuda")).defaults["fused"] is True
    off = OptimConfig(**ALL_CONFIGS[key], fused=False)
    assert adamw_of(build_optimizer(model, off, device="cuda")).defaults["fused"] is None
    sgd = build_optimizer(model, OptimConfig(name="sam", sam_base="sgd"), device="cuda")
    assert adamw_of(sgd) is None


def test_fused_adamw_needs_every_parameter_floating():
    cfg = OptimConfig()
    floats = [nn.Parameter(torch.zeros(2))]
    assert fused_adamw(floats, cfg, "cuda") and not fused_adamw(floats, cfg) and not fused_adamw([], cfg, "cuda")
    assert not fused_adamw([*floats, torch.zeros(2, dtype=torch.long)], cfg, "cuda")


def test_fused_adamw_steps_as_the_default_kernels():
    """The fused path (forced here with the CUDA hint: torch has fused AdamW kernels for CPUs too) through our
    groups, lr schedule and state dict, against torch's default kernels."""
    batch = token_batch(ragged=True)
    a, b = TinyLM(seed=9), TinyLM(seed=9)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    oa, ob = build_optimizer(a, cfg), build_optimizer(b, cfg, device="cuda")
    for factor in (0.5, 1.0, 0.25):
        set_lr(oa, factor)
        set_lr(ob, factor)
        take_step(a, oa, split(batch, 2), lm_loss_fn)
        take_step(b, ob, split(batch, 2), lm_loss_fn)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    buffer = io.BytesIO()
    torch.save(ob.state_dict(), buffer)
    buffer.seek(0)
    oa.load_state_dict(torch.load(buffer, weights_only=True))  # the fused state loads into the default kernels


# --------------------------------------------------------------------------- accelerate


@pytest.fixture
def cpu_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accelerator_path_equals_plain_path(cpu_accelerator):
    batch = token_batch(ragged=True)
    a, b = tiny_llama(seed=6), tiny_llama(seed=6)
    b = cpu_accelerator.prepare(b)
    cfg = OptimConfig(name="sam", sam_base="muon", lr=1e-2)
    oa, ob = build_optimizer(a, cfg), build_optimizer(b, cfg)
    for _ in range(2):
        sa = take_step(a, oa, split(batch, 2), lm_loss_fn, max_grad_norm=0.5)
        sb = take_step(b, ob, split(batch, 2), lm_loss_fn, max_grad_norm=0.5, accelerator=cpu_accelerator)
    assert sa.grad_norm == pytest.approx(sb.grad_norm, rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


# --------------------------------------------------------------------------- DDP (2 CPU processes)

DDP_WORKER = textwrap.dedent(r"""
    import os, sys, torch
    from torch import nn
    from accelerate import Accelerator
    from datalever.optim import OptimConfig, build_optimizer, optimizer_step

    torch.set_num_threads(1)
    name, rho, lr, clip = sys.argv[1], 0.2, 0.05, 0.5
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    assert world == 2

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()

    def data(r, step):  # each rank has a different number of tokens
        g = torch.Generator().manual_seed(1000 * step + r)
        return [(torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64))
                for n in (2 + r, 3 + 3 * r)]

    def loss_fn(model, mb):
        x, y = mb
        return ((model(x).squeeze(-1) - y) ** 2).sum(), len(y)

    def local_grad(model, mbs):  # grad of this rank's token-mean loss
        model.zero_grad()
        n = sum(len(y) for _, y in mbs)
        (sum(loss_fn(model, mb)[0] for mb in mbs) / n).backward()
        return [p.grad.clone() for p in model.parameters()]

    model = acc.prepare(make())
    opt = build_optimizer(model, OptimConfig(name=name, lr=lr, sam_rho=rho, sam_base="adamw"))
    ref = make()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.0)
    for step in range(3):
        mbs = data(rank, step)
        n = sum(len(y) for _, y in mbs)
        optimizer_step(model, opt, mbs, loss_fn, n_tokens=n, accelerator=acc, max_grad_norm=clip)
        grads = []
        for r in range(world):  # reference: DDP's average of per-rank gradients, written out
            g = local_grad(ref, data(r, step))
            if name == "sam":  # each rank perturbs with its own local gradient
                norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
                backup = [p.detach().clone() for p in ref.parameters()]
                with torch.no_grad():
                    for p, gi in zip(ref.parameters(), g):
                        p.add_(rho * gi / norm)
                g = local_grad(ref, data(r, step))
                with torch.no_grad():
                    for p, w in zip(ref.parameters(), backup):
                        p.copy_(w)
            grads.append(g)
        for p, *gs in zip(ref.parameters(), *grads):
            p.grad = sum(gs) / world
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        ref_opt.step()
    for p, q in zip(acc.unwrap_model(model).parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = acc.gather(flat[None])
    assert torch.equal(gathered[0], gathered[1])
    print("DDP_OK", rank, name, flush=True)
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()  # else gloo may abort at interpreter exit
    # Even so, gloo's threads sometimes abort the interpreter's teardown on a loaded machine
    # ("terminate called without an active exception") after the work is done: skip the teardown.
    os._exit(0)
""")


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["adamw", "sam"])
def test_ddp_two_cpu_processes_match_reference(tmp_path, name):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), name],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("DDP_OK") == 2
