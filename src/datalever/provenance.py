"""Provenance: what made a directory, and whether new work is the same work.

Every stage records the settings it ran with (`<stage>.config.yaml`) and the facts of the run (`<stage>.meta.json`:
library versions, the data's fingerprint, whatever the stage adds) beside its outputs (`record`). Before a stage
reuses or continues what a directory holds it asks here whether that is the same work (`refuse_other_settings`,
`differences`): the recorded settings against the ones asked for, and fingerprints of what the inputs contain
(examples, files, directories), so that a moved copy is the same work and data edited in place is not.

Settings recorded by an earlier version count as the same work where they can: an option added since, at the value
that does what runs did before it existed (`earlier_value`), and an option no longer there.

Each stage config that records an identity says which of its fields decide its outputs and which do not
(`Classified`): a new field is in neither list until someone decides, and a test fails until then.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from datalever.rundir import provenance_files, to_jsonable, write_json, write_yaml

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()  # a setting one side does not have


@dataclass(frozen=True)
class Classified:
    """A config's fields by what they do to the stage's outputs: `decide` (compared by value before the outputs are
    reused or continued), `inputs` (decide them through what they name: compared by content, so a moved copy is the
    same work) and `ignored` (change no output: where the stage writes, how it shows progress, when it saves...)."""

    decide: tuple[str, ...]
    ignored: tuple[str, ...]
    inputs: tuple[str, ...] = ()

    def unclassified(self, config_class: type) -> list[str]:
        """The fields of `config_class` in no list, or in more than one: what tests/test_identity.py refuses."""
        lists = (self.decide, self.inputs, self.ignored)
        return [f.name for f in dataclasses.fields(config_class) if sum(f.name in names for names in lists) != 1]

    def unknown(self, config_class: type) -> list[str]:
        """Names in the lists that are no field of `config_class` (a field renamed or removed)."""
        names = {f.name for f in dataclasses.fields(config_class)}
        return [n for n in (*self.decide, *self.inputs, *self.ignored) if n not in names]


# ----------------------------------------------------------------------------- records


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


def record(out_dir: str | os.PathLike, stage: str, config: Any, **extra: Any) -> None:
    """Write the stage's settings and facts (with the library versions) into its directory."""
    config_file, meta_file = provenance_files(out_dir, stage)
    write_yaml(config_file, config)
    write_json(meta_file, {"stage": stage, "versions": versions(), **extra})


def recorded_settings(out_dir: str | os.PathLike, stage: str) -> dict | None:
    """The settings a stage recorded in its directory (`<stage>.config.yaml`), or None if it has none."""
    config_file = provenance_files(out_dir, stage)[0]
    return (yaml.safe_load(config_file.read_text()) or {}) if config_file.exists() else None


# ----------------------------------------------------------------------------- is it the same work?


def flatten(settings: dict, prefix: str = "") -> dict:
    """Nested settings as one dict with dotted names (`optim.lr`)."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Options whose default does not do what runs did before the option existed: the value that does.
EARLIER_VALUES = {"chat_template": "none"}  # plain text; "auto" renders through a tokenizer's template


def earlier_value(key: str, defaults: dict) -> Any:
    """What a run recorded before `key` (a dotted name) existed did: its earlier value, else today's default."""
    return EARLIER_VALUES.get(key.rsplit(".", 1)[-1], defaults.get(key, MISSING))


def field_defaults(config: Any) -> dict:
    """A config dataclass's defaults, nested configs included (fields without a default are left out)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_jsonable(f.default_factory())  # the factory's own values (a proxy's lr 2e-3)
    return out


def differences(before: dict, now: dict, *, defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
    """The dotted settings in which `now` differs from `before` (nested dicts flattened), sorted by name, as
    (name, value before, value now), `MISSING` for a side that lacks the name.

    Without `defaults` every name either side has counts. With `defaults` (the config's flattened defaults) settings
    recorded by another version count as the same work where they can: only the names `now` has count (an option no
    longer there is no difference), and a name `before` lacks counts only where its value now is not what runs did
    before it existed (`earlier_value`)."""
    before, now = flatten(before), flatten(now)
    names = sorted(now if defaults is not None else now.keys() | before.keys())
    out = []
    for name in names:
        old, new = before.get(name, MISSING), now.get(name, MISSING)
        if old == new:
            continue
        if defaults is not None and old is MISSING and new == earlier_value(name, defaults):
            continue  # an option added since, at what runs did before it existed
        out.append((name, old, new))
    return out


def settings_differences(recorded: dict, config: Any, ignore: Iterable[str] = ()) -> list[str]:
    """The settings (dotted names, `old -> new`) in which `config` differs from recorded settings; a name in
    `ignore` (a top-level option or a dotted one) does not count. Settings recorded by another version count as
    the same work where they can (`differences` with defaults)."""
    ignore = set(ignore)

    def kept(settings: dict) -> dict:
        return {k: v for k, v in flatten(settings).items() if k not in ignore and k.split(".")[0] not in ignore}

    defaults = flatten(to_jsonable(field_defaults(config)))
    found = differences(kept(recorded), kept(to_jsonable(config)), defaults=defaults)
    return [f"{k}: {None if old is MISSING else old!r} -> {new!r}" for k, old, new in found]


NEVER_COMPARED = ("overwrite", "progress", "on_conflict")


def refuse_other_settings(
    out_dir: str | os.PathLike, stage: str, config: Any, *, ignore: Iterable[str] = ()
) -> list[str]:
    """Outputs are replaced only by the same work: if `out_dir` holds this stage's outputs made with other
    settings, raise one line naming them, unless the config says `overwrite`. Returns the differences."""
    from datalever.checks import ConfigError

    recorded = recorded_settings(out_dir, stage)
    # Change no output anywhere: replacing it, showing progress, refusing conflicting labels rather than naming them.
    diffs = [] if recorded is None else settings_differences(recorded, config, {*ignore, *NEVER_COMPARED})
    if diffs and not getattr(config, "overwrite", False):
        shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
        raise ConfigError(
            f"{out_dir} holds {stage} outputs made with other settings ({shown}): use another output directory, "
            "or --overwrite true to replace them"
        )
    return diffs


# ----------------------------------------------------------------------------- fingerprints


def fingerprint(examples: Iterable) -> str:
    """A hash of the examples' ids in order: two runs saw the same data iff the fingerprints agree."""
    h = hashlib.sha256()
    n = 0
    for ex in examples:
        h.update(ex.id.encode())
        h.update(b"\n")
        n += 1
    return f"{h.hexdigest()[:16]}-{n}"


def content_fingerprint(examples: Iterable) -> str:
    """The ids in order (`fingerprint`) plus a hash of every example's text and source: edited content under
    kept ids differs. What profile and train compare before continuing a run."""
    h = hashlib.sha256()
    for ex in examples:
        for part in (ex.id, ex.prompt, ex.response, ex.source or ""):
            h.update(part.encode("utf-8"))
            h.update(b"\x1f")
    return f"{fingerprint(examples)}-{h.hexdigest()[:16]}"


def counts_fingerprint(multiplicities) -> str:
    """The multiplicities in example order (no manifest: all 1, the same work as a manifest of ones)."""
    return hashlib.sha256(",".join(str(int(m)) for m in multiplicities).encode()).hexdigest()[:16]


def _hash_file(h, path: Path) -> None:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    _hash_file(h, Path(path))
    return h.hexdigest()


def directory_fingerprint(root: Path) -> str:
    """sha256 over every file's relative path and bytes (hidden files and folders, e.g. caches, left out)."""
    h = hashlib.sha256()
    found = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
    for path in found:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        _hash_file(h, path)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
