"""`datalever train` end to end on a tiny preset: optimizers, LoRA, kill-and-resume, logs, manifests, DDP.

Every check uses its own reference: the training loss is measured with the loss engine
(`score_examples`) on the saved models, not read from the run's log; resumed weights are compared
with an uninterrupted run's weights bit for bit; the learning rates with values computed by hand.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datalever import checks, cli, train
from datalever.examples import load_examples, save_examples
from datalever.losses import score_examples
from datalever.models import load_model, load_tokenizer, resolve_model
from datalever.optim import OptimConfig
from datalever.rundir import CheckpointDir, TrainDir, to_jsonable
from datalever.train import LoraConfig, TrainConfig, inputs, logs, loop, order
from factories import read_log, synth_splits, weights
from factories import train_config as config
from launchers import free_port, fsdp_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth_splits(tmp_path_factory, n_train=64, n_val=16, n_test=16)


@pytest.fixture(scope="module")
def preset() -> str:
    """The untrained tiny preset every run starts from (built once into the tests' preset cache)."""
    return resolve_model("preset:tiny", seed=0)


def mean_loss(model_dir: str, examples) -> float:
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    scores = score_examples(model, tok, examples, max_length=512)
    return sum(s.loss for s in scores.values()) / len(scores)


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", ["adamw", "muon", "sam"])
def test_each_optimizer_lowers_training_loss(data, preset, tmp_path, name):
    cfg = config(data, tmp_path / name, optim=OptimConfig(name=name, lr=3e-3, sam_rho=0.05))
    summary = train.run(cfg)
    examples = load_examples(data["train"])
    before = mean_loss(preset, examples)
    after = mean_loss(str(TrainDir(cfg.out).model), examples)
    assert before > math.log(512) - 0.5  # an untrained model: near uniform over the vocabulary
    assert after < before - 0.3, (name, before, after)
    assert TrainDir(cfg.out).summary.exists()
    passes = 2 if name == "sam" else 1
    assert summary["compute"]["forwards"] == summary["compute"]["backwards"] == 8 * 2 * passes  # 2 micro-batches


# ----------------------------------------------------------------------------- LoRA


def test_lora_changes_only_adapters_and_final_model_is_merged(data, preset, tmp_path):
    out = tmp_path / "lora"
    cfg = config(
        data,
        out,
        lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"]),
        save_dtype="float32",  # compared with float32 weights below (on a GPU, auto would save bf16)
    )
    seen: dict[str, torch.Tensor] = {}

    def grab(step, record, model, accelerator):  # the PEFT model before merging, after the last step
        if step == cfg.max_steps:
            seen.update({k: v.detach().clone() for k, v in accelerator.unwrap_model(model).model.state_dict().items()})

    summary = train.run(cfg, on_step=grab)
    initial = weights(preset)
    assert summary["trainable_params"] < summary["n_params"] / 5

    base = {
        k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v for k, v in seen.items() if "lora_" not in k
    }
    assert set(base) == set(initial)
    for k, v in initial.items():
        assert torch.equal(base[k], v), f"base weight {k} changed under LoRA"
    lora_b = [v for k, v in seen.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 2 and all(v.abs().max() > 0 for v in lora_b)  # 2 layers x (q, v); B starts at 0

    final = weights(TrainDir(out).model)
    assert set(final) == set(initial)  # a plain HF model: no adapter keys left
    for k, v in initial.items():
        if ".q_proj." in k or ".v_proj." in k:
            assert not torch.equal(final[k], v), f"{k}: the merged adapter should change it"
        else:
            assert torch.equal(final[k], v), f"{k} is not adapted and must be unchanged"
    assert (TrainDir(out).adapter / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------- kill and resume


class Killed(Exception):
    pass


def run_until_killed(cfg: TrainConfig, step: int) -> None:
    """Train and die right after `step` (an exception from the step hook, before that step's checkpoint)."""

    def kill(at, *_):
        if at == step:
            raise Killed

    with pytest.raises(Killed):
        train.run(cfg, on_step=kill)


@pytest.mark.parametrize("name,lora", [("adamw", False), ("sam", False), ("muon", False), ("adamw", True)])
def test_kill_and_resume_ends_with_the_same_weights(data, tmp_path, name, lora):
    """Checkpoints every 2 steps; killed at step 5 (after step 4's checkpoint), resumed, compared exactly.

    The LoRA case has dropout on the adapters, so it also checks that the RNG state is restored.
    """
    kw = dict(
        max_steps=6, save_every=2, optim=OptimConfig(name=name, lr=3e-3), lora=LoraConfig(enabled=lora, dropout=0.1)
    )
    ref = config(data, tmp_path / "ref", **kw)
    train.run(ref)

    cfg = config(data, tmp_path / "killed", **kw)

    run_until_killed(cfg, 5)
    assert not TrainDir(cfg.out).summary.exists()
    assert [r["step"] for r in read_log(cfg.out)] == [1, 2, 3, 4, 5]

    resumed_steps = []
    train.run(cfg, on_step=lambda step, *_: resumed_steps.append(step))
    assert resumed_steps == [5, 6]  # resumed from step 4, not restarted

    a, b = weights(TrainDir(ref.out).model), weights(TrainDir(cfg.out).model)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref_log, log = read_log(ref.out), read_log(cfg.out)
    assert [r["step"] for r in log] == list(range(1, 7))  # the lines written after the checkpoint are redone once
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]
    assert log[-1]["compute_forwards"] == ref_log[-1]["compute_forwards"]


def test_resume_refuses_a_checkpoint_of_other_settings(data, tmp_path):
    cfg = config(data, tmp_path / "run", max_steps=4, save_every=2)

    run_until_killed(cfg, 3)
    with pytest.raises(RuntimeError, match="other settings"):
        train.run(config(data, tmp_path / "run", max_steps=4, save_every=2, optim=OptimConfig(name="adamw", lr=1e-3)))


# ----------------------------------------------------------------------------- logs and schedule


def test_log_has_loss_lr_throughput_compute_and_follows_warmup_cosine(data, tmp_path):
    cfg = config(
        data,
        tmp_path / "log",
        max_steps=10,
        warmup_ratio=0.2,
        optim=OptimConfig(name="adamw", lr=1e-3),
        eval_every=5,
    )
    train.run(cfg)
    log = read_log(cfg.out)
    assert [r["step"] for r in log] == list(range(1, 11))
    for r in log:
        for key in (
            "loss",
            "lr",
            "tokens_per_s",
            "grad_norm",
            "compute_optimizer_steps",
            "compute_forwards",
            "compute_backwards",
            "compute_tokens",
            "compute_flops",
            "compute_wall_s",
        ):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (r["step"], key)
        assert r["tokens_per_s"] > 0 and r["compute_optimizer_steps"] == r["step"]
        assert r["compute_forwards"] == 2 * r["step"]  # 8 examples in micro-batches of 4
    assert all(b["compute_flops"] > a["compute_flops"] for a, b in zip(log, log[1:]))
    assert [("val_loss" in r) for r in log] == [s in (5, 10) for s in range(1, 11)]
    # Warmup = ceil(0.2 * 10) = 2 updates (lr 0, then half), then cosine over the 8 remaining ones:
    # lr_k = 1e-3 * (1 + cos(pi * (k - 3) / 8)) / 2 for the k-th update, k = 3..10.
    expected = [
        0.0,
        0.5e-3,
        1e-3,
        0.9619397662556434e-3,
        0.8535533905932737e-3,
        0.6913417161825449e-3,
        0.5e-3,
        0.3086582838174551e-3,
        0.1464466094067262e-3,
        0.0380602337443566e-3,
    ]
    assert [r["lr"] for r in log] == pytest.approx(expected, abs=1e-12)
    summary = json.loads(TrainDir(cfg.out).summary.read_text())
    assert summary["final_val_loss"] == log[-1]["val_loss"]
    assert summary["compute"]["flops"] == log[-1]["compute_flops"]


# ----------------------------------------------------------------------------- manifest


def test_manifest_multiplicities_are_what_the_loop_trains_on(data, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    examples = load_examples(data["train"])
    mult = {ex.id: [1, 2, 0, 3][i % 4] for i, ex in enumerate(examples)}  # 96 draws per epoch
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"id": list(mult), "multiplicity": list(mult.values())}), manifest)

    trained = collections.Counter()
    real = loop.micro_batches

    def spy(encoded, *args, **kwargs):
        if len(encoded) == 8:  # the training batches (validation uses other calls)
            trained.update(e.id for e in encoded)
        return real(encoded, *args, **kwargs)

    monkeypatch.setattr(loop, "micro_batches", spy)
    cfg = config(data, tmp_path / "run", manifest=str(manifest), max_steps=None, epochs=1.0, val_data=None)
    summary = train.run(cfg)
    assert summary["steps"] == 96 // 8 and summary["epoch_len"] == 96
    assert trained == collections.Counter({k: v for k, v in mult.items() if v})

    # The stream alone, over the next epochs: exactly the multiplicities again, in a new order.
    ex_list, m = inputs.load_training_data(cfg)
    stream = order.ExampleStream(m, seed=0)
    e1, e2 = stream.take(96, 96), stream.take(192, 96)
    for epoch in (e1, e2):
        assert collections.Counter(ex_list[i].id for i in epoch) == collections.Counter(
            {k: v for k, v in mult.items() if v}
        )
    assert e1 != e2


