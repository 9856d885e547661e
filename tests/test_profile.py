"""The profile stage: recorded losses against brute force, store format, kill-and-resume, refusals, several processes.

The references are independent of the recording path: weights are taken from the proxy's saved
final model (and, for intermediate steps, copied out of the training loop by a hook that runs
before the recording hook), and each example's loss is the model's own batch-size-1 `labels=`
loss. Resume tests compare whole pyarrow tables for exact equality with an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from datalever import profile, rundir, synth
from datalever.checks import ConfigError
from datalever.examples import load_examples
from datalever.models import load_model, load_tokenizer, resolve_model
from datalever.optim import OptimConfig
from datalever.profile import ProfileConfig, ProfileError, record_steps
from datalever.rundir import RunDir
from datalever.tokens import IGNORE, encode_example
from datalever.trajectories import loss_column
from launchers import fsdp_command

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 128
# 49 examples (48 + 1 long), batch 8, a whole epoch: 7 proxy steps, recorded at steps 2, 5, 7.
SETTINGS = dict(
    proxy="preset:tiny",
    fraction=1.0,
    checkpoints=3,
    batch_size=8,
    micro_batch_size=4,
    max_length=MAX_LENGTH,
    token_budget=1024,
    optim=OptimConfig(lr=3e-3),
    seed=0,
    progress=False,
)
STEPS = [2, 5, 7]
LONG_QUESTION = "How many apples are left after " + "and then Tom gives some away " * 150 + "?"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Data (48 synth examples + one whose response max_length cuts away) and the tiny preset, built once."""
    root = tmp_path_factory.mktemp("profile")
    paths = synth.write_splits(str(root / "data"), n_train=48, n_val=8, n_test=8, seed=0)
    with open(paths["train"], "a") as f:
        f.write(json.dumps({"question": LONG_QUESTION, "answer": "Nothing is left.\n#### 0"}) + "\n")
    model = resolve_model("preset:tiny", seed=0)  # built into the tests' preset cache once
    return {"train": paths["train"], "model": model}


def new_run_dir(prepared, path: Path) -> Path:
    """A run directory with the data where the profile looks for it."""
    (path / "data").mkdir(parents=True)
    shutil.copy(prepared["train"], path / "data" / "train.jsonl")
    return path


def config(run_dir: Path, **over) -> ProfileConfig:
    return ProfileConfig(run_dir=str(run_dir), **{**SETTINGS, **over})


def wrap_train(monkeypatch, before=None, after=None):
    """Run `before(step, model, accelerator)` / `after(...)` around the profile's own train hook."""
    real = profile.train_run

    def train_run(cfg, on_step=None, checkpoint_steps=None):
        def hook(step, record, model, accelerator):
            if before:
                before(step, model, accelerator)
            on_step(step, record, model, accelerator)
            if after:
                after(step, model, accelerator)

        return real(cfg, on_step=hook, checkpoint_steps=checkpoint_steps)

    monkeypatch.setattr(profile, "train_run", train_run)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """An uninterrupted run, with the proxy's weights copied out of the loop at every recorded step."""
    run_dir = new_run_dir(prepared, tmp_path_factory.mktemp("reference"))
    weights = {}

    def capture(step, model, accelerator):
        if step in STEPS:
            inner = accelerator.unwrap_model(model).model
            weights[step] = {k: v.detach().clone() for k, v in inner.state_dict().items()}

    with pytest.MonkeyPatch.context() as mp:
        wrap_train(mp, before=capture)
        meta = profile.run(config(run_dir))
    return {"run_dir": run_dir, "meta": meta, "table": pq.read_table(RunDir(run_dir).trajectories), "weights": weights}


def brute_force(model, tokenizer, examples) -> dict[str, float]:
    """Each example alone, no padding, the model's own `labels=` mean loss (NaN when no response token is left)."""
    out = {}
    model.eval()
    with torch.no_grad():
        for ex in examples:
            enc = encode_example(tokenizer, ex, MAX_LENGTH)
            if enc.fully_truncated:
                out[ex.id] = math.nan
                continue
            ids = torch.tensor([enc.input_ids])
            labels = ids.clone()
            labels[0, : max(enc.n_prompt, 1)] = IGNORE
            out[ex.id] = model(input_ids=ids, labels=labels).loss.item()
    return out


