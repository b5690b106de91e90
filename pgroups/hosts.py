"""Which host each rank runs on, learned from the ranks themselves (never ``rank // 8``).

``PGROUPS_HOSTNAME`` overrides the hostname a rank reports — for tests that simulate several
hosts on one machine, and for sites whose hostnames are not what operators call the nodes.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from .ranks import ranks_by_host  # noqa: F401 — pure, lives with the rank-list helpers

HOSTNAME_ENV = "PGROUPS_HOSTNAME"
MAX_HOSTNAME_BYTES = 255


def local_hostname() -> str:
    """This process's host name (``PGROUPS_HOSTNAME`` if set)."""
    return os.environ.get(HOSTNAME_ENV) or socket.gethostname()


def gather_hostnames(group: Optional[dist.ProcessGroup] = None,
                     device: Optional[torch.device] = None,
                     timeout: Optional[datetime.timedelta] = None,
                     describe: Optional[Callable[[BaseException], str]] = None) -> List[str]:
    """Every rank's host name, indexed by rank within ``group`` (default: the world).

    Collective over ``group``. The tensors live on ``device`` (default: CPU, for a gloo group;
    pass the GPU for an NCCL group). Exchanges fixed-size byte tensors, so it needs no numpy
    (torch's ``*_object`` collectives do). With ``timeout`` it waits through
    :func:`pgroups.deadlines.wait_within` — on NCCL too, where a plain call returns when the kernel
    is enqueued — and a peer that never joins raises GroupTimeoutError(``describe(exc)``).
    """
    name = local_hostname().encode("utf-8")[:MAX_HOSTNAME_BYTES]
    mine = torch.zeros(MAX_HOSTNAME_BYTES + 1, dtype=torch.uint8)
    mine[0] = len(name)
    mine[1:1 + len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    mine = mine.to(device or "cpu")
    size = dist.get_world_size(group)
    everyone = [torch.empty_like(mine) for _ in range(size)]
    if timeout is None:
        dist.all_gather(everyone, mine, group=group)
    else:
        from .deadlines import wait_within

        wait_within(dist.all_gather(everyone, mine, group=group, async_op=True), timeout,
                    describe or (lambda exc: f"gathering hostnames timed out after {timeout.total_seconds():g}s"),
                    group)
    return [bytes(t[1:1 + int(t[0])].tolist()).decode("utf-8", "replace") for t in (e.cpu() for e in everyone)]