# ----------------------------------------------------------------------------- dtype


def test_bf16_checkpoint_is_trained_with_float32_weights(data, preset, tmp_path):
    src = load_model(preset)
    src.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    load_tokenizer(preset).save_pretrained(tmp_path / "bf16")
    # save_dtype float32: on a GPU, bf16 autocast would save the final model in bf16 (save_dtype auto)
    cfg = config(data, tmp_path / "run", model=str(tmp_path / "bf16"), max_steps=1, val_data=None, save_dtype="float32")
    train.run(cfg)
    assert {v.dtype for v in weights(TrainDir(cfg.out).model).values()} == {torch.float32}


# ----------------------------------------------------------------------------- what the output directory holds


def copy_file(src, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return str(dst)


def keep_lines(path: Path, n: int) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))


def edit_first_response(path: Path) -> None:
    """One response changed under its id (a file in datalever's own schema, whose ids are given, not hashed)."""
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["response"] = "So the answer is:\n" + record["response"]
    path.write_text(json.dumps(record) + "\n" + "".join(lines[1:]))


def tree_digest(root: Path) -> dict[str, str]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def error_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("change", ["lr", "max_steps", "data"])
def test_a_finished_run_of_other_work_is_refused_not_returned(data, tmp_path, change):
    """Before: the old summary came back (exit 0) whatever changed. The refusal names what changed, and the
    finished run is left exactly as it was."""
    train_file = tmp_path / "train.jsonl"
    first = config(data, tmp_path / "run", data=copy_file(data["train"], train_file), max_steps=2)
    train.run(first)
    before = tree_digest(tmp_path / "run")
    if change == "lr":
        second, named = dataclasses.replace(first, optim=OptimConfig(name="adamw", lr=1e-3)), "optim.lr 0.003 -> 0.001"
    elif change == "max_steps":
        second, named = dataclasses.replace(first, max_steps=3), "max_steps 2 -> 3"
    else:
        keep_lines(train_file, 32)  # the same path, half the rows
        second, named = first, "data: other content"
    with pytest.raises(RuntimeError) as err:  # outputs.OtherRunError
        train.run(second)
    message = error_line(err)
    assert named in message and "--out" in message and "--overwrite true" in message, message
    assert tree_digest(tmp_path / "run") == before


