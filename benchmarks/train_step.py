"""Training speed: `datalever train`'s step per optimizer against a bare PyTorch loop, in tokens/s and MFU.

CPU, the small presets in float32 (the defaults without a GPU):
    python benchmarks/train_step.py [--presets demo pythia-70m] [--steps 12 6] [--batch 8 4] [--micro 4 2]
GPU, the paper's shapes with bf16 autocast over float32 master weights (a few minutes on one H100/H200):
    python benchmarks/train_step.py --device cuda --dtype bf16 [--presets qwen3-0.6b] [--seq 512] [--steps 13]
        [--warmup 3] [--batch 32] [--micro 16] [--compile] [--json results.json]

Variants (`--variants`), all on the same batches (one seeded stream, the same length-sorted micro-batches, per-step
lr, clipping at 1.0):
  adamw, muon, sam, lora  `datalever.train.run` with that optimizer (lora: AdamW on r=8 adapters at peft's default
                          targets): Accelerate, optim.optimizer_step, the JSONL log, compute counts;
  bare                    a bare loop: the ResponseLoss module, autocast as the run, loss.backward, clip, AdamW.step
                          (fused on CUDA, as the run's);
  bare-hf                 a bare loop with the HF loss, model(input_ids, attention_mask, labels).loss (full logits).
`--seq S` trains on examples of exactly S tokens (about half prompt, half response; no padding); without it, on the
short examples of the embedded dataset (max_length 512). Time per step is the median gap between consecutive step
ends (torch.cuda.synchronize before each clock read); the first `--warmup` steps, the set-up, the checkpoint and the
final save are not timed (a run is stopped after its last step). MFU divides the model FLOPs (`FLOPS_FORMULA`, printed)
by the time and the GPU's dense bf16 peak (known GPUs by name, else `--peak_tflops`). Each variant runs `--repeats`
times, interleaved, the fastest kept. The goals: run/bare >= 0.9x, MFU >= 40% (AdamW, full fine-tuning, qwen3-0.6b
at sequence 512), SAM/AdamW <= 2.1x, Muon/AdamW <= 1.15x time per step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from datalever import launch, synth, train
from datalever.examples import Example, save_examples
from datalever.losses import ResponseLoss
from datalever.models import load_model, load_tokenizer, resolve_model
from datalever.optim import OptimConfig, lr_factor
from datalever.tokens import encode_example
from datalever.train import inputs, loop, order

RUN_VARIANTS = {"adamw": ("adamw", False), "muon": ("muon", False), "sam": ("sam", False), "lora": ("adamw", True)}
VARIANTS = (*RUN_VARIANTS, "bare", "bare-hf")
CPU_DEFAULTS = dict(presets=["demo", "pythia-70m"], steps=[12, 6], batch=[8, 4], micro=[4, 2], warmup=2, repeats=2)
CUDA_DEFAULTS = dict(presets=["qwen3-0.6b"], steps=[13], batch=[32], micro=[16], warmup=3, repeats=1, seq=512)
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a part of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
FLOPS_FORMULA = (
    "model FLOPs per step = passes * sum over rows [T*(4N + 2N_trainable) + 12*L*A*T^2 + R*(4 + 2*head_trainable)*V*d]"
    "  (PaLM's 6N + 12LAT per token for full fine-tuning; N: parameters outside the input embedding and the output "
    "head; T: row length; L: layers; A: heads*head_dim; R: loss positions, where the head V*d is applied; passes: 2 "
    "for SAM)"
)
GOALS = {"run/bare": 0.9, "mfu": 0.40, "sam/adamw": 2.1, "muon/adamw": 1.15}


class RunDone(Exception):
    """Raised by the step hook after the last timed step: the run's checkpoint and final save are not benchmarked."""


@dataclass
class Shape:
    """What the model FLOPs are counted from (`FLOPS_FORMULA`)."""

    n_body: int  # N
    n_body_trainable: int
    layers: int
    attn_width: int  # A
    head: int  # V*d
    head_trainable: bool


@dataclass
class Timing:
    step_s: float
    peak_mem_gb: float | None
    shape: Shape


# ----------------------------------------------------------------------------- measuring


def model_shape(hf_model) -> Shape:
    from datalever.models import unwrap

    inner = unwrap(hf_model)
    cfg = inner.config
    head = inner.get_output_embeddings().weight
    outside = {id(p) for m in (inner.get_input_embeddings(), inner.get_output_embeddings()) for p in m.parameters()}
    body = {id(p): p for p in hf_model.parameters() if id(p) not in outside}.values()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Shape(
        n_body=sum(p.numel() for p in body),
        n_body_trainable=sum(p.numel() for p in body if p.requires_grad),
        layers=cfg.num_hidden_layers,
        attn_width=heads * head_dim,
        head=head.numel(),
        head_trainable=head.requires_grad,
    )


