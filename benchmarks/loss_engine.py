"""Loss engine throughput against an S2L-style loop and the forward-only ceiling, side by side.

    python benchmarks/loss_engine.py [--n 256] [--presets demo pythia-70m]

For each preset, on the same examples of the embedded dataset:
  engine   datalever's per-example loss engine (token-budget batches, length bucketing,
           output projection only at response positions, inference mode);
  s2l      an S2L-style loop: one example at a time, `labels=` passed to the model;
  ceiling  the model's plain forward with no padding and no loss: the engine's own length-bucketed
           batches, each row cut to the batch's shortest row (so no position is padding), full
           logits, inference mode; its rate counts only the tokens it actually ran.
Prints tokens/s and the ratios engine/s2l (goal >= 10) and engine/ceiling (goal >= 0.85).
Absolute times drift on shared machines; the ratios, measured in one run, hold.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from datalever import synth
from datalever.examples import Example, content_id
from datalever.losses import score_encoded
from datalever.models import build_preset, load_model, load_tokenizer
from datalever.tokens import IGNORE, encode_example, token_budget_batches


def examples(n: int) -> list[Example]:
    recs = synth.generate(n, seed=7)
    return [Example(content_id(r["question"], r["answer"]), f"Question: {r['question']}\nAnswer: ", r["answer"])
            for r in recs]


def timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up (allocator, kernels)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def s2l_loop(model, encoded):
    with torch.inference_mode():
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            labels = ids.clone()
            labels[0, : e.n_prompt] = IGNORE
            model(input_ids=ids, labels=labels).loss.item()


def ceiling_batches(encoded, token_budget) -> list[torch.Tensor]:
    """The engine's batches with every row cut to the batch's shortest row: same shapes, no padding."""
    batches = token_budget_batches([len(e.input_ids) for e in encoded], token_budget)
    out = []
    for b in batches:
        width = min(len(encoded[i].input_ids) for i in b)
        out.append(torch.tensor([encoded[i].input_ids[:width] for i in b]))
    return out


def ceiling(model, batches):
    with torch.inference_mode():
        for ids in batches:
            model(input_ids=ids).logits.sum().item()


def bench(preset: str, n: int, token_budget: int, s2l_n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_preset(preset, f"{tmp}/m", seed=0))
        model = load_model(path).eval()
        tok = load_tokenizer(path)
    encoded = [encode_example(tok, ex, 512) for ex in examples(n)]
    tokens = sum(len(e.input_ids) for e in encoded)
    sub = encoded[:s2l_n]  # the S2L loop is slow: time a subset, compare per-token rates
    sub_tokens = sum(len(e.input_ids) for e in sub)
    t_engine = timed(lambda: score_encoded(model, encoded, pad_id=tok.pad_token_id, token_budget=token_budget))
    batches = ceiling_batches(encoded, token_budget)
    ceiling_tokens = sum(b.numel() for b in batches)
    t_ceiling = timed(lambda: ceiling(model, batches))
    t_s2l = timed(lambda: s2l_loop(model, sub), repeats=1)
    rates = {"engine": tokens / t_engine, "ceiling": ceiling_tokens / t_ceiling, "s2l": sub_tokens / t_s2l}
    return {"preset": preset, "examples": n, "tokens": tokens, **rates,
            "engine/s2l": rates["engine"] / rates["s2l"], "engine/ceiling": rates["engine"] / rates["ceiling"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="examples per preset")
    ap.add_argument("--s2l-n", type=int, default=64, help="examples timed with the slow S2L loop")
    ap.add_argument("--token-budget", type=int, default=2048, help="padded tokens per batch (the engine's CPU default)")
    ap.add_argument("--presets", nargs="+", default=["demo", "pythia-70m"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads")
    print("| preset | examples | tokens | engine tok/s | S2L-style tok/s | ceiling tok/s | engine/S2L | engine/ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        r = bench(preset, args.n, args.token_budget, args.s2l_n)
        print(f"| {r['preset']} | {r['examples']} | {r['tokens']} | {r['engine']:,.0f} | {r['s2l']:,.0f} | "
              f"{r['ceiling']:,.0f} | {r['engine/s2l']:.1f}x | {r['engine/ceiling']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
