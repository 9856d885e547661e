"""Models and tokenizers: any HF causal LM by path or hub id, or a preset built from scratch.

A preset is a real HF architecture (Llama, GPT-NeoX/Pythia, Qwen3, Gemma 3, Phi) with random weights and a
byte-level BPE tokenizer trained locally on the embedded math corpus, saved with `save_pretrained`:
every artifact is an ordinary HF checkpoint directory, so the code path for a real checkpoint and
for a preset is the same one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PhiConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

from datalever import checks, rundir

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16", "auto")  # weight dtypes a model loads in ("auto": the checkpoint's)
PRESET_PREFIX = "preset:"
EMBEDDED_PREFIX = "embedded:"  # a checkpoint shipped inside the package (src/datalever/assets/NAME)
EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass(frozen=True)
class Preset:
    arch: str  # "llama" | "gpt_neox" | "qwen3" | "gemma3_text" | "phi" (HF model_type)
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int  # model vocabulary (embedding rows); >= the tokenizer's size
    max_positions: int = 1024
    tokenizer_vocab: int = 512
    kv_heads: int | None = None  # key/value heads (grouped-query attention); None: as many as `heads`
    head_dim: int | None = None  # None: hidden // heads
    tied: bool = False  # output head shares the input embedding's weight


PRESETS: dict[str, Preset] = {
    # For tests: seconds to build and run. One per family of the paper's targets (Qwen3, Llama, Gemma 3, Phi),
    # plus GPT-NeoX (Pythia, the proxy).
    "tiny": Preset("llama", hidden=32, layers=2, heads=4, intermediate=64, vocab=512, max_positions=512),
    "tiny-neox": Preset("gpt_neox", hidden=32, layers=2, heads=4, intermediate=64, vocab=512, max_positions=512),
    "tiny-qwen3": Preset("qwen3", hidden=32, layers=2, heads=4, intermediate=64, vocab=512, max_positions=512),
    # As Gemma-3-1B: one KV head, head_dim unrelated to hidden // heads, tied and scaled embeddings.
    "tiny-gemma3": Preset(
        "gemma3_text",
        hidden=32,
        layers=2,
        heads=4,
        kv_heads=1,
        head_dim=16,
        intermediate=64,
        vocab=512,
        max_positions=512,
        tied=True,
    ),
    "tiny-phi": Preset("phi", hidden=32, layers=2, heads=4, intermediate=64, vocab=512, max_positions=512),
    # The demo's proxy and target: trains in minutes on 2 CPU cores.
    "demo": Preset("llama", hidden=128, layers=4, heads=4, intermediate=384, vocab=512),
    # The demo's width halved and doubled (0.28 M and 3.7 M parameters against its 0.98 M): the proxy sizes of
    # docs/results/proxies/, pretrained as demo-base was (`datalever model pretrain --preset demo-small`).
    "demo-small": Preset("llama", hidden=64, layers=4, heads=4, intermediate=192, vocab=512),
    "demo-large": Preset("llama", hidden=256, layers=4, heads=4, intermediate=768, vocab=512),
    # Pythia-70M's shape (hidden 512, 6 layers, 8 heads, 50304 embedding rows) for benchmarks.
    "pythia-70m": Preset("gpt_neox", hidden=512, layers=6, heads=8, intermediate=2048, vocab=50304, max_positions=2048),
    # The shapes of two of the paper's targets (random weights; the local tokenizer uses the first 512 rows), for
    # GPU benchmarks: Qwen3-0.6B-Base (0.596 B parameters) and Llama-3.2-1B (1.236 B).
    "qwen3-0.6b": Preset(
        "qwen3",
        hidden=1024,
        layers=28,
        heads=16,
        kv_heads=8,
        head_dim=128,
        intermediate=3072,
        vocab=151936,
        max_positions=4096,
        tied=True,
    ),
    "llama3.2-1b": Preset(
        "llama",
        hidden=2048,
        layers=16,
        heads=32,
        kv_heads=8,
        intermediate=8192,
        vocab=128256,
        max_positions=4096,
        tied=True,
    ),
}


def is_preset(spec: str) -> bool:
    return spec.startswith(PRESET_PREFIX)


def build_tokenizer(
    vocab_size: int = 512, corpus_seed: int = 12345, corpus_size: int = 4000
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on generated math problems (deterministic).

    Digits are split one per token (as in Llama), so arithmetic is not hidden inside merges; every
    byte is in the alphabet, so no text is ever out of vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from datalever import synth

    records = synth.generate(corpus_size, seed=corpus_seed)
    corpus = [r["question"] + "\n" + r["answer"] for r in records]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=1_000_000)


def build_config(preset: Preset, tokenizer) -> PretrainedConfig:
    """The HF config of `preset`; token ids from `tokenizer` (bos is EOS: the tokenizer has no BOS token)."""
    common = dict(
        vocab_size=max(preset.vocab, len(tokenizer)),
        hidden_size=preset.hidden,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        intermediate_size=preset.intermediate,
        max_position_embeddings=preset.max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=preset.tied,
    )
    kv_heads = preset.kv_heads or preset.heads
    head_dim = preset.head_dim or preset.hidden // preset.heads
    if preset.arch == "llama":
        return LlamaConfig(num_key_value_heads=kv_heads, head_dim=head_dim, **common)
    if preset.arch == "qwen3":
        return Qwen3Config(num_key_value_heads=kv_heads, head_dim=head_dim, **common)
    if preset.arch == "gemma3_text":
        return _gemma3_config(preset, kv_heads, head_dim, common)
    if preset.arch == "phi":
        # Phi-2's layout: partial rotary (0.4 there; 0.5 keeps a small head's rotary part even), biases everywhere.
        return PhiConfig(num_key_value_heads=kv_heads, partial_rotary_factor=0.5, **common)
    if preset.arch == "gpt_neox":
        if kv_heads != preset.heads or head_dim != preset.hidden // preset.heads:
            raise ValueError("gpt_neox presets have neither grouped-query attention nor a free head_dim")
        return GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, **common)
    raise ValueError(f"unknown architecture {preset.arch!r}")


def _gemma3_config(preset: Preset, kv_heads: int, head_dim: int, common: dict) -> Gemma3TextConfig:
    # Gemma 3 interleaves sliding-window and full attention (5:1 in the real models); a tiny model gets both
    # kinds and a window shorter than a training example, so the window really masks something.
    layer_types = ["full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(preset.layers)]
    return Gemma3TextConfig(
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,  # as in Gemma-3-1B (256 = its head_dim): scores scaled by 1/sqrt(head_dim)
        sliding_window=16,
        layer_types=layer_types,
        **common,
    )


def build_preset(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build preset `name` from scratch with seed `seed` and save it as an HF checkpoint directory."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        if _built_preset(out_dir) == {"preset": name, "seed": seed}:
            return out_dir  # built before: presets are deterministic by (name, seed)
        # Never replace what this function did not make (a user's checkpoint, say).
        raise checks.ConfigError(f"{out_dir} exists and is not preset {name} (seed {seed}): choose another directory")
    preset = PRESETS[name]
    tokenizer = build_tokenizer(preset.tokenizer_vocab)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(preset, tokenizer))
    # keep_existing: two processes may build the same preset at once; both copies are identical.
    with rundir.atomic_dir(out_dir, keep_existing=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "datalever_preset.json").write_text(json.dumps({"preset": name, "seed": seed}))
    return out_dir


def _built_preset(path: Path) -> dict | None:
    """The {preset, seed} record of a directory build_preset made, or None."""
    record = path / "datalever_preset.json"
    return json.loads(record.read_text()) if record.is_file() and (path / "model.safetensors").is_file() else None


def preset_cache_dir() -> Path:
    """Where `preset:NAME` models are built: $DATALEVER_CACHE/presets (default ~/.cache/datalever/presets).

    A preset is deterministic by name and seed, so one cache serves every stage and run (as the HF
    hub cache does for downloaded checkpoints).
    """
    root = os.environ.get("DATALEVER_CACHE") or Path.home() / ".cache" / "datalever"
    return Path(root) / "presets"


def resolve_model(spec: str, *, seed: int = 0) -> str:
    """Turn a model spec into something `from_pretrained` accepts; every stage resolves through here.

    `preset:NAME` builds the preset (seed `seed`) into the preset cache once; `embedded:NAME` is a
    checkpoint that ships with the package (`demo-base`: the demo preset pretrained on arithmetic and
    copy drills by `datalever model pretrain`); a local checkpoint directory or a hub id is returned
    unchanged. A spec written as a local path (`./x`, `/x`, `~/x`, `a/b/c`) that does not exist is an
    error here, not a hub lookup.
    """
    if spec.startswith(EMBEDDED_PREFIX):
        return embedded_checkpoint(spec[len(EMBEDDED_PREFIX) :])
    if is_preset(spec):
        name = spec[len(PRESET_PREFIX) :]
        return str(build_preset(name, preset_cache_dir() / f"{name}-seed{seed}", seed=seed))
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    hint = _did_you_mean(spec) if "/" not in spec else ""
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or hint:
        raise FileNotFoundError(f"no model directory {spec}{hint} (a hub id is written ORG/NAME)")
    check_hub_reachable(spec)
    return spec


def _did_you_mean(spec: str) -> str:
    """ "; did you mean preset:qwen3-0.6b?" for a spec close to a preset's name, else ""."""
    import difflib

    names = [PRESET_PREFIX + name for name in PRESETS] + [EMBEDDED_PREFIX + "demo-base"]
    bare = {name.split(":", 1)[1]: name for name in names}
    close = difflib.get_close_matches(spec.lower(), list(bare), n=1, cutoff=0.6)
    return f"; did you mean {bare[close[0]]}?" if close else ""


