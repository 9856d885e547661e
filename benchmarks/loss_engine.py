"""Loss engine throughput against an S2L-style loop and the forward-only ceiling, side by side.

    python benchmarks/loss_engine.py [--n 256] [--s2l-n 64] [--rounds 3] [--presets demo pythia-70m]
                                     [--device cpu|cuda] [--dtype float32|bfloat16] [--token-budget N]

For each preset, on the same examples of the embedded dataset:
  engine   datalever's per-example loss engine (token-budget batches, length bucketing,
           output projection only at response positions, no autograd);
  s2l      an S2L-style loop: one example at a time, `labels=` passed to the model; timed on a
           length-stratified subset of `--s2l-n` examples (every k-th in length order, so its
           lengths match the full set: per-call overhead weighs more on short examples);
  ceiling  the model's plain forward with no padding and no loss: the engine's own length-bucketed
           batches, each row cut to the batch's shortest row (so no position is padding), full
           logits, inference mode; its rate counts only the tokens it actually ran.
All three run with use_cache=False, as the engine does: none of them decodes afterwards, and a KV
cache built for nothing would slow the two baselines only (it costs ~10% of a demo forward here).

Bounds: what any engine could reach over the S2L loop on this machine.
  ceiling/S2L      the engine/S2L ratio of an engine that only matched the ceiling;
  body-only/S2L    the model body alone (no output layer, no loss) on the ceiling's batches, over
                   the S2L rate: every engine must run the body over every token (the prompt is
                   context), so even with a free output layer and loss, engine/S2L stays below this;
  S2L time split   the share of the S2L loop's time in the body (the body alone, one example at a
                   time) and, the rest, in the full-vocabulary logits and the loss.

Host time: the engine's host work alone (padding each batch, copying it to the device, bringing the
per-example results back), in ms per million tokens, against the old collate path (one tensor per
example, padding row by row, a blocking copy per tensor, two result syncs per batch) on the same
batches, with stand-in results in place of the forward; measured here without a GPU, and its share of
the engine's scoring time says how much of a run it weighs (on a GPU the engine overlaps it with the
forward of the batch before).

Every method is timed once per round, the methods interleaved within a round (a warm-up round
first, which also checks that the engine and the S2L loop give the same losses); each rate is
from the method's fastest round, so a burst of load from another process skews none of them.
Absolute times drift on shared machines; the ratios, measured in one run, hold.
On a GPU (`--device cuda`, the default when one is visible) the token budget defaults to the engine's
accelerator default (32768); every timing waits for the GPU (torch.cuda.synchronize) before it starts and
before it stops.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from datalever import synth
from datalever.examples import Example, content_id
from datalever.losses import _example_losses, _send_to_host, _stage, default_token_budget, score_encoded
from datalever.models import build_preset, load_model, load_tokenizer
from datalever.tokens import IGNORE, encode_example, token_budget_batches


def examples(n: int) -> list[Example]:
    recs = synth.generate(n, seed=7)
    return [
        Example(content_id(r["question"], r["answer"]), f"Question: {r['question']}\nAnswer: ", r["answer"])
        for r in recs
    ]


def timed(fn, repeats: int = 2, sync=lambda: None) -> float:
    """Best of `repeats` timings after a warm-up call (used by benchmarks/profile_cost.py)."""
    return min(timed_rounds({"fn": fn}, repeats, sync)["fn"])


def timed_rounds(fns: dict, rounds: int, sync=lambda: None) -> dict[str, list[float]]:
    """Seconds of each call, the functions interleaved within each round, after one warm-up round.

    `sync` waits for the device (torch.cuda.synchronize on a GPU), before the clock starts, so no
    earlier work is counted, and before it stops, so all of the call's work is.
    """
    for fn in fns.values():
        fn()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def device_sync(device: str):
    """What `timed_rounds` calls to wait for the device: only CUDA runs asynchronously here."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None


def s2l_subset(encoded, k: int):
    """`k` examples evenly spaced in length order: the same length distribution as the full set."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].input_ids), i))
    if k >= len(order):
        return list(encoded)
    step = len(order) / k
    return [encoded[order[int((j + 0.5) * step)]] for j in range(k)]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def s2l_loop(model, encoded) -> list[float]:
    """One example at a time, the model's own `labels=` loss (mean NLL over the response tokens)."""
    losses = []
    with torch.inference_mode():
        for e in encoded:
            ids = torch.tensor([e.input_ids], device=_device(model))
            labels = ids.clone()
            labels[0, : max(e.n_prompt, 1)] = IGNORE
            losses.append(model(input_ids=ids, labels=labels, use_cache=False).loss.item())
    return losses