def assert_same_table(got, want):
    """Exact equality of every column (NaN equal to NaN), with the first difference named."""
    assert got.schema.equals(want.schema), (got.schema, want.schema)
    for name in want.column_names:
        g, w = got.column(name).to_pylist(), want.column(name).to_pylist()
        diffs = [
            (i, a, b)
            for i, (a, b) in enumerate(zip(g, w))
            if a != b and not (isinstance(a, float) and math.isnan(a) and math.isnan(b))
        ]
        assert not diffs and len(g) == len(w), (name, diffs[:3])
    # (Table.equals alone cannot be used: Arrow compares NaN unequal to itself, and flagged rows hold NaN.)


def assert_column_matches(table, column, ref: dict[str, float]):
    for id_, got in zip(table.column("id").to_pylist(), table.column(column).to_pylist()):
        if math.isnan(ref[id_]):
            assert math.isnan(got), id_
        else:
            assert got == pytest.approx(ref[id_], abs=1e-5, rel=1e-5), (column, id_)


# ----------------------------------------------------------------------------- steps


def test_record_steps_are_evenly_spaced_distinct_and_end_at_the_last_step():
    assert record_steps(7, 3) == STEPS
    assert record_steps(10, 5) == [2, 4, 6, 8, 10]
    assert record_steps(5, 5) == [1, 2, 3, 4, 5]
    assert record_steps(9, 1) == [9]
    for n in range(1, 60):
        for k in range(1, n + 1):
            s = record_steps(n, k)
            assert len(s) == k and s[-1] == n and s[0] >= 1 and all(a < b for a, b in zip(s, s[1:]))
    with pytest.raises(ValueError, match="do not fit"):
        record_steps(3, 4)
    with pytest.raises(ValueError):
        record_steps(3, 0)


# ----------------------------------------------------------------------------- correctness


def test_final_column_equals_brute_force_loss_of_the_saved_final_proxy(reference):
    run_dir = reference["run_dir"]
    model_dir = run_dir / "profile" / "model"
    examples = load_examples(str(run_dir / "data" / "train.jsonl"))
    ref = brute_force(load_model(str(model_dir)), load_tokenizer(str(model_dir)), examples)
    assert_column_matches(reference["table"], loss_column(STEPS[-1]), ref)


def test_every_column_equals_brute_force_loss_of_the_weights_at_that_step(reference, prepared):
    run_dir = reference["run_dir"]
    examples = load_examples(str(run_dir / "data" / "train.jsonl"))
    tokenizer = load_tokenizer(str(prepared["model"]))
    assert sorted(reference["weights"]) == STEPS
    previous = None
    for step in STEPS:
        model = load_model(str(prepared["model"]))
        model.load_state_dict(reference["weights"][step])
        ref = brute_force(model, tokenizer, examples)
        assert_column_matches(reference["table"], loss_column(step), ref)
        if previous is not None:  # the proxy did move between checkpoints: the columns are not one column repeated
            assert reference["table"].column(loss_column(step)).to_pylist() != previous
        previous = reference["table"].column(loss_column(step)).to_pylist()


def test_the_loss_before_training_is_the_untrained_proxys(reference, prepared):
    """Token-weighted over the examples that keep a response: each example alone, brute force."""
    examples = load_examples(str(reference["run_dir"] / "data" / "train.jsonl"))
    tokenizer = load_tokenizer(str(prepared["model"]))
    ref = brute_force(load_model(str(prepared["model"])), tokenizer, examples)
    tokens = {ex.id: encode_example(tokenizer, ex, MAX_LENGTH).n_response for ex in examples}
    kept = [i for i, loss in ref.items() if not math.isnan(loss)]
    want = sum(ref[i] * tokens[i] for i in kept) / sum(tokens[i] for i in kept)
    assert reference["meta"]["initial_per_token_loss"] == pytest.approx(want, rel=1e-5)