def test_settings_that_change_no_number_return_the_finished_run(data, tmp_path):
    """progress, log_with, save_every, keep_last, micro_batch_size (the same sum in other passes),
    trust_remote_code, overwrite, the data's path (a copy of the same content), and values left unused (epochs under
    max_steps, LoRA's rank with LoRA off, Muon's lr under AdamW) are not other work."""
    first = config(data, tmp_path / "run", max_steps=2)
    summary = train.run(first)
    again = dataclasses.replace(
        first,
        data=copy_file(data["train"], tmp_path / "moved" / "train.jsonl"),
        progress=True,
        log_with=["tensorboard"],
        save_every=1,
        keep_last=3,
        micro_batch_size=2,
        trust_remote_code=True,
        overwrite=True,
        epochs=1.0,
        lora=LoraConfig(enabled=False, r=4),
        optim=OptimConfig(name="adamw", lr=3e-3, muon_lr=1e-2),
    )
    steps = []
    assert train.run(again, on_step=lambda step, *_: steps.append(step)) == summary
    assert steps == []  # returned, not trained again (overwrite replaces other work only)


def test_overwrite_replaces_only_what_train_wrote(data, tmp_path):
    """--overwrite true: the earlier run's files go (all of them: checkpoints, tracker logs), the user's stay, and
    the new run is exactly a fresh run in an empty directory."""
    out = tmp_path / "run"
    train.run(config(data, out, max_steps=2, save_every=1, keep_last=5, log_with=["tensorboard"]))
    assert (out / logs.TRACKER_PROJECT).is_dir()
    (out / "wandb" / "run-1").mkdir(parents=True)  # what wandb writes there (tracker_init_kwargs)
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "train.jsonl").write_text("{}\n")
    kw = dict(max_steps=3, optim=OptimConfig(name="adamw", lr=1e-3))
    summary = train.run(config(data, out, overwrite=True, **kw))
    fresh = train.run(config(data, tmp_path / "fresh", **kw))

    a, b = weights(TrainDir(out).model), weights(TrainDir(tmp_path / "fresh").model)
    assert all(torch.equal(a[k], b[k]) for k in b) and set(a) == set(b)
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(tmp_path / "fresh")]
    assert summary["steps"] == fresh["steps"] == 3
    # The earlier run's checkpoints went; the new run's last one (step 3) held model/'s weights and went too.
    assert not TrainDir(out).checkpoints.exists()
    assert not (out / logs.TRACKER_PROJECT).exists() and not (out / "wandb").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine" / "train.jsonl").read_text() == "{}\n"


