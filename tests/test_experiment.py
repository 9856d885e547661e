"""End to end: `datalever experiment` on a tiny config — artifacts agree with each other, reruns do
nothing new, and a run killed mid-arm resumes."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datalever import experiment, provenance
from datalever.answers import answers_match
from datalever.demo import shipped_config
from datalever.train import loop
from factories import write_arm_results

ARMS, SEEDS = ["base", "hard"], [0, 1]


def _config(run_dir):
    """The quick smoke configuration shipped with the package (what `datalever demo --quick` runs)."""
    cfg = shipped_config("quick")
    cfg.run_dir, cfg.seeds, cfg.arms, cfg.progress = str(run_dir), SEEDS, ARMS, False
    cfg.train.save_every = 2
    return cfg


def _log_lines(run_dir, arm, seed):
    return (Path(run_dir) / "arms" / arm / f"seed{seed}" / "train" / "train_log.jsonl").read_text().splitlines()


def test_experiment_artifacts_agree_and_rerun_is_a_no_op(tmp_path):
    cfg = _config(tmp_path)
    experiment.run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["arms"]) == set(ARMS) and results["seeds"] == SEEDS
    for name in ("results.md", "results_accuracy.png", "split.parquet", "trajectories.parquet"):
        assert (tmp_path / name).exists(), name
    split = pq.read_table(tmp_path / "split.parquet").to_pandas()
    n_train = len(split)
    n_hard = int((split["hard"] & (split["flag"] == "")).sum())
    for arm in ARMS:
        for seed in SEEDS:
            d = tmp_path / "arms" / arm / f"seed{seed}"
            # The arm's training distribution: every example once, hard ones 1+m times in `hard`.
            mult = pq.read_table(d / "manifest.parquet").to_pydict()["multiplicity"]
            expected = n_train + (cfg.m * n_hard if arm == "hard" else 0)
            assert sum(mult) == expected
            summary = json.loads((d / "train" / "train_summary.json").read_text())
            assert summary["epoch_len"] == expected
            # Accuracy recomputed from the prediction file, with the extractor's own matcher.
            preds = [json.loads(line) for line in (d / "eval" / "predictions.jsonl").read_text().splitlines()]
            assert len(preds) == results["n_test"]
            acc = sum(answers_match(p["extracted"], p["gold"]) for p in preds) / len(preds)
            assert results["arms"][arm]["accuracy"]["per_seed"][str(seed)] == pytest.approx(acc)
            assert (d / "train" / "model" / "model.safetensors").exists()
    # A second invocation trains and evaluates nothing new.
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("arms/*/seed*/eval/metrics.json")}
    logs = {(a, s): _log_lines(tmp_path, a, s) for a in ARMS for s in SEEDS}
    experiment.run(_config(tmp_path))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("arms/*/seed*/eval/metrics.json")} == before
    assert {(a, s): _log_lines(tmp_path, a, s) for a in ARMS for s in SEEDS} == logs
    # The run directory moved (copied elsewhere): the same work, continued there, not refused or redone.
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, moved)
    before = {p: p.stat().st_mtime_ns for p in moved.glob("arms/*/seed*/eval/metrics.json")}
    experiment.run(_config(moved))
    assert {p: p.stat().st_mtime_ns for p in moved.glob("arms/*/seed*/eval/metrics.json")} == before
    assert {(a, s): _log_lines(moved, a, s) for a in ARMS for s in SEEDS} == logs


def test_experiment_killed_mid_arm_resumes(tmp_path, monkeypatch):
    """Kill the `hard` arm of seed 0 after a checkpoint; the rerun resumes it and ends like a clean run."""
    cfg = _config(tmp_path)
    cfg.arms, cfg.seeds = ["hard"], [0]
    real_step = loop.optimizer_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # step 4 of the arm: a checkpoint exists at step 2
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    # The proxy's steps go through optimizer_step too: profile first, then patch.
    experiment.study.run_method(cfg, experiment.data.data_files(cfg))
    monkeypatch.setattr(loop, "optimizer_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(cfg)
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    arm_train = tmp_path / "arms" / "hard" / "seed0" / "train"
    assert (arm_train / "checkpoints" / "step-2").exists() and not (arm_train / "train_summary.json").exists()
    experiment.run(cfg)
    steps = [json.loads(line)["step"] for line in _log_lines(tmp_path, "hard", 0)]
    # The log keeps what the checkpoint holds (steps 1-2) and the rerun continues from step 3: no step twice.
    assert steps == list(range(1, steps[-1] + 1))
    # Same weights as an uninterrupted run of the same arm.
    clean = tmp_path / "clean"
    cfg2 = _config(clean)
    cfg2.arms, cfg2.seeds = ["hard"], [0]
    experiment.run(cfg2)
    from safetensors.torch import load_file

    a = load_file(arm_train / "model" / "model.safetensors")
    b = load_file(clean / "arms" / "hard" / "seed0" / "train" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_an_arm_with_other_split_features_upsamples_that_split(tmp_path):
    """`hard-final` (features: final) gets its own split of the same profile under splits/final/, and its
    training set upsamples exactly the hard examples of a final-loss split computed here from the
    trajectories, while `hard` keeps the experiment's trajectory split."""
    from datalever.split import split_trajectories
    from datalever.trajectories import read_store

    cfg = _config(tmp_path)
    cfg.arms, cfg.seeds = ["hard", "hard-final"], [0]
    experiment.run(cfg)
    ids, sources, losses, flags, meta = read_store(tmp_path / "trajectories.parquet")
    for arm, features, split_file in [
        ("hard", "trajectory", tmp_path / "split.parquet"),
        ("hard-final", "final", tmp_path / "splits" / "final" / "split.parquet"),
    ]:
        ref = split_trajectories(
            ids, sources, losses, features=features, k=2, seed=cfg.profile.seed, flags=flags, steps=meta["steps"]
        )
        hard = set(ref.loc[ref["hard"] & (ref["flag"] == ""), "id"])
        assert set(pq.read_table(split_file).to_pandas().query("hard and flag == ''")["id"]) == hard
        man = pq.read_table(tmp_path / "arms" / arm / "seed0" / "manifest.parquet").to_pandas()
        assert set(man.loc[man["multiplicity"] == 1 + cfg.m, "id"]) == hard, arm
    final_split = pq.read_table(tmp_path / "splits" / "final" / "split.parquet").to_pandas()
    traj_split = pq.read_table(tmp_path / "split.parquet").to_pandas()
    assert not final_split["hard"].equals(traj_split["hard"])  # the two arms really differ
    assert json.loads((tmp_path / "results.json").read_text())["arms"].keys() == {"hard", "hard-final"}


