"""Model specs resolve in one place: presets into one cache, embedded checkpoints from the package,
local directories as they are, a mistyped local path as a one-line error (not a hub lookup)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from datalever import models


def test_a_preset_is_built_once_into_the_cache_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("DATALEVER_CACHE", str(tmp_path / "cache"))
    path = Path(models.resolve_model("preset:tiny", seed=3))
    assert path == tmp_path / "cache" / "presets" / "tiny-seed3"
    first = (path / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_model("preset:tiny", seed=3) == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == first  # found, not rebuilt
    # The same preset built elsewhere with the same seed has the same weights.
    again = models.build_preset("tiny", tmp_path / "elsewhere", seed=3)
    a, b = models.load_model(str(path)).state_dict(), models.load_model(str(again)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "cache" / "presets").glob(".*"))  # no temporary directory left behind


def test_embedded_local_and_hub_specs():
    embedded = Path(models.resolve_model("embedded:demo-base"))
    assert (embedded / "config.json").is_file()
    assert models.resolve_model(str(embedded)) == str(embedded)  # a local directory as it is
    assert models.resolve_model("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"  # a hub id, untouched
    with pytest.raises(ValueError, match="no embedded checkpoint"):
        models.resolve_model("embedded:nope")
    with pytest.raises(ValueError, match="unknown model preset"):
        models.resolve_model("preset:nope")


@pytest.mark.parametrize("spec", ["./no/such/model", "/no/such/model", "runs/x/model"])
def test_a_missing_local_path_is_an_error_naming_it(spec):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        models.resolve_model(spec)


def test_unwrap_strips_wrappers_and_stops_at_peft_when_asked():
    from peft import LoraConfig, get_peft_model

    hf = models.load_model(models.resolve_model("preset:tiny"))
    peft_model = get_peft_model(hf, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))

    class Wrapper(nn.Module):  # what DDP and DataParallel look like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = Wrapper(peft_model)
    assert models.unwrap(wrapped) is hf
    assert models.unwrap(wrapped, through_peft=False) is peft_model
    assert models.unwrap(hf) is hf


def test_model_build_never_replaces_a_directory_it_did_not_make(tmp_path):
    """`model build --out EXISTING_DIR` once deleted the directory and everything in it."""
    from datalever.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_:
        main(["model", "build", "--preset", "tiny", "--out", str(mine)])
    assert exit_.value.code == 2 and (mine / "notes.txt").read_text() == "keep me"
    built = tmp_path / "built"
    models.build_preset("tiny", built, seed=1)
    with pytest.raises(ValueError, match="is not preset tiny \\(seed 2\\)"):
        models.build_preset("tiny", built, seed=2)  # another seed: refused, not silently reused
    assert models.build_preset("tiny", built, seed=1) == built  # the same preset and seed: found


@pytest.mark.parametrize("spec,suggestion", [("qwen3-06b", "preset:qwen3-0.6b"), ("tiny-neo", "preset:tiny-neox")])
def test_a_mistyped_name_is_answered_at_once_with_the_closest_preset(spec, suggestion):
    with pytest.raises(FileNotFoundError, match=f"no model directory {spec}; did you mean {suggestion}"):
        models.resolve_model(spec)


def test_an_unreachable_hub_is_one_line_at_once(monkeypatch):
    """Without the hub, a hub id not in the local cache once took a minute of retries and an 80-line traceback."""
    import socket

    import huggingface_hub

    def unreachable(*_args, **_kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(
        FileNotFoundError, match=r"model Org/not-cached: .*cannot be reached \(Network is unreachable\)"
    ):
        models.resolve_model("Org/not-cached")


def test_a_bare_hub_name_goes_to_the_hub_and_a_proxy_is_not_probed(monkeypatch):
    import socket

    import huggingface_hub

    assert models.resolve_model("gpt2") == "gpt2"  # not close to a preset: a (legacy) hub id

    def unreachable(*_args, **_kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # egress only through the proxy: no probe
    assert models.resolve_model("Org/not-cached") == "Org/not-cached"