def test_an_output_directory_without_train_s_record_is_refused(data, preset, tmp_path):
    """A model/ that train did not record making (another tool's, or an earlier version's) is not replaced."""
    shutil.copytree(preset, tmp_path / "run" / "model")
    before = tree_digest(tmp_path / "run")
    with pytest.raises(RuntimeError) as err:  # outputs.OtherRunError
        train.run(config(data, tmp_path / "run", max_steps=1))
    assert "no record of the run that made them" in error_line(err)
    assert tree_digest(tmp_path / "run") == before


def test_a_checkpoint_is_checked_against_the_run_too(data, tmp_path):
    """The checkpoint's own identity is compared as well (a checkpoint copied in from another run)."""
    cfg = config(data, tmp_path / "run", max_steps=4, save_every=2)
    run_until_killed(cfg, 3)
    state_file = CheckpointDir(TrainDir(cfg.out).checkpoint(2)).trainer_state
    state = torch.load(state_file, weights_only=True)
    saved = json.loads(state["identity"])
    saved["settings"]["optim"]["lr"] = 1e-3
    state["identity"] = json.dumps(saved, sort_keys=True)
    torch.save(state, state_file)
    with pytest.raises(RuntimeError) as err:
        train.run(cfg)
    assert "optim.lr 0.001 -> 0.003" in error_line(err)


