"""The launch: an Accelerator for however the processes were started, and the model wrapped for it.

`python -m datalever train` (one process: CPU or one GPU), `torchrun --nproc_per_node N -m datalever
train` (DDP; without GPUs the processes talk over gloo), or `accelerate launch --config_file
configs/accelerate/fsdp2.yaml -m datalever train` (FSDP2, also on CPUs): one code path for all of them.

Also the speed settings a launch applies before wrapping the model: the attention kernels (`check_attention`),
TensorFloat-32 (`set_tf32`), activation checkpointing and per-block torch.compile.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from datalever import checks

ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")  # transformers' names


def no_accelerator_device() -> bool:
    """No GPU or other accelerator on this machine: several processes must then talk over gloo on CPUs."""
    if torch.cuda.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return False
    try:
        from accelerate.utils import is_mlu_available, is_npu_available

        return not (is_npu_available() or is_mlu_available())
    except ImportError:
        return True


def fsdp_requested() -> bool:
    """An Accelerate FSDP config is in effect (`accelerate launch --config_file fsdp.yaml` sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def resolve_mixed_precision(setting: str) -> str:
    """What `auto` means on this machine: bf16 autocast on a GPU that supports it, else float32 ("no")."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(mixed_precision: str, log_with: list[str] | None, project_dir: str):
    """An Accelerator set up from the environment (torchrun / accelerate launch / plain python).

    `mixed_precision`: no | bf16 | auto (bf16 on a GPU that supports it, else no).

    Accelerate only treats a torchrun launch as multi-process CPU (gloo) when asked with `cpu=True`;
    without it, N processes on a machine without GPUs each train alone. So `cpu=True` is passed
    exactly when several processes were launched and there is no accelerator device.

    FSDP: only Accelerate's FSDP2 (`fsdp_version: 2`) is supported; its sharded parameters are what
    Muon, SAM and the sharded checkpoints here are written for. Accelerate turns FSDP on only for
    accelerator devices, while torch's FSDP2 also shards over gloo on CPUs: on a machine without
    GPUs the FSDP plugin is switched on by hand, so the same code path runs (and is tested) there.
    """
    from accelerate import Accelerator

    mixed_precision = resolve_mixed_precision(mixed_precision)
    fsdp = fsdp_requested()
    if fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError(
            "datalever supports FSDP through Accelerate's FSDP2 only: set `fsdp_version: 2` in the "
            "Accelerate config (FSDP_VERSION=2)"
        )
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and no_accelerator_device()
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir, cpu=cpu)
    if fsdp and cpu and not accelerator.is_fsdp2:
        _enable_fsdp_on_cpus(accelerator)
    if accelerator.is_fsdp2 and accelerator.mixed_precision == "bf16":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # FSDP2 does mixed precision by casting the gathered weights, not by autocast. Accelerate's policy
        # would also reduce gradients in bf16 and cast every unit's outputs, the root's float32 per-example
        # loss sums included, to bf16. Here gradients are reduced in float32 (as under DDP) and outputs are
        # left as computed: blocks hand on bf16 activations, the loss module its float32 sums.
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    return accelerator


def _enable_fsdp_on_cpus(accelerator) -> None:
    """What Accelerate itself does on GPUs: the plugin on the accelerator state, the type in both shared states."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the same environment
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def prepare(accelerator, model, opt):
    """Wrap the model (a ResponseLoss) for the launch (DDP, FSDP2 or nothing) and point the optimizer at the
    wrapped parameters.

    Under FSDP2, Accelerate replaces every parameter by a sharded DTensor and re-points the torch
    optimizers passed with the model at the new parameters, in place; our Multi/SAM wrappers hold those
    same optimizer objects, so they follow. Elsewhere the parameters stay the same objects.
    """
    if accelerator.is_fsdp2:
        # Accelerate's transformer-block wrap policy looks for the HF model's block classes on the root module.
        model._no_split_modules = getattr(model.model, "_no_split_modules", None)
        return accelerator.prepare(model, *opt.torch_optimizers())[0]
    return accelerator.prepare(model)


# ----------------------------------------------------------------------------- speed settings


def check_attention(attn_implementation: str, mixed_precision: str, dtype: str) -> None:
    """Refuse an attention implementation this machine or these precisions cannot run, in one line."""
    checks.one_of("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    if attn_implementation != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():  # also False without a CUDA GPU
        raise checks.ConfigError(
            "attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install flash-attn --no-build-isolation); use sdpa"
        )
    if resolve_mixed_precision(mixed_precision) == "no" and dtype == "float32":
        raise checks.ConfigError(
            "attn_implementation=flash_attention_2 computes in bf16 or fp16 only: use mixed_precision bf16 (or auto) "
            "or dtype bfloat16"
        )


def tf32_in_effect(tf32: bool) -> bool:
    """Whether the tf32 setting changes anything here: only CUDA has TensorFloat-32 matmuls."""
    return bool(tf32) and torch.cuda.is_available()


def set_tf32(tf32: bool) -> None:
    """float32 matmuls on CUDA in TensorFloat-32 (tensor cores, 10-bit mantissa) or in IEEE float32 (torch's default).

    On a CPU nothing is touched (torch's global float32 precision would also reach oneDNN's CPU kernels). The flag
    is process-wide, so every run sets it either way rather than inherit an earlier run's. Through the older
    `allow_tf32` flag, which both APIs read back: once torch 2.9's `fp32_precision` is set, reading the older
    settings raises, and Accelerate still sets `allow_tf32` and inductor reads `torch.get_float32_matmul_precision()`.
    """
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)


def enable_gradient_checkpointing(hf_model: nn.Module) -> None:
    """Recompute every block's activations in the backward (transformers' activation checkpointing).

    Non-reentrant: it needs no input that requires grad (LoRA's frozen embeddings), replays the recompute with the
    first forward's RNG state (the same dropout masks, the same numbers), and is the kind DDP, FSDP2 and
    torch.compile support.
    """
    kwargs = {"use_reentrant": False}
    enable = getattr(hf_model, "activation_checkpointing_enable", None)  # transformers >= 5's name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an HF model (the classes it names in `_no_split_modules`), under a peft model too."""
    from datalever.models import unwrap

    names = set(getattr(unwrap(model), "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every transformer block in place (`nn.Module.compile`); returns how many.

    In place, so module names, state dicts and checkpoints stay as they are and DDP or FSDP2 wrap the model as
    before. Blocks rather than the whole model: the loss module around the model gathers the response positions
    (a data-dependent shape, which would break the graph), and the blocks share one code object, so one
    compilation serves all of them.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"torch_compile: no transformer blocks found in {type(model).__name__} (_no_split_modules)")
    for block in blocks:
        block.compile()
    return len(blocks)


def check_compile_available() -> None:
    """Refuse torch_compile where torch.compile cannot run (e.g. a Python version dynamo does not support yet)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise checks.ConfigError("torch_compile=true: torch.compile is not supported on this Python/torch; use false")