def check_hub_reachable(repo_id: str, timeout: float = 5.0) -> None:
    """A hub model that is not in the local cache needs the hub: when it cannot be reached, say so in one line
    now, not after a minute of retries and a long traceback."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if offline or proxied or isinstance(try_to_load_from_cache(repo_id, "config.json"), str):  # proxied: not probed
        return  # cached (or offline mode, where the loader's own error is immediate)
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        raise FileNotFoundError(
            f"model {repo_id}: not a local directory, not in the Hugging Face cache, and {url.hostname} cannot be "
            f"reached ({e.strerror or e}); download it where the hub is reachable and pass its directory"
        ) from None


def embedded_checkpoint(name: str) -> str:
    from importlib.resources import files

    path = files("datalever") / "assets" / name
    if not (path / "config.json").is_file():
        raise ValueError(f"no embedded checkpoint {name!r} (have: demo-base)")
    return str(path)


DIRECTORY = "directory sha256:"  # how `model_identity` marks a hash of a directory's files


def model_identity(spec: str) -> str:
    """What the model spec stands for: for a local directory (the embedded one included) a hash of its files, so a
    checkpoint retrained in place is not taken for the one a run started from; otherwise the spec itself (a preset
    is built the same way for the same name and seed; a hub id is the hub's, its revision not pinned here)."""
    from datalever.provenance import directory_fingerprint

    if is_preset(spec):
        return spec
    path = Path(embedded_checkpoint(spec[len(EMBEDDED_PREFIX) :]) if spec.startswith(EMBEDDED_PREFIX) else spec)
    path = path.expanduser()
    return f"{DIRECTORY}{directory_fingerprint(path)}" if path.is_dir() else spec


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Many base models ship without a pad token; padding positions are always masked out.
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load an HF causal LM. Weights come from safetensors when the checkpoint has them.

    `attn_implementation`: sdpa | flash_attention_2 | eager; None: transformers' choice (sdpa where the model
    supports it)."""
    if isinstance(dtype, str):
        checks.one_of("dtype", dtype, DTYPES)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[dtype]
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def unwrap(model: nn.Module, *, through_peft: bool = True) -> nn.Module:
    """The model under DDP / DataParallel / torch.compile wrappers, and under peft's unless told not to.

    through_peft=False stops at a peft model, which still forwards `generate` and the embedding
    getters; through it (the default) comes the HF model, with the LoRA layers injected.
    """
    while True:
        if isinstance(getattr(model, "module", None), nn.Module):  # DDP, DataParallel, DeepSpeed
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif through_peft and hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_config_summary(path: str) -> dict:
    cfg = AutoConfig.from_pretrained(path)
    return {
        "architectures": getattr(cfg, "architectures", None),
        "model_type": cfg.model_type,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
    }


@dataclass
class ModelBuildConfig:
    """Build a small model from scratch (a real HF architecture) with a locally trained tokenizer."""

    preset: str = "demo"
    """Preset name: tiny, tiny-neox, tiny-qwen3, tiny-gemma3, tiny-phi (tests), demo, pythia-70m, qwen3-0.6b,
    llama3.2-1b (the real shapes, random weights)."""
    out: str = "runs/models/demo"
    """Output HF checkpoint directory (refused if it exists and is not this preset, built before)."""
    seed: int = 0
    """Initialization seed."""

    def __post_init__(self) -> None:
        checks.one_of("preset", self.preset, PRESETS)


def run_model_build(cfg: ModelBuildConfig) -> str:
    path = build_preset(cfg.preset, cfg.out, seed=cfg.seed)
    return f"{path}: {count_parameters(load_model(str(path))):,} parameters"
