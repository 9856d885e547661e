"""Generation throughput of `datalever eval` against the plain `model.generate` path, and the memory-bandwidth bound.

    python benchmarks/generate.py [--preset demo] [--n 64] [--max_new_tokens 256] [--batch_size 32]
                                  [--device cpu|cuda] [--dtype float32|bfloat16] [--bandwidth_gbs GB/s]
                                  [--rounds 2] [--stop S ...] [--cache static|dynamic]

On the same GSM8K-length prompts (the embedded generator `datalever.synth`, rendered as eval renders them):
  plain     today's plain path: `model.generate` on left-padded batches in input order, dynamic KV cache;
  datalever `generation.generate_ids`: length-sorted batches, static KV cache where the model supports one
            (on a GPU HF then compiles the decoding step), stop strings (`--stop`, none by default).
Both generate exactly `--max_new_tokens` tokens per prompt (EOS suppressed until then: random-init
presets rarely emit it, trained ones would each stop elsewhere), so the token count is known.

Bound: a decoding step must read every weight once per batch (the input embedding only at the batch's
rows, unless it is tied to the output layer) and each row's KV cache for its own context (prompt + tokens so
far, no padding; sliding-window layers at most their window). The bound's rate is the generated tokens over
(those bytes summed over every step of every batch) / bandwidth; "of bound" is the measured rate over it.
The prefill and everything else count as time spent, so the fraction is a strict one.
Bandwidth: `--bandwidth_gbs`, else on a GPU the device's peak (H200 4.8 TB/s, H100 SXM 3.35 TB/s, ...) and on a
CPU a nominal 20 GB/s (a desktop's dual-channel DDR4/5; pass your machine's).

Each path runs once to warm up (on a GPU this is where the static-cache path compiles), then `--rounds` times,
the paths interleaved; each rate is from its path's fastest round. Timings wait for the GPU (synchronize).
"""

from __future__ import annotations

import argparse
import time

import torch

from datalever import synth
from datalever.evaluate import eval_dtype
from datalever.examples import DEFAULT_TEMPLATES
from datalever.generation import (
    GenerationOptions,
    _eos_ids,
    _left_pad,
    _until_eos,
    encode_prompts,
    generate_ids,
    supports_static_cache,
)
from datalever.models import load_model, load_tokenizer, resolve_model

CPU_BANDWIDTH_GBS = 20.0
# Peak HBM bandwidth by device name (GB/s), most specific first: torch.cuda.get_device_name() names the part.
GPU_BANDWIDTH_GBS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM (HBM3)
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
)


def prompts(n: int) -> list[str]:
    return [DEFAULT_TEMPLATES["gsm8k"].format(question=r["question"]) for r in synth.generate(n, seed=7)]


def bandwidth_gbs(device: torch.device, given: float | None) -> tuple[float, str]:
    """The bandwidth the bound assumes and where it comes from."""
    if given is not None:
        return given, "--bandwidth_gbs"
    if device.type != "cuda":
        return CPU_BANDWIDTH_GBS, "nominal CPU bandwidth; pass --bandwidth_gbs"
    name = torch.cuda.get_device_name(device)
    for part, gbs in GPU_BANDWIDTH_GBS:
        if part in name:
            return gbs, f"peak of {name}"
    raise SystemExit(f"no known bandwidth for {name}: pass --bandwidth_gbs")


# ----------------------------------------------------------------------------- the bound


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decoding step reads: all of them, but an untied input embedding only at a few rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight.data_ptr() != embedding.data_ptr():
        total -= embedding.numel() * embedding.element_size()
    return total


