"""The private torch APIs pgroups relies on, in one place: each with the torch version it was
checked against, what it is for, and the fallback where one exists.

Checked against torch 2.13.0 (``torch/distributed/distributed_c10d.py``, ``torch/_C/__init__.pyi``,
``torch/_tensor.py``). A torch that moves one
of them fails here, with the name of what moved, rather than deep inside group creation.
"""
from __future__ import annotations

import itertools
from typing import Any, Optional

import torch
import torch.distributed as dist

CHECKED_AGAINST = "2.13.0"


def _c10d() -> Any:
    return dist.distributed_c10d


def default_group_bound_device() -> Optional[Any]:
    """The device the default group is bound to (``init_process_group(device_id=...)``), or None.
    ``_get_default_group().bound_device_id``; fallback: None (treated as unbound)."""
    group = getattr(_c10d(), "_get_default_group", lambda: None)()
    return getattr(group, "bound_device_id", None)


def default_store() -> Any:
    """The default group's store (``_get_default_store``): where pgroups' members meet when the user,
    not pgroups, started torch.distributed. No fallback: raises RuntimeError naming it."""
    getter = getattr(_c10d(), "_get_default_store", None)
    if getter is None:
        raise RuntimeError(f"torch.distributed.distributed_c10d._get_default_store is gone (checked against "
                           f"torch {CHECKED_AGAINST}); let pgroups start torch.distributed (init_from_config)")
    return getter()


def groups_held() -> int:
    """How many process groups this process holds — ``len(_world.pg_names)``, which torch hashes
    into a members-only or split group's name (``_hash_ranks_to_str``). No fallback."""
    return len(_c10d()._world.pg_names)


def autograd_backward_running() -> bool:
    """Whether the calling code runs inside an autograd backward pass — ``torch._C.
    _current_graph_task_id() != -1`` (the engine's current graph task; -1 outside one). ISP
    uses it to tell an activation recomputation (a block's forward re-run inside its own
    backward) from a forward. torch 2.13 has no public equivalent. No fallback: raises
    RuntimeError naming it (guessing "not in backward" would record a recomputation as a new
    forward and hold its weights)."""
    getter = getattr(torch._C, "_current_graph_task_id", None)
    if getter is None:
        raise RuntimeError(f"torch._C._current_graph_task_id is gone (checked against torch {CHECKED_AGAINST}); "
                           "pgroups' WeightParallel cannot tell activation recomputation from a forward")
    return getter() != -1


_ALWAYS_NEW = itertools.count(-1, -1)  # negative: never a real version


def tensor_version(tensor: Any) -> int:
    """The in-place version counter of ``tensor`` (``tensor._version``: bumped by every in-place
    change, an optimizer step included). ISP compares it to know whether a gathered full weight
    is stale. Fallback when the attribute is gone: a number never returned before, so every
    comparison says "changed" — still correct, at the cost of one all-gather more per use."""
    version = getattr(tensor, "_version", None)
    return next(_ALWAYS_NEW) if version is None else int(version)


def abort_process_groups() -> None:
    """Abort every process group's communicators (``_abort_process_group``), so that destroying
    them does not wait for a hung NCCL operation. Best effort: a torch without it, or an abort
    that fails, leaves the groups as they are."""
    try:
        _c10d()._abort_process_group()
    except (RuntimeError, ValueError, AttributeError):
        pass
