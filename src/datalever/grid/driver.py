"""The driver: runs a graph of units through a launcher, each when the units it reads are finished, and tells what
happens.

It starts every ready unit the launcher has room for, one line when a unit starts and when it ends (unit, where,
time), and keeps an overall bar (units done of total, which are running, an estimate of the time left from the
units of the same kind finished so far). A unit claimed by another process (another driver on the same run
directory) is left to it and watched until it is finished, or its claim is given up (that process died), when it is
taken over. A unit that fails is reported with its name, its log file and its last lines; the units that do not
depend on it go on; at the end `GridFailed` names every failure, and a rerun retries only what is unfinished.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from datalever import progress
from datalever.grid.units import ClaimedElsewhere, Unit, check_graph, claim, claimed_elsewhere

POLL_S = 2.0  # how often units running elsewhere are looked at


@dataclass
class Outcome:
    """How a unit's attempt ended."""

    unit: str
    status: str  # done | failed | elsewhere (claimed by another process) | preempted (state saved: run it again)
    where: str = "here"
    seconds: float = 0.0
    log: Path | None = None
    tail: str = ""  # the last lines of its log, for a failure
    error: BaseException | None = None  # the exception of a unit that failed in this process


class Launcher(Protocol):
    capacity: int
    """How many units may run at once."""

    def start(self, unit: Unit) -> str:
        """Start `unit` (or run it, for a launcher without processes of its own); returns where it runs."""

    def wait(self, timeout: float) -> list[Outcome]:
        """The outcomes of the attempts that ended, waiting up to `timeout` seconds for one."""

    def stop(self) -> None:
        """End every attempt still running (the driver is being stopped)."""


class GridFailed(RuntimeError):
    """Some units failed (or could not run because a unit they read failed)."""

    def __init__(self, failed: list[Outcome], blocked: list[str]):
        self.failed, self.blocked = failed, blocked
        parts = [f"{o.unit} (log: {o.log})" if o.log else o.unit for o in failed]
        message = f"{len(failed)} unit(s) failed: {', '.join(parts)}"
        if blocked:
            message += f"; {len(blocked)} not run because a unit they read failed"
        super().__init__(message + "; rerun the same command to retry what is unfinished")


@dataclass
class _State:
    done: set[str] = field(default_factory=set)
    running: dict[str, tuple[float, str]] = field(default_factory=dict)  # unit -> (start, where)
    elsewhere: set[str] = field(default_factory=set)
    failed: dict[str, Outcome] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # by kind


def run(units: list[Unit], root: str | Path, launcher: Launcher, *, show: bool = True) -> None:
    """Run every unfinished unit of `units` (the run directory `root` holds their claims) through `launcher`;
    raises GridFailed after the rest has run if any failed."""
    by_name = check_graph(units)
    state = _State(done={u.name for u in units if not u.in_driver and u.done()})
    with progress.bar(total=len(units), initial=len(state.done), desc="units", unit="unit", show=show) as bar:
        try:
            _drive(by_name, root, launcher, state, bar)
        except BaseException:
            launcher.stop()
            raise
    failed = list(state.failed.values())
    if failed:
        blocked = [name for name in by_name if name not in state.done and name not in state.failed]
        for outcome in failed:
            _say(bar, f"failed: {outcome.unit} ({outcome.where}); log: {outcome.log}\n{outcome.tail}".rstrip())
        errors = [o.error for o in failed if o.error is not None]
        if len(failed) == 1 and errors:  # one failure in this process: its own exception, as a stage raises it
            raise errors[0]
        raise GridFailed(failed, blocked)


def _drive(by_name: dict[str, Unit], root, launcher: Launcher, state: _State, bar) -> None:
    units = list(by_name.values())
    while True:
        for unit in _ready(units, state):
            if unit.in_driver:
                _run_in_driver(unit, root, state, bar)
            elif len(state.running) < launcher.capacity and not _busy_elsewhere(unit, root, state, bar):
                _start(unit, launcher, state, bar)
        if not state.running:
            if not state.elsewhere and not _ready(units, state):
                return
            time.sleep(POLL_S)  # only units that other processes run: look again soon
            continue
        for outcome in launcher.wait(timeout=POLL_S):
            _ended(by_name[outcome.unit], outcome, state, bar)
        _update(bar, units, state, launcher)