@pytest.mark.parametrize("change", ["fewer rows", "edited text", "validation data", "multiplicities"])
def test_resume_refuses_a_checkpoint_of_other_data_under_the_same_path(data, tmp_path, change):
    """Before: replacing train.jsonl under the same path resumed the checkpoint and changed the run's length.
    The checkpoint is kept; the original content under another path resumes it (the content counts, not the
    path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    save_examples(str(tmp_path / "in" / "train.jsonl"), load_examples(data["train"]))
    files = {
        "data": str(tmp_path / "in" / "train.jsonl"),
        "val_data": copy_file(data["validation"], tmp_path / "in" / "val.jsonl"),
        "manifest": str(tmp_path / "in" / "manifest.parquet"),
    }
    ids = [ex.id for ex in load_examples(data["train"])]
    pq.write_table(pa.table({"id": ids, "multiplicity": [1] * len(ids)}), files["manifest"])
    cfg = config(data, tmp_path / "run", max_steps=None, epochs=1.0, save_every=2, **files)  # 64 / 8 = 8 steps
    run_until_killed(cfg, 3)
    originals = {k: copy_file(v, tmp_path / "kept" / Path(v).name) for k, v in files.items()}

    if change == "fewer rows":
        keep_lines(Path(files["data"]), 32)
    elif change == "edited text":
        edit_first_response(Path(files["data"]))
    elif change == "validation data":
        keep_lines(Path(files["val_data"]), 8)
    else:
        pq.write_table(pa.table({"id": ids, "multiplicity": [2] + [1] * (len(ids) - 1)}), files["manifest"])
    named = {"validation data": "val_data: other content", "multiplicities": "multiplicities: other content"}
    with pytest.raises(RuntimeError) as err:
        train.run(cfg)
    assert named.get(change, "data: other content") in error_line(err)
    assert TrainDir(cfg.out).checkpoint(2).is_dir() and not TrainDir(cfg.out).summary.exists()

    resumed = []
    train.run(dataclasses.replace(cfg, **originals), on_step=lambda step, *_: resumed.append(step))
    assert resumed == [3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("where", ["model in out", "out in model", "data in out"])
def test_outputs_never_overlap_inputs(data, preset, tmp_path, where):
    """Before: `--model D/model --out D` replaced the model being fine-tuned with the result. Refused in one line,
    and the inputs are untouched."""
    d = tmp_path / "D"
    if where == "model in out":
        shutil.copytree(preset, d / "model")
        cfg = config(data, d, model=str(d / "model"), max_steps=1)
    elif where == "out in model":
        shutil.copytree(preset, d)
        cfg = config(data, d / "finetuned", model=str(d), max_steps=1)
    else:
        cfg = config(data, d, data=copy_file(data["train"], d / "checkpoints" / "train.jsonl"), max_steps=1)
    before = tree_digest(d)
    with pytest.raises(checks.ConfigError) as err:
        train.run(cfg)
    assert "overlaps" in error_line(err)
    assert tree_digest(d) == before


# ----------------------------------------------------------------------------- option values


@pytest.mark.parametrize(
    "name,value",
    [
        ("max_grad_norm", -1.0),  # would turn descent into ascent
        ("max_grad_norm", 0.0),
        ("epochs", 0.0),
        ("epochs", -1.0),
        ("max_steps", -5),
        ("max_steps", 0),
        ("save_every", -1),
        ("eval_every", -1),
        ("batch_size", 0),
        ("micro_batch_size", 0),
        ("max_length", 0),
        ("keep_last", 0),
        ("warmup_ratio", -0.1),
        ("warmup_ratio", 1.5),
        ("min_lr_ratio", 1.01),
        ("seed", -1),
        ("dtype", "float64"),
        ("mixed_precision", "fp8"),
        ("attn_implementation", "flash_attention_3"),
        ("tf32", "yes"),
        ("gradient_checkpointing", None),
        ("group_by_length", "no"),
        ("torch_compile", 1.5),
    ],
)
def test_bad_values_are_refused_when_the_config_is_built(name, value):
    with pytest.raises(checks.ConfigError, match=rf"^{name} must be .*got {value!r}"):
        TrainConfig(**{name: value})


@pytest.mark.parametrize("name,value", [("r", 0), ("alpha", 0), ("alpha", -16), ("dropout", 1.0), ("dropout", -0.1)])
def test_bad_lora_values_are_refused(name, value):
    with pytest.raises(checks.ConfigError, match=rf"^lora\.{name} must be .*got {value!r}"):
        LoraConfig(**{name: value})


def test_the_edges_of_the_ranges_are_accepted():
    TrainConfig(max_grad_norm=None, max_steps=None, save_every=0, eval_every=0, warmup_ratio=1.0, min_lr_ratio=0.0)
    TrainConfig(batch_size=6, micro_batch_size=4)  # the loop takes a last, smaller micro-batch: no multiple needed
    LoraConfig(dropout=0.0)


@pytest.mark.parametrize("option", ["data", "val_data", "manifest"])
def test_a_missing_input_is_refused_before_any_work(data, tmp_path, monkeypatch, option):
    def no_work(*_args, **_kwargs):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(loop, "load_trainable_model", no_work)
    monkeypatch.setattr(inputs, "read_data", no_work)
    monkeypatch.setattr(loop, "make_accelerator", no_work)
    cfg = config(data, tmp_path / "run", **{option: str(tmp_path / "missing.jsonl")})
    with pytest.raises(checks.ConfigError, match=rf"^{option}: no such file or directory"):
        train.run(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra,named",
    [
        (["--max_grad_norm", "-1"], "max_grad_norm must be > 0"),
        (["--lora.dropout", "1.0"], "lora.dropout must be < 1"),
        ([], "--data"),  # no --data at all: there is no demo default
    ],
)
def test_cli_refuses_in_one_line_naming_the_option(data, tmp_path, capsys, extra, named):
    data_option = ["--data", data["train"]] if extra else []
    argv = ["train", *data_option, "--out", str(tmp_path / "run"), "--model", "preset:tiny", *extra]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("datalever train: error:")]
    assert len(errors) == 1 and named in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- a torn log


def test_a_torn_last_log_line_is_skipped_on_resume(data, tmp_path):
    """Power loss or a full disk cut the last line of train_log.jsonl mid-JSON: the run resumes and ends exactly as
    an uninterrupted run (the torn step is redone). Before: the resume failed on the JSON, naming no file."""
    kw = dict(max_steps=6, save_every=2)
    ref = config(data, tmp_path / "ref", **kw)
    train.run(ref)
    cfg = config(data, tmp_path / "killed", **kw)
    run_until_killed(cfg, 5)
    log = TrainDir(cfg.out).log
    text = log.read_text()
    last = text.splitlines()[-1]
    log.write_text(text[: len(text) - len(last) // 2 - 1])  # half of line 5, no newline
    with pytest.raises(json.JSONDecodeError):
        json.loads(log.read_text().splitlines()[-1])

    train.run(cfg)
    a, b = weights(TrainDir(ref.out).model), weights(TrainDir(cfg.out).model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(cfg.out)] == [r["loss"] for r in read_log(ref.out)]
    assert [r["step"] for r in read_log(cfg.out)] == list(range(1, 7))


def test_a_torn_line_before_the_last_is_an_error_naming_the_file_and_line(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"train_log\.jsonl: line 2: malformed JSON"):
        logs.truncate_log(log, 3)
    with pytest.raises(ValueError, match=r"train_log\.jsonl: line 2: malformed JSON"):
        logs.final_losses(log)
    log.write_text('{"step": 1, "loss": 2.0, "val_loss": 2.5}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert logs.final_losses(log) == (1.5, 2.5)


# ----------------------------------------------------------------------------- truncation


def full_lengths(tokenizer, examples) -> list[int]:
    """Prompt (with the tokenizer's special tokens) + response + EOS, counted with the tokenizer alone."""
    return [
        len(tokenizer(ex.prompt)["input_ids"]) + len(tokenizer(ex.response, add_special_tokens=False)["input_ids"]) + 1
        for ex in examples
    ]


def test_summary_counts_the_examples_max_length_cuts_and_says_so(data, preset, tmp_path, caplog):
    examples = load_examples(data["train"])
    lengths = full_lengths(load_tokenizer(preset), examples)
    max_length = sorted(lengths)[len(lengths) // 2]  # about half the examples are longer
    n_cut = sum(n > max_length for n in lengths)
    assert 0.01 * len(examples) < n_cut < len(examples)

    with caplog.at_level(logging.WARNING, logger="datalever.train"):
        summary = train.run(config(data, tmp_path / "cut", max_length=max_length, max_steps=1, val_data=None))
    assert summary["truncation"]["n_examples"] == len(examples)
    assert summary["truncation"]["n_cut"] == n_cut
    assert summary["truncation"]["needed_length"] == max(lengths)
    said = [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()]
    assert len(said) == 1 and f"{n_cut} of {len(examples)}" in said[0] and f"max_length={max(lengths)}" in said[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datalever.train"):
        whole = train.run(config(data, tmp_path / "whole", max_length=max(lengths), max_steps=1, val_data=None))
    assert whole["truncation"]["n_cut"] == 0
    assert not [r for r in caplog.records if "max_length" in r.getMessage()]


# ----------------------------------------------------------------------------- several processes


def _torchrun(cfg: TrainConfig, nproc: int, tmp_path: Path) -> list[dict]:
    path = tmp_path / f"config-{nproc}.json"
    path.write_text(json.dumps(to_jsonable(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(ROOT / "tests" / "multiproc" / "train_run.py"),
        str(path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(f.read_text()) for f in sorted(tmp_path.glob(f"{path.name}.rank*.json"))]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["adamw", "sam"])
def test_two_cpu_processes_match_one(data, tmp_path, name):
    """torchrun --nproc_per_node 2 (gloo) against one process with the same global batch of 8, 10 steps.

    Each process gets 4 of the 8 examples and scales its loss so that DDP's gradient mean is the
    batch's token-weighted mean, i.e. the gradient one process computes. For AdamW what remains is
    float rounding (other summation orders: the all-reduce, micro-batches padded to other widths),
    about 1e-7 relative per step: tolerance 1e-4 absolute on every logged step loss and on the final
    validation loss (losses are ~6 nats; a real mismatch, such as each process training alone or a
    per-process normalization, shows up at 1e-3 or more), 1e-3 on the final weights.
    SAM under DDP perturbs each process's weights with that process's own gradient (optim.py's design,
    "m-sharpness" with m = 4 examples), which one process with 8 examples does not do, so only the first
    step (before any update) must agree to 1e-4; later losses within 2e-2 (observed: ~2e-3).
    """
    kw = dict(max_steps=10, optim=OptimConfig(name=name, lr=3e-3))
    one = config(data, tmp_path / "one", **kw)
    two = config(data, tmp_path / "two", **kw)
    train.run(one)
    results = _torchrun(two, 2, tmp_path)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 for r in results)

    log1, log2 = read_log(one.out), read_log(two.out)
    assert [r["step"] for r in log2] == list(range(1, 11))
    assert log2[-1]["compute_forwards"] == log1[-1]["compute_forwards"]
    assert log2[0]["loss"] == pytest.approx(log1[0]["loss"], abs=1e-4)
    tol = 1e-4 if name == "adamw" else 2e-2
    assert [r["loss"] for r in log2] == pytest.approx([r["loss"] for r in log1], abs=tol)
    assert log2[-1]["val_loss"] == pytest.approx(log1[-1]["val_loss"], abs=tol)
    assert log2[-1]["loss"] < log2[0]["loss"] - 0.3
    if name == "adamw":
        w1, w2 = weights(TrainDir(one.out).model), weights(TrainDir(two.out).model)
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------- FSDP2


def _accelerate_launch(
    cfg: TrainConfig, tmp_path: Path, name: str, kill_at_step: int | None = None, **extra
) -> list[dict]:
    """Run train_run.py under FSDP2 on 2 processes (`launchers.fsdp_command`); the per-rank results. `extra`: the
    script's other options (eval_at_step, eval_data, eval_options)."""
    path = tmp_path / f"{name}.json"
    values = {**to_jsonable(cfg), **extra}
    if kill_at_step is not None:
        values["kill_at_step"] = kill_at_step
    path.write_text(json.dumps(values))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    cmd = fsdp_command(str(ROOT / "tests" / "multiproc" / "train_run.py"), str(path))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if kill_at_step is not None:
        assert proc.returncode != 0, "the run should have been killed"
        return []
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(f.read_text()) for f in sorted(tmp_path.glob(f"{path.name}.rank*.json"))]


@pytest.mark.slow
@pytest.mark.multiproc
def test_the_live_model_is_evaluated_under_fsdp_as_its_saved_copy_is_alone(data, preset, tmp_path):
    """Learning curves evaluate the model being trained. Under FSDP2 each process holds a shard of every weight, so
    generation is a collective: 5 prompts over 2 processes in batches of 2 give one process 2 batches and the other
    1, and rows may end at different lengths. The processes must stay in step (one filler batch, synced decoding)
    and give exactly the generations of the saved final model (the same weights) decoded in one plain process."""
    from datalever.evaluate import evaluate_examples
    from datalever.generation import GenerationOptions

    five = tmp_path / "five.jsonl"
    save_examples(str(five), load_examples(data["test"])[:5])
    cfg = config(data, tmp_path / "fsdp", max_steps=2, micro_batch_size=2)
    options = {"max_new_tokens": 12, "batch_size": 2}
    results = _accelerate_launch(cfg, tmp_path, "fsdp", eval_at_step=2, eval_data=str(five), eval_options=options)
    assert all(r["summary"]["distributed_type"] == "FSDP" for r in results) and len(results) == 2
    model, tokenizer = load_model(TrainDir(cfg.out).model), load_tokenizer(TrainDir(cfg.out).model)
    generation = GenerationOptions(progress=False, **options)
    metrics, records = evaluate_examples(model.eval(), tokenizer, load_examples(str(five)), generation)
    expected = {r["id"]: r["generation"] for r in records}
    assert len(expected) == 5
    for r in results:  # every process has every example's generation, as the single process does
        assert r["eval"]["generations"] == expected and r["eval"]["accuracy"] == metrics["accuracy"]


@pytest.fixture(scope="module")
def tied_model(preset, tmp_path_factory):
    """The tiny preset with its output head tied to the input embedding (one parameter under two names)."""
    path = tmp_path_factory.mktemp("tied") / "tiny-tied"
    model = load_model(preset)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(path)
    load_tokenizer(preset).save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize(
    "name,lora,tied",
    [
        ("adamw", False, False),
        ("muon", False, False),
        ("sam", False, False),
        ("adamw", True, False),
        ("adamw", False, True),
    ],
)
def test_fsdp_matches_one_process_and_resumes_exactly(data, preset, tied_model, tmp_path, name, lora, tied):
    """FSDP2 over 2 processes (every parameter a shard) against one process with the same global batch.

    What sharding could break and this catches: Muon must orthogonalize whole matrices, not shards;
    SAM's perturbation norm must cover all shards (under FSDP the first pass syncs, so SAM perturbs with
    the whole batch's gradient, exactly as one process does: same tolerance as AdamW); gradient
    accumulation must survive gradients that every backward already reduces over processes (two
    micro-batches per process per step). Tolerances as in test_two_cpu_processes_match_one
    (float rounding of other summation orders): 1e-4 on every step loss, 1e-3 on the final weights (2e-3 under Muon).
    Then the FSDP run is killed after step 5 (checkpoints every 2 steps, full optimizer state gathered
    from the shards) and resumed: it must end with exactly the weights of the uninterrupted FSDP run.
    """
    # micro_batch_size 2: each process accumulates two micro-batches of unequal token counts per step.
    kw = dict(
        max_steps=6,
        save_every=2,
        optim=OptimConfig(name=name, lr=3e-3),
        micro_batch_size=2,
        lora=LoraConfig(enabled=lora, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        **({"model": tied_model} if tied else {}),
    )
    one = config(data, tmp_path / "one", **kw)
    fsdp = config(data, tmp_path / "fsdp", **kw)
    killed = config(data, tmp_path / "killed", **kw)
    train.run(one)
    results = _accelerate_launch(fsdp, tmp_path, "fsdp")
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["world_size"] == 2 for r in results)
    assert all(r["summary"]["distributed_type"] == "FSDP" for r in results)

    log1, log2 = read_log(one.out), read_log(fsdp.out)
    assert [r["loss"] for r in log2] == pytest.approx([r["loss"] for r in log1], abs=1e-4)
    assert log2[-1]["val_loss"] == pytest.approx(log1[-1]["val_loss"], abs=1e-4)
    assert log2[-1]["compute_forwards"] == log1[-1]["compute_forwards"]
    w1, w2 = weights(TrainDir(one.out).model), weights(TrainDir(fsdp.out).model)
    assert set(w1) == set(w2)  # a plain HF checkpoint (LoRA merged), not shards
    # Muon's Newton-Schulz iterations amplify the summation-order rounding of its input: 2e-3 on the weights
    # (one element of 16384 reached 1.35e-3 after 6 steps on the embedded data). Orthogonalizing shards instead
    # of whole matrices would change every element by about the learning rate per step.
    atol = 2e-3 if name == "muon" else 1e-3
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=atol, rtol=0)
    if tied:  # saved once, as save_pretrained saves a tied model (the head is the embedding)
        assert "lm_head.weight" not in w2
    if lora:
        base = weights(preset)
        assert any(not torch.equal(w2[k], base[k]) for k in w2 if ".q_proj." in k)
        assert all(
            torch.equal(w2[k], base[k]) for k in w2 if "_proj." in k and ".q_proj." not in k and ".v_proj." not in k
        )

    _accelerate_launch(killed, tmp_path, "killed", kill_at_step=5)
    assert not TrainDir(killed.out).summary.exists()
    assert TrainDir(killed.out).checkpoint(4).is_dir()
    _accelerate_launch(killed, tmp_path, "resumed")
    w3 = weights(TrainDir(killed.out).model)
    for k in w2:
        assert torch.equal(w3[k], w2[k]), k
    assert [r["loss"] for r in read_log(killed.out)] == [r["loss"] for r in log2]


def _tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files under run_dir, read from the record format itself
    (8-byte length, 4-byte CRC, an Event protobuf, 4-byte CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = collections.defaultdict(dict)
    for path in run_dir.rglob("events.out.tfevents.*"):
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos : pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars[value.tag][event.step] = value.simple_value
    return scalars


def test_tensorboard_tracker_receives_the_logged_scalars(data, tmp_path):
    """`log_with: [tensorboard]` goes through Accelerate's tracker (tensorboardX, a test dependency); the
    event files hold the same per-step loss and learning rate as the JSONL log."""
    cfg = config(data, tmp_path / "tb", max_steps=3, log_with=["tensorboard"])
    train.run(cfg)
    scalars = _tensorboard_scalars(tmp_path / "tb")
    log = read_log(cfg.out)
    assert scalars["loss"] == pytest.approx({r["step"]: r["loss"] for r in log}, rel=1e-6)
    assert scalars["lr"] == pytest.approx({r["step"]: r["lr"] for r in log}, rel=1e-6)
    assert 3 in scalars["val_loss"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_fsdp_bf16_keeps_float32_master_weights_and_losses(data, tmp_path):
    """FSDP2 with --mixed_precision bf16 (here on CPUs, gloo carrying the bf16 all-gathers): bf16 compute
    on float32 shards runs end to end, the logged losses stay within bf16 compute error of a float32
    run (and differ from it), the checkpoint keeps the float32 master weights and the final model is saved in
    bf16 (save_dtype auto)."""
    one = config(data, tmp_path / "one", max_steps=4, micro_batch_size=2)
    bf16 = config(data, tmp_path / "bf16", max_steps=4, micro_batch_size=2, mixed_precision="bf16")
    train.run(one)
    _accelerate_launch(bf16, tmp_path, "bf16")
    log1, log2 = read_log(one.out), read_log(bf16.out)
    assert [r["loss"] for r in log2] == pytest.approx([r["loss"] for r in log1], abs=3e-2)
    assert any(abs(a["loss"] - b["loss"]) > 1e-6 for a, b in zip(log1, log2))  # bf16 compute really ran
    assert {v.dtype for v in weights(TrainDir(bf16.out).checkpoint(4) / "model").values()} == {torch.float32}
    assert {v.dtype for v in weights(TrainDir(bf16.out).model).values()} == {torch.bfloat16}


def test_resume_refuses_optimizer_state_saved_in_the_other_mode(data, tmp_path):
    """An FSDP checkpoint keys optimizer state by parameter name, a plain one by position: never mixed."""
    cfg = config(data, tmp_path / "run", max_steps=4, save_every=2)

    run_until_killed(cfg, 3)
    state_file = CheckpointDir(TrainDir(cfg.out).checkpoint(2)).trainer_state
    state = torch.load(state_file, weights_only=True)
    assert state["optimizer_format"] == "torch"
    state["optimizer_format"] = "fsdp2-full"
    torch.save(state, state_file)
    with pytest.raises(RuntimeError, match="under FSDP"):
        train.run(cfg)
