"""A unit of work and its claim: the grid's vocabulary.

A study (`experiment.units`) is a small graph of units: each has a name (the path of its outputs under the run
directory, e.g. "profile", "arms/hard/seed0", "sweep/m=2/split"), the units it reads (`after`), a way to tell it is
finished (`done`: its outputs are there, written last as every stage writes them) and a way to run it (`run`). The
launchers (`grid.local`, `grid.slurm`) decide where and when.

Before a unit runs it is claimed: an exclusive lock on a file in the run directory (`filelock`: flock, which the
kernel releases when the process holding it dies, however it dies). Any number of drivers and workers on one run
directory therefore never run a unit twice, and a claim left by a process that died is free at once for the next.
On a shared filesystem the lock is the filesystem's (NFS and Lustre with locking enabled, GPFS, BeeGFS); one
without locks is refused with a line saying so.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import filelock

from datalever.rundir import RunDir


@dataclass
class Unit:
    name: str
    """Where its outputs live under the run directory: "profile", "arms/hard/seed0", "sweep/m=2/split"."""
    kind: str
    """What it does (data, profile, split, upsample, train, link, report): for progress lines and estimates."""
    run: Callable[[], Any]
    done: Callable[[], bool]
    after: tuple[str, ...] = ()
    """The units whose outputs it reads."""
    in_driver: bool = False
    """Bookkeeping the driver does itself, in its own process (reading the data in, the report): seconds of work
    that a job of its own would only delay."""


class ClaimedElsewhere(RuntimeError):
    """Another process holds the unit's claim: it is running there."""


@contextmanager
def claim(root: str | Path, unit: str) -> Iterator[None]:
    """Hold `unit`'s claim in the run directory `root` while the block runs; ClaimedElsewhere if another process
    holds it."""
    path = RunDir(root).claim(unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise ClaimedElsewhere(f"{unit} is claimed by another process ({path})") from None
    except OSError as e:  # e.g. a filesystem without locks
        raise OSError(f"{path}: cannot lock ({e.strerror or e}); the run directory needs a filesystem with file locks")
    try:
        yield
    finally:
        lock.release()


@contextmanager
def claim_together(root: str | Path, unit: str) -> Iterator[None]:
    """`claim` for the processes of one launch (torchrun, accelerate launch), which run every unit together: the
    main process claims, and all of them run the unit or all of them raise ClaimedElsewhere."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        with claim(root, unit):
            yield
        return
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    with ExitStack() as held:
        answer = [None]
        if state.is_main_process:
            try:
                held.enter_context(claim(root, unit))
            except ClaimedElsewhere as e:
                answer = [str(e)]
        broadcast_object_list(answer, from_process=0)
        if answer[0] is not None:
            raise ClaimedElsewhere(answer[0])
        yield


def claimed_elsewhere(root: str | Path, unit: str) -> bool:
    """Whether another process holds `unit`'s claim now (a probe: taken and given back at once if free)."""
    try:
        with claim(root, unit):
            return False
    except ClaimedElsewhere:
        return True


def check_graph(units: list[Unit]) -> dict[str, Unit]:
    """The units by name, after checking that every name is unique, every `after` names a unit, and nothing
    waits on itself."""
    by_name: dict[str, Unit] = {}
    for unit in units:
        if unit.name in by_name:
            raise ValueError(f"two units are named {unit.name!r}")
        by_name[unit.name] = unit
    for unit in units:
        missing = [name for name in unit.after if name not in by_name]
        if missing:
            raise ValueError(f"unit {unit.name} waits for {missing}, which are not units of this grid")
    visiting: set[str] = set()
    ordered: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name in visiting:
            raise ValueError(f"units wait for each other in a circle: {' -> '.join((*path, name))}")
        visiting.add(name)
        for before in by_name[name].after:
            visit(before, (*path, name))
        visiting.discard(name)
        ordered.add(name)

    for unit in units:
        visit(unit.name, ())
    return by_name
