"""Sweeps in one config: every combination of the listed values runs as an experiment of its own, and one report
compares them (a table per point, accuracy against compute); learning curves meet at equal steps."""

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from datalever import experiment
from datalever.demo import shipped_config


def _config(run_dir, **changes):
    cfg = shipped_config("quick")
    cfg.run_dir, cfg.seeds, cfg.arms, cfg.progress = str(run_dir), [0], ["base", "hard"], False
    return dataclasses.replace(cfg, **changes)


def test_sweep_points_are_every_combination_in_order(tmp_path):
    cfg = _config(tmp_path, sweep={"m": [1, 2], "epochs": [1, 2]})
    points = experiment.config.sweep_points(cfg)
    assert points == [{"m": 1, "epochs": 1}, {"m": 1, "epochs": 2}, {"m": 2, "epochs": 1}, {"m": 2, "epochs": 2}]
    sub = experiment.config.sweep_config(cfg, points[3])
    assert (sub.m, sub.train.epochs, sub.sweep) == (2, 2.0, None)
    assert sub.run_dir == str(tmp_path / "sweep" / "m=2,epochs=2")
    assert cfg.m == 1 and cfg.train.epochs == 1  # the sweep's own config is left as it was


@pytest.mark.parametrize(
    "sweep,message",
    [
        ({"lr": [1e-3]}, "sweep axis must be one of"),
        ({"m": []}, "sweep.m must list distinct values"),
        ({"m": [1, 1]}, "sweep.m must list distinct values"),
        ({"m": [1.5]}, "sweep.m takes whole numbers"),
        ({"m": [101]}, "m must be <="),  # a point is checked as a config of its own
    ],
)
def test_a_bad_sweep_is_refused_before_any_work(tmp_path, sweep, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, sweep=sweep)
    assert not any(tmp_path.iterdir())


def test_an_arm_depends_on_m_and_the_profile_only_through_the_data_it_upsamples():
    cfg = _config("unused")
    axes = {
        name: experiment.study.arm_axes(cfg, experiment.config.arm_spec(cfg, name))
        for name in experiment.config.BUILTIN_ARMS
    }
    everything = set(experiment.config.SWEEP_AXES)
    assert axes["base"] == axes["sam"] == {"epochs"}
    assert axes["hard"] == axes["random"] == axes["easy"] == axes["hard-final"] == everything
    assert axes["base-long"] == everything  # as many steps as hard: its length follows hard's data


def test_a_sweep_over_epochs_reuses_nothing(tmp_path):
    """Every arm depends on the epochs: no point links another's run, each trains its own."""
    cfg = _config(tmp_path, sweep={"epochs": [1, 2]})
    kinds = {u.name: u.kind for u in experiment.units(cfg)}
    assert "link" not in kinds.values()
    assert kinds["sweep/epochs=2/arms/base/seed0"] == kinds["sweep/epochs=1/arms/base/seed0"] == "train"


def test_an_m_sweep_links_the_arms_that_do_not_depend_on_m(tmp_path):
    cfg = _config(tmp_path, sweep={"m": [1, 3, 5]})
    units = {u.name: u for u in experiment.units(cfg)}
    for point in ("m=3", "m=5"):  # both from the first point that trained base, never a link of a link
        assert units[f"sweep/{point}/arms/base/seed0"].kind == "link"
        assert units[f"sweep/{point}/arms/base/seed0"].after == ("sweep/m=1/arms/base/seed0",)
        assert units[f"sweep/{point}/arms/hard/seed0"].kind == "train"
    assert units["report"].after == ("sweep/m=1/report", "sweep/m=3/report", "sweep/m=5/report")


def test_the_sweep_report_tables_each_points_paired_differences(tmp_path):
    """Hand-made point results: the cross-point table holds each point's own pairs, a dash where a point has none."""
    from datalever import rundir
    from datalever.report_sweep import write_sweep_report
    from datalever.rundir import RunDir

    def arm(acc):
        return {"accuracy": {"mean": acc, "ci95": 0.01}, "compute": {"flops": 1e9}}

    def pair(diff, wins):
        return {"mean_diff": diff, "ci95": 0.02, "wins": wins, "ties": 0, "losses": 3 - wins}

    points = {
        "m=1": {"hard - base-long": pair(-0.01, 1), "hard - base": pair(0.05, 3)},
        "m=9": {"hard - base-long": pair(-0.04, 0)},
    }
    for name, by_pair in points.items():
        results = {"arms": {"hard": arm(0.6), "base-long": arm(0.62)}, "paired": by_pair, "markdown": f"({name})"}
        rundir.write_json(RunDir(RunDir(tmp_path).sweep_point(name)).results_json, results)
    write_sweep_report(tmp_path, list(points))
    lines = (tmp_path / "sweep_results.md").read_text().splitlines()
    assert "| point | hard - base-long | hard - base |" in lines
    assert "| m=1 | -1.0 ± 2.0 (1/0/2) | +5.0 ± 2.0 (3/0/0) |" in lines
    assert "| m=9 | -4.0 ± 2.0 (0/0/3) | — |" in lines