def test_report_pairs_every_non_control_arm_with_every_control_seed_by_seed(tmp_path, monkeypatch):
    """Hand-made metrics: accuracies chosen so each paired difference is known exactly."""
    from datalever import report, rundir
    from datalever.report import write_report
    from datalever.rundir import RunDir

    ticks = {}
    save = report.save_figure

    def record_ticks(fig, path):
        ticks[Path(path).name] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        return save(fig, path)

    monkeypatch.setattr(report, "save_figure", record_ticks)

    acc = {"base": [0.50, 0.60], "random": [0.55, 0.55], "hard": [0.60, 0.58], "hard-final": [0.52, 0.70]}
    hard_problems = {"base": [0.10, 0.20], "random": [0.10, 0.10], "hard": [0.30, 0.25], "hard-final": [0.2, 0.2]}
    for arm, values in acc.items():
        for seed, a in enumerate(values):
            d = RunDir(tmp_path).seed_dir(arm, seed)
            levels = {
                "easy": {"accuracy": 0.9, "n": 30},
                "hard": {"accuracy": hard_problems[arm][seed], "n": 50},
                "medium": {"accuracy": 0.5, "n": 20},
            }
            rundir.write_json(d.eval.metrics, {"accuracy": a, "n": 100, "per_difficulty": {"level": levels}})
            compute = {k: 1 for k in ("optimizer_steps", "forwards", "backwards", "tokens", "flops", "wall_s")}
            rundir.write_json(d.train.summary, {"compute": compute, "final_val_loss": 1.0})
            d.train.log.write_text('{"step": 1, "loss": 1.0}\n')
    results = write_report(tmp_path, list(acc), [0, 1], controls=experiment.config.CONTROL_ARMS)
    assert set(results["paired"]) == {"hard - base", "hard - random", "hard-final - base", "hard-final - random"}
    got = results["paired"]["hard-final - base"]
    assert got["per_seed"] == pytest.approx({"0": 0.02, "1": 0.10})
    assert got["mean_diff"] == pytest.approx(0.06) and (got["wins"], got["ties"], got["losses"]) == (2, 0, 0)
    got = results["paired"]["hard - random"]
    assert got["per_seed"] == pytest.approx({"0": 0.05, "1": 0.03}) and got["mean_diff"] == pytest.approx(0.04)
    # the same pairs on the hard problems alone: does an arm learn them, not just more of the easy ones
    got = results["paired_by_level"]["hard - base"]
    assert got["hard"]["per_seed"] == pytest.approx({"0": 0.20, "1": 0.05}) and got["easy"]["mean_diff"] == 0
    assert "  - by level: easy +0.0 ± 0.0 (0/2/0), medium +0.0 ± 0.0 (0/2/0), hard +12.5" in results["markdown"]
    # the plot reads in the tables' order: easy, medium, hard (not alphabetically)
    assert ticks["results_difficulty.png"] == ["easy", "medium", "hard"]


