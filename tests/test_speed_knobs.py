"""The speed settings of `datalever train` (attention kernels, TF32, fused AdamW, activation checkpointing, length
grouping, torch.compile, no host sync per micro-batch): each reaches the model or the loop, changes no number it
should not, and enters the resume identity exactly when it picks other kernels.

References: a run with the setting off (bit for bit where the arithmetic is the same, within float rounding where the
kernels differ), labels counted from the collated tensors, and torch's own flags.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import traceback
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from datalever import checks, launch, train
from datalever.examples import Example
from datalever.models import load_tokenizer, resolve_model
from datalever.optim import OptimConfig
from datalever.rundir import TrainDir
from datalever.tokens import IGNORE, collate, encode_example
from datalever.train import LoraConfig, TrainConfig, inputs, loop
from datalever.train.config import resume_identity
from factories import synth_splits, train_config

KERNEL_KEYS = ("attn_implementation", "tf32", "torch_compile")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth_splits(tmp_path_factory, n_train=32, n_val=4, n_test=4)


def config(data, out, **kw) -> TrainConfig:
    """3 steps, no validation data."""
    return train_config(data, out, **{"max_steps": 3, "val_data": None, **kw})


def losses(cfg: TrainConfig) -> list[float]:
    train.run(cfg)
    return [json.loads(line)["loss"] for line in TrainDir(cfg.out).log.read_text().splitlines()]


def settings(cfg: TrainConfig) -> dict:
    return json.loads(resume_identity(cfg, {}))["settings"]


@pytest.fixture
def cuda_present(monkeypatch):
    """What the settings resolve to on a CUDA machine (only the availability check is faked: nothing runs on CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


# ----------------------------------------------------------------------------- the resume identity


def test_default_settings_leave_the_identity_as_it_was_before_they_existed():
    found = settings(TrainConfig())
    assert not set(KERNEL_KEYS) & set(found), found  # a run recorded before these settings keeps its identity
    assert "fused" not in found["optim"]
    assert {"gradient_checkpointing", "group_by_length"}.isdisjoint(found)


@pytest.mark.parametrize(
    "change,entry",
    [
        (dict(attn_implementation="eager"), ("attn_implementation", "eager")),
        (dict(torch_compile=True), ("torch_compile", True)),
    ],
)
def test_settings_that_pick_other_kernels_enter_the_identity(change, entry):
    assert settings(TrainConfig(**change))[entry[0]] == entry[1]


def test_tf32_and_fused_adamw_enter_the_identity_only_where_they_run(cuda_present):
    on_cuda = settings(TrainConfig(mixed_precision="no"))
    assert on_cuda["tf32"] is True and on_cuda["optim"]["fused"] is True
    off = settings(TrainConfig(mixed_precision="no", tf32=False, optim=OptimConfig(fused=False)))
    assert "tf32" not in off and "fused" not in off["optim"]  # as CUDA runs computed before these settings
    sgd = settings(TrainConfig(mixed_precision="no", optim=OptimConfig(name="sam", sam_base="sgd")))
    assert "fused" not in sgd["optim"]  # no AdamW is built


def test_tf32_and_fused_change_nothing_on_a_cpu():
    assert settings(TrainConfig(tf32=False, optim=OptimConfig(fused=False))) == settings(TrainConfig())


def test_settings_that_only_reschedule_the_same_arithmetic_stay_out_of_the_identity():
    same = TrainConfig(gradient_checkpointing=True, group_by_length=False, micro_batch_size=2)
    assert resume_identity(same, {}) == resume_identity(TrainConfig(), {})


# ----------------------------------------------------------------------------- option values


@pytest.mark.parametrize(
    "name,value",
    [("attn_implementation", "flash"), ("tf32", "yes"), ("gradient_checkpointing", 2), ("torch_compile", None)],
)
def test_bad_values_are_refused_in_one_line(name, value):
    with pytest.raises(checks.ConfigError, match=rf"^{name} must be .*got {value!r}$"):
        TrainConfig(**{name: value})


def test_flash_attention_2_without_its_package_or_a_gpu_is_refused_in_one_line():
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(checks.ConfigError, match=r"^attn_implementation=flash_attention_2 needs a CUDA GPU") as err:
        TrainConfig(attn_implementation="flash_attention_2")
    assert "\n" not in str(err.value)


def test_flash_attention_2_refuses_float32_compute(monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    with pytest.raises(checks.ConfigError, match="bf16 or fp16 only"):
        TrainConfig(attn_implementation="flash_attention_2", mixed_precision="no", dtype="float32")
    TrainConfig(attn_implementation="flash_attention_2", mixed_precision="no", dtype="bfloat16")


# ----------------------------------------------------------------------------- each setting reaches the model


def trainable_model(cfg: TrainConfig):
    one_process = SimpleNamespace(main_process_first=contextlib.nullcontext)  # all load_trainable_model asks of it
    return loop.load_trainable_model(cfg, one_process)[2]


def test_attention_and_checkpointing_reach_the_model(data, tmp_path):
    from datalever.models import unwrap

    plain = unwrap(trainable_model(config(data, tmp_path)))
    assert plain.config._attn_implementation == "sdpa"
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.modules())
    cfg = config(
        data, tmp_path, attn_implementation="eager", gradient_checkpointing=True, lora=LoraConfig(enabled=True)
    )
    model = unwrap(trainable_model(cfg))
    assert model.config._attn_implementation == "eager"
    blocks = launch.transformer_blocks(model)
    assert len(blocks) == 2 and all(block.gradient_checkpointing for block in blocks)


def test_compile_blocks_compiles_every_block_in_place(data, tmp_path):
    model = trainable_model(config(data, tmp_path))
    names = list(model.state_dict())
    assert launch.compile_blocks(model) == model.config.num_hidden_layers
    assert all(block._compiled_call_impl is not None for block in launch.transformer_blocks(model))
    assert list(model.state_dict()) == names  # in place: checkpoints keep their keys


def test_tf32_touches_nothing_on_a_cpu_and_reads_back_through_both_torch_apis(monkeypatch):
    before, cpu_kernels = torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.matmul.fp32_precision
    launch.set_tf32(not before)
    assert torch.backends.cuda.matmul.allow_tf32 == before
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        launch.set_tf32(True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"  # what inductor reads: no mixed-API error
        launch.set_tf32(False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee" and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.mkldnn.matmul.fp32_precision == cpu_kernels  # oneDNN's (CPU) setting, untouched
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ----------------------------------------------------------------------------- the numbers


@pytest.mark.parametrize("lora", [False, True])  # LoRA: dropout 0.05, replayed with the same masks
def test_gradient_checkpointing_gives_the_same_numbers(data, tmp_path, lora):
    lora_cfg = LoraConfig(enabled=lora)
    plain = losses(config(data, tmp_path / "plain", lora=lora_cfg))
    assert losses(config(data, tmp_path / "gc", lora=lora_cfg, gradient_checkpointing=True)) == plain


def test_eager_attention_matches_sdpa_to_float_rounding(data, tmp_path):
    sdpa = losses(config(data, tmp_path / "sdpa"))
    eager = losses(config(data, tmp_path / "eager", attn_implementation="eager"))
    assert eager == pytest.approx(sdpa, rel=1e-5)


def test_micro_batches_in_stream_order_train_to_the_same_losses_and_pad_more(data, tmp_path):
    grouped = losses(config(data, tmp_path / "grouped", micro_batch_size=2))
    ungrouped = losses(config(data, tmp_path / "ungrouped", micro_batch_size=2, group_by_length=False))
    assert ungrouped == pytest.approx(grouped, rel=1e-5)

    tok = load_tokenizer(resolve_model("preset:tiny", seed=0))
    rows = [encode_example(tok, ex, 512) for ex in inputs.load_training_data(config(data, tmp_path))[0][:16]]
    in_order = loop.micro_batches(rows, 4, tok.pad_token_id, "cpu", sort=False)
    assert torch.equal(in_order[0]["input_ids"], collate(rows[:4], tok.pad_token_id)["input_ids"])

    def padding(batches):
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert padding(loop.micro_batches(rows, 4, tok.pad_token_id, "cpu")) < padding(in_order)


def needs_compiler():
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python/torch")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: inductor cannot compile on this CPU")


@pytest.mark.slow
def test_torch_compile_trains_to_the_same_losses(data, tmp_path):
    needs_compiler()
    plain = losses(config(data, tmp_path / "plain"))
    compiled = losses(config(data, tmp_path / "compiled", torch_compile=True))
    assert compiled == pytest.approx(plain, rel=1e-5)


# ----------------------------------------------------------------------------- no host sync per micro-batch


def test_loss_tokens_counted_from_lengths_equal_the_labels():
    tok = load_tokenizer(resolve_model("preset:tiny", seed=0))
    examples = [
        Example("short", "1+1=", "2"),
        Example("long", "What is 12 * 34 plus the number of days in a week? " * 3, "12 * 34 = 408. 408 + 7 = 415."),
        Example("empty prompt", "", "only a response"),
    ]
    for max_length in (512, 40, 12, 2):  # 40: the response cut; 12 and 2: the prompt cut too, nothing left
        encoded = [encode_example(tok, ex, max_length) for ex in examples]
        labels = collate(encoded, tok.pad_token_id)["labels"]
        assert sum(loop.response_tokens(e) for e in encoded) == int((labels[:, 1:] != IGNORE).sum()), max_length
        for e in encoded:
            row = collate([e], tok.pad_token_id)["labels"]
            assert loop.response_tokens(e) == int((row[:, 1:] != IGNORE).sum()), (e.id, max_length)


HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


def host_reads_by_datalever(monkeypatch) -> Counter:
    """Counts the tensor-to-host reads that datalever's own code makes (each one a sync on a GPU)."""
    counts: Counter = Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if "/datalever/" in caller.filename:
                counts[f"{caller.name}:{_name}"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return counts


@pytest.mark.parametrize("name", ["adamw", "sam"])
def test_a_step_reads_the_device_as_often_for_eight_micro_batches_as_for_one(data, tmp_path, monkeypatch, name):
    reads = []
    for micro in (8, 1):
        cfg = config(data, tmp_path / f"m{micro}", micro_batch_size=micro, optim=OptimConfig(name=name, lr=3e-3))
        job = loop.setup(cfg, inputs.load_inputs(cfg))
        counts = host_reads_by_datalever(monkeypatch)
        loop.optimize_batch(job, list(range(8)))
        monkeypatch.undo()
        reads.append(dict(counts))
    assert reads[0] == reads[1]
    # Per pass its loss and token count, per step the gradient norm (SAM: two passes, and the norm it perturbs with).
    assert sum(reads[0].values()) <= (6 if name == "sam" else 3), reads[0]
