"""Checks of option values, run when a config is built (its `__post_init__`): a bad value is refused
with one line naming the option, before any data is read or any model is loaded.

A `ConfigError` is a `ValueError`, which the command line prints as one line (no traceback).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable


class ConfigError(ValueError):
    """An option value that cannot work; the message names the option and the value."""


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return value


def positive(name: str, value: Any, *, optional: bool = False) -> None:
    """value > 0 (or None when optional)."""
    if optional and value is None:
        return
    if _number(name, value) <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


def non_negative(name: str, value: Any, *, optional: bool = False) -> None:
    """value >= 0 (or None when optional)."""
    if optional and value is None:
        return
    if _number(name, value) < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")


def at_most(name: str, value: Any, limit: float) -> None:
    if _number(name, value) > limit:
        raise ConfigError(f"{name} must be <= {limit}, got {value!r}")


def one_of(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def existing_path(name: str, value: str | None, *, optional: bool = False) -> None:
    """A local file or directory that exists (hub dataset names are not checked here)."""
    if optional and value is None:
        return
    if not value or not Path(value).expanduser().exists():
        raise ConfigError(f"{name}: no such file or directory: {value}")