def row_flops(shape: Shape, length: int, loss_positions: int) -> float:
    body = length * (4 * shape.n_body + 2 * shape.n_body_trainable)
    attention = 12 * shape.layers * shape.attn_width * length**2
    head = loss_positions * (4 + 2 * shape.head_trainable) * shape.head
    return float(body + attention + head)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(ends: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(ends, ends[1:])][max(warmup - 1, 0) :]
    return statistics.median(gaps)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_run(cfg: train.TrainConfig, device: torch.device, warmup: int) -> Timing:
    """`datalever train` itself, stopped after its last step."""
    shutil.rmtree(cfg.out, ignore_errors=True)
    reset_memory(device)
    ends: list[float] = []
    shapes: list[Shape] = []

    def on_step(step, _record, model, accelerator) -> None:
        if not shapes:  # before the clock read: no timed gap holds it
            shapes.append(model_shape(accelerator.unwrap_model(model).model))
        sync(device)
        ends.append(time.perf_counter())
        if step == cfg.max_steps:
            raise RunDone

    with contextlib.suppress(RunDone):
        train.run(cfg, on_step=on_step)
    timing = Timing(step_time(ends, warmup), peak_memory(device), shapes[0])
    shutil.rmtree(cfg.out, ignore_errors=True)
    return timing


def time_bare(cfg: train.TrainConfig, device: torch.device, warmup: int, hf_loss: bool) -> Timing:
    """The same batches as train.run, with nothing but PyTorch around the model."""
    reset_memory(device)
    torch.manual_seed(cfg.seed)
    launch.set_tf32(cfg.tf32)
    path = resolve_model(cfg.model, seed=cfg.seed)
    tok = load_tokenizer(path)
    model = load_model(path, dtype=torch.float32, attn_implementation=cfg.attn_implementation).to(device)
    model.train()
    if cfg.gradient_checkpointing:
        launch.enable_gradient_checkpointing(model)
    if cfg.torch_compile:
        launch.compile_blocks(model)
    scorer = ResponseLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, fused=True if device.type == "cuda" else None)
    bf16 = cfg.mixed_precision == "bf16"
    examples, mult = inputs.load_training_data(cfg)
    encoded = [encode_example(tok, ex, cfg.max_length) for ex in examples]
    stream = order.ExampleStream(mult, seed=cfg.seed)
    steps = cfg.max_steps
    warmup_steps = order.warmup_steps(cfg, steps)
    ends = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cfg.optim.lr * lr_factor(step, steps, warmup_steps)
        rows = [encoded[i] for i in stream.take(step * cfg.batch_size, cfg.batch_size)]
        batches = loop.micro_batches(rows, cfg.micro_batch_size, tok.pad_token_id, device)
        rows.sort(key=lambda e: len(e.input_ids))  # as micro_batches orders them (a stable sort)
        chunks = [rows[i : i + cfg.micro_batch_size] for i in range(0, len(rows), cfg.micro_batch_size)]
        n_total = sum(loop.response_tokens(e) for e in rows)  # from the lengths: no device read
        for chunk, b in zip(chunks, batches):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if hf_loss:  # HF's mean over the micro-batch's tokens, reweighted to the step's token mean
                    loss = model(**b).loss * (sum(loop.response_tokens(e) for e in chunk) / n_total)
                else:
                    loss = scorer(**b)[0].sum() / n_total
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        ends.append(time.perf_counter())
    return Timing(step_time(ends, warmup), peak_memory(device), model_shape(model))


# ----------------------------------------------------------------------------- data


