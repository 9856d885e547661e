"""Every family of the paper's targets (Llama, Qwen3, Gemma 3, Phi) and the proxy's (GPT-NeoX) through the whole
code path a real checkpoint takes, on tiny presets: load, score, train (AdamW, Muon, LoRA), generate.

Each check has its own reference: the model's own `labels=` loss, a hand greedy loop without KV cache, parameter
names written out by hand per architecture, the real models' published parameter counts.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from datalever import models, synth, train
from datalever.evaluate import evaluate_examples
from datalever.examples import load_examples
from datalever.generation import GenerationOptions
from datalever.losses import score_examples
from datalever.optim import OptimConfig, muon_param_split
from datalever.rundir import TrainDir
from datalever.tokens import encode_example
from datalever.train import loop
from factories import brute_force_loss

torch.set_num_threads(1)

FAMILIES = ("tiny", "tiny-neox", "tiny-qwen3", "tiny-gemma3", "tiny-phi")

# Per architecture, written from the HF module names: the 2-D hidden matrices of a block (Muon), the rest of a
# block (AdamW: norms, biases), the top-level parameters (AdamW: embeddings, final norm, head unless tied), and
# peft's default LoRA targets.
LAYOUT = {
    "tiny": dict(
        muon=[f"self_attn.{m}_proj.weight" for m in "qkvo"] + [f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")],
        block_adamw=["input_layernorm.weight", "post_attention_layernorm.weight"],
        top=["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"],
        lora=["q_proj", "v_proj"],
    ),
    "tiny-qwen3": dict(
        muon=[f"self_attn.{m}_proj.weight" for m in "qkvo"] + [f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")],
        block_adamw=[
            "self_attn.q_norm.weight",
            "self_attn.k_norm.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        ],
        top=["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"],
        lora=["q_proj", "v_proj"],
    ),
    "tiny-gemma3": dict(
        muon=[f"self_attn.{m}_proj.weight" for m in "qkvo"] + [f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")],
        block_adamw=[
            "self_attn.q_norm.weight",
            "self_attn.k_norm.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "pre_feedforward_layernorm.weight",
            "post_feedforward_layernorm.weight",
        ],
        top=["model.embed_tokens.weight", "model.norm.weight"],  # lm_head.weight IS model.embed_tokens.weight
        lora=["q_proj", "v_proj"],
    ),
    "tiny-neox": dict(
        muon=[
            "attention.query_key_value.weight",
            "attention.dense.weight",
            "mlp.dense_h_to_4h.weight",
            "mlp.dense_4h_to_h.weight",
        ],
        block_adamw=[
            "attention.query_key_value.bias",
            "attention.dense.bias",
            "mlp.dense_h_to_4h.bias",
            "mlp.dense_4h_to_h.bias",
            "input_layernorm.weight",
            "input_layernorm.bias",
            "post_attention_layernorm.weight",
            "post_attention_layernorm.bias",
        ],
        top=[
            "gpt_neox.embed_in.weight",
            "gpt_neox.final_layer_norm.weight",
            "gpt_neox.final_layer_norm.bias",
            "lm_head.weight",  # embed_out in Pythia checkpoints; transformers 5 renames it on loading
        ],
        lora=["query_key_value"],
    ),
    "tiny-phi": dict(
        muon=[f"self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "dense")]
        + ["mlp.fc1.weight", "mlp.fc2.weight"],
        block_adamw=[f"self_attn.{m}.bias" for m in ("q_proj", "k_proj", "v_proj", "dense")]
        + ["mlp.fc1.bias", "mlp.fc2.bias", "input_layernorm.weight", "input_layernorm.bias"],
        top=[
            "model.embed_tokens.weight",
            "model.final_layernorm.weight",
            "model.final_layernorm.bias",
            "lm_head.weight",
            "lm_head.bias",
        ],
        lora=["q_proj", "v_proj", "fc1", "fc2"],
    ),
}


def block_prefix(name: str, layer: int) -> str:
    return f"gpt_neox.layers.{layer}." if name == "tiny-neox" else f"model.layers.{layer}."


def expected_split(name: str, layers: int = 2) -> tuple[set[str], set[str]]:
    """(Muon names, AdamW names) of preset `name`, from LAYOUT."""
    spec = LAYOUT[name]
    muon = {block_prefix(name, i) + s for i in range(layers) for s in spec["muon"]}
    adamw = {block_prefix(name, i) + s for i in range(layers) for s in spec["block_adamw"]} | set(spec["top"])
    return muon, adamw


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, str]:
    return {name: models.resolve_model(f"preset:{name}", seed=0) for name in FAMILIES}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    # 8 training examples: two batches of 4, the fixed set whose loss training must lower. Seed 1: seed 0's
    # problems give one tiny-gemma3 prompt a near tie in greedy decoding, which the generation test refuses.
    return synth.write_splits(str(tmp_path_factory.mktemp("data")), n_train=8, n_val=4, n_test=4, seed=1)


def load(path: str):
    return models.load_model(path).eval(), models.load_tokenizer(path)


def mean_loss(path: str, examples) -> float:
    model, tok = load(path)
    scores = score_examples(model, tok, examples, max_length=256)
    return sum(s.loss for s in scores.values()) / len(scores)


# ----------------------------------------------------------------------------- the presets themselves


@pytest.mark.parametrize("name", FAMILIES)
def test_preset_checkpoint_reloads_as_built(checkpoints, name):
    """What from_pretrained gives back is the model from_config built (tied weights, Gemma's embedding scale)."""
    model, tok = load(checkpoints[name])
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(models.build_config(models.PRESETS[name], tok)).eval()
    ids = torch.randint(0, len(tok), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    assert model.config.model_type == models.PRESETS[name].arch
    assert (tok.eos_token_id, tok.pad_token_id) == (model.config.eos_token_id, model.config.pad_token_id)
    assert model.config.bos_token_id == tok.eos_token_id  # the tokenizer has no BOS; every preset says EOS
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == models.PRESETS[name].tied


def test_gemma3_preset_has_the_gemma3_features(checkpoints):
    model, _ = load(checkpoints["tiny-gemma3"])
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    assert cfg.sliding_window == 16  # shorter than the test examples: the window masks something
    assert cfg.query_pre_attn_scalar == cfg.head_dim == 16 != cfg.hidden_size // cfg.num_attention_heads
    assert float(model.get_input_embeddings().embed_scale) == pytest.approx(math.sqrt(cfg.hidden_size))


def test_phi_preset_has_the_phi_features(checkpoints):
    model, _ = load(checkpoints["tiny-phi"])
    assert type(model).__name__ == "PhiForCausalLM"
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert model.lm_head.bias is not None and model.model.layers[0].mlp.fc1.bias is not None


@pytest.mark.parametrize(
    "name, params, non_embedding",
    [("qwen3-0.6b", 596_049_920, 440_467_456), ("llama3.2-1b", 1_235_814_400, 973_146_112)],
)
def test_paper_target_shapes_have_the_real_parameter_counts(checkpoints, name, params, non_embedding):
    """Qwen3-0.6B-Base and Llama-3.2-1B as published (tied embeddings counted once); built on the meta device."""
    tok = models.load_tokenizer(checkpoints["tiny"])  # every preset trains the same 512-token tokenizer
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(models.build_config(models.PRESETS[name], tok))
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    assert total == pytest.approx(params, rel=0.01)
    assert total - embedding == pytest.approx(non_embedding, rel=0.01)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


# ----------------------------------------------------------------------------- the loss engine


@pytest.mark.parametrize("name", FAMILIES)
def test_engine_matches_brute_force(checkpoints, data, name):
    model, tok = load(checkpoints[name])
    examples = load_examples(data["train"]) + load_examples(data["test"])
    # A small budget: batches of mixed widths, so most rows are padded.
    got = score_examples(model, tok, examples, max_length=256, token_budget=400)
    assert min(len(encode_example(tok, ex, 256).input_ids) for ex in examples) > 16  # longer than Gemma's window
    for ex in examples:
        assert got[ex.id].flag == ""
        assert got[ex.id].loss == pytest.approx(brute_force_loss(model, tok, ex, 256), abs=1e-5, rel=1e-5)


# ----------------------------------------------------------------------------- Muon's parameter split


@pytest.mark.parametrize("name", FAMILIES)
def test_muon_split_by_hand(checkpoints, name):
    model, _ = load(checkpoints[name])
    named = dict(model.named_parameters())  # a tied head appears once, as the embedding
    expect_muon, expect_adamw = expected_split(name)
    assert set(named) == expect_muon | expect_adamw  # the hand-written layout names every parameter
    muon, adamw = muon_param_split(model)
    assert [id(p) for p in muon] == [id(p) for n, p in named.items() if n in expect_muon]
    assert [id(p) for p in adamw] == [id(p) for n, p in named.items() if n in expect_adamw]
    assert id(model.get_output_embeddings().weight) in {id(p) for p in adamw}


@pytest.mark.parametrize("name", FAMILIES)
def test_muon_split_under_peft_default_lora(checkpoints, name):
    """With peft's default targets for the architecture: exactly the adapters train, all of them on Muon."""
    model = loop.apply_lora(load(checkpoints[name])[0], train.LoraConfig(enabled=True, r=4, dropout=0.0))
    named = dict(model.named_parameters())
    lora = {n for n in named if ".lora_A." in n or ".lora_B." in n}
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert adapted == set(LAYOUT[name]["lora"])
    assert len(lora) == 2 * 2 * len(LAYOUT[name]["lora"])  # layers x (A, B) x modules
    muon, adamw = muon_param_split(model)
    assert {id(p) for p in muon} == {id(named[n]) for n in lora} and adamw == []


# ----------------------------------------------------------------------------- training end to end


MODES = {
    "adamw": dict(optim=OptimConfig(name="adamw", lr=1e-2)),
    "muon": dict(optim=OptimConfig(name="muon", lr=1e-2)),
    # LoRA on peft's default targets, with each optimizer (Muon: the adapters are its hidden matrices). Muon's
    # per-matrix lr scale is small for the thin lora_B matrices, hence its higher lr.
    "lora-adamw": dict(optim=OptimConfig(name="adamw", lr=3e-2), lora=train.LoraConfig(enabled=True, dropout=0.0)),
    "lora-muon": dict(optim=OptimConfig(name="muon", lr=1e-1), lora=train.LoraConfig(enabled=True, dropout=0.0)),
}
# Measured drops (6 steps, seed 0): full training 1.05-1.35 for every family; LoRA on the few attention
# projections a random model barely uses, 0.10-0.30. A run that trains nothing drops exactly 0.
MIN_DROP = {"adamw": 0.5, "muon": 0.5, "lora-adamw": 0.05, "lora-muon": 0.05}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", FAMILIES)
def test_training_lowers_the_loss(checkpoints, data, tmp_path, name, mode):
    cfg = train.TrainConfig(
        model=f"preset:{name}",
        data=data["train"],
        out=str(tmp_path / "run"),
        max_steps=6,
        batch_size=4,
        micro_batch_size=4,
        warmup_ratio=0.0,
        progress=False,
        **MODES[mode],
    )
    summary = train.run(cfg)
    final = TrainDir(cfg.out).model
    examples = load_examples(data["train"])
    before, after = mean_loss(checkpoints[name], examples), mean_loss(str(final), examples)
    assert before > math.log(512) - 0.5  # untrained: near uniform over the vocabulary
    assert after < before - MIN_DROP[mode], (before, after)
    assert summary["steps"] == 6
    if cfg.lora.enabled:
        assert_merged_lora(checkpoints[name], final, LAYOUT[name]["lora"])


def assert_merged_lora(base_dir: str, final_dir: Path, targets: list[str]) -> None:
    """The final model is a plain HF checkpoint: the adapted modules changed, every other weight is the base's."""
    base, final = load_file(f"{base_dir}/model.safetensors"), load_file(str(final_dir / "model.safetensors"))
    assert set(final) == set(base)
    adapted = {k for k in base if k.rsplit(".", 2)[-2] in targets and k.endswith(".weight")}
    assert len(adapted) == 2 * len(targets)
    for k, v in base.items():
        assert torch.equal(final[k], v) != (k in adapted), k


# ----------------------------------------------------------------------------- generation


def greedy_reference(model, tokenizer, prompt: str, n: int) -> tuple[list[int], float]:
    """Greedy ids by full forwards without KV cache or padding; and the smallest top-2 logit gap on the way."""
    ids = tokenizer(prompt)["input_ids"]
    out, gap = [], math.inf
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1]
            top = logits.topk(2).values
            gap = min(gap, float(top[0] - top[1]))
            nxt = int(logits.argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
    return out, gap


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluate_generates_greedily(checkpoints, data, name):
    """Batched, left-padded, KV-cached generation equals the hand greedy loop for prompts of different lengths."""
    model, tok = load(checkpoints[name])
    examples = load_examples(data["test"])
    assert len({len(tok(ex.prompt)["input_ids"]) for ex in examples}) > 1  # left padding happens
    metrics, records = evaluate_examples(
        model, tok, examples, GenerationOptions(max_new_tokens=6, batch_size=4, progress=False)
    )
    assert metrics["n"] == len(examples) and [r["id"] for r in records] == [ex.id for ex in examples]
    for ex, record in zip(examples, records):
        ref, gap = greedy_reference(model, tok, ex.prompt, 6)
        assert gap > 1e-4, "a near tie: the comparison would test rounding, not generation"
        assert ref and record["generation"] == tok.decode(ref, skip_special_tokens=True)