def test_store_format_step_order_and_flagged_examples(reference):
    table, meta = reference["table"], reference["meta"]
    assert table.column_names == ["id", "source", "n_tokens", "n_cut", "flag"] + [loss_column(s) for s in STEPS]
    assert meta["steps"] == meta["planned_steps"] == STEPS and meta["complete"] is True
    assert meta["loss_columns"] == [loss_column(s) for s in STEPS]
    assert meta["proxy_steps"] == 7 and meta["seed"] == 0 and meta["proxy"]["model_type"] == "llama"
    assert meta["data_fingerprint"] and meta["versions"]["torch"] == torch.__version__
    assert len(meta["record_wall_s"]) == len(STEPS) and meta["record_tokens"] > 0

    rows = table.to_pylist()
    examples = load_examples(str(reference["run_dir"] / "data" / "train.jsonl"))
    assert [r["id"] for r in rows] == [ex.id for ex in examples]  # the training file's order
    flagged = [r for r in rows if r["flag"]]
    assert len(flagged) == 1 and flagged[0]["flag"] == "truncated" and flagged[0]["n_tokens"] == 0
    # The response tokens max_length cut, counted by hand: what does not fit after the prompt (+ EOS).
    tokenizer = load_tokenizer(resolve_model("preset:tiny"))
    for ex, r in zip(examples, rows):
        n_prompt = len(tokenizer(ex.prompt)["input_ids"])
        n_response = len(tokenizer(ex.response, add_special_tokens=False)["input_ids"]) + 1
        assert r["n_cut"] == n_response - min(n_response, max(MAX_LENGTH - n_prompt, 0)), ex.id
    assert meta["truncation"]["n_cut"] == sum(r["n_cut"] > 0 for r in rows) and meta["truncation"]["n_cut_whole"] == 1
    assert meta["truncation"]["needed_length"] > MAX_LENGTH
    assert all(math.isnan(flagged[0][loss_column(s)]) for s in STEPS)
    assert meta["n_flagged"] == 1 and meta["flag_counts"] == {"truncated": 1}
    for r in rows:
        if not r["flag"]:
            assert r["n_tokens"] > 0 and all(math.isfinite(r[loss_column(s)]) and r[loss_column(s)] > 0 for s in STEPS)


# ----------------------------------------------------------------------------- kill and resume


def test_killed_after_the_parquet_before_the_meta_resumes_to_the_same_table(reference, prepared, tmp_path, monkeypatch):
    run_dir = new_run_dir(prepared, tmp_path / "run")
    real_write_json = rundir.write_json
    parquet_writes = []
    monkeypatch.setattr(
        rundir, "write_parquet", lambda p, t, real=rundir.write_parquet: (parquet_writes.append(p), real(p, t))
    )

    def write_json(path, obj):
        # Killed once the second column's parquet is written, before its meta.
        if Path(path) == RunDir(run_dir).trajectories_meta and len(parquet_writes) == 2:
            raise Killed()
        real_write_json(path, obj)

    monkeypatch.setattr(rundir, "write_json", write_json)
    with pytest.raises(Killed):
        profile.run(config(run_dir))
    monkeypatch.undo()
    # The parquet holds a column the meta never committed; the rerun records it again.
    assert pq.read_table(RunDir(run_dir).trajectories).column_names[-2:] == [loss_column(2), loss_column(5)]
    assert rundir.read_json(RunDir(run_dir).trajectories_meta)["steps"] == [2]
    meta = profile.run(config(run_dir))
    assert meta["complete"] and meta["steps"] == STEPS
    assert_same_table(pq.read_table(RunDir(run_dir).trajectories), reference["table"])


