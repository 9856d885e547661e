"""A sweep's report: each point's results side by side (sweep_results.{md,json}), every point's paired differences in
one table, and accuracy against compute over every point and arm, with the frontier (results_frontier.png); where the
points profile differently (a proxy, fraction or K sweep), how their splits differ (split_compare:
split_comparison.{md,json,png})."""

from __future__ import annotations

import math
from pathlib import Path

from datalever import rundir
from datalever.report import paired_text, pct, save_figure
from datalever.rundir import RunDir


def arm_flops(results: dict, arm: str) -> float:
    """An arm's training FLOPs (mean over seeds), plus the proxy's when its data came from the split."""
    proxy = (
        (results.get("proxy_compute") or {}).get("total_flops", 0.0) if arm in results.get("split_arms", []) else 0.0
    )
    return results["arms"][arm]["compute"]["flops"] + proxy


def frontier(entries: list[dict]) -> list[dict]:
    """The entries no other entry beats on both axes (more accuracy for no more FLOPs), by FLOPs."""
    best, out = -math.inf, []
    for e in sorted(entries, key=lambda e: (e["flops"], -e["accuracy"])):
        if e["accuracy"] > best:
            out.append(e)
            best = e["accuracy"]
    return out


def write_sweep_report(run_dir: str | Path, points: list[str], compare_splits: bool = False) -> str:
    """One report over a sweep's points: each point's table, and accuracy against compute over every point and arm
    (sweep_results.md / .json, results_frontier.png); with `compare_splits`, the points' splits compared."""
    run_dir = RunDir(run_dir)
    summary, sections, entries, paired = {"points": []}, [], [], {}
    for name in points:
        results = rundir.read_json(RunDir(run_dir.sweep_point(name)).results_json)
        paired[name] = results["paired"]
        arms = {}
        for arm, a in results["arms"].items():
            arms[arm] = {
                "accuracy": a["accuracy"]["mean"],
                "ci95": a["accuracy"]["ci95"],
                "flops": arm_flops(results, arm),
            }
            entries.append({"point": name, "arm": arm, **arms[arm]})
        summary["points"].append({"point": name, "arms": arms})
        sections += [f"## {name}", "", results["markdown"], ""]
    summary["frontier"] = frontier(entries)
    lines = [
        "# Sweep",
        "",
        "Accuracy against compute (FLOPs, the proxy's share included for arms built from the split); the frontier is",
        "every point and arm that no other beats on both:",
        "",
        "| point | arm | test acc % (mean ± 95% CI) | FLOPs | on the frontier |",
        "|---|---|---|---|---|",
    ]
    on_frontier = {(e["point"], e["arm"]) for e in summary["frontier"]}
    for e in sorted(entries, key=lambda e: e["flops"]):
        mark = "yes" if (e["point"], e["arm"]) in on_frontier else ""
        lines.append(
            f"| {e['point']} | {e['arm']} | {pct(e['accuracy'])} ± {pct(e['ci95'])} | {e['flops']:.3g} | {mark} |"
        )
    splits = _compared_splits(run_dir, points) if compare_splits else []
    markdown = "\n".join(lines + [""] + _paired_across_points(paired) + splits + sections)
    summary["plot"] = plot_frontier(entries, summary["frontier"], run_dir)
    rundir.atomic_write_text(run_dir.sweep_md, markdown)
    rundir.write_json(run_dir.sweep_json, summary)
    return markdown + f"\n\nsweep results: {run_dir.sweep_md} (plot: {summary['plot']})"


def _compared_splits(run_dir: RunDir, points: list[str]) -> list[str]:
    """The points' splits compared (split_comparison.*), and its table as a section of the sweep's report."""
    from datalever import split_compare

    found = split_compare.compare({name: run_dir.sweep_point(name) for name in points})
    split_compare.write(found, run_dir.split_comparison)
    table = split_compare.splits_table(found)
    return ["## Splits", "", *table, "", f"(every pair, and the plot: {run_dir.split_comparison.md})", ""]


def _paired_across_points(paired: dict[str, dict]) -> list[str]:
    """One table of every point's paired differences (a row per point, a column per comparison): how a
    comparison moves along the sweep, e.g. hard against base-long as m grows."""
    names = list(dict.fromkeys(pair for by_pair in paired.values() for pair in by_pair))
    if not names:
        return []
    lines = [
        "Paired differences at each point (accuracy points, mean ± 95% CI over the same seeds; wins/ties/losses):",
        "",
        "| point | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for point, by_pair in paired.items():
        cells = [paired_text(by_pair[pair]) if pair in by_pair else "—" for pair in names]
        lines.append(f"| {point} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_frontier(entries: list[dict], front: list[dict], run_dir: RunDir) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm in dict.fromkeys(e["arm"] for e in entries):
        mine = [e for e in entries if e["arm"] == arm]
        errs = [0.0 if math.isnan(e["ci95"]) else 100 * e["ci95"] for e in mine]
        ax.errorbar([e["flops"] for e in mine], [100 * e["accuracy"] for e in mine], yerr=errs, fmt="o", capsize=3,
                    label=arm)  # fmt: skip
        for e in mine:
            ax.annotate(
                e["point"], (e["flops"], 100 * e["accuracy"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    ax.plot([e["flops"] for e in front], [100 * e["accuracy"] for e in front], "k--", lw=0.8, label="frontier")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs (proxy included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy against compute, every sweep point and arm")
    ax.legend(fontsize=7)
    return save_figure(fig, run_dir.plot("frontier"))