def s2l_body(model, encoded):
    """The S2L loop's body forward alone (no output layer, no loss): its share of the loop's time."""
    body = getattr(model, model.base_model_prefix)
    with torch.inference_mode():
        for e in encoded:
            body(
                input_ids=torch.tensor([e.input_ids], device=_device(model)), use_cache=False
            ).last_hidden_state.sum().item()


def ceiling_batches(encoded, token_budget, device="cpu") -> list[torch.Tensor]:
    """The engine's batches with every row cut to the batch's shortest row: same shapes, no padding."""
    batches = token_budget_batches([len(e.input_ids) for e in encoded], token_budget)
    out = []
    for b in batches:
        width = min(len(encoded[i].input_ids) for i in b)
        out.append(torch.tensor([encoded[i].input_ids[:width] for i in b], device=device))
    return out


def ceiling(model, batches):
    with torch.inference_mode():
        for ids in batches:
            model(input_ids=ids, use_cache=False).logits.sum().item()


def body_only(model, batches):
    """The ceiling without the output layer: the body on the same unpadded batches."""
    body = getattr(model, model.base_model_prefix)
    with torch.inference_mode():
        for ids in batches:
            body(input_ids=ids, use_cache=False).last_hidden_state.sum().item()


def collate_per_example(batch, pad_id: int) -> dict[str, torch.Tensor]:
    """The old collate, kept as the baseline of the host-time table: one torch.tensor per example,
    padding written row by row in Python."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        start = max(e.n_prompt, 1)
        labels[row, start:n] = input_ids[row, start:n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def host_work_batches(encoded, token_budget, device) -> list[tuple[list, torch.Tensor, torch.Tensor]]:
    """The engine's batches, each with stand-in per-example results on the device (sums, counts): the host
    work of scoring without the forward."""
    out = []
    for b in token_budget_batches([len(e.input_ids) for e in encoded], token_budget):
        rows = [encoded[i] for i in b]
        sums = torch.rand(len(rows), device=device)
        counts = torch.randint(1, 100, (len(rows),), device=device)
        out.append((rows, sums, counts))
    return out


def old_host_path(batches, pad_id: int, device) -> None:
    """Before: collate per example, three blocking copies in, two syncs out (`tolist` each)."""
    for rows, sums, counts in batches:
        {k: v.to(device) for k, v in collate_per_example(rows, pad_id).items()}
        [(e.id, s / c, c) for e, s, c in zip(rows, sums.tolist(), counts.tolist())]


def engine_host_path(batches, pad_id: int, device) -> None:
    """Now: the engine's own steps, one padded buffer in (pinned, asynchronous on CUDA), one transfer out."""
    for rows, sums, counts in batches:
        _stage(rows, pad_id, torch.device(device))
        _example_losses(rows, _send_to_host(sums, counts))