def test_killed_in_the_train_loop_resumes_to_the_same_table(reference, prepared, tmp_path, monkeypatch):
    run_dir = new_run_dir(prepared, tmp_path / "run")

    def kill_at(step_to_kill):
        def after(step, model, accelerator):
            if step == step_to_kill:
                raise Killed()

        return after

    # Between checkpoints (after step 2's checkpoint, before step 5), then right after step 5 was
    # recorded but before its proxy checkpoint was saved, then at the last step (store full, proxy unfinished).
    for kill in (3, 5, 7):
        wrap_train(monkeypatch, after=kill_at(kill))
        with pytest.raises(Killed):
            profile.run(config(run_dir))
        monkeypatch.undo()
        assert not rundir.read_json(RunDir(run_dir).trajectories_meta)["complete"]
    assert rundir.read_json(RunDir(run_dir).trajectories_meta)["steps"] == STEPS
    assert not (run_dir / "profile" / "train_summary.json").exists()
    meta = profile.run(config(run_dir))
    assert meta["complete"] and (run_dir / "profile" / "train_summary.json").exists()
    assert_same_table(pq.read_table(RunDir(run_dir).trajectories), reference["table"])


KILLABLE = """
import sys, time, torch
torch.set_num_threads(1)
import datalever.profile as p
real = p.train_run
def slow(cfg, on_step=None, checkpoint_steps=None):
    def hook(*a):
        on_step(*a)
        time.sleep(0.4)  # room for the kill to land inside the run
    return real(cfg, on_step=hook, checkpoint_steps=checkpoint_steps)
p.train_run = slow
from datalever.cli import main
main(sys.argv[1:])
"""


def cli_args(run_dir: Path) -> list[str]:
    args = ["profile", "--run_dir", str(run_dir)]
    for k, v in SETTINGS.items():
        if isinstance(v, OptimConfig):  # a nested config: its options as --optim.name, --optim.lr
            args += [f"--{k}.name", v.name, f"--{k}.lr", str(v.lr)]
        else:
            args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return args


