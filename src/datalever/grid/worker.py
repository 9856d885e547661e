"""One unit in a process of its own: what `grid.local.Workers` starts and what a SLURM job runs.

    python -m datalever.grid.worker --study datalever.experiment --config RUN/.grid/config-<hash>.yaml \
        --unit arms/hard/seed0 [--processes G]

It claims the unit, runs it and exits 0; 73 if another process holds the claim; 75 if it was stopped by a signal
with its state saved (`preempt`); 1 with the traceback if it failed. With `--processes G` > 1 the claim is held here
while the unit runs under torchrun, one process per device (each of those runs with `--claimed`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import traceback

from datalever.grid.local import CLAIMED_EXIT
from datalever.grid.units import ClaimedElsewhere, Unit, claim
from datalever.preempt import REQUEUE_EXIT, Preempted


def load_unit(study: str, config_file: str, name: str) -> tuple[str, Unit]:
    """The run directory (where claims live) and the unit `name` of the study module `study` (which rebuilds its units
    from a settings file: `units_from_file`)."""
    root, units = importlib.import_module(study).units_from_file(config_file)
    found = {unit.name: unit for unit in units}
    if name not in found:
        raise SystemExit(f"no unit {name!r} in the study of {config_file}")
    return root, found[name]


def set_threads() -> None:
    threads = os.environ.get("DATALEVER_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def run_unit(
    study: str, config_file: str, name: str, processes: int = 1, claimed: bool = False, reraise: tuple = ()
) -> int:
    """Run the unit; the exit status (0, CLAIMED_EXIT, REQUEUE_EXIT or 1). Exceptions of the types in `reraise` go
    to the caller (a SLURM job handles a stop itself)."""
    set_threads()
    root, unit = load_unit(study, config_file, name)
    try:
        if claimed:
            unit.run()
            return 0
        with claim(root, name):
            if unit.done():  # finished by another process between its being found ready and this claim
                return 0
            if processes > 1:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), "-m", "datalever.grid.worker", "--study", study, "--config", config_file,
                           "--unit", name, "--claimed"]  # fmt: skip
                return subprocess.run(command).returncode
            unit.run()
        return 0
    except reraise:
        raise
    except ClaimedElsewhere as e:
        print(e, file=sys.stderr)
        return CLAIMED_EXIT
    except Preempted as e:
        print(f"{name}: {e}", file=sys.stderr)
        return REQUEUE_EXIT
    except Exception:
        traceback.print_exc()
        return 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datalever.grid.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--study", required=True, help="the module whose units_from_file rebuilds the units")
    parser.add_argument("--config", required=True, help="the study's settings (a YAML file)")
    parser.add_argument("--unit", required=True, help="the unit's name, e.g. arms/hard/seed0")
    parser.add_argument("--processes", type=int, default=1, help="processes (devices) the unit runs on")
    parser.add_argument("--claimed", action="store_true", help="the claim is held by the parent (under torchrun)")
    args = parser.parse_args(argv)
    from datalever.cli import _quiet_libraries

    _quiet_libraries()
    sys.exit(run_unit(args.study, args.config, args.unit, args.processes, args.claimed))


if __name__ == "__main__":
    main()
