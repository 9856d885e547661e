"""Long runs: checkpoints by time (a fake clock) and by steps, keep_last, the optimizer state deleted once the run is
finished, the final model in the training dtype, tracker runs named and given the config and final metrics, and the
temporaries killed saves leave cleared.

Expectations come from elsewhere than the code under test: the steps a checkpoint is due at worked out by hand from
the fake clock, file sizes (bf16 is 2 bytes a weight, AdamW keeps 2 float32 moments a weight), weights compared with
an uninterrupted run's or cast by torch, TensorBoard's event files parsed from their record format.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datalever import checks, provenance, train
from datalever.models import load_model
from datalever.rundir import CheckpointDir, TrainDir, to_jsonable
from datalever.train import LoraConfig, TrainConfig, checkpoint, logs
from datalever.train.config import identity_differences, resume_identity
from factories import synth_splits, train_config
from launchers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth_splits(tmp_path_factory, n_train=32, n_val=8, n_test=8)


def config(files, out, **kw) -> TrainConfig:
    """4 steps of 8 in one pass each, float32 compute on any machine (auto is bf16 on a GPU: what save_dtype auto
    keeps)."""
    return train_config(files, out, **{"max_steps": 4, "micro_batch_size": 8, "mixed_precision": "no", **kw})


def weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def checkpoint_steps(out) -> list[int]:
    """The step-N directories under checkpoints/, in step order (whatever they hold)."""
    names = [p.name for p in TrainDir(out).checkpoints.iterdir() if p.name.startswith("step-")]
    return sorted(int(name.removeprefix("step-")) for name in names)


def resumable(out, step: int) -> bool:
    return CheckpointDir(TrainDir(out).checkpoint(step)).trainer_state.exists()


def losses(out) -> list[tuple]:
    return [(r["loss"], r.get("val_loss")) for r in map(json.loads, TrainDir(out).log.read_text().splitlines())]


def assert_same_weights(a_dir, b_dir) -> None:
    a, b = weights(a_dir), weights(b_dir)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Killed(Exception):
    pass


def kill_after(step: int):
    def on_step(at, *_):
        if at == step:
            raise Killed

    return on_step


# ----------------------------------------------------------------------------- the defaults


def test_defaults_checkpoint_by_time_and_keep_the_newest_one():
    cfg = TrainConfig()
    assert (cfg.save_every, cfg.save_every_minutes, cfg.keep_last) == (0, 30.0, 1)
    assert cfg.keep_optimizer_state is False and cfg.save_dtype == "auto" and cfg.run_name is None


@pytest.mark.parametrize(
    "name,value",
    [
        ("save_every_minutes", -1.0),
        ("keep_last", 0),
        ("save_dtype", "float64"),
        ("keep_optimizer_state", "yes"),
        ("run_name", "../elsewhere"),
        ("run_name", "/abs/name"),
        ("run_name", ""),
    ],
)
def test_bad_values_are_refused_when_the_config_is_built(name, value):
    with pytest.raises(checks.ConfigError, match=rf"^{name} must be .*got {value!r}"):
        TrainConfig(**{name: value})


# ----------------------------------------------------------------------------- checkpoints by time


def run_on_a_fake_clock(monkeypatch, cfg: TrainConfig, minutes_per_step: float) -> None:
    """Train with checkpoint.clock at `minutes_per_step` x the steps done (0 before the first)."""
    now = {"s": 0.0}
    monkeypatch.setattr(checkpoint, "clock", lambda: now["s"])

    def tick(step, *_):
        now["s"] = step * minutes_per_step * 60

    train.run(cfg, on_step=tick)


@pytest.mark.parametrize(
    "minutes,every,expected",
    [
        (10.0, 0, [3, 6, 8]),  # 4 minutes a step: 12 >= 10 at step 3, then 24 - 12 >= 10 at step 6; the end
        (10.0, 4, [3, 4, 7, 8]),  # step 4's save restarts the clock: 28 - 16 >= 10 at step 7
        (0.0, 0, [8]),  # by time never: only the end
    ],
)
def test_checkpoints_are_saved_by_time_on_the_main_process_s_clock(
    data, tmp_path, monkeypatch, minutes, every, expected
):
    cfg = config(data, tmp_path / "run", max_steps=8, save_every=every, save_every_minutes=minutes, keep_last=10)
    run_on_a_fake_clock(monkeypatch, dataclasses.replace(cfg, keep_optimizer_state=True), minutes_per_step=4)
    assert checkpoint_steps(cfg.out) == expected
    for step in expected:  # each a real checkpoint of that step
        assert torch.load(CheckpointDir(TrainDir(cfg.out).checkpoint(step)).trainer_state)["step"] == step


# ----------------------------------------------------------------------------- keep_last and the optimizer state


def test_keep_last_keeps_the_newest_checkpoints(data, tmp_path):
    cfg = config(data, tmp_path / "run", max_steps=5, save_every=1, keep_last=2, keep_optimizer_state=True)
    train.run(cfg)
    assert checkpoint_steps(cfg.out) == [4, 5]
    assert resumable(cfg.out, 4) and resumable(cfg.out, 5)


def test_the_optimizer_state_goes_once_the_run_is_finished_unless_kept(data, tmp_path):
    """The optimizer state is AdamW's two float32 moments a weight: about twice the float32 model. Without
    keep_optimizer_state the checkpoints keep their weights only, the final model is the same, and a rerun returns
    the finished run (it never resumed from the checkpoint anyway)."""
    dropped = config(data, tmp_path / "dropped", max_steps=3, save_every=2, keep_last=2)
    kept = dataclasses.replace(dropped, out=str(tmp_path / "kept"), keep_optimizer_state=True)
    summary = train.run(dropped)
    train.run(kept)

    model_bytes = (TrainDir(kept.out).checkpoint(3) / "model" / "model.safetensors").stat().st_size
    state_bytes = CheckpointDir(TrainDir(kept.out).checkpoint(3)).trainer_state.stat().st_size
    assert 1.8 * model_bytes < state_bytes < 2.5 * model_bytes
    for step in (2, 3):
        assert resumable(kept.out, step) and (TrainDir(kept.out).checkpoint(step) / "rng-0.pt").exists()
    assert {p.name for p in TrainDir(dropped.out).checkpoint(2).iterdir()} == {"model"}
    assert_same_weights(TrainDir(dropped.out).checkpoint(2) / "model", TrainDir(kept.out).checkpoint(2) / "model")
    # The last step's checkpoint held the weights model/ holds (float32, no LoRA): it went whole.
    assert not TrainDir(dropped.out).checkpoint(3).exists()
    assert_same_weights(TrainDir(dropped.out).model, TrainDir(kept.out).checkpoint(3) / "model")
    assert_same_weights(TrainDir(dropped.out).model, TrainDir(kept.out).model)

    steps = []
    assert train.run(dropped, on_step=lambda step, *_: steps.append(step)) == summary
    assert steps == []


@pytest.mark.parametrize(
    "settings",
    [{"save_dtype": "bfloat16"}, {"lora": LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"])}],
    ids=["bf16-save", "lora"],
)
def test_the_last_checkpoint_stays_when_the_final_model_differs_from_it(data, tmp_path, settings):
    """model/ in bfloat16 is not the float32 master weights of the last checkpoint, and a LoRA run's model/ is the
    merged model, not the adapter and base the checkpoint holds: that checkpoint is kept (its weights only)."""
    cfg = config(data, tmp_path / "run", max_steps=3, save_every=3, **settings)
    train.run(cfg)
    assert (TrainDir(cfg.out).checkpoint(3) / "model").is_dir() and not resumable(cfg.out, 3)


def test_a_failed_final_save_keeps_the_last_checkpoint_resumable(data, tmp_path, monkeypatch):
    """Nothing is deleted before the final model and the summary are written: a run that dies saving its model
    resumes from its last checkpoint (no step redone) and finishes, and only then drops the optimizer state."""
    cfg = config(data, tmp_path / "run", max_steps=3)
    real_save_model = checkpoint.save_final_model

    def die(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(checkpoint, "save_final_model", die)
    with pytest.raises(Killed):
        train.run(cfg)
    assert resumable(cfg.out, 3) and not TrainDir(cfg.out).summary.exists()
    shutil.copytree(TrainDir(cfg.out).checkpoint(3) / "model", tmp_path / "step-3")

    monkeypatch.setattr(checkpoint, "save_final_model", real_save_model)
    steps = []
    summary = train.run(cfg, on_step=lambda step, *_: steps.append(step))
    assert steps == [] and summary["steps"] == 3
    assert TrainDir(cfg.out).summary.exists() and not resumable(cfg.out, 3)
    assert_same_weights(TrainDir(cfg.out).model, tmp_path / "step-3")  # finished from the checkpoint, no step redone


# ----------------------------------------------------------------------------- the final model's dtype


@pytest.fixture
def own_accelerator_state():
    """Accelerate keeps one state per process, its mixed precision included: a run of another precision gets its own
    (reset before and after)."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    reset()
    yield
    reset()