def test_curve_steps_are_one_grid_for_every_arm():
    """Arms of different lengths meet at the same steps: every curve_every epochs of the data as given."""
    cfg = _config("unused", curve_every=1.0)
    tcfg = dataclasses.replace(cfg.train, epochs=3, batch_size=10)
    # 100 training examples: a point every 10 steps; the base arm ends at 30, an arm with 150 rows per epoch at 45.
    assert experiment.curve.curve_steps(cfg, tcfg, 100, 100) == [10, 20, 30]
    assert experiment.curve.curve_steps(cfg, tcfg, 100, 150) == [10, 20, 30, 40, 45]
    half = dataclasses.replace(cfg, curve_every=0.5)
    assert experiment.curve.curve_steps(half, tcfg, 100, 100) == [5, 10, 15, 20, 25, 30]
    # Steps per epoch that are not whole (2000 / 32 = 62.5) round up as the run's length does: the base arm's end
    # (6 epochs: 375 steps) is a grid point, where the longer arms meet it.
    six = dataclasses.replace(cfg.train, epochs=6, batch_size=32)
    assert experiment.curve.curve_steps(cfg, six, 2000, 2000) == [63, 125, 188, 250, 313, 375]
    assert experiment.curve.curve_steps(dataclasses.replace(cfg, curve_every=6.0), six, 2000, 3000) == [375, 563]


def test_a_sweep_runs_each_point_and_reports_them_together(tmp_path, monkeypatch):
    cfg = _config(tmp_path, sweep={"m": [1, 3]})
    trained = []
    real = experiment.study.train_run

    def spy(tcfg, **kw):
        trained.append(Path(tcfg.out).relative_to(tmp_path).parts[1:4])  # point, arms, arm
        return real(tcfg, **kw)

    monkeypatch.setattr(experiment.study, "train_run", spy)
    experiment.run(cfg)
    # base trains the data as given: m does not change it, so the second point links the first one's run
    assert trained == [("m=1", "arms", "base"), ("m=1", "arms", "hard"), ("m=3", "arms", "hard")]
    first, second = (tmp_path / "sweep" / p / "arms" / "base" / "seed0" for p in ("m=1", "m=3"))
    assert json.loads((second / "reused_from.json").read_text()) == {"source": str(first), "changed": ["m"]}
    weights = [d / "train" / "model" / "model.safetensors" for d in (first, second)]
    assert weights[0].read_bytes() == weights[1].read_bytes()
    assert not (tmp_path / "sweep" / "m=3" / "arms" / "hard" / "seed0" / "reused_from.json").exists()
    summary = json.loads((tmp_path / "sweep_results.json").read_text())
    assert [p["point"] for p in summary["points"]] == ["m=1", "m=3"]
    for point, m in (("m=1", 1), ("m=3", 3)):
        sub = tmp_path / "sweep" / point
        results = json.loads((sub / "results.json").read_text())
        n_train = len((sub / "data" / "train.jsonl").read_text().splitlines())
        manifest = json.loads((sub / "arms" / "hard" / "seed0" / "manifest.json").read_text())
        n_hard = json.loads((sub / "split_summary.json").read_text())["n_hard"]
        assert manifest["n_rows"] == n_train + m * n_hard  # the point's own m
        entry = next(p for p in summary["points"] if p["point"] == point)
        assert entry["arms"]["hard"]["accuracy"] == results["arms"]["hard"]["accuracy"]["mean"]
    markdown = (tmp_path / "sweep_results.md").read_text()
    assert "## m=1" in markdown and "## m=3" in markdown
    assert (tmp_path / "results_frontier.png").exists()