def test_report_shows_generation_counts_and_lm_eval_beside_datalever(tmp_path):
    """Hand-made metrics with the counts, and lm-eval's JSON for some arms and seeds: means over seeds, each
    beside datalever's accuracy, and n/a for a count that a seed's metrics predate."""
    from datalever import rundir
    from datalever.report import LM_EVAL_NOTE, write_report

    counts = {"base": [(4, 0, 6, 1), (6, 2, 8, 1)], "hard": [(1, 3, 2, 0), (None, 5, 2, 0)]}
    for arm, per_seed in counts.items():
        for seed, (cut, program, no_marker, ungradable) in enumerate(per_seed):
            metrics = {"accuracy": 0.5 + 0.1 * seed, "n": 20, "n_program": program, "n_no_marker": no_marker,
                       "n_ungradable": ungradable, "n_cut": cut}  # fmt: skip
            d = write_arm_results(tmp_path, arm, seed, metrics, "gsm8k")
            if arm == "hard" or seed == 0:  # base's seed 1 has no lm-eval run
                rundir.write_json(
                    d.eval_on("gsm8k").lm_eval,
                    {"task": "gsm8k", "num_fewshot": 5, "n": 20, "lm_eval_version": "0.4.13",
                     "accuracy": {"strict-match": 0.2 + 0.1 * seed, "flexible-extract": 0.4}},
                )  # fmt: skip
    results = write_report(tmp_path, ["base", "hard"], [0, 1], controls=["base"], benchmarks=["gsm8k"])
    base, hard = (results["arms"][a]["benchmarks"]["gsm8k"] for a in ("base", "hard"))
    assert base["counts"] == {"n_cut": 5, "n_program": 1, "n_no_marker": 7, "n_ungradable": 1}
    assert hard["counts"]["n_cut"] is None and hard["counts"]["n_program"] == 4
    assert hard["lm_eval"]["scores"]["strict-match"]["mean"] == pytest.approx(0.25)
    assert hard["lm_eval"]["n_seeds"] == 2 and base["lm_eval"]["n_seeds"] == 1
    text = (tmp_path / "results.md").read_text()
    assert "| base | gsm8k | 20 | 5 | 1 | 7 | 1 |" in text
    assert "| hard | gsm8k | 20 | n/a | 4 | 2 | 0 |" in text
    assert (
        "| hard | gsm8k | 55.0 ± 63.5 | gsm8k, 5-shot | strict-match 25.0 ± 63.5; flexible-extract 40.0 ± 0.0 |" in text
    )
    assert "| base | gsm8k | 55.0 ± 63.5 | gsm8k, 5-shot (1 of 2 seeds) | strict-match 20.0 ± n/a;" in text
    assert LM_EVAL_NOTE in text


