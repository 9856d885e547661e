"""The profile stage's cost: recording versus training the proxy, and recording throughput versus the ceiling.

    python benchmarks/profile_cost.py [--n 500] [--preset demo] [--checkpoints 5]

Runs `datalever profile` (the given preset as proxy, default settings otherwise: 1/3 epoch, AdamW,
batch 32) on `--n` embedded synth training examples in a temporary run directory, then reads:
  recording   the store meta's record_wall_s (seconds spent scoring every example, per recorded
              step) and record_tokens (tokens per pass);
  training    the proxy's train_summary.json compute.wall_s (the train loop's clock, which leaves
              out the time spent in the recording hook; proxy checkpoint saves stay in it).
and times, on the saved final proxy and the same encoded examples:
  ceiling     the model's plain forward with no padding and no loss on the engine's own batches
              cut to their shortest row (`benchmarks/loss_engine.py`'s definition, imported from there).
Prints one markdown table. Absolute times drift on shared machines; ratios measured in one run hold.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from datalever import rundir, synth
from datalever.examples import load_examples
from datalever.models import load_model, load_tokenizer
from datalever.profile import ProfileConfig
from datalever.profile import run as profile_run
from datalever.tokens import encode_example

# Not named profile.py: run as a script, a file of that name in this folder would shadow the
# standard library's `profile` module, which cProfile (imported by torch.distributed) needs.
_HERE = Path(__file__).resolve().parent


def _loss_engine_bench():
    spec = importlib.util.spec_from_file_location("loss_engine_bench", _HERE / "loss_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench(n: int, preset: str, checkpoints: int, token_budget: int, run_dir: Path) -> dict:
    le = _loss_engine_bench()
    files = synth.write_splits(str(run_dir / "data"), n_train=n, n_val=8, n_test=8, seed=0)
    cfg = ProfileConfig(
        run_dir=str(run_dir),
        data=files["train"],
        proxy=f"preset:{preset}",
        checkpoints=checkpoints,
        token_budget=token_budget,
        progress=False,
    )
    t0 = time.perf_counter()
    profile_run(cfg)
    total_s = time.perf_counter() - t0
    layout = rundir.RunDir(run_dir)
    meta = rundir.read_json(layout.trajectories_meta)
    summary = rundir.read_json(layout.proxy.summary)

    # seconds per recorded step, and the pass of the untrained proxy before training where the store has one
    score_s = list(meta["record_wall_s"].values()) + ([meta["initial_wall_s"]] if "initial_wall_s" in meta else [])
    record_s = sum(score_s)
    train_s = summary["compute"]["wall_s"]
    tokens = meta["record_tokens"]

    final = str(layout.proxy.model)
    model = load_model(final).eval()
    tok = load_tokenizer(final)
    encoded = [
        e
        for e in (encode_example(tok, ex, cfg.max_length) for ex in load_examples(files["train"]))
        if not e.fully_truncated
    ]
    assert sum(len(e.input_ids) for e in encoded) == tokens
    ceiling_batches = le.ceiling_batches(encoded, token_budget)
    ceiling_tokens = sum(b.numel() for b in ceiling_batches)
    t_ceiling = le.timed(lambda: le.ceiling(model, ceiling_batches))
    t_engine = le.timed(lambda: le.score_encoded(model, encoded, pad_id=tok.pad_token_id, token_budget=token_budget))
    return {
        "preset": preset,
        "examples": n,
        "steps": summary["steps"],
        "recorded": meta["steps"],
        "tokens": tokens,
        "total_s": total_s,
        "train_s": train_s,
        "record_s": record_s,
        "passes": len(score_s),
        "record_rate": tokens * len(score_s) / sum(score_s),
        "record_rate_best": tokens / min(score_s),
        "engine_rate": tokens / t_engine,
        "ceiling_rate": ceiling_tokens / t_ceiling,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="training examples")
    ap.add_argument("--preset", default="demo", help="proxy preset")
    ap.add_argument("--checkpoints", type=int, default=5, help="K recorded steps")
    ap.add_argument("--token-budget", type=int, default=2048, help="padded tokens per scoring batch (the CPU default)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--keep", default=None, help="run directory to keep (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        r = bench(args.n, args.preset, args.checkpoints, args.token_budget, Path(args.keep or tmp))
    print(
        f"torch {torch.__version__}, {args.threads} threads; preset {r['preset']}, {r['examples']} examples, "
        f"{r['steps']} proxy steps, recorded at {r['recorded']}, {r['tokens']} tokens per recording pass; "
        f"profile wall {r['total_s']:.1f} s"
    )
    print()
    print("| what | seconds | share |")
    print("|---|---|---|")
    print(f"| proxy training (optimizer steps + checkpoints) | {r['train_s']:.2f} | 1.00 |")
    print(
        f"| recording ({r['passes']} passes, scoring + writing) | {r['record_s']:.2f} | "
        f"{r['record_s'] / r['train_s']:.2f} x training |"
    )
    print()
    print("| recording throughput | tokens/s | vs ceiling |")
    print("|---|---|---|")
    print(
        f"| recording passes in the profile (mean) | {r['record_rate']:,.0f} "
        f"| {r['record_rate'] / r['ceiling_rate']:.2f}x |"
    )
    print(
        f"| recording passes in the profile (best) | {r['record_rate_best']:,.0f} "
        f"| {r['record_rate_best'] / r['ceiling_rate']:.2f}x |"
    )
    print(f"| loss engine alone, final proxy | {r['engine_rate']:,.0f} | {r['engine_rate'] / r['ceiling_rate']:.2f}x |")
    print(f"| ceiling: plain forward, no padding, no loss | {r['ceiling_rate']:,.0f} | 1.00x |")


if __name__ == "__main__":
    main()
