"""The embedded study's units one at a time (today's default: in this process, every core's threads) against
`--workers N` (N worker processes, cores / N threads each), on this machine, side by side in one run.

    python benchmarks/grid_workers.py [--arms base,hard] [--seeds 0,1] [--epochs 2] [--workers 2] [--out DIR]

Both runs are `datalever experiment --config configs/embedded.yaml` with the same arms, seeds and epochs, each in a
fresh run directory: the data, the profile and the split (one unit each, in order), then the arms' units (training,
curve points, evaluation), which the workers run side by side. It prints each run's wall time, the arm units' own
time (from the first arm's start to the last arm's end, read from the driver's lines), and the ratios. Absolute
times drift on shared machines; the ratio measured in one run holds. By hand, two base-arm trainings of 125 steps
took 82 s one after another with two threads and 58 s side by side with one thread each: 1.43x.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\[grid\] (\d\d):(\d\d):(\d\d) (started|finished) (arms/\S+)")


def run_study(run_dir: Path, options: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds of the whole command, seconds from the first arm unit's start to the last one's end, stderr)."""
    command = [sys.executable, "-m", "datalever", "experiment", "--config", str(ROOT / "configs" / "embedded.yaml"),
               "--run_dir", str(run_dir), "--progress", "false", *options]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    stamps = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s, *_ in (LINE.match(x).groups() for x in
              done.stderr.splitlines() if LINE.match(x))]  # fmt: skip
    arms = (max(stamps) - min(stamps)) if stamps else float("nan")
    return wall, arms, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default="base,hard")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=float, default=2.0, help="the arms' epochs (the study's: 6)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="where the two run directories go (default: a temporary one)")
    args = parser.parse_args()
    common = ["--arms", f"[{args.arms}]", "--seeds", f"[{args.seeds}]", "--train.epochs", str(args.epochs)]
    out = Path(args.out or tempfile.mkdtemp(prefix="grid-workers-"))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["TOKENIZERS_PARALLELISM"] = "false"

    one_wall, one_arms, _ = run_study(out / "one-at-a-time", common, env)
    many_wall, many_arms, stderr = run_study(
        out / f"workers-{args.workers}", common + ["--workers", str(args.workers)], env
    )
    threads = next((m.group(1) for m in re.finditer(r"(\d+) threads?", stderr)), "?")
    cores = len(os.sched_getaffinity(0))
    print(f"embedded study units: arms {args.arms}, seeds {args.seeds}, {args.epochs:g} epochs; {cores} cores\n")
    print("| run | whole command s | arm units s |")
    print("|---|---|---|")
    print(f"| one at a time, in process ({cores} threads) | {one_wall:.0f} | {one_arms:.0f} |")
    print(f"| --workers {args.workers} ({threads} thread(s) each) | {many_wall:.0f} | {many_arms:.0f} |")
    print(f"| speed-up | {one_wall / many_wall:.2f}x | {one_arms / many_arms:.2f}x |")
    print(f"\nrun directories: {out}")


if __name__ == "__main__":
    main()