def _ready(units: list[Unit], state: _State) -> list[Unit]:
    taken = state.done | state.failed.keys() | state.running.keys()
    return [u for u in units if u.name not in taken and all(d in state.done for d in u.after)]


def _busy_elsewhere(unit: Unit, root, state: _State, bar) -> bool:
    """Whether another process runs `unit`; one it finished counts as done here."""
    if unit.name not in state.elsewhere:
        return False
    if unit.done():
        state.elsewhere.discard(unit.name)
        state.done.add(unit.name)
        bar.update(1)
        _say(bar, f"finished {unit.name} (by another process)")
        return True
    if claimed_elsewhere(root, unit.name):
        return True
    state.elsewhere.discard(unit.name)  # its claim was given up unfinished (that process died): take it over
    return False


def _start(unit: Unit, launcher: Launcher, state: _State, bar) -> None:
    start = time.monotonic()
    if getattr(launcher, "synchronous", False):  # it runs the unit before it returns: say so first
        _say(bar, f"started {unit.name} (here)")
    where = launcher.start(unit)
    state.running[unit.name] = (start, where)
    if not getattr(launcher, "synchronous", False):
        _say(bar, f"started {unit.name} ({where})")


def _ended(unit: Unit, outcome: Outcome, state: _State, bar) -> None:
    start, where = state.running.pop(unit.name)
    seconds = outcome.seconds or time.monotonic() - start
    if outcome.status == "done":
        state.done.add(unit.name)
        state.seconds[unit.kind].append(seconds)
        bar.update(1)
        _say(bar, f"finished {unit.name} in {seconds:.0f} s ({outcome.where or where})")
    elif outcome.status == "elsewhere":
        state.elsewhere.add(unit.name)
        _say(bar, f"{unit.name} is claimed by another process: left to it")
    elif outcome.status == "preempted":  # its state is saved: it goes again
        _say(bar, f"{unit.name} stopped with its state saved ({outcome.where or where}): it runs again")
    else:
        state.failed[unit.name] = outcome
        _say(bar, f"failed {unit.name} after {seconds:.0f} s ({outcome.where or where}); log: {outcome.log}")


def _run_in_driver(unit: Unit, root, state: _State, bar) -> None:
    """Bookkeeping the driver does itself, claimed like any unit (another driver doing it is waited for)."""
    while True:
        try:
            with claim(root, unit.name):
                unit.run()
            break
        except ClaimedElsewhere:
            time.sleep(POLL_S)
        except Exception as e:
            state.failed[unit.name] = Outcome(unit.name, "failed", error=e, tail=f"{type(e).__name__}: {e}")
            return
    state.done.add(unit.name)
    bar.update(1)


def _update(bar, units: list[Unit], state: _State, launcher: Launcher) -> None:
    running = ", ".join(sorted(state.running)[:4]) + (" ..." if len(state.running) > 4 else "")
    left = _time_left(units, state, launcher.capacity)
    bar.set_postfix_str(f"running: {running or '-'}" + (f"; ~{left / 60:.0f} min left" if left is not None else ""))


def _time_left(units: list[Unit], state: _State, capacity: int) -> float | None:
    """Each unfinished unit at the mean time of the finished units of its kind (of all kinds, where its kind has
    none finished yet), over the launcher's room; None before any unit has finished here."""
    finished = [s for times in state.seconds.values() for s in times]
    if not finished:
        return None
    overall = sum(finished) / len(finished)

    def mean(kind: str) -> float:
        times = state.seconds.get(kind)
        return sum(times) / len(times) if times else overall

    left = sum(mean(u.kind) for u in units if u.name not in state.done and u.name not in state.failed)
    return left / max(1, capacity)


def _say(bar, line: str) -> None:
    bar.write(f"[grid] {time.strftime('%H:%M:%S')} {line}", file=sys.stderr)