def kv_layers(model) -> list[tuple[int, int | None]]:
    """(bytes of K and V per token, attention window or None) of each layer."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_token = 2 * kv_heads * head_dim * model.dtype.itemsize
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    return [(per_token, window if kind == "sliding_attention" else None) for kind in layer_types]


def bytes_read(model, batches: list[list[int]], new_tokens: int) -> int:
    """Bytes every decoding step of every batch must read, rows of `batches` given by their prompt lengths."""
    weights = weight_bytes_per_step(model)
    layers = kv_layers(model)
    total = 0
    for lengths in batches:
        for step in range(new_tokens):  # the step producing token step+1 attends to prompt + step tokens
            total += weights
            for per_token, window in layers:
                total += per_token * sum(min(n + step, window or n + step) for n in lengths)
    return total


# ----------------------------------------------------------------------------- the two paths


@torch.no_grad()
def plain_generate(model, tok, texts: list[str], new_tokens: int, batch_size: int) -> list[list[int]]:
    """Today's plain path: batches in input order, left-padded, HF's default (dynamic) cache."""
    encoded = encode_prompts(tok, texts)
    eos = _eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    out: list[list[int]] = []
    for start in range(0, len(encoded), batch_size):
        input_ids, attention_mask = _left_pad(encoded[start : start + batch_size], pad, model.device)
        ids = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        out.extend(_until_eos(row, eos) for row in ids[:, input_ids.shape[1] :].tolist())
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(fns: dict, rounds: int, device: torch.device) -> tuple[dict[str, float], dict[str, list]]:
    """Fastest seconds of each call over `rounds` interleaved rounds after a warm-up round; and each call's output."""
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up: allocator, kernels, compilation
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            outputs[name] = fn()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", help="model preset (qwen3-0.6b: the real shape, random weights)")
    ap.add_argument("--n", type=int, default=64, help="prompts")
    ap.add_argument("--max_new_tokens", type=int, default=256, help="tokens generated per prompt (exactly)")
    ap.add_argument("--batch_size", type=int, default=32, help="prompts per batch (both paths)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: as eval")
    ap.add_argument("--bandwidth_gbs", type=float, default=None, help="memory bandwidth the bound assumes (GB/s)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up; each rate is the best")
    ap.add_argument("--stop", nargs="*", default=[], help="stop strings of the datalever path")
    ap.add_argument("--cache", default="static", choices=["static", "dynamic"], help="KV cache of the datalever path")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    path = resolve_model(f"preset:{args.preset}", seed=0)
    tok = load_tokenizer(path)
    model = load_model(path, dtype=eval_dtype(args.dtype, device)).eval().to(device)
    texts = prompts(args.n)
    new, bs = args.max_new_tokens, args.batch_size
    gbs, source = bandwidth_gbs(device, args.bandwidth_gbs)

    fns = {
        "plain": lambda: plain_generate(model, tok, texts, new, bs),
        "datalever": lambda: generate_ids(
            model,
            tok,
            texts,
            GenerationOptions(
                max_new_tokens=new, batch_size=bs, progress=False, stop=args.stop, cache=args.cache, min_new_tokens=new
            ),
        ),
    }
    seconds, outputs = timed_rounds(fns, args.rounds, device)

    lengths = [len(ids) for ids in encode_prompts(tok, texts)]
    batches = [lengths[i : i + bs] for i in range(0, len(lengths), bs)]  # the bound does not depend on grouping
    bound_s = bytes_read(model, batches, new) / (gbs * 1e9)
    n_params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    cache = "static" if args.cache == "static" and supports_static_cache(model) else "dynamic"
    print(
        f"torch {torch.__version__}, {device} ({where}), preset {args.preset} ({n_params / 1e6:.1f} M parameters, "
        f"{model.dtype}), {args.n} prompts of {min(lengths)}-{max(lengths)} tokens, {new} new tokens each, "
        f"batches of {bs}, best of {args.rounds} rounds"
    )
    print(
        f"bound: {weight_bytes_per_step(model) / 1e6:,.1f} MB of weights per step + each row's KV cache "
        f"({sum(b for b, _ in kv_layers(model)) / 1e3:,.1f} kB per token), at {gbs:,.0f} GB/s ({source}): "
        f"{bound_s:.3f} s"
    )
    print("| path | seconds | generated tokens | tokens/s | bound tokens/s | of bound |")
    print("|---|---|---|---|---|---|")
    labels = {
        "plain": "plain model.generate (dynamic cache, input order)",
        "datalever": f"datalever ({cache} cache, length-sorted)",
    }
    for name, label in labels.items():
        tokens = sum(len(ids) for ids in outputs[name])
        rate = tokens / seconds[name]
        bound_rate = tokens / bound_s
        print(
            f"| {label} | {seconds[name]:.2f} | {tokens} | {rate:,.0f} | {bound_rate:,.0f} | {rate / bound_rate:.1%} |"
        )
    same = sum(a == b for a, b in zip(outputs["plain"], outputs["datalever"]))
    print(f"datalever / plain: {seconds['plain'] / seconds['datalever']:.2f}x; same tokens in {same} of {args.n} rows")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
