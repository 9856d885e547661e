import os
import shutil
import subprocess
import tempfile
from pathlib import Path

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


# ----------------------------------------------------------------------------- a real SLURM cluster

SLURM_DIR = Path(__file__).resolve().parent / "slurm"  # start.sh, stop.sh, bin/sacct (../shared/slurm's recipe)
SLURM_NEEDED = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo"]
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _slurm_missing() -> str | None:
    missing = [b for b in SLURM_NEEDED if shutil.which(b, path=SBIN_PATH) is None]
    if missing:
        install = "apt-get install slurmctld slurmd slurm-client munge"
        return f"SLURM not installed (missing {', '.join(missing)}; {install})"
    if os.geteuid() != 0:
        return "the one-node SLURM cluster needs root (SlurmUser=root; slurmd launches the jobs)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A private one-node SLURM cluster (munged, slurmctld, slurmd) under a fresh directory, up for the session, every
    daemon stopped at the end. Skips where SLURM is not installed or the tests do not run as root."""
    from launchers import free_port

    reason = _slurm_missing()
    if reason:
        pytest.skip(reason)
    # Not tmp_path_factory: its directories are 0700, and munged refuses a socket under a path not o+x everywhere;
    # the socket path must also stay under 108 characters.
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    root.chmod(0o755)
    env = dict(os.environ, PATH=SBIN_PATH, SLURM_TRY_CTLD_PORT=str(free_port()), SLURM_TRY_SLURMD_PORT=str(free_port()))
    try:
        started = subprocess.run(
            ["bash", str(SLURM_DIR / "start.sh"), str(root)], env=env, capture_output=True, text=True, timeout=60
        )
        if started.returncode != 0:
            logs = "".join(p.read_text()[-2000:] for p in (root / "log").glob("*.log"))
            pytest.fail(f"slurm did not start:\n{started.stdout}\n{started.stderr}\n{logs}")
        patch = pytest.MonkeyPatch()
        patch.setenv("SLURM_CONF", str(root / "etc" / "slurm.conf"))
        # sacct needs a database the one-node cluster has not: the stand-in reads scontrol and the job log
        patch.setenv("PATH", os.pathsep.join([str(SLURM_DIR / "bin"), SBIN_PATH]))
        yield root
        patch.undo()
    finally:
        subprocess.run(["bash", str(SLURM_DIR / "stop.sh"), str(root)], env=env, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
