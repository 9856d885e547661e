"""Command lines that start several processes, shared by the multi-process tests."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_command(*script_and_args: str) -> list[str]:
    """`accelerate launch` with configs/accelerate/fsdp2.yaml on 2 processes, as a user launches FSDP.

    There is no GPU on CI machines: datalever switches Accelerate's FSDP plugin on for the CPU
    processes (gloo), so this runs the same FSDP2 code path as a GPU launch.
    """
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        *script_and_args,
    ]