def test_bf16_mixed_precision_saves_a_bf16_final_model_of_half_the_size(data, tmp_path, own_accelerator_state):
    """bf16 autocast (here on a CPU) over float32 master weights: the final model is those weights cast to bf16
    (what `Tensor.to` gives), half the bytes, and says bfloat16 in config.json; the checkpoint keeps float32."""
    cfg = config(data, tmp_path / "bf16", max_steps=2, mixed_precision="bf16")
    train.run(cfg)
    master_dir, final_dir = TrainDir(cfg.out).checkpoint(2) / "model", TrainDir(cfg.out).model
    master, final = weights(master_dir), weights(final_dir)
    assert {v.dtype for v in master.values()} == {torch.float32}
    assert {v.dtype for v in final.values()} == {torch.bfloat16}
    assert set(final) == set(master) and all(torch.equal(final[k], master[k].to(torch.bfloat16)) for k in master)
    ratio = (final_dir / "model.safetensors").stat().st_size / (master_dir / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    assert json.loads((final_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in load_model(str(final_dir), dtype="auto").parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16", "float16"])
def test_save_dtype_casts_the_final_model_only(data, tmp_path, save_dtype):
    """A float32 run (the CPU default) saved in another dtype: the same training (the same log), the final model
    the float32 one cast."""
    reference = config(data, tmp_path / "auto", max_steps=2)
    cfg = dataclasses.replace(reference, out=str(tmp_path / save_dtype), save_dtype=save_dtype)
    train.run(reference)
    train.run(cfg)
    assert losses(cfg.out) == losses(reference.out)
    dtype = getattr(torch, save_dtype)
    a, b = weights(TrainDir(reference.out).model), weights(TrainDir(cfg.out).model)
    assert {v.dtype for v in a.values()} == {torch.float32}  # auto, without bf16 compute: as trained
    assert all(b[k].dtype == dtype and torch.equal(b[k], a[k].to(dtype)) for k in a)


def test_cast_weights_keeps_tied_weights_one_tensor():
    shared = torch.randn(4, 3)
    state = {"embed.weight": shared, "head.weight": shared.detach(), "bias": torch.zeros(3), "ids": torch.arange(3)}
    cast = checkpoint.cast_weights(state, "bfloat16")
    assert cast["embed.weight"] is cast["head.weight"] and cast["embed.weight"].dtype == torch.bfloat16
    assert cast["bias"].dtype == torch.bfloat16 and cast["ids"].dtype == torch.int64
    assert checkpoint.cast_weights(state, None) is state


def identity(files, out, **kw) -> str:
    return resume_identity(config(files, out, **kw), {"model": "preset:tiny"})


def test_what_enters_the_resume_identity(data, tmp_path):
    """The new options that change no number stay out; save_dtype enters only where it casts (on a CPU, float32
    is what auto saves: the same work; bfloat16 is not)."""
    same = identity(data, tmp_path)
    for kw in (
        {"save_every_minutes": 5.0},
        {"keep_last": 4},
        {"keep_optimizer_state": True},
        {"run_name": "a/b"},
        {"save_dtype": "float32"},
    ):
        assert identity(data, tmp_path, **kw) == same, kw
    assert identity_differences(same, identity(data, tmp_path, save_dtype="bfloat16")) == [
        "save_dtype unused -> 'bfloat16'"
    ]


# ----------------------------------------------------------------------------- trackers


def tensorboard_events(run_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, object]]:
    """(scalars by tag and step, hyperparameters) of every event file under run_dir, read from the record format
    (8-byte length, 4-byte CRC, an Event protobuf, 4-byte CRC)."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    scalars: dict[str, dict[int, float]] = collections.defaultdict(dict)
    hparams: dict[str, object] = {}
    for path in run_dir.rglob("events.out.tfevents.*"):
        raw, pos = path.read_bytes(), 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos : pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    start = HParamsPluginData.FromString(value.metadata.plugin_data.content).session_start_info
                    hparams.update({k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()})
                elif value.HasField("simple_value"):
                    scalars[value.tag][event.step] = value.simple_value
    return scalars, hparams


def test_tensorboard_run_is_named_and_gets_the_config_and_the_final_metrics(data, tmp_path):
    """In an experiment's layout (RUN/arms/<arm>/seed<S>/train) the run is named <run>/<arm>/seed<S>: TensorBoard's
    run directory under out/datalever. It holds every setting and, at the last step, the summary's final metrics."""
    out = tmp_path / "exp7" / "arms" / "hard" / "seed1" / "train"
    cfg = config(data, out, max_steps=3, log_with=["tensorboard"])
    summary = train.run(cfg)
    run_dir = out / logs.TRACKER_PROJECT / "exp7" / "hard" / "seed1"
    assert run_dir.is_dir() and not list((out / logs.TRACKER_PROJECT).glob("events.*"))
    scalars, hparams = tensorboard_events(run_dir)
    assert scalars["final_train_loss"] == pytest.approx({3: summary["final_train_loss"]}, rel=1e-6)
    assert scalars["final_val_loss"] == pytest.approx({3: summary["final_val_loss"]}, rel=1e-6)
    assert scalars["final_steps"] == {3: 3.0}
    assert scalars["final_wall_s"] == pytest.approx({3: summary["compute"]["wall_s"]}, rel=1e-6)
    assert set(scalars["loss"]) == {1, 2, 3}
    assert hparams["run_name"] == "exp7/hard/seed1"
    assert hparams["optim.lr"] == pytest.approx(3e-3) and hparams["max_steps"] == 3 and hparams["lora.enabled"] is False
    assert hparams["log_with"] == '["tensorboard"]' and hparams["model"] == "preset:tiny"
    # Every setting that has a value is there (TensorBoard drops None), by its flattened name.
    flat = {k for k, v in provenance.flatten(to_jsonable(cfg)).items() if v is not None}
    assert flat <= set(hparams), flat - set(hparams)


@pytest.mark.parametrize(
    "out,run_name,expected",
    [
        ("runs/plain", None, "runs/plain"),
        ("R/arms/base/seed0/train", None, "R/base/seed0"),
        ("R/arms/base/seed0/train", "mine/base", "mine/base"),
    ],
)
def test_run_names(tmp_path, out, run_name, expected):
    assert logs.run_name(TrainConfig(out=str(tmp_path / out), run_name=run_name)) == expected


def test_wandb_writes_its_files_under_out_not_where_the_command_started(data, tmp_path, monkeypatch):
    """wandb.init without `dir` writes ./wandb in the working directory, outside the run it belongs to."""
    import accelerate

    seen = {}
    monkeypatch.setattr(accelerate.Accelerator, "init_trackers", lambda self, project, **kw: seen.update(kw))
    cfg = config(data, tmp_path / "run", max_steps=1, val_data=None, run_name="study/a")
    train.run(cfg)
    assert seen["init_kwargs"]["wandb"] == {"name": "study/a", "dir": str(tmp_path / "run")}
    assert seen["init_kwargs"]["mlflow"] == {"run_name": "study/a"}


def test_an_explicit_run_name_names_the_tensorboard_directory(data, tmp_path):
    cfg = config(data, tmp_path / "run", max_steps=1, val_data=None, log_with=["tensorboard"], run_name="study/a")
    summary = train.run(cfg)
    scalars, _ = tensorboard_events(tmp_path / "run" / logs.TRACKER_PROJECT / "study" / "a")
    assert summary["final_val_loss"] is None and "final_val_loss" not in scalars  # no validation data: no value
    assert scalars["final_steps"] == {1: 1.0}


# ----------------------------------------------------------------------------- temporaries killed saves leave


def test_stale_temporaries_are_cleared_at_the_start_of_a_run(data, tmp_path):
    """A checkpoint's temporary without trainer_state.pt (a save killed midway), a complete one older than the
    checkpoint in place, and a final model's temporary go; the run resumes from its checkpoint as if they never
    were, and ends with an uninterrupted run's weights."""
    kw = dict(max_steps=6, save_every=2)
    reference = config(data, tmp_path / "reference", **kw)
    train.run(reference)
    cfg = config(data, tmp_path / "run", **kw)
    with pytest.raises(Killed):
        train.run(cfg, on_step=kill_after(5))
    layout = TrainDir(cfg.out)
    assert checkpoint_steps(cfg.out) == [4]
    half_saved = layout.checkpoints / ".step-6.tmp"
    shutil.copytree(layout.checkpoint(4) / "model", half_saved / "model")
    older = layout.checkpoints / ".step-2.tmp"
    shutil.copytree(layout.checkpoint(4), older)
    model_tmp = layout.root / ".model.k1ll3d.tmp"
    shutil.copytree(layout.checkpoint(4) / "model", model_tmp)

    resumed = []
    train.run(cfg, on_step=lambda step, *_: resumed.append(step))
    assert resumed == [5, 6]
    assert not half_saved.exists() and not older.exists() and not model_tmp.exists()
    assert not [p.name for p in layout.root.rglob("*.tmp")]
    assert_same_weights(layout.model, TrainDir(reference.out).model)


def test_a_complete_temporary_newer_than_every_checkpoint_is_resumed_from(data, tmp_path):
    """A save killed between removing an older directory of its step's name and the rename leaves the newest
    checkpoint only as `.step-N.tmp`, complete (trainer_state.pt is written last): it is put in place, not cleared,
    and the run resumes from it (steps 5 and 6 only, not 3 to 6 from step 2)."""
    kw = dict(max_steps=6, save_every=2, keep_last=2)
    reference = config(data, tmp_path / "reference", **kw)
    train.run(reference)
    cfg = config(data, tmp_path / "run", **kw)
    with pytest.raises(Killed):
        train.run(cfg, on_step=kill_after(5))
    layout = TrainDir(cfg.out)
    assert checkpoint_steps(cfg.out) == [2, 4]
    layout.checkpoint(4).rename(layout.checkpoints / ".step-4.tmp")

    resumed = []
    train.run(cfg, on_step=lambda step, *_: resumed.append(step))
    assert resumed == [5, 6]
    assert not (layout.checkpoints / ".step-4.tmp").exists()
    assert_same_weights(layout.model, TrainDir(reference.out).model)


# ----------------------------------------------------------------------------- several processes

SKEWED_CLOCKS = """
import json, os, signal, sys
import torch

signal.alarm(120)  # a hang (a save some processes start and others do not) ends the process: no orphans left
torch.set_num_threads(1)
from datalever import train
from datalever.optim import OptimConfig
from datalever.train import LoraConfig, TrainConfig, checkpoint

values = json.loads(open(sys.argv[1]).read())
values["optim"] = OptimConfig(**values["optim"])
values["lora"] = LoraConfig(**values["lora"])
rank = int(os.environ["RANK"])
minutes_per_step = 4.0 if rank == 0 else 400.0  # alone, rank 1 would save after every step
now = {"s": 0.0}
checkpoint.clock = lambda: now["s"]


def tick(step, *_):
    now["s"] = step * minutes_per_step * 60


train.run(TrainConfig(**values), on_step=tick)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.multiproc
def test_processes_with_other_clocks_save_together_at_the_main_process_s_times(data, tmp_path):
    """torchrun, 2 processes (gloo) whose clocks disagree by 100x: every checkpoint is saved by both (both RNG
    files) at the steps rank 0's clock gives (3, 6, and the end), and the run neither hangs nor fails."""
    cfg = config(data, tmp_path / "run", max_steps=8, save_every_minutes=10.0, keep_last=10, keep_optimizer_state=True)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(to_jsonable(cfg)))
    script = tmp_path / "skewed_clocks.py"
    script.write_text(SKEWED_CLOCKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(config_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    hung = "the processes hung (killed by their alarm): they did not agree on when to save\n"
    assert proc.returncode == 0, (hung if "SIGALRM" in proc.stderr else "") + proc.stdout[-3000:] + proc.stderr[-5000:]
    assert checkpoint_steps(cfg.out) == [3, 6, 8]
    for step in (3, 6, 8):
        assert {p.name for p in TrainDir(cfg.out).checkpoint(step).glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}


def test_the_rendering_is_part_of_the_resume_identity(tmp_path):
    """Another chat template gives other tokens and masks: never the same run. Plain text is what runs recorded
    before the option did, so it leaves their identity as it was."""
    from datalever.train.config import resume_identity

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    plain, auto = TrainConfig(chat_template="none"), TrainConfig(chat_template="auto")
    from_file = TrainConfig(chat_template=str(template))
    ids = {name: resume_identity(c, {}) for name, c in (("none", plain), ("auto", auto), ("file", from_file))}
    assert len(set(ids.values())) == 3
    assert "chat_template" not in ids["none"]
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")  # edited in place: other work
    assert resume_identity(TrainConfig(chat_template=str(template)), {}) != ids["file"]
