"""The private torch APIs pgroups relies on, in one place: each with the torch version it was
checked against, what it is for, and the fallback where one exists.

Checked against torch 2.13.0 (``torch/distributed/distributed_c10d.py``). A torch that moves one
of them fails here, with the name of what moved, rather than deep inside group creation.
"""
from __future__ import annotations

from typing import Any, Optional

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
