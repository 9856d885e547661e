"""The run directory: every stage reads and writes files here, atomically, with provenance."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(to_jsonable(obj), sort_keys=False))


def write_parquet(path: str | os.PathLike, table) -> None:
    """Atomically write a pyarrow Table."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    return obj


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    # Read from package metadata: importing the libraries just for their versions costs seconds.
    for name in (
        "datalever",
        "torch",
        "transformers",
        "tokenizers",
        "accelerate",
        "peft",
        "datasets",
        "scikit-learn",
        "numpy",
        "pyarrow",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def fingerprint(examples: Iterable) -> str:
    """A hash of the examples' ids in order: two runs saw the same data iff the fingerprints agree."""
    h = hashlib.sha256()
    n = 0
    for ex in examples:
        h.update(ex.id.encode())
        h.update(b"\n")
        n += 1
    return f"{h.hexdigest()[:16]}-{n}"


def record_provenance(run_dir: str | os.PathLike, stage: str, config: Any, **extra: Any) -> None:
    """Write `<stage>.config.yaml` and `<stage>.meta.json` (versions, extra facts) into the run dir."""
    run_dir = Path(run_dir)
    write_yaml(run_dir / f"{stage}.config.yaml", config)
    write_json(run_dir / f"{stage}.meta.json", {"stage": stage, "versions": versions(), **extra})
