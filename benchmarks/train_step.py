"""Training steps per second: `datalever train` against a bare PyTorch loop, and SAM's cost over AdamW.

    python benchmarks/train_step.py [--presets demo pythia-70m] [--steps 12 6] [--batch 8 4] [--micro 4 2]

For each preset, on the same batches of the embedded dataset (same seeded stream, same length-sorted
micro-batches, float32, AdamW, gradient clipping at 1.0, per-step lr):
  run         `datalever.train.run` with AdamW (Accelerate, optim.optimizer_step, JSONL log, compute counts);
  run-sam     the same with SAM (two forward/backward passes per step);
  bare-resp   a bare loop: ResponseLoss module (response positions only), loss.backward, clip, AdamW.step;
  bare-hf     a bare loop with the HF loss: model(input_ids, attention_mask, labels).loss (full logits).
Time per step is the median of the gaps between consecutive step ends (the first `--skip` steps, and
the set-up, checkpoint and final save, are excluded). Prints a markdown table with the ratios
run/bare-resp (goal >= 0.9), run/bare-hf, and SAM/AdamW time per step (expected about 2).
Absolute speeds drift on shared machines; each variant runs `--repeats` times, interleaved, best kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from datalever import synth, train
from datalever.losses import ResponseLoss
from datalever.models import count_parameters, load_model, load_tokenizer, resolve_model
from datalever.optim import OptimConfig, lr_factor
from datalever.tokens import encode_example


def step_time(ends: list[float], skip: int) -> float:
    gaps = [b - a for a, b in zip(ends, ends[1:])][max(skip - 1, 0) :]
    return statistics.median(gaps)


def time_run(cfg: train.TrainConfig, skip: int) -> float:
    shutil.rmtree(cfg.out, ignore_errors=True)
    ends: list[float] = []
    train.run(cfg, on_step=lambda *_: ends.append(time.perf_counter()))
    shutil.rmtree(cfg.out, ignore_errors=True)  # checkpoints of a 70M model are large
    return step_time(ends, skip)


def time_bare(cfg: train.TrainConfig, model_path: str, skip: int, hf_loss: bool) -> float:
    """The same batches as train.run, with nothing but PyTorch around the model."""
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(model_path)
    model = load_model(model_path, dtype=torch.float32)
    model.train()
    scorer = ResponseLoss(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    examples, mult = train.load_training_data(cfg)
    encoded = [encode_example(tok, ex, cfg.max_length) for ex in examples]
    stream = train.ExampleStream(mult, seed=cfg.seed)
    steps = cfg.max_steps
    warmup = train.warmup_steps(cfg, steps)
    ends = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cfg.optim.lr * lr_factor(step, steps, warmup)
        rows = [encoded[i] for i in stream.take(step * cfg.batch_size, cfg.batch_size)]
        batches = train.micro_batches(rows, cfg.micro_batch_size, tok.pad_token_id, "cpu")
        n_total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for b in batches:
            if hf_loss:  # HF's mean over the micro-batch's tokens, reweighted to the step's token mean
                n = int((b["labels"][:, 1:] != -100).sum())
                loss = model(**b).loss * (n / n_total)
            else:
                sums, _ = scorer(**b)
                loss = sums.sum() / n_total
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return step_time(ends, skip)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["demo", "pythia-70m"])
    ap.add_argument("--steps", nargs="+", type=int, default=[12, 6], help="optimizer steps per preset")
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 4], help="examples per step, per preset")
    ap.add_argument("--micro", nargs="+", type=int, default=[4, 2], help="micro-batch size, per preset")
    ap.add_argument("--skip", type=int, default=2, help="steps left out of the timing (warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant (interleaved); the fastest is kept")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: steadier on a small shared machine; 0: torch's choice)",
    )
    ap.add_argument("--workdir", default=None, help="where data and runs go (default: a temp dir)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    per = lambda xs, i: xs[min(i, len(xs) - 1)]  # noqa: E731

    work = Path(args.workdir or tempfile.mkdtemp(prefix="datalever-bench-"))
    data = synth.write_splits(str(work / "data"), n_train=256, n_val=8, n_test=8, seed=0)
    rows = []
    for i, name in enumerate(args.presets):
        model_path = resolve_model(f"preset:{name}", seed=0)  # built once into the preset cache
        n_params = count_parameters(load_model(model_path))
        steps, batch, micro = per(args.steps, i), per(args.batch, i), per(args.micro, i)

        def cfg(opt: str) -> train.TrainConfig:
            return train.TrainConfig(
                model=model_path,
                data=data["train"],
                out=str(work / "runs" / f"{name}-{opt}"),
                max_steps=steps,
                batch_size=batch,
                micro_batch_size=micro,
                max_length=512,
                optim=OptimConfig(name=opt, lr=1e-3),
                warmup_ratio=0.1,
                progress=False,
            )

        best = {k: float("inf") for k in ("run", "run-sam", "bare-resp", "bare-hf")}
        for _ in range(args.repeats):
            best["bare-resp"] = min(best["bare-resp"], time_bare(cfg("adamw"), model_path, args.skip, hf_loss=False))
            best["run"] = min(best["run"], time_run(cfg("adamw"), args.skip))
            best["bare-hf"] = min(best["bare-hf"], time_bare(cfg("adamw"), model_path, args.skip, hf_loss=True))
            best["run-sam"] = min(best["run-sam"], time_run(cfg("sam"), args.skip))
        rows.append((name, n_params, batch, micro, steps, best))
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.0f} ms/step" for k, v in best.items()), flush=True)

    print()
    print(
        f"threads: {torch.get_num_threads()}, load average: {os.getloadavg()[0]:.2f}, "
        f"timed steps per run: steps - {args.skip}, best of {args.repeats}"
    )
    print()
    print(
        "| preset | params | batch / micro | run steps/s | bare-resp steps/s | bare-hf steps/s "
        "| run / bare-resp | run / bare-hf | SAM / AdamW time per step |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, n_params, batch, micro, steps, b in rows:
        print(
            f"| {name} | {n_params / 1e6:.1f}M | {batch} / {micro} | {1 / b['run']:.2f} | {1 / b['bare-resp']:.2f} "
            f"| {1 / b['bare-hf']:.2f} | {b['bare-resp'] / b['run']:.2f}x | {b['bare-hf'] / b['run']:.2f}x "
            f"| {b['run-sam'] / b['run']:.2f}x |"
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
