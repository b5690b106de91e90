"""The pure planner and schedule of resharding. The planner (its public names also in
:mod:`pgroups.reshard.planner`): the plan's values (:mod:`.types`), interval geometry
(:mod:`.geometry`), the sender rule (:mod:`.rule`), a share and the whole plan (:mod:`.assembly`),
the plan hash (:mod:`.digest`) and reports (:mod:`.report`). The schedule: every rank's rounds as
the executor posts them (:mod:`.schedule`), a network model and the lower bound on it
(:mod:`.network`), and a discrete-event simulation of the schedule on that network (:mod:`.sim`).
No torch.distributed.

The schedule's names are imported on first use: :mod:`.schedule` reads the executor's wire layout,
which is built on the planner's types, so importing them here eagerly would make every import of
the planner import the wire layout first (a cycle)."""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Bound": "network", "Network": "network", "lower_bound": "network",
         "SimChunk": "schedule", "SimMessage": "schedule", "rank_rounds": "schedule",
         "SimResult": "sim", "simulate": "sim"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