def test_the_chosen_checkpoint_is_the_best_on_validation_and_its_test_accuracy_is_reported():
    from datalever.report import chosen_test_accuracy, summarize_curve

    def point(step, val, test=None):
        p = {"step": step, "epoch": step / 10, "tokens": 100 * step, "flops": 1e6 * step, "val_accuracy": val}
        return p | ({"test_accuracy": {"test": test}} if test is not None else {})

    by_seed = {
        0: [point(10, 0.2, 0.25), point(20, 0.4, 0.35), point(30, 0.3)],  # best at 20
        1: [point(10, 0.5, 0.45), point(20, 0.5), point(30, 0.1)],  # a tie: the earlier, 10
    }
    curve = summarize_curve(by_seed, proxy_flops=5e5)
    assert {s: c["step"] for s, c in curve["chosen"].items()} == {"0": 20, "1": 10}
    # Best at the last point: the evaluation stage measured those weights, and its numbers are taken.
    last = summarize_curve({2: [point(10, 0.1, 0.1), point(30, 0.6)]}, 0.0, final={2: {"test": 0.55}})
    assert last["chosen"]["2"] == {"step": 30, "val_accuracy": 0.6, "test": {"test": 0.55}}
    assert [p["val_mean"] for p in curve["points"]] == pytest.approx([0.35, 0.45, 0.2])
    assert curve["points"][0]["flops"] == pytest.approx(1e7 + 5e5)  # the proxy's share added
    chosen = chosen_test_accuracy(curve)["test"]
    assert chosen["mean"] == pytest.approx((0.35 + 0.45) / 2) and chosen["n_seeds"] == 2


def test_arms_are_compared_at_the_steps_both_reached_in_every_seed():
    from datalever.report import paired_at_equal_steps

    def points(vals):
        return [{"step": s, "val_accuracy": v} for s, v in vals]

    curves = {
        "hard": {0: points([(10, 0.3), (20, 0.5), (30, 0.6)]), 1: points([(10, 0.2), (20, 0.4), (30, 0.5)])},
        "base": {0: points([(10, 0.1), (20, 0.4)]), 1: points([(10, 0.2), (20, 0.2)])},
    }
    diffs = paired_at_equal_steps(curves, "hard", "base", [0, 1])
    assert [d["step"] for d in diffs] == [10, 20]  # base never reached 30
    assert [d["mean_diff"] for d in diffs] == pytest.approx([0.1, 0.15])


def test_on_test_arms_are_compared_where_both_were_evaluated_at_the_same_step():
    """Test accuracy at a step: a curve point evaluated on test, or an arm's last step (the evaluation stage's)."""
    from datalever.report import paired_on_test_at_equal_steps

    def point(step, val, test=None):
        return {"step": step, "val_accuracy": val, **({"test_accuracy": {"test": test}} if test is not None else {})}

    curves = {
        # seed 1's validation did not improve at step 20, so it has no test accuracy there
        "hard": {0: [point(10, 0.3, 0.32), point(20, 0.5, 0.52), point(30, 0.6)],
                 1: [point(10, 0.4, 0.40), point(20, 0.3), point(30, 0.5)]},
        "base": {0: [point(10, 0.2, 0.25), point(20, 0.4)], 1: [point(10, 0.1, 0.20), point(20, 0.2)]},
    }  # fmt: skip
    final = {("hard", 0): 0.61, ("hard", 1): 0.55, ("base", 0): 0.45, ("base", 1): 0.35}
    rows = {key: {"benchmarks": {"test": {"accuracy": acc}}} for key, acc in final.items()}
    diffs = paired_on_test_at_equal_steps(curves, rows, "test", "hard", "base", [0, 1])
    # step 10: both curves' test points; step 20: base's end, but hard has no test there in seed 1; step 30: base's
    # curve never reached it
    assert [d["step"] for d in diffs] == [10]
    assert diffs[0]["mean_diff"] == pytest.approx(((0.32 - 0.25) + (0.40 - 0.20)) / 2)
    assert diffs[0]["wins_ties_losses"] == (2, 0, 0)
    # with hard's test at 20 in seed 1 too, step 20 pairs hard's curve point with base's final evaluation
    curves["hard"][1][1] = point(20, 0.45, 0.47)
    diffs = paired_on_test_at_equal_steps(curves, rows, "test", "hard", "base", [0, 1])
    assert [d["step"] for d in diffs] == [10, 20]
    assert diffs[1]["mean_diff"] == pytest.approx(((0.52 - 0.45) + (0.47 - 0.35)) / 2)


def test_the_frontier_keeps_what_nothing_beats_on_both_axes():
    from datalever.report_sweep import frontier

    entries = [
        {"point": "a", "arm": "base", "flops": 1.0, "accuracy": 0.3},
        {"point": "a", "arm": "hard", "flops": 2.0, "accuracy": 0.25},  # more compute, less accuracy: off
        {"point": "b", "arm": "base", "flops": 3.0, "accuracy": 0.4},
        {"point": "b", "arm": "hard", "flops": 3.0, "accuracy": 0.35},  # same compute, less accuracy: off
    ]
    assert [(e["point"], e["arm"]) for e in frontier(entries)] == [("a", "base"), ("b", "base")]


# ----------------------------------------------------------------------------- the proxy as a sweep axis


