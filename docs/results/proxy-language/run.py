"""Are the split audit's language thresholds right on proxies they were not set on? (issue 22, item 9)

The thresholds (audit.UNTRAINED_FRACTION = 0.8 of ln V, audit.UNIGRAM_FRACTION = 0.9 of the unigram loss) were set
on the embedded data with `embedded:demo-base` and an untrained preset. Here the same architecture is pretrained on
text unlike the word problems (equation drills alone, or sentences about people and objects alone) for two amounts,
then each proxy profiles the embedded training set (1/3 epoch, K=5) and the split is audited: does the language
warning fire exactly for the proxies whose hard cluster does not follow the problems' difficulty?

    python docs/results/proxy-language/run.py [--out runs/proxy-language]

Writes results.md and results.json beside this file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datalever import audit, rundir, synth
from datalever.pretrain import PretrainConfig
from datalever.pretrain import run as pretrain
from datalever.profile import ProfileConfig
from datalever.profile import run as profile
from datalever.split import SplitConfig
from datalever.split import run as split

HERE = Path(__file__).resolve().parent
PROXIES = {  # name -> (pretraining mix, steps); None: not pretrained
    "untrained": None,
    "drills-150": ({"arith": 1.0}, 150),
    "drills-600": ({"arith": 1.0}, 600),
    "sentences-150": ({"copy": 1.0}, 150),
    "sentences-600": ({"copy": 1.0}, 600),
    "demo-base (mixed, 1500)": "embedded:demo-base",
}


def proxy_model(name: str, spec, out: Path) -> str:
    if spec is None:
        return "preset:demo"
    if isinstance(spec, str):
        return spec
    mix, steps = spec
    path = out / "proxies" / name
    if not (path / "config.json").exists():
        pretrain(PretrainConfig(out=str(path), preset="demo", steps=steps, mix=mix, warmup_steps=min(100, steps // 10)))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/proxy-language")
    out = Path(parser.parse_args().out)
    data = synth.write_splits(str(out / "data"), n_train=2000, n_val=300, n_test=500, seed=0)
    rows = []
    for name, spec in PROXIES.items():
        run_dir = out / name.split()[0]
        model = proxy_model(name.split()[0], spec, out)
        profile(ProfileConfig(run_dir=str(run_dir), data=data["train"], proxy=model, progress=False))
        summary = split(SplitConfig(run_dir=str(run_dir), data=data["train"]))
        found = rundir.read_json(rundir.RunDir(run_dir).split().audit)
        proxy, feats = found["proxy"], found["features"]
        rows.append(
            {
                "proxy": name,
                "final_over_uniform": proxy["final_over_uniform"],
                "final_over_unigram": proxy["final_over_unigram"],
                "language_warning": proxy["warning"] is not None,
                "level_auroc": feats["level"]["auroc"],
                "level_ci95": feats["level"]["ci95"],
                "steps_auroc": feats["steps"]["auroc"],
                "steps_ci95": feats["steps"]["ci95"],
                "n_hard": summary["n_hard"],
                "warnings": found["warnings"],
            }
        )
    lines = [
        "| proxy | final / ln V | final / unigram | language warning | level AUROC (95% CI) | steps AUROC (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['proxy']} | {r['final_over_uniform']:.2f} | {r['final_over_unigram']:.2f} | "
            f"{'yes' if r['language_warning'] else 'no'} | {r['level_auroc']:.2f} ({r['level_ci95'][0]:.2f}-"
            f"{r['level_ci95'][1]:.2f}) | {r['steps_auroc']:.2f} ({r['steps_ci95'][0]:.2f}-{r['steps_ci95'][1]:.2f}) |"
        )
    thresholds = f"thresholds: {audit.UNTRAINED_FRACTION} of ln V, {audit.UNIGRAM_FRACTION} of the unigram loss"
    (HERE / "results.md").write_text("\n".join(lines) + f"\n\n{thresholds}\n")
    (HERE / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