def exact_length_examples(tokenizer, n: int, seq: int, seed: int = 0) -> list[Example]:
    """`n` examples of exactly `seq` tokens as `encode_example` counts them, half prompt, half response: math problems
    with their answers, then digits to the exact length (the preset tokenizers split digits one per token)."""
    records = iter(synth.generate(n * (seq // 32 + 4), seed=seed))

    def count(text: str, special: bool) -> int:
        return len(tokenizer(text, add_special_tokens=special)["input_ids"])

    def fill(budget: int, special: bool) -> str:
        text = ""
        while count(more := f"{text}{(r := next(records))['question']}\n{r['answer']}\n\n", special) <= budget:
            text = more
        return text + "7" * (budget - count(text, special))

    examples = []
    for i in range(n):
        prompt = fill(seq // 2, special=True)
        ex = Example(id=f"long-{i}", prompt=prompt, response=fill(seq - seq // 2 - 1, special=False))  # 1: the EOS
        if len(encode_example(tokenizer, ex, seq + 1).input_ids) != seq:
            raise ValueError(f"this tokenizer does not split digits one per token: cannot build {seq}-token examples")
        examples.append(ex)
    return examples


def benchmark_data(work: Path, preset: str, seq: int | None, n: int) -> str:
    if seq is None:  # the short examples of the embedded dataset, as the CPU benchmark always used
        return synth.write_splits(str(work / "data"), n_train=256, n_val=8, n_test=8, seed=0)["train"]
    path = work / f"data-{preset}-{seq}.jsonl"
    tokenizer = load_tokenizer(resolve_model(f"preset:{preset}", seed=0))
    save_examples(str(path), exact_length_examples(tokenizer, n, seq))
    return str(path)


# ----------------------------------------------------------------------------- report


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The device's dense bf16 peak (TFLOP/s; None if unknown) and the device's name."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if override is not None:
        return override, name
    found = [tflops for part, tflops in PEAK_BF16_TFLOPS if part in name] if device.type == "cuda" else []
    return (found[0] if found else None), name


def step_stats(timing: Timing, peak: float | None, passes: int, tokens: float, flops: float) -> dict:
    tflops = passes * flops / timing.step_s / 1e12
    return {
        "ms_per_step": timing.step_s * 1e3,
        "tokens_per_s": tokens / timing.step_s,
        "model_tflop_per_step": passes * flops / 1e12,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_mem_gb": timing.peak_mem_gb,
    }


def timed_batches(cfg: train.TrainConfig, warmup: int) -> list[list]:
    """The encoded examples of every timed step, as the stream draws them."""
    tok = load_tokenizer(resolve_model(cfg.model, seed=cfg.seed))
    examples, mult = inputs.load_training_data(cfg)
    encoded = [encode_example(tok, ex, cfg.max_length) for ex in examples]
    stream = order.ExampleStream(mult, seed=cfg.seed)
    return [[encoded[i] for i in stream.take(s * cfg.batch_size, cfg.batch_size)] for s in range(warmup, cfg.max_steps)]


def batch_work(batches: list[list], shape: Shape) -> tuple[float, float]:
    """Mean tokens (padding excluded) and model FLOPs (one pass) per timed step."""
    tokens = statistics.mean(sum(len(e.input_ids) for e in rows) for rows in batches)
    flops = statistics.mean(
        sum(row_flops(shape, len(e.input_ids), loop.response_tokens(e)) for e in rows) for rows in batches
    )
    return tokens, flops


def print_table(preset: str, results: dict[str, dict]) -> None:
    print(f"\n{preset}\n")
    print("| variant | ms/step | tokens/s | model GFLOP/step | TFLOP/s | MFU | peak memory |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gb']:.1f} GiB" if r["peak_mem_gb"] is not None else "n/a"
        print(
            f"| {name} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {r['model_tflop_per_step'] * 1e3:,.1f} "
            f"| {r['tflops']:.3g} | {mfu} | {mem} |"
        )


def ratios(results: dict[str, dict]) -> dict[str, float]:
    ms = {name: r["ms_per_step"] for name, r in results.items()}
    out = {}
    if "adamw" in ms and "bare" in ms:
        out["run/bare"] = ms["bare"] / ms["adamw"]
    if "adamw" in ms and "bare-hf" in ms:
        out["run/bare-hf"] = ms["bare-hf"] / ms["adamw"]
    if "adamw" in ms and results["adamw"]["mfu"] is not None:
        out["mfu"] = results["adamw"]["mfu"]
    for name in ("sam", "muon", "lora"):
        if "adamw" in ms and name in ms:
            out[f"{name}/adamw"] = ms[name] / ms["adamw"]
    return out


def print_ratios(found: dict[str, float]) -> None:
    for key, value in found.items():
        goal = GOALS.get(key)
        shown = f"{value:.1%}" if key == "mfu" else f"{value:.2f}x"
        if goal is None:
            print(f"- {key}: {shown}")
            continue
        met = value >= goal if key in ("run/bare", "mfu") else value <= goal
        sign = ">=" if key in ("run/bare", "mfu") else "<="
        target = f"{goal:.0%}" if key == "mfu" else f"{goal}x"
        print(f"- {key}: {shown} (goal {sign} {target}: {'met' if met else 'NOT met'})")


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default=None,
        help="compute: float32, or bf16 autocast over float32 master weights (default: bf16 on CUDA, fp32 on a CPU)",
    )
    ap.add_argument("--presets", nargs="+", default=None)
    ap.add_argument("--steps", nargs="+", type=int, default=None, help="optimizer steps per preset, warmup included")
    ap.add_argument("--batch", nargs="+", type=int, default=None, help="examples per step, per preset")
    ap.add_argument("--micro", nargs="+", type=int, default=None, help="micro-batch size, per preset")
    ap.add_argument("--seq", type=int, default=None, help="examples of exactly this many tokens (default: 512 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the timing")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each variant (interleaved); the fastest kept")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--attn", choices=launch.ATTN_IMPLEMENTATIONS, default="sdpa", help="attn_implementation")
    ap.add_argument("--compile", action="store_true", help="torch_compile (the bare loops compile their blocks too)")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak of the device, TFLOP/s")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default 1 on a CPU: steadier on a shared machine; 0: torch's choice, CUDA's default)",
    )
    ap.add_argument("--workdir", default=None, help="where data and runs go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()
    defaults = CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.threads = (0 if args.device == "cuda" else 1) if args.threads is None else args.threads
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.device == "cpu" and torch.cuda.is_available():
        ap.error("--device cpu on a machine with a GPU: run with CUDA_VISIBLE_DEVICES= (Accelerate would take the GPU)")
    return args


def train_config(args, work: Path, data: str, preset: str, i: int, variant: str) -> train.TrainConfig:
    per = lambda xs: xs[min(i, len(xs) - 1)]  # noqa: E731
    opt, lora = RUN_VARIANTS.get(variant, ("adamw", False))
    return train.TrainConfig(
        model=f"preset:{preset}",
        data=data,
        out=str(work / "runs" / f"{preset}-{variant}"),
        max_steps=per(args.steps),
        batch_size=per(args.batch),
        micro_batch_size=per(args.micro),
        max_length=args.seq or 512,
        optim=OptimConfig(name=opt, lr=1e-3),
        lora=train.LoraConfig(enabled=lora),
        warmup_ratio=0.1,
        mixed_precision="bf16" if args.dtype == "bf16" else "no",
        attn_implementation=args.attn,
        torch_compile=args.compile,
        gradient_checkpointing=args.gradient_checkpointing,
        progress=False,
    )


def time_variant(cfg: train.TrainConfig, variant: str, device: torch.device, warmup: int) -> Timing:
    if variant in RUN_VARIANTS:
        return time_run(cfg, device, warmup)
    return time_bare(cfg, device, warmup, hf_loss=variant == "bare-hf")


def benchmark_preset(args, work: Path, preset: str, i: int, device: torch.device, peak: float | None) -> dict:
    resolve_model(f"preset:{preset}", seed=0)  # built once into the preset cache, outside any timing
    steps, batch = args.steps[min(i, len(args.steps) - 1)], args.batch[min(i, len(args.batch) - 1)]
    data = benchmark_data(work, preset, args.seq, n=steps * batch)
    best: dict[str, Timing] = {}
    for _ in range(args.repeats):
        for variant in args.variants:
            timing = time_variant(train_config(args, work, data, preset, i, variant), variant, device, args.warmup)
            if variant not in best or timing.step_s < best[variant].step_s:
                best[variant] = timing
            print(f"{preset} {variant}: {timing.step_s * 1e3:.1f} ms/step", flush=True)
    batches = timed_batches(train_config(args, work, data, preset, i, "adamw"), args.warmup)
    results = {}
    for variant, timing in best.items():
        tokens, flops = batch_work(batches, timing.shape)
        passes = 2 if variant == "sam" else 1
        results[variant] = {**step_stats(timing, peak, passes, tokens, flops), "shape": asdict(timing.shape)}
    return results


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device(args.device)
    peak, device_name = peak_tflops(device, args.peak_tflops)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="datalever-bench-"))
    report = {"device": device_name, "peak_tflops": peak, "args": vars(args), "presets": {}}
    for i, preset in enumerate(args.presets):
        results = benchmark_preset(args, work, preset, i, device, peak)
        report["presets"][preset] = {"variants": results, "ratios": ratios(results)}

    shown_peak = f"{peak:g} TFLOP/s" + (" (--peak_tflops)" if args.peak_tflops else "") if peak else "unknown"
    print(f"\ndevice: {device_name}; dense bf16 peak: {shown_peak}{'' if peak else ' (MFU: pass --peak_tflops)'}")
    print(
        f"compute: {args.dtype} (float32 master weights), attention {args.attn}, compile {args.compile}, "
        f"gradient checkpointing {args.gradient_checkpointing}, threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f}; timed steps per run: steps - {args.warmup}, best of {args.repeats}"
    )
    print(FLOPS_FORMULA)
    for preset, found in report["presets"].items():
        print_table(preset, found["variants"])
        print()
        print_ratios(found["ratios"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
