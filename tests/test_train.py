"""`datalever train` end to end on a tiny preset: optimizers, LoRA, kill-and-resume, logs, manifests, DDP.

Every check uses its own reference: the training loss is measured with the loss engine
(`score_examples`) on the saved models, not read from the run's log; resumed weights are compared
with an uninterrupted run's weights bit for bit; the learning rates with values computed by hand.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datalever import checkpoint, synth, train
from datalever.examples import load_examples
from datalever.losses import score_examples
from datalever.models import load_model, load_tokenizer, resolve_model
from datalever.optim import OptimConfig
from datalever.rundir import TrainDir, to_jsonable
from datalever.train import LoraConfig, TrainConfig
from launchers import free_port, fsdp_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth.write_splits(str(tmp_path_factory.mktemp("data")), n_train=64, n_val=16, n_test=16, seed=0)


@pytest.fixture(scope="module")
def preset() -> str:
    """The untrained tiny preset every run starts from (built once into the tests' preset cache)."""
    return resolve_model("preset:tiny", seed=0)


def config(data, out, **kw) -> TrainConfig:
    base = dict(
        model="preset:tiny",
        data=data["train"],
        val_data=data["validation"],
        out=str(out),
        max_steps=8,
        batch_size=8,
        micro_batch_size=4,
        warmup_ratio=0.0,
        optim=OptimConfig(name="adamw", lr=3e-3),
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def mean_loss(model_dir: str, examples) -> float:
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    scores = score_examples(model, tok, examples, max_length=512)
    return sum(s.loss for s in scores.values()) / len(scores)


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in TrainDir(out).log.read_text().splitlines()]


def weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


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
    real = train.micro_batches

    def spy(encoded, *args, **kwargs):
        if len(encoded) == 8:  # the training batches (validation uses other calls)
            trained.update(e.id for e in encoded)
        return real(encoded, *args, **kwargs)

    monkeypatch.setattr(train, "micro_batches", spy)
    cfg = config(data, tmp_path / "run", manifest=str(manifest), max_steps=None, epochs=1.0, val_data=None)
    summary = train.run(cfg)
    assert summary["steps"] == 96 // 8 and summary["epoch_len"] == 96
    assert trained == collections.Counter({k: v for k, v in mult.items() if v})

    # The stream alone, over the next epochs: exactly the multiplicities again, in a new order.
    ex_list, m = train.load_training_data(cfg)
    stream = train.ExampleStream(m, seed=0)
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
    cfg = config(data, tmp_path / "run", model=str(tmp_path / "bf16"), max_steps=1, val_data=None)
    train.run(cfg)
    assert {v.dtype for v in weights(TrainDir(cfg.out).model).values()} == {torch.float32}


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


def _accelerate_launch(cfg: TrainConfig, tmp_path: Path, name: str, kill_at_step: int | None = None) -> list[dict]:
    """Run train_run.py under FSDP2 on 2 processes (`launchers.fsdp_command`); the per-rank results."""
    path = tmp_path / f"{name}.json"
    values = to_jsonable(cfg)
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
    (float rounding of other summation orders): 1e-4 on every step loss, 1e-3 on the final weights.
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
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-3, rtol=0)
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
    run (and differ from it), and the saved weights are float32."""
    one = config(data, tmp_path / "one", max_steps=4, micro_batch_size=2)
    bf16 = config(data, tmp_path / "bf16", max_steps=4, micro_batch_size=2, mixed_precision="bf16")
    train.run(one)
    _accelerate_launch(bf16, tmp_path, "bf16")
    log1, log2 = read_log(one.out), read_log(bf16.out)
    assert [r["loss"] for r in log2] == pytest.approx([r["loss"] for r in log1], abs=3e-2)
    assert any(abs(a["loss"] - b["loss"]) > 1e-6 for a, b in zip(log1, log2))  # bf16 compute really ran
    assert {v.dtype for v in weights(TrainDir(bf16.out).model).values()} == {torch.float32}


def test_resume_refuses_optimizer_state_saved_in_the_other_mode(data, tmp_path):
    """An FSDP checkpoint keys optimizer state by parameter name, a plain one by position: never mixed."""
    cfg = config(data, tmp_path / "run", max_steps=4, save_every=2)

    run_until_killed(cfg, 3)
    state_file = TrainDir(cfg.out).checkpoint(2) / checkpoint.TRAINER_STATE
    state = torch.load(state_file, weights_only=True)
    assert state["optimizer_format"] == "torch"
    state["optimizer_format"] = "fsdp2-full"
    torch.save(state, state_file)
    with pytest.raises(RuntimeError, match="under FSDP"):
        train.run(cfg)
