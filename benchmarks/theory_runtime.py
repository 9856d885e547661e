"""Runtime of `datalever theory`: the per-step cost of the vectorized trainer and the default run.

python benchmarks/theory_runtime.py            # per-step cost only (a few seconds)
python benchmarks/theory_runtime.py --full     # also the default run (sweep, search, rerun: minutes), to a temp dir
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from datalever import theory as th


def step_cost(R: int = 60, d: int = 8, H: int = 16, steps: int = 300) -> float:
    """Milliseconds per training step for R runs (R a multiple of 4, half of them SAM) on a random Gram matrix."""
    feat = th.Features(d)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(feat.size, feat.size, generator=g, dtype=torch.float64)
    st = th.Stats(A @ A.T / feat.size, torch.randn(feat.size, generator=g, dtype=torch.float64), 1.0)
    theta = th.random_init(R, H, d, 0.05, g)
    lam = torch.tensor(np.geomspace(1, 0.25, d))
    U = torch.eye(d, dtype=torch.float64)
    mode = [0, 1, 2, 0] * (R // 4)
    rho = [0.02 if m else 0.0 for m in mode]
    t0 = time.perf_counter()
    th.train(feat, theta, [(slice(0, R), st)], mode, rho, 0.01, steps, 10, lam, U, test_groups=[(slice(0, R), st)])
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="also time the default run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for R in (4, 20, 60):
        print(f"R={R:3d} runs (half SAM): {step_cost(R=R):.2f} ms/step")
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = th.run(th.TheoryConfig(out=tmp, progress=False))
            print(f"default run: {time.perf_counter() - t0:.1f} s (training {res['runtime_s']['train']:.1f} s)")


if __name__ == "__main__":
    main()
