import os
import tempfile

import pytest
import torch

# Two cores on CI: keep each test single-threaded so xdist workers do not fight over them.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Presets are built into one cache (models.preset_cache_dir): the tests' own, never the user's.
os.environ.setdefault("DATALEVER_CACHE", tempfile.mkdtemp(prefix="datalever-test-cache-"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Tiny presets of each architecture, built once per test session (HF checkpoint dirs)."""
    from datalever.models import build_preset

    root = tmp_path_factory.mktemp("models")
    return {name: str(build_preset(name, root / name, seed=0)) for name in ("tiny", "tiny-neox", "tiny-qwen3")}


@pytest.fixture
def fast_provenance(monkeypatch):
    """provenance.versions() reads every library's metadata (imports transformers/peft/datasets: seconds); tests whose
    subject is not provenance use this stand-in."""
    from datalever import provenance

    monkeypatch.setattr(provenance, "versions", lambda: {"python": "test"})