def test_sigkilled_cli_run_resumes_to_the_same_table(reference, prepared, tmp_path):
    run_dir = new_run_dir(prepared, tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, *cli_args(run_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    meta_path = RunDir(run_dir).trajectories_meta
    try:
        # Generous: on a loaded 2-core machine the first column can take minutes to appear.
        deadline = time.monotonic() + 600
        first_column_in = False
        while time.monotonic() < deadline and proc.poll() is None:
            if meta_path.exists() and rundir.read_json(meta_path)["steps"]:
                first_column_in = True
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert first_column_in, "the profile wrote no column within 600 s"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert not rundir.read_json(meta_path)["complete"]
    meta = profile.run(config(run_dir))
    assert meta["complete"]
    assert_same_table(pq.read_table(RunDir(run_dir).trajectories), reference["table"])


# ----------------------------------------------------------------------------- refusals and completed runs


def test_completed_run_returns_at_once_and_other_settings_are_refused(reference, monkeypatch):
    run_dir = reference["run_dir"]

    def must_not_train(*a, **k):
        raise AssertionError("a completed profile trained again")

    monkeypatch.setattr(profile, "train_run", must_not_train)
    t0 = time.perf_counter()
    meta = profile.run(config(run_dir, progress=True))  # display settings are not part of the identity
    assert time.perf_counter() - t0 < 5 and meta == reference["meta"]
    with pytest.raises(ProfileError, match=r"other settings.*checkpoints: store has 3, asked 4"):
        profile.run(config(run_dir, checkpoints=4))
    with pytest.raises(ProfileError, match="lr"):
        profile.run(config(run_dir, optim=OptimConfig(lr=1e-4)))


def test_other_data_is_refused(reference, prepared, tmp_path):
    run_dir = reference["run_dir"]
    other = tmp_path / "train.jsonl"
    lines = Path(prepared["train"]).read_text().splitlines()
    other.write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(ProfileError, match="training data"):
        profile.run(config(run_dir, data=str(other)))


def test_leftovers_without_meta_are_refused(prepared, tmp_path):
    run_dir = new_run_dir(prepared, tmp_path / "run")
    (run_dir / "profile" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ProfileError, match="no trajectories.meta.json"):
        profile.run(config(run_dir))


# ----------------------------------------------------------------------------- several processes


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("launcher", ["torchrun", "fsdp"])
def test_two_processes_write_the_same_store_as_one(reference, prepared, tmp_path, launcher):
    """DDP through torchrun, and FSDP2 through `accelerate launch` with configs/accelerate/fsdp2.yaml
    (the proxy sharded; every rank then runs as many scoring forwards as the others, or FSDP would hang)."""
    run_dir = new_run_dir(prepared, tmp_path / "run")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    settings = rundir.to_jsonable({"run_dir": str(run_dir), **SETTINGS})  # the nested optim config as its fields
    script = [str(REPO / "tests" / "multiproc" / "profile_run.py"), json.dumps(settings)]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
    else:
        cmd = fsdp_command(*script)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    summary = rundir.read_json(run_dir / "profile" / "train_summary.json")
    assert summary["distributed_type"] == ("FSDP" if launcher == "fsdp" else "MULTI_CPU")
    table = pq.read_table(RunDir(run_dir).trajectories)
    meta = rundir.read_json(RunDir(run_dir).trajectories_meta)
    assert meta["complete"] and meta["steps"] == STEPS and meta["n_flagged"] == 1
    assert rundir.read_json(run_dir / "profile" / "train_summary.json")["world_size"] == 2
    ref = reference["table"]
    assert table.column_names == ref.column_names
    for name in ["id", "source", "n_tokens", "flag"]:
        assert table.column(name).equals(ref.column(name))
    for step in STEPS:
        got, want = table.column(loss_column(step)).to_pylist(), ref.column(loss_column(step)).to_pylist()
        for g, w in zip(got, want):
            assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, abs=1e-5, rel=1e-5), step


def test_the_pass_before_training_counts_in_what_profiling_cost(reference):
    """K recorded passes and the one of the untrained proxy: K + 1 forwards over the examples."""
    from datalever.report import proxy_compute

    meta = reference["meta"]
    summary = rundir.read_json(RunDir(reference["run_dir"]).proxy.summary)
    got = proxy_compute(RunDir(reference["run_dir"]))
    assert meta["initial_wall_s"] > 0
    assert got["record_flops"] == 2.0 * summary["n_params"] * meta["record_tokens"] * (len(STEPS) + 1)
    assert got["record_wall_s"] == pytest.approx(sum(meta["record_wall_s"].values()) + meta["initial_wall_s"])


# ----------------------------------------------------------------------------- the schedule's horizon


def test_a_proxy_can_be_the_start_of_a_longer_schedule(prepared, tmp_path):
    """fraction 1 of 49 examples in batches of 8: 7 steps; schedule_epochs 3: a 19-step cosine (warmup 3%: 1 step),
    of which the proxy runs the first 7, its learning rate read from its log against the hand-computed cosine."""
    run_dir = new_run_dir(prepared, tmp_path / "run")
    meta = profile.run(config(run_dir, schedule_epochs=3.0, warmup_ratio=0.03))
    assert meta["steps"] == STEPS and meta["proxy_steps"] == 7  # the same recorded steps as a 7-step run
    log = [json.loads(line) for line in (run_dir / "profile" / "train_log.jsonl").read_text().splitlines()]
    peak, horizon = 3e-3, math.ceil(3.0 * 49 / 8)  # 3 epochs of 49 examples in batches of 8: 19 steps
    warmup = math.ceil(0.03 * horizon)  # 1

    def expected(step):  # the update with index step - 1, as the loop sets it before stepping
        s = step - 1
        if s < warmup:
            return peak * s / warmup
        return peak * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (horizon - warmup)))

    assert [r["step"] for r in log] == list(range(1, 8))
    assert [r["lr"] for r in log] == pytest.approx([expected(s) for s in range(1, 8)], rel=1e-9)
    assert log[-1]["lr"] > 0.8 * peak  # near its peak at the last recorded step, not decayed to 0
    summary = rundir.read_json(run_dir / "profile" / "train_summary.json")
    assert summary["steps"] == 7 and summary["schedule_steps"] == horizon
    with pytest.raises(ConfigError, match="schedule_epochs=0.5 must be at least fraction=1.0"):
        config(run_dir, schedule_epochs=0.5)
