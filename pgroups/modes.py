"""Parallel modes: the names by which groups are built and queried.

Every API accepts a :class:`ParallelMode` member or its string value; users add modes of
their own (``"micro_data"``, ``"expert"`` …) simply by registering an initializer under a new
name — a mode is a plain string, the enum only names the built-ins.
"""
from __future__ import annotations

import enum
from typing import Union


class ParallelMode(str, enum.Enum):
    """The built-in modes. The value is the name used in configs, the CLI and JSON."""

    GLOBAL = "global"
    DATA = "data"
    MODEL = "model"
    PIPELINE = "pipe"
    TENSOR = "tensor"
    ZERO1 = "zero1"
    NETTEST = "nettest"
    DUMMY = "dummy"

    def __str__(self) -> str:  # "tensor", not "ParallelMode.TENSOR", in messages
        return self.value


ModeLike = Union[ParallelMode, str]


def mode_name(mode: ModeLike) -> str:
    """Return the canonical string name of ``mode`` (a ParallelMode or a str).

    Raises TypeError for anything else, naming the type received.
    """
    if isinstance(mode, ParallelMode):
        return mode.value
    if isinstance(mode, str) and mode:
        return mode
    raise TypeError(f"a parallel mode must be a ParallelMode or a non-empty str, got {mode!r}")
