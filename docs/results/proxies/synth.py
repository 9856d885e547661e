"""Issue 24 item 4: are synthesized variants of hard problems hard too? (The summary: about half are reclassified hard.)

The variants that hard-synth trains on (datalever.synth:variants of every hard problem, seed 0) are profiled with
the same proxy and settings as the split that chose their parents, together with the original problems, and split
the same way. The proxy takes as many steps as it did (its fraction scaled by originals / all), so it is the same
proxy run length over a larger set. Counted: the share of variants in the new hard cluster, beside the share of their
parents still hard, and of the other originals.

    python docs/results/proxies/synth.py [POINT]   # POINT: a profiled and split run (default: demo-base at 1/3 epoch)

Writes docs/results/proxies/synth.json and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd

from datalever import profile, split, upsample
from datalever.examples import load_examples
from datalever.optim import OptimConfig

ROOT = Path(__file__).resolve().parents[3]
POINT = ROOT / "runs/proxies/sweep/sweep/proxy=embedded-demo-base,fraction=0.333333"
OUT = ROOT / "runs/proxies/synth"


def variants(point: Path) -> Path:
    """hard-synth's training set from the point's split: originals and variants (upsample, seed 0)."""
    arm = OUT / "arm"
    if not (arm / "manifest.json").exists():
        data = point / "data"
        upsample.run(
            upsample.UpsampleConfig(
                run_dir=str(point),
                distribution="hard",
                synth_fn="datalever.synth:variants",
                m=1,
                seed=0,
                data=str(data / "train.jsonl"),
                heldout=[str(data / "validation.jsonl"), str(data / "test.jsonl")],
                out=str(arm),
            )
        )
    return arm


def reprofile(point: Path, arm: Path) -> Path:
    """The point's profile and split settings over originals + variants, the proxy's steps kept."""
    run = OUT / "reprofile"
    meta = json.loads((point / "trajectories.meta.json").read_text())
    settings = dict(meta["config"])
    n_all, n_original = len(load_examples(str(arm / "examples.jsonl"))), meta["n_examples"]
    settings.update(run_dir=str(run), data=str(arm / "examples.jsonl"), progress=False)
    settings["fraction"] = settings["fraction"] * n_original / n_all
    settings["optim"] = OptimConfig(**settings["optim"])
    fields = {f.name for f in dataclasses.fields(profile.ProfileConfig)}
    if not (run / "trajectories.parquet").exists():
        profile.run(profile.ProfileConfig(**{k: v for k, v in settings.items() if k in fields}))
    if not (run / "split.parquet").exists():
        import yaml

        split_settings = yaml.safe_load((point / "split.config.yaml").read_text())
        split_settings.update(run_dir=str(run), data=str(arm / "examples.jsonl"), out=str(run), trajectories=None)
        fields = {f.name for f in dataclasses.fields(split.SplitConfig)}
        split.run(split.SplitConfig(**{k: v for k, v in split_settings.items() if k in fields}))
    return run


def count(point: Path, arm: Path, run: Path) -> dict:
    manifest = pd.read_parquet(arm / "manifest.parquet")
    before = pd.read_parquet(point / "split.parquet").set_index("id")["hard"]
    after = pd.read_parquet(run / "split.parquet").set_index("id")["hard"]
    synth = manifest[manifest["origin"] == "synth"]
    originals = manifest[manifest["origin"] == "original"]["id"]
    parents = set(synth["parent_id"])
    hard_before = set(before.index[before])
    groups = {
        "variants": list(synth["id"]),
        "their parents (hard before)": sorted(parents),
        "other hard originals": sorted(hard_before - parents),
        "easy originals": [i for i in originals if not before[i]],
    }
    rows = {name: {"n": len(ids), "hard_now": float(after[ids].mean())} for name, ids in groups.items()}
    paired = synth.assign(hard=after[synth["id"]].to_numpy(), parent_hard=after[synth["parent_id"]].to_numpy())
    rows["variants of parents still hard"] = {
        "n": int(paired["parent_hard"].sum()),
        "hard_now": float(paired.loc[paired["parent_hard"], "hard"].mean()),
    }
    return {"point": str(point.relative_to(ROOT)), "n_hard_after": int(after.sum()), "n_after": len(after), **rows}


def main() -> None:
    point = Path(sys.argv[1]) if len(sys.argv) > 1 else POINT
    arm = variants(point)
    found = count(point, arm, reprofile(point, arm))
    (Path(__file__).parent / "synth.json").write_text(json.dumps(found, indent=2) + "\n")
    print("| examples | n | share hard after re-profiling |\n|---|---|---|")
    for name, row in found.items():
        if isinstance(row, dict):
            print(f"| {name} | {row['n']} | {100 * row['hard_now']:.1f}% |")


if __name__ == "__main__":
    main()