def bench(
    preset: str, n: int, token_budget: int | None, s2l_n: int, rounds: int, device: str = "cpu", dtype: str = "float32"
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_preset(preset, f"{tmp}/m", seed=0))
        model = load_model(path, dtype=dtype).eval().to(device)
        tok = load_tokenizer(path)
    token_budget = token_budget or default_token_budget(torch.device(device))
    sync = device_sync(device)
    encoded = [encode_example(tok, ex, 512) for ex in examples(n)]
    tokens = sum(len(e.input_ids) for e in encoded)
    sub = s2l_subset(encoded, s2l_n)  # the S2L loop is slow: time a subset, compare per-token rates
    sub_tokens = sum(len(e.input_ids) for e in sub)
    batches = ceiling_batches(encoded, token_budget, device)
    ceiling_tokens = sum(b.numel() for b in batches)

    # Same work: the engine's losses are the S2L loop's (checked once, outside the timings).
    engine_losses = score_encoded(model, sub, pad_id=tok.pad_token_id, token_budget=token_budget)
    s2l_losses = s2l_loop(model, sub)
    worst = max(abs(engine_losses[e.id].loss - ref) for e, ref in zip(sub, s2l_losses))
    tolerance = 1e-4 if dtype == "float32" else 5e-2  # bf16: other rounding of the same sums
    assert worst < tolerance, f"{preset}: engine and S2L losses differ by {worst}"

    times = timed_rounds(
        {
            "engine": lambda: score_encoded(model, encoded, pad_id=tok.pad_token_id, token_budget=token_budget),
            "ceiling": lambda: ceiling(model, batches),
            "body": lambda: body_only(model, batches),
            "s2l": lambda: s2l_loop(model, sub),
            "s2l_body": lambda: s2l_body(model, sub),
        },
        rounds,
        sync,
    )
    # Host work alone (padding, copies, results back): milliseconds, so more rounds cost little.
    host_batches = host_work_batches(encoded, token_budget, device)
    host = timed_rounds(
        {
            "old": lambda: old_host_path(host_batches, tok.pad_token_id, device),
            "engine": lambda: engine_host_path(host_batches, tok.pad_token_id, device),
        },
        5 * rounds,
        sync,
    )
    best = {k: min(v) for k, v in times.items()}
    rates = {
        "engine": tokens / best["engine"],
        "ceiling": ceiling_tokens / best["ceiling"],
        "body": ceiling_tokens / best["body"],
        "s2l": sub_tokens / best["s2l"],
    }
    # The body's share of the S2L loop, from each round's pair of timings (median over rounds).
    s2l_body_share = statistics.median(b / s for b, s in zip(times["s2l_body"], times["s2l"]))
    return {
        "preset": preset,
        "examples": n,
        "tokens": tokens,
        **rates,
        "engine/s2l": rates["engine"] / rates["s2l"],
        "engine/ceiling": rates["engine"] / rates["ceiling"],
        "ceiling/s2l": rates["ceiling"] / rates["s2l"],
        "body/s2l": rates["body"] / rates["s2l"],
        "s2l_body_share": s2l_body_share,
        "host_old_ms": 1e9 * min(host["old"]) / tokens,  # ms per million tokens
        "host_engine_ms": 1e9 * min(host["engine"]) / tokens,
        "host_share": min(host["engine"]) / best["engine"],
        "host_old_share": min(host["old"]) / best["engine"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="examples per preset")
    ap.add_argument("--s2l-n", type=int, default=64, help="examples timed with the slow S2L loop")
    ap.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help="padded tokens per batch (default: the engine's: 2048 on a CPU, 32768 on a GPU)",
    )
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when a GPU is visible)",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute dtype")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up; each rate is the best round")
    ap.add_argument("--presets", nargs="+", default=["demo", "pythia-70m"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {args.device} ({where}), {args.dtype}, best of {args.rounds} interleaved rounds")
    print(
        "| preset | examples | tokens | engine tok/s | S2L-style tok/s | ceiling tok/s | engine/S2L (goal >= 10x) "
        "| engine/ceiling (goal >= 0.85x) | bound: ceiling/S2L | bound: body-only/S2L "
        "| S2L time: body / logits+loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for preset in args.presets:
        r = bench(preset, args.n, args.token_budget, args.s2l_n, args.rounds, args.device, args.dtype)
        results.append(r)
        share = r["s2l_body_share"]
        print(
            f"| {r['preset']} | {r['examples']} | {r['tokens']} | {r['engine']:,.0f} | {r['s2l']:,.0f} | "
            f"{r['ceiling']:,.0f} | {r['engine/s2l']:.1f}x | {r['engine/ceiling']:.2f}x | {r['ceiling/s2l']:.1f}x | "
            f"{r['body/s2l']:.1f}x | {share:.0%} / {1 - share:.0%} |",
            flush=True,
        )
    print_host_table(results)


def print_host_table(results: list[dict]) -> None:
    """Host time per million tokens, the old collate path and the engine's, measured in the same run."""
    print()
    print(
        "| preset | host ms / M tokens: old collate path | host ms / M tokens: engine | old/engine "
        "| host share of engine time: old / engine |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['preset']} | {r['host_old_ms']:,.1f} | {r['host_engine_ms']:,.1f} | "
            f"{r['host_old_ms'] / r['host_engine_ms']:.1f}x | {r['host_old_share']:.2%} / {r['host_share']:.2%} |"
        )


if __name__ == "__main__":
    main()