def test_a_report_without_counts_or_lm_eval_shows_neither(tmp_path):
    from datalever.report import write_report

    write_arm_results(tmp_path, "base", 0, {"accuracy": 0.5, "n": 10})  # metrics from before the counts
    text = write_report(tmp_path, ["base"], [0], controls=["base"])["markdown"]
    assert "cut at the cap" not in text and "lm-evaluation-harness" not in text


def test_a_split_made_with_other_features_is_not_reused(tmp_path):
    cfg = _config(tmp_path)
    cfg.arms, cfg.seeds = ["hard"], [0]
    experiment.study.run_method(cfg, experiment.data.data_files(cfg))
    experiment.study.run_method(cfg, experiment.data.data_files(cfg))  # same settings: reused
    cfg.features = "final"
    with pytest.raises(ValueError, match="features"):
        experiment.study.run_method(cfg, experiment.data.data_files(cfg))


def test_the_demo_runs_the_shipped_study_config_with_its_own_arms_and_seeds(tmp_path, monkeypatch):
    """One copy of the study's settings: configs/embedded.yaml is the file the demo reads."""
    from datalever import demo

    repo_config = Path(__file__).parents[1] / "configs" / "embedded.yaml"
    shipped = Path(str(demo.files("datalever") / "assets" / "configs" / "embedded.yaml"))
    assert repo_config.resolve() == shipped.resolve()
    ran = []
    monkeypatch.setattr(demo, "experiment_run", ran.append)
    demo.run(demo.DemoConfig(run_dir=str(tmp_path), seeds=[4], arms=["base", "hard"], progress=False))
    demo.run(demo.DemoConfig(run_dir=str(tmp_path), overwrite=True))  # an earlier version's demo dir: started again
    study = demo.shipped_config("embedded")
    assert ran[0].arms == ["base", "hard"] and ran[0].seeds == [4] and ran[0].run_dir == str(tmp_path)
    assert not ran[0].overwrite and ran[1].overwrite
    assert ran[0].train == study.train and ran[0].profile == study.profile and ran[0].synth == study.synth
    assert study.train.model == "embedded:demo-base" and study.train.epochs == 6  # README's chosen settings


