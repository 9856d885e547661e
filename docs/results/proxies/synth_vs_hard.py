"""Issue 24 item 4, second half: hard-synth against hard, seed by seed.

hard-synth and a base-long matched to its steps ran as one experiment (downstream-synth/, run.sh); hard is the study's
own arm (docs/results/embedded/), the same data, split and seeds (the base arm reproduces to the decimal). Paired
differences of the final models' test accuracy, overall and per difficulty level, printed as a table.

    python docs/results/proxies/synth_vs_hard.py
"""

from __future__ import annotations

import json
from pathlib import Path

from datalever.stats import t_interval

HERE = Path(__file__).parent
RUNS = {
    "hard-synth": HERE / "downstream-synth" / "arms" / "hard-synth",
    "base-long (hard-synth's steps)": HERE / "downstream-synth" / "arms" / "base-long",
    "hard (the study's)": HERE.parent / "embedded" / "arms" / "hard",
    "base-long (hard's steps, the study's)": HERE.parent / "embedded" / "arms" / "base-long",
}
SEEDS = range(5)


def accuracy(arm: Path, seed: int, level: str | None) -> float:
    metrics = json.loads((arm / f"seed{seed}" / "metrics.json").read_text())
    return metrics["per_difficulty"]["level"][level]["accuracy"] if level else metrics["accuracy"]


def paired(a: str, b: str, level: str | None = None) -> str:
    diffs = [100 * (accuracy(RUNS[a], s, level) - accuracy(RUNS[b], s, level)) for s in SEEDS]
    mean, half = t_interval(diffs)
    wins, ties, losses = sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)
    return f"{mean:+.1f} ± {half:.1f} ({wins}/{ties}/{losses})"


def main() -> None:
    print("| comparison | all | easy | medium | hard |\n|---|---|---|---|---|")
    names = list(RUNS)
    for a, b in ((names[0], names[1]), (names[0], names[2]), (names[0], names[3])):
        cells = [paired(a, b)] + [paired(a, b, level) for level in ("easy", "medium", "hard")]
        print(f"| {a} − {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