def test_a_proxy_sweep_names_each_point_by_its_model(tmp_path):
    proxies = ["preset:tiny", "runs/proxies/demo-large-1500/", "embedded:demo-base", "arm:base"]
    cfg = _config(tmp_path, sweep={"proxy": proxies, "fraction": [0.5]})
    names = [experiment.config.point_name(p) for p in experiment.config.sweep_points(cfg)]
    assert names == [
        "proxy=preset-tiny,fraction=0.5",
        "proxy=demo-large-1500,fraction=0.5",
        "proxy=embedded-demo-base,fraction=0.5",
        "proxy=arm-base,fraction=0.5",
    ]
    sub = experiment.config.sweep_config(cfg, {"proxy": "runs/proxies/demo-large-1500/", "fraction": 0.5})
    assert (sub.profile.proxy, sub.profile.fraction) == ("runs/proxies/demo-large-1500/", 0.5)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"sweep": {"proxy": [1]}}, "sweep.proxy takes model names or paths"),
        ({"sweep": {"fraction": ["preset:tiny"]}}, "sweep.fraction takes numbers"),
        ({"sweep": {"proxy": ["a/demo", "b/demo"]}}, "name the same sweep directory"),
        ({"sweep": {"proxy": ["arm:nothing"]}}, "nothing is not one of the arms"),
        ({"sweep": {"proxy": ["arm:hard"]}}, "trains on data made from the split"),
        ({"profile": {"proxy": "arm:base", "seed": 3}}, "seed profile.seed=3, which is not one of the seeds"),
    ],
)
def test_a_bad_proxy_is_refused_before_any_work(tmp_path, changes, message):
    base = _config(tmp_path)
    if "profile" in changes:
        changes = {"profile": dataclasses.replace(base.profile, **changes["profile"])}
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(base, **changes)
    assert not any(tmp_path.iterdir())


def test_the_oracle_proxy_profiles_after_the_arm_whose_model_it_is(tmp_path):
    """arm:base: the profile waits for the base arm's run; base's data does not wait for the split (it reads none:
    else the graph would be a circle); hard's data still does."""
    cfg = _config(tmp_path, profile=dataclasses.replace(_config(tmp_path).profile, proxy="arm:base"))
    units = {u.name: u for u in experiment.units(cfg)}
    assert units["profile"].after == ("data", "arms/base/seed0")
    assert units["arms/base/seed0/data"].after == ("data",)
    assert units["arms/hard/seed0/data"].after == ("split",)
    assert set(units["report"].after) >= {"split", "arms/base/seed0", "arms/hard/seed0"}
    only_base = _config(tmp_path, arms=["base"], sweep={"proxy": ["preset:tiny", "arm:base"]})
    for unit in experiment.units(only_base):  # no arm reads a split; the reports, which show it, still wait for it
        if unit.kind == "report" and unit.name != "report":
            assert unit.name.removesuffix("report") + "split" in unit.after
    assert experiment.study.proxy_model(cfg) == str(tmp_path / "arms" / "base" / "seed0" / "train" / "model")


def test_a_proxy_sweep_profiles_with_each_proxy_and_compares_the_splits(tmp_path):
    """preset:tiny and the base arm's own fine-tuned model (arm:base): base trains once (it reads no split), the
    oracle point profiles with that model, and the report compares the two splits."""
    cfg = _config(tmp_path, sweep={"proxy": ["preset:tiny", "arm:base"]})
    experiment.run(cfg)
    first, oracle = tmp_path / "sweep" / "proxy=preset-tiny", tmp_path / "sweep" / "proxy=arm-base"
    assert json.loads((oracle / "arms" / "base" / "seed0" / "reused_from.json").read_text())["changed"] == ["proxy"]
    meta = json.loads((oracle / "trajectories.meta.json").read_text())
    assert meta["proxy"]["path"] == str(oracle / "arms" / "base" / "seed0" / "train" / "model")
    assert meta["proxy"]["hidden_size"] == 32  # the fine-tuned tiny model, not the demo preset
    base_model = first / "arms" / "base" / "seed0" / "train" / "model" / "model.safetensors"
    assert (oracle / "arms" / "base" / "seed0" / "train" / "model" / "model.safetensors").read_bytes() == (
        base_model.read_bytes()
    )
    first_losses = pd.read_parquet(first / "trajectories.parquet").filter(like="loss_step")
    oracle_losses = pd.read_parquet(oracle / "trajectories.parquet").filter(like="loss_step")
    assert first_losses.iloc[:, 0].mean() > oracle_losses.iloc[:, 0].mean()  # the oracle knows the task already
    result = json.loads((tmp_path / "split_comparison.json").read_text())
    assert result["names"] == ["proxy=preset-tiny", "proxy=arm-base"]
    assert result["ari"][0][0] == result["ari"][1][1] == pytest.approx(1.0)
    assert "## Splits" in (tmp_path / "sweep_results.md").read_text()