def test_a_rerun_with_other_settings_is_refused_and_overwrite_starts_again(tmp_path):
    """An experiment rerun with a new lr once reused every finished arm and rewrote its config."""
    from datalever import rundir
    from datalever.checks import ConfigError

    cfg = _config(tmp_path)
    provenance.record(tmp_path, "experiment", cfg)
    finished = rundir.RunDir(tmp_path).seed_dir("base", 0).eval.metrics
    rundir.write_json(finished, {"accuracy": 0.5})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.jsonl").write_text("{}\n")  # not made by `data synth`: never removed

    more = _config(tmp_path)
    more.seeds, more.arms = [0, 1, 2], ["base", "hard", "random"]
    experiment.study.check_same_settings(more)  # more seeds and arms: the same work, continued
    more.train.data, more.profile.train_file = "set/per/arm.jsonl", "set/by/experiment.jsonl"
    recorded = provenance.recorded_settings(tmp_path, "experiment")
    assert (
        provenance.settings_differences(recorded, more, experiment.config.NOT_COMPARED) == []
    )  # the experiment sets these

    other = _config(tmp_path)
    other.train.optim.lr *= 2
    other.eval_limit = 5
    with pytest.raises(ConfigError, match=r"eval_limit: None -> 5; train\.optim\.lr: 0\.001 -> 0\.002"):
        experiment.study.check_same_settings(other)
    assert finished.exists()

    other.overwrite = True
    experiment.study.check_same_settings(other)
    assert not finished.exists() and not (tmp_path / "arms").exists()
    assert (tmp_path / "data" / "mine.jsonl").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"arms": []}, "arms is empty"),
        ({"arms": ["base", "hardest"]}, "unknown arm 'hardest'"),
        ({"eval_split": "dev"}, "eval_split must be one of test, validation"),
        ({"train_file": "/no/such/train.jsonl"}, "train_file: no such file"),
        ({"seeds": []}, "seeds must name one seed"),
        ({"m": 1_000_000}, "m must be <= 100"),
        ({"arms": ["long"], "extra_arms": [experiment.ArmConfig("long", match_steps_of="hardest")]}, "unknown arm"),
        # a length matched to base-long's would be base's epoch length, not hard's: refused, not silently short
        (
            {"arms": ["longer"], "extra_arms": [experiment.ArmConfig("longer", match_steps_of="base-long")]},
            "longer: match_steps_of names base-long, which matches another arm's steps itself",
        ),
        ({"arms": ["self"], "extra_arms": [experiment.ArmConfig("self", match_steps_of="self")]}, "matches another"),
    ],
)
def test_the_whole_experiment_is_checked_before_any_work(tmp_path, change, match):
    """An unknown eval_split or a missing test file once failed only after profiling and training."""
    import dataclasses

    from datalever.checks import ConfigError

    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(_config(tmp_path), **change)


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "a/b", ".hidden", ""])
def test_an_arm_name_cannot_leave_the_run_directory(name):
    from datalever.checks import ConfigError

    with pytest.raises(ConfigError, match="arm name"):
        experiment.ArmConfig(name=name, data="hard")


def test_user_defined_arms_work_from_yaml_and_the_command_line(tmp_path):
    """extra_arms from a YAML file once arrived as dicts ('dict' object has no attribute 'name')."""
    from datalever.cli import read_config

    config = tmp_path / "exp.yaml"
    config.write_text(
        "run_dir: runs/x\narms: [base, hard-adam3]\n"
        "extra_arms:\n  - {name: hard-adam3, data: hard, optimizer: adamw, features: final}\n"
    )
    cfg = read_config(experiment.ExperimentConfig, config)
    arm = experiment.config.arm_spec(cfg, "hard-adam3")
    assert isinstance(arm, experiment.ArmConfig) and arm.data == "hard" and arm.features == "final"
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: [x]\nextra_arms:\n  - {name: x, data: hardest}\n")
    with pytest.raises(ValueError, match="arm x: data must be one of"):
        read_config(experiment.ExperimentConfig, bad)


def test_overlapping_splits_are_refused_before_any_work_and_recorded_when_allowed(tmp_path, monkeypatch):
    """A test file equal to the train file once ran without a word."""
    import dataclasses

    from datalever import synth
    from datalever.examples import DataError

    files = synth.write_splits(str(tmp_path / "data"), n_train=8, n_val=4, n_test=4, seed=0)
    cfg = dataclasses.replace(
        _config(tmp_path / "run"), train_file=files["train"], val_file=files["validation"], test_file=files["train"]
    )
    monkeypatch.setattr(experiment.study, "run_profile", lambda *a: pytest.fail("work started before the check"))
    with pytest.raises(DataError, match="test shares 8 of 8 examples with train"):
        experiment.run(cfg)
    clean = experiment.data.check_splits_apart(
        dataclasses.replace(cfg, test_file=files["test"]),
        experiment.data.data_files(dataclasses.replace(cfg, test_file=files["test"])),
    )
    assert clean == {"splits": ["train", "validation", "test"], "overlaps": []}
    allowed = experiment.data.check_splits_apart(
        dataclasses.replace(cfg, allow_overlap=True), experiment.data.data_files(cfg)
    )
    assert [(o["first"], o["second"], o["count"]) for o in allowed["overlaps"]] == [("train", "test", 8)]
