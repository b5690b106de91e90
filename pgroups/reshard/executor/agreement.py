"""The plan agreement: before any byte moves, the ranks of the group all-gather an 8-byte digest
of the plan and the shared options (:func:`.wire.agreement_digest`) and compare."""
from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from ...comm.raw import all_gather_single
from ...deadlines import wait_within
from ...errors import GroupTimeoutError, ReshardError
from ..wire import REFUSED, first_disagreement
from .buffers import _Buffers


def agree(group: Any, buffers: _Buffers, device: torch.device, digest: int, rank: int,
          timeout: datetime.timedelta, refuse: bool) -> None:
    """All-gather ``digest`` (or :data:`.wire.REFUSED` with ``refuse``) over ``group``, waiting
    at most ``timeout`` (:func:`pgroups.deadlines.wait_within`: on NCCL it ends before the
    communicator's watchdog); ReshardError naming the first rank that disagrees (or refused),
    GroupTimeoutError if a rank of the group never joins. Under NCCL it is also the group's first
    collective, which a later batch_isend_irecv needs. The two int64 buffers come from
    ``buffers`` (kept between runs)."""
    size = dist.get_world_size(group)
    mine = buffers.get("agree.mine", 1, device, torch.int64)[:1]
    gathered = buffers.get("agree.all", size, device, torch.int64)[:size]
    mine.fill_(REFUSED if refuse else digest)
    where = f"reshard plan agreement on rank {rank} over the global group ({size} ranks)"

    def timed_out(exc: BaseException) -> str:
        return (f"{where}: not done within {timeout.total_seconds():g}s — does every rank of the group run the "
                f"reshard? ({_first_line(exc)})")

    try:
        wait_within(all_gather_single(gathered, mine, group=group, async_op=True), timeout, timed_out, group)
    except GroupTimeoutError:
        raise
    except Exception as exc:
        raise ReshardError(f"{where} failed: {_first_line(exc)}") from exc
    if refuse:
        return
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
    problem = first_disagreement(gathered.tolist(), ranks)
    if problem is not None:
        raise ReshardError(f"reshard plan agreement on rank {rank}: {problem}; nothing was sent or written")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
