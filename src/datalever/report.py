"""The experiment's report: accuracy per arm with 95% confidence intervals over seeds, accuracy by
difficulty, relative gain over base, compute spent (the proxy's share included), paired
comparisons of `hard` against each control over the same seeds, each split's audit (what the hard
cluster tracks: difficulty, or length and token composition), what the generations were (cut by the cap,
written as programs, unmarked, ungradable) and, where it ran, lm-evaluation-harness's accuracy beside datalever's."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean
from typing import Sequence

from datalever import audit, rundir
from datalever.examples import LEVELS
from datalever.rundir import RunDir
from datalever.stats import t_interval


def collect(run_dir: RunDir, arms: list[str], seeds: list[int], benchmarks: Sequence[str] = ("test",)) -> dict:
    """Per arm and seed: the metrics on each benchmark (`metrics`: the first one's), lm-eval's results where it ran
    (`lm_eval`, by benchmark) and the training run's compute."""
    rows = {}
    for arm in arms:
        for seed in seeds:
            d = run_dir.seed_dir(arm, seed)
            by_benchmark = {name: rundir.read_json(d.eval_on(name).metrics) for name in benchmarks}
            lm_eval = {name: rundir.read_json(d.eval_on(name).lm_eval) for name in benchmarks
                       if d.eval_on(name).lm_eval.exists()}  # fmt: skip
            summary = rundir.read_json(d.train.summary)
            rows[(arm, seed)] = {"metrics": by_benchmark[benchmarks[0]], "benchmarks": by_benchmark, "train": summary,
                                 "lm_eval": lm_eval}  # fmt: skip
    return rows


# Counts of what the generations were, from each evaluation's metrics (evaluate.compute_metrics).
COUNTS = {
    "n_cut": "cut at the cap",
    "n_program": "program answers",
    "n_no_marker": "no answer marker",
    "n_ungradable": "ungradable",
}


def benchmark_accuracy(rows: dict, arm: str, seeds: list[int], benchmark: str) -> dict:
    """Accuracy on one benchmark over seeds; the generation counts (`COUNTS`, mean over seeds; None where a seed's
    metrics predate a count); lm-eval's accuracies on it where it ran (`lm_eval_accuracy`)."""
    metrics = [rows[(arm, s)]["benchmarks"][benchmark] for s in seeds]
    accs = [m["accuracy"] for m in metrics]
    acc_mean, acc_ci = t_interval(accs)
    counts = {k: None if any(m.get(k) is None for m in metrics) else mean(m[k] for m in metrics) for k in COUNTS}
    return {"per_seed": dict(zip(map(str, seeds), accs)), "mean": acc_mean, "ci95": acc_ci, "n": metrics[0]["n"],
            "counts": counts, "lm_eval": lm_eval_accuracy(rows, arm, seeds, benchmark)}  # fmt: skip


def lm_eval_accuracy(rows: dict, arm: str, seeds: list[int], benchmark: str) -> dict | None:
    """lm-eval's accuracies on a benchmark (each of its scores: mean, 95% CI and per seed, over the seeds where it
    ran), its task and shots; None where it ran for no seed."""
    found = {s: rows[(arm, s)].get("lm_eval", {}).get(benchmark) for s in seeds}
    found = {s: f for s, f in found.items() if f is not None}
    if not found:
        return None
    first = next(iter(found.values()))
    scores = {}
    for name in first["accuracy"]:
        values = [f["accuracy"][name] for f in found.values()]
        m, ci = t_interval(values)
        scores[name] = {"mean": m, "ci95": ci, "per_seed": {str(s): f["accuracy"][name] for s, f in found.items()}}
    return {"task": first["task"], "num_fewshot": first["num_fewshot"], "n": first["n"], "n_seeds": len(found),
            "version": first.get("lm_eval_version"), "scores": scores}  # fmt: skip


def proxy_compute(run_dir: RunDir) -> dict:
    """What profiling cost: the proxy's training plus the recording passes."""
    summary_path, meta_path = run_dir.proxy.summary, run_dir.trajectories_meta
    out = {}
    n_params = 0
    if summary_path.exists():
        summary = rundir.read_json(summary_path)
        out.update(summary["compute"])
        n_params = summary.get("n_params", 0)
    if meta_path.exists():
        meta = rundir.read_json(meta_path)
        out["record_wall_s"] = sum(meta.get("record_wall_s", {}).values()) + meta.get("initial_wall_s", 0.0)
        # Each recorded step is one forward over the examples (~2 * params * tokens), and so is the pass of the
        # untrained proxy before training, where the store has one.
        passes = len(meta.get("steps", [])) + ("initial_per_token_loss" in meta)
        out["record_flops"] = 2.0 * n_params * (meta.get("record_tokens") or 0) * passes
    out["total_flops"] = out.get("flops", 0.0) + out.get("record_flops", 0.0)
    return out


# ----------------------------------------------------------------------------- learning curves


def read_curves(run_dir: RunDir, arms: list[str], seeds: list[int]) -> dict[str, dict[int, list[dict]]]:
    """Each arm's curve points by seed (arms or seeds without curve.json are left out)."""
    curves: dict[str, dict[int, list[dict]]] = {}
    for arm in arms:
        for seed in seeds:
            path = run_dir.seed_dir(arm, seed).curve
            if path.exists():
                curves.setdefault(arm, {})[seed] = rundir.read_json(path)["points"]
    return curves


def summarize_curve(by_seed: dict[int, list[dict]], proxy_flops: float, final: dict | None = None) -> dict:
    """Validation accuracy per step (mean, 95% CI over the seeds that reached it), FLOPs with the proxy's share, and
    test accuracy at the point each seed's validation accuracy chose (its best, the earliest on a tie; at the last
    point, the evaluation stage's: `final`, {seed: {test set: accuracy}})."""
    steps = sorted({p["step"] for points in by_seed.values() for p in points})
    table = []
    for step in steps:
        at = [p for points in by_seed.values() for p in points if p["step"] == step]
        m, ci = t_interval([p["val_accuracy"] for p in at])
        flops = mean(p["flops"] for p in at) + proxy_flops
        table.append({"step": step, "val_mean": m, "val_ci95": ci, "n_seeds": len(at), "flops": flops,
                      "tokens": mean(p["tokens"] for p in at), "epoch": mean(p["epoch"] for p in at)})  # fmt: skip
    chosen = {}
    for seed, points in by_seed.items():
        best = max(points, key=lambda p: (p["val_accuracy"], -p["step"]))
        test = best.get("test_accuracy")
        if test is None and best["step"] == points[-1]["step"]:
            test = (final or {}).get(seed)
        chosen[str(seed)] = {"step": best["step"], "val_accuracy": best["val_accuracy"], "test": test}
    return {"points": table, "chosen": chosen, "proxy_flops": proxy_flops}


def chosen_test_accuracy(curve: dict) -> dict[str, dict]:
    """Per test set: test accuracy at the checkpoint chosen on validation, mean and 95% CI over seeds."""
    names = {n for c in curve["chosen"].values() for n in (c["test"] or {})}
    out = {}
    for name in sorted(names):
        accs = [c["test"][name] for c in curve["chosen"].values() if c["test"] and name in c["test"]]
        m, ci = t_interval(accs)
        out[name] = {"mean": m, "ci95": ci, "n_seeds": len(accs)}
    return out


def paired_at_equal_steps(curves: dict, a: str, b: str, seeds: list[int]) -> list[dict]:
    """a - b in validation accuracy, seed by seed, at every step both reached in every seed."""

    def by_step(arm: str, seed: int) -> dict[int, float]:
        return {p["step"]: p["val_accuracy"] for p in curves[arm].get(seed, [])}

    return _paired_by_step(by_step, curves, a, b, seeds)


def paired_on_test_at_equal_steps(
    curves: dict, rows: dict, benchmark: str, a: str, b: str, seeds: list[int]
) -> list[dict]:
    """a - b in test accuracy, seed by seed, at every step where both have a test accuracy in every seed: a curve
    point that was evaluated on test (the best on validation so far), or an arm's last step (the evaluation stage's
    number). Validation points are few problems; this is the same comparison on the test set, where it exists.
    After bf16 training on a GPU the two can differ slightly in kind: a curve point decodes with the live float32
    master weights under autocast, the evaluation stage with the saved bf16 model/ (save_dtype auto)."""

    def by_step(arm: str, seed: int) -> dict[int, float]:
        points = curves[arm].get(seed, [])
        out = {p["step"]: p["test_accuracy"][benchmark] for p in points if benchmark in (p.get("test_accuracy") or {})}
        if points:  # a curve's last point is the arm's last step: the weights the evaluation stage scored
            out[points[-1]["step"]] = rows[(arm, seed)]["benchmarks"][benchmark]["accuracy"]
        return out

    return _paired_by_step(by_step, curves, a, b, seeds)


def _paired_by_step(by_step, curves: dict, a: str, b: str, seeds: list[int]) -> list[dict]:
    """Mean and 95% CI over the seeds both arms have curves for of by_step(a, seed)[step] - by_step(b, seed)[step],
    at the steps both have in every such seed."""
    seeds = [s for s in seeds if s in curves.get(a, {}) and s in curves.get(b, {})]
    if not seeds:
        return []
    common = set.intersection(*(set(by_step(a, s)) & set(by_step(b, s)) for s in seeds))
    out = []
    for step in sorted(common):
        diffs = [by_step(a, s)[step] - by_step(b, s)[step] for s in seeds]
        m, ci = t_interval(diffs)
        out.append({"step": step, "mean_diff": m, "ci95": ci, "n_seeds": len(seeds), "wins_ties_losses": _wins(diffs)})
    return out


def curve_results(
    rows: dict, run_dir: RunDir, seeds: list[int], split_arms: Sequence[str], pairs, proxy_flops: float, benchmark: str
) -> dict:
    """The learning curves' summaries, the test accuracy each arm's validation chose, and the paired comparisons at
    equal optimizer steps: on validation, and on `benchmark` (the first test set) where it was evaluated."""
    arms = list(dict.fromkeys(arm for arm, _ in rows))
    curves = read_curves(run_dir, arms, seeds)
    if not curves:
        return {}
    summaries = {}
    for arm, by_seed in curves.items():
        final = {s: {b: m["accuracy"] for b, m in rows[(arm, s)]["benchmarks"].items()} for s in by_seed}
        summaries[arm] = summarize_curve(by_seed, proxy_flops if arm in split_arms else 0.0, final)
    for s in summaries.values():
        s["chosen_test"] = chosen_test_accuracy(s)
    equal_steps = {f"{a} - {b}": paired_at_equal_steps(curves, a, b, seeds) for a, b in pairs}
    on_test = {f"{a} - {b}": paired_on_test_at_equal_steps(curves, rows, benchmark, a, b, seeds) for a, b in pairs}
    return {
        "arms": summaries,
        "paired_at_equal_steps": {k: v for k, v in equal_steps.items() if v},
        "test_benchmark": benchmark,
        "test_paired_at_equal_steps": {k: v for k, v in on_test.items() if v},
    }


def curve_lines(curves: dict) -> list[str]:
    if not curves:
        return []
    arms = curves["arms"]
    lines = ["", "Learning curves: validation accuracy % (mean ± 95% CI over seeds) at each optimizer step:", ""]
    steps = sorted({p["step"] for a in arms.values() for p in a["points"]})
    lines += ["| step | " + " | ".join(arms) + " |", "|" + "---|" * (len(arms) + 1)]
    for step in steps:
        cells = []
        for a in arms.values():
            p = next((p for p in a["points"] if p["step"] == step), None)
            cells.append("" if p is None else f"{pct(p['val_mean'])} ± {pct(p['val_ci95'])}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "Test accuracy % at the checkpoint chosen on validation (its best point), per test set:", ""]
    for name, a in arms.items():
        chosen = "; ".join(f"{t} {pct(v['mean'])} ± {pct(v['ci95'])}" for t, v in a["chosen_test"].items())
        at = ", ".join(str(c["step"]) for c in a["chosen"].values())
        lines.append(f"- {name}: {chosen or 'n/a'} (chosen steps {at})")
    if curves["paired_at_equal_steps"]:
        lines += ["", "At equal optimizer steps (validation accuracy points, mean ± 95% CI):", ""]
        lines += _equal_step_lines(curves["paired_at_equal_steps"])
    if curves.get("test_paired_at_equal_steps"):
        lines += ["", f"At equal optimizer steps on {curves['test_benchmark']} (accuracy points, mean ± 95% CI; "
                  "wins/ties/losses), where both arms were evaluated on it at that step:", ""]  # fmt: skip
        lines += _equal_step_lines(curves["test_paired_at_equal_steps"], counts=True)
    return lines


def _equal_step_lines(paired: dict, counts: bool = False) -> list[str]:
    def cell(d: dict) -> str:
        text = f"step {d['step']}: {100 * d['mean_diff']:+.1f} ± {pct(d['ci95'])}"
        return text + (" ({}/{}/{})".format(*d["wins_ties_losses"]) if counts else "")

    return [f"- {name}: " + ", ".join(cell(d) for d in diffs) for name, diffs in paired.items()]


def save_figure(fig, path: Path) -> str:
    """Lay out, write (PNG, 120 dpi) and close a figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_curves(curves: dict, run_dir: RunDir) -> list[str]:
    """Validation accuracy against optimizer steps and against FLOPs (the proxy's share included), 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    axes = (("step", "optimizer step", "curves_steps"), ("flops", "FLOPs (proxy included)", "curves_flops"))
    for axis, label, name in axes:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for arm, a in curves["arms"].items():
            xs = [p[axis] for p in a["points"]]
            ys = [100 * p["val_mean"] for p in a["points"]]
            ci = [0.0 if math.isnan(p["val_ci95"]) else 100 * p["val_ci95"] for p in a["points"]]
            (line,) = ax.plot(xs, ys, marker="o", ms=3, label=arm)
            ax.fill_between(xs, [y - c for y, c in zip(ys, ci)], [y + c for y, c in zip(ys, ci)],
                            color=line.get_color(), alpha=0.15)  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title("Learning curves (mean, 95% band over seeds)")
        ax.legend(fontsize=8)
        paths.append(save_figure(fig, run_dir.plot(name)))
    return paths


def split_audits(run_dir: RunDir) -> dict[str, dict]:
    """The audit of every split the experiment made, by where it lives ("split": the run directory's own,
    "splits/<features>": the others), for splits that wrote one."""
    found = {"split": run_dir.split().audit}
    for features in run_dir.further_splits():
        found[f"splits/{features}"] = run_dir.split(features).audit
    return {name: rundir.read_json(path) for name, path in found.items() if path.exists()}


def summarize_arm(rows: dict, arm: str, seeds: list[int]) -> dict:
    accs = [rows[(arm, s)]["metrics"]["accuracy"] for s in seeds]
    acc_mean, acc_ci = t_interval(accs)
    by_level: dict[str, dict[str, float]] = {}
    for key in ("level",):
        values = {v for s in seeds for v in rows[(arm, s)]["metrics"].get("per_difficulty", {}).get(key, {})}
        for v in sorted(values):
            vals = [
                rows[(arm, s)]["metrics"]["per_difficulty"][key][v]["accuracy"]
                for s in seeds
                if v in rows[(arm, s)]["metrics"]["per_difficulty"].get(key, {})
            ]
            by_level[v] = {"mean": mean(vals), "n_seeds": len(vals)}
    compute_keys = ("optimizer_steps", "forwards", "backwards", "tokens", "flops", "wall_s")
    compute = {k: mean(rows[(arm, s)]["train"]["compute"][k] for s in seeds) for k in compute_keys}
    return {
        "accuracy": {"per_seed": dict(zip(map(str, seeds), accs)), "mean": acc_mean, "ci95": acc_ci},
        "by_level": by_level,
        "compute": compute,
        "final_val_loss": [rows[(arm, s)]["train"].get("final_val_loss") for s in seeds],
        "n_test": rows[(arm, seeds[0])]["metrics"]["n"],
        "benchmarks": {b: benchmark_accuracy(rows, arm, seeds, b) for b in rows[(arm, seeds[0])]["benchmarks"]},
    }


def paired(
    rows: dict, a: str, b: str, seeds: list[int], benchmark: str | None = None, level: str | None = None
) -> dict:
    """a - b in accuracy, seed by seed, on one benchmark (default: the first), or on its problems of one difficulty
    `level` (the data's `level` column)."""

    def acc(arm: str, s: int) -> float:
        metrics = rows[(arm, s)]["benchmarks"][benchmark] if benchmark else rows[(arm, s)]["metrics"]
        return metrics["per_difficulty"]["level"][level]["accuracy"] if level else metrics["accuracy"]

    diffs = [acc(a, s) - acc(b, s) for s in seeds]
    m, ci = t_interval(diffs)
    wins, ties, losses = _wins(diffs)
    return {
        "mean_diff": m,
        "ci95": ci,
        "per_seed": dict(zip(map(str, seeds), diffs)),
        "wins": wins,
        "ties": ties,
        "losses": losses,
    }


def _wins(diffs: list[float]) -> tuple[int, int, int]:
    """How many paired differences are above, at and below zero (wins, ties, losses)."""
    return sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)


def _level_order(level: str) -> tuple:
    """easy, medium, hard first (the embedded data's), then any other levels by name (MATH's Level 1..5)."""
    return (LEVELS.index(level), "") if level in LEVELS else (len(LEVELS), str(level))


def pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    arms = results["arms"]
    levels = sorted(
        {lv for a in arms.values() for lv in a["by_level"]},
        key=_level_order,
    )
    names = results.get("benchmarks") or ["test"]
    first = "test" if names[0] in ("test", "validation") else names[0]
    others = names[1:]
    head = (
        ["arm", f"{first} acc % (mean ± 95% CI)", "gain vs base"]
        + [f"acc {lv} %" for lv in levels]
        + [f"{b} acc % (mean ± 95% CI)" for b in others]
        + ["optimizer steps", "fwd passes", "bwd passes", "wall s"]
    )
    sizes = ", ".join(f"{b} {arms[next(iter(arms))]['benchmarks'][b]['n']}" for b in others)
    lines = [
        f"Seeds: {results['seeds']}; test examples: {results['n_test']}{'; ' + sizes if others else ''}; "
        f"split: {results['eval_split']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, a in arms.items():
        acc = a["accuracy"]
        gain = a.get("relative_gain_vs_base")
        cells = [name, f"{pct(acc['mean'])} ± {pct(acc['ci95'])}", "—" if gain is None else f"{100 * gain:+.1f}%"]
        cells += [pct(a["by_level"].get(lv, {}).get("mean", math.nan)) for lv in levels]
        cells += [f"{pct(a['benchmarks'][b]['mean'])} ± {pct(a['benchmarks'][b]['ci95'])}" for b in others]
        c = a["compute"]
        cells += [f"{c['optimizer_steps']:.0f}", f"{c['forwards']:.0f}", f"{c['backwards']:.0f}", f"{c['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    p = results.get("proxy_compute") or {}
    if p:
        lines += [
            "",
            f"Proxy (shared by all arms): {p.get('optimizer_steps', 0):.0f} optimizer steps, "
            f"{p.get('wall_s', 0):.0f} s training plus {p.get('record_wall_s', 0):.0f} s recording.",
        ]
    lines += _count_lines(arms, names)
    lines += _lm_eval_lines(arms, names, len(results["seeds"]))
    if results["paired"]:
        lines += ["", "Paired differences over the same seeds (accuracy points, mean ± 95% CI; wins/ties/losses):", ""]
        for name, d in results["paired"].items():
            lines.append(f"- {name}: {paired_text(d)}")
            levels = (results.get("paired_by_level") or {}).get(name)
            if levels:
                lines.append("  - by level: " + ", ".join(f"{lv} {paired_text(v)}" for lv, v in levels.items()))
            for b in others:
                lines.append(f"  - on {b}: {paired_text(results['paired_by_benchmark'][b][name])}")
    for name, found in (results.get("split_audits") or {}).items():
        title = "Split audit" if name == "split" else f"Split audit ({name})"
        lines += ["", *audit.markdown_lines(found, title)]
    lines += curve_lines(results.get("curves") or {})
    lines += _data_check_lines(results.get("data_checks") or {})
    return "\n".join(lines)


def _count_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}".removesuffix(".0")


def _count_lines(arms: dict, names: list[str]) -> list[str]:
    """A table of the generation counts per arm and test set (none where every count predates this report)."""
    per = [(arm, b, a["benchmarks"][b]["counts"]) for arm, a in arms.items() for b in names]
    if all(v is None for _, _, counts in per for v in counts.values()):
        return []
    lines = [
        "",
        "Generations per test set (examples, mean over seeds): cut at the cap (max_new_tokens reached without EOS or a "
        "stop string), answers written as programs (program of thought: counted, never run; graded on their text), "
        'without an answer marker (####, "the answer is", \\boxed), ungradable:',
        "",
        "| arm | test set | n | " + " | ".join(COUNTS.values()) + " |",
        "|" + "---|" * (len(COUNTS) + 3),
    ]
    for arm, b, counts in per:
        n = arms[arm]["benchmarks"][b]["n"]
        lines.append(f"| {arm} | {b} | {n} | " + " | ".join(_count_text(counts[k]) for k in COUNTS) + " |")
    return lines


LM_EVAL_NOTE = (
    "Why the two can differ. Extraction: lm-eval's gsm8k strict-match takes the first `#### N` (regex "
    "`#### (\\-?[0-9\\.\\,]+)`) and flexible-extract the last number in the generation, even one written after the "
    "answer; both then compare strings (commas, `$` and a final `.` removed). Its minerva_math compares the "
    'normalized "Final Answer: The final answer is ..." with the gold\'s last `\\boxed{}` (exact_match), or the whole '
    "generation with the gold solution through math-verify (math_verify). datalever takes the first `####` or "
    '"the answer is", else the last `\\boxed{}`, else the last value, and compares values (`1,234` = `1234.0`, '
    '`1/2` = `0.5`, math-verify for the rest). Prompts: lm-eval asks in its own format ("Question: ... Answer:", '
    '"Problem: ... Solution:") with its few-shot examples, datalever in the arm\'s training format (e.g. an Alpaca '
    "prompt), zero-shot; a fine-tuned model can do better in the format it was trained on."
)


def _lm_eval_lines(arms: dict, names: list[str], n_seeds: int) -> list[str]:
    """lm-eval's accuracies beside datalever's, per arm and test set, and why they can differ."""
    per = [(arm, b, a["benchmarks"][b]) for arm, a in arms.items() for b in names if a["benchmarks"][b]["lm_eval"]]
    if not per:
        return []
    lines = [
        "",
        "lm-evaluation-harness on the same test sets and saved models (accuracy %, mean ± 95% CI over seeds), beside "
        "datalever's:",
        "",
        "| arm | test set | datalever | lm-eval task | lm-eval |",
        "|---|---|---|---|---|",
    ]
    for arm, b, bench in per:
        lm = bench["lm_eval"]
        task = f"{lm['task']}, {lm['num_fewshot']}-shot" + (
            f" ({lm['n_seeds']} of {n_seeds} seeds)" if lm["n_seeds"] < n_seeds else ""
        )
        scores = "; ".join(f"{k} {pct(v['mean'])} ± {pct(v['ci95'])}" for k, v in lm["scores"].items())
        lines.append(f"| {arm} | {b} | {pct(bench['mean'])} ± {pct(bench['ci95'])} | {task} | {scores} |")
    return lines + ["", LM_EVAL_NOTE]


def paired_text(d: dict) -> str:
    return f"{100 * d['mean_diff']:+.1f} ± {pct(d['ci95'])} ({d['wins']}/{d['ties']}/{d['losses']})"


def _data_check_lines(checks: dict) -> list[str]:
    overlap = checks.get("overlap")
    if not overlap:
        return []
    if not overlap["overlaps"]:
        return ["", f"Data check: {', '.join(overlap['splits'])} share no example (by content id or prompt)."]
    shared = "; ".join(
        f"{o['second']} shares {o['count']} of {o['size']} with {o['first']}" for o in overlap["overlaps"]
    )
    return ["", f"Data check: SPLITS OVERLAP (run with allow_overlap): {shared}."]


def plot(results: dict, run_dir: RunDir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    names = list(arms)
    paths = []
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    means = [100 * arms[n]["accuracy"]["mean"] for n in names]
    errs = [0 if math.isnan(arms[n]["accuracy"]["ci95"]) else 100 * arms[n]["accuracy"]["ci95"] for n in names]
    ax.bar(names, means, yerr=errs, capsize=4, color="tab:blue")
    for n_i, n in enumerate(names):
        ax.scatter(
            [n_i] * len(arms[n]["accuracy"]["per_seed"]),
            [100 * v for v in arms[n]["accuracy"]["per_seed"].values()],
            color="k",
            s=10,
            zorder=3,
        )
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy per arm (mean, 95% CI, seeds as dots)")
    paths.append(save_figure(fig, run_dir.plot("accuracy")))

    levels = sorted({lv for a in arms.values() for lv in a["by_level"]}, key=_level_order)
    if levels:
        fig, ax = plt.subplots(figsize=(1.5 * len(levels) * max(1, len(names) / 3) + 2, 3.5))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            ax.bar(
                [j + i * width for j in range(len(levels))],
                [100 * arms[n]["by_level"].get(lv, {}).get("mean", math.nan) for lv in levels],
                width,
                label=n,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))], levels)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Accuracy by difficulty level")
        ax.legend(fontsize=8)
        paths.append(save_figure(fig, run_dir.plot("difficulty")))
    return paths


def plot_loss_curves(run_dir: RunDir, arms: list[str], seed: int) -> str:
    """Training loss per step (and the final validation loss) of each arm for one seed."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm in arms:
        log = run_dir.seed_dir(arm, seed).train.log
        records = [json.loads(line) for line in log.read_text().splitlines()]
        (line,) = ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8, label=arm)
        vals = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if vals:
            ax.scatter(*zip(*vals), color=line.get_color(), marker="o", s=18)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response loss (nats/token)")
    ax.set_yscale("log")
    ax.set_title(f"Training loss per arm, seed {seed} (dots: validation loss)")
    ax.legend(fontsize=8)
    return save_figure(fig, run_dir.plot("loss"))


def write_report(
    run_dir: str | Path,
    arms: list[str],
    seeds: list[int],
    *,
    controls: Sequence[str],
    eval_split: str = "test",
    data_checks: dict | None = None,
    benchmarks: Sequence[str] | None = None,
    split_arms: Sequence[str] = (),
) -> dict:
    """Collect every arm's results, summarize them, pair each non-control arm with each control, write
    results.json, results.md and the plots into the run directory. `benchmarks`: what each arm was evaluated on
    (default: the eval split), the first one deciding the headline accuracy and comparisons. `split_arms`: the arms
    whose data came from the split, whose compute includes the proxy's."""
    run_dir = RunDir(run_dir)
    benchmarks = list(benchmarks or [eval_split])
    rows = collect(run_dir, arms, seeds, benchmarks)
    summaries = {arm: summarize_arm(rows, arm, seeds) for arm in arms}
    if "base" in summaries:
        base = summaries["base"]["accuracy"]["mean"]
        for arm, s in summaries.items():
            s["relative_gain_vs_base"] = None if arm == "base" or base == 0 else s["accuracy"]["mean"] / base - 1
    # Every arm that is not a control (hard, hard-final, user arms, ...) against every control, seed by seed.
    controls = [a for a in controls if a in summaries]
    treated = [a for a in arms if a not in controls]
    pairs = [(t, c) for t in treated for c in controls]
    comparisons = {f"{t} - {c}": paired(rows, t, c, seeds) for t, c in pairs}
    # By difficulty level where every run has each level: whether an arm learns the hard problems, not just more.
    levels = set.intersection(*(set(r["metrics"].get("per_difficulty", {}).get("level", {})) for r in rows.values()))
    levels = sorted(levels, key=_level_order)
    by_level = {f"{t} - {c}": {lv: paired(rows, t, c, seeds, level=lv) for lv in levels} for t, c in pairs}
    by_benchmark = {b: {f"{t} - {c}": paired(rows, t, c, seeds, b) for t, c in pairs} for b in benchmarks}
    proxy = proxy_compute(run_dir)
    results = {
        "seeds": seeds,
        "eval_split": eval_split,
        "benchmarks": benchmarks,
        "paired_by_benchmark": by_benchmark,
        "n_test": summaries[arms[0]]["n_test"],
        "arms": summaries,
        "paired": comparisons,
        "paired_by_level": by_level,
        "proxy_compute": proxy,
        "split_audits": split_audits(run_dir),
        "data_checks": data_checks or {},
        "split_arms": list(split_arms),
        "curves": curve_results(rows, run_dir, seeds, split_arms, pairs, proxy.get("total_flops", 0.0), benchmarks[0]),
    }
    results["plots"] = plot(results, run_dir) + [plot_loss_curves(run_dir, arms, seeds[0])]
    if results["curves"]:
        results["plots"] += plot_curves(results["curves"], run_dir)
    results["markdown"] = markdown(results)
    rundir.atomic_write_text(run_dir.results_md, "# Results\n\n" + results["markdown"] + "\n")
    rundir.write_json(run_dir.results_json, results)
    return results
