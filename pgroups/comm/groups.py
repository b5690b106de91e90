"""Resolve a mode (or an explicit process group) to the group a collective runs on.

Every collective of :mod:`pgroups.comm` takes ``mode`` — a :class:`~pgroups.modes.ParallelMode`,
a mode name (``"tensor"``, ``"weight"``, any registered mode) looked up in a
:class:`~pgroups.context.ParallelContext` (default ``pgroups.gpc``), or a
``torch.distributed.ProcessGroup`` — and resolves it once to a :class:`GroupInfo`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import attrs
import torch
import torch.distributed as dist

from ..backend import tensor_device
from ..deadlines import is_peer_lost, timeouts_named
from ..context import ParallelContext
from ..errors import GroupTimeoutError
from ..handle import GroupHandle
from ..modes import ModeLike, ParallelMode, mode_name
from ..ranks import format_ranks

GroupLike = Union[ModeLike, dist.ProcessGroup, GroupHandle]


@attrs.frozen(eq=False)
class GroupInfo:
    """A resolved group: the torch group, its size, this rank's position, and a label for
    messages (``"mode 'tensor' (ranks [0, 1])"``)."""

    group: Optional[dist.ProcessGroup]
    size: int
    rank: int
    label: str
    device: torch.device = torch.device("cpu")   # where helpers put tensors they create


def resolve_group(mode: GroupLike, ctx: Optional[ParallelContext] = None, cpu: bool = False) -> GroupInfo:
    """Resolve ``mode`` (ParallelMode, mode name, GroupHandle, or ProcessGroup) to a :class:`GroupInfo`.

    Modes are looked up in ``ctx`` (default ``pgroups.gpc``); ``cpu=True`` takes the mode's CPU
    (gloo) twin. Raises ModeNotInitializedError for a mode not built (or a rank outside it),
    ValueError for a process group this rank is not a member of.
    """
    if isinstance(mode, GroupHandle):
        return GroupInfo(mode.cpu_group if cpu else mode.group, mode.size, mode.rank, mode.label,
                         torch.device("cpu") if cpu else mode.device)
    if isinstance(mode, dist.ProcessGroup):
        rank = dist.get_rank(mode)
        ranks = dist.get_process_group_ranks(mode)
        if rank < 0:
            raise ValueError(f"this rank ({dist.get_rank()}) is not a member of the process group "
                             f"of ranks {format_ranks(ranks)}")
        return GroupInfo(mode, len(ranks), rank, f"group of ranks {format_ranks(ranks)}",
                         tensor_device(str(dist.get_backend(mode)).lower(), cpu))
    if not isinstance(mode, (str, ParallelMode)):
        raise TypeError(f"mode must be a ParallelMode, a mode name or a ProcessGroup, got {mode!r}")
    if ctx is None:
        import pgroups  # the package's context, looked up at call time

        ctx = pgroups.gpc
    name = mode_name(mode)
    group = ctx.get_cpu_group(name) if cpu else ctx.get_group(name)
    ranks = ctx.get_ranks_in_group(name)
    backend_name = "gloo" if cpu or ctx.backend is None else ctx.backend.device_backend
    return GroupInfo(group, len(ranks), ctx.get_local_rank(name), f"mode {name!r} (ranks {format_ranks(ranks)})",
                     tensor_device(backend_name, cpu))


def group_handle(mode: GroupLike, ctx: Optional[ParallelContext] = None) -> Union[GroupHandle, dist.ProcessGroup]:
    """The :class:`~pgroups.handle.GroupHandle` of a named mode (``ctx.group(mode)``, ``ctx``
    default ``pgroups.gpc``); a handle or a ProcessGroup is returned as given. Raises
    ModeNotInitializedError for a mode not built, TypeError for anything else."""
    if isinstance(mode, (GroupHandle, dist.ProcessGroup)):
        return mode
    if not isinstance(mode, (str, ParallelMode)):
        raise TypeError(f"mode must be a ParallelMode, a mode name, a GroupHandle or a ProcessGroup, got {mode!r}")
    if ctx is None:
        import pgroups  # the package's context, looked up at call time

        ctx = pgroups.gpc
    return ctx.group(mode)


@contextlib.contextmanager
def comm_errors(info: GroupInfo, operation: str) -> Iterator[None]:
    """Turn a collective's timeout, or the loss of a peer, into GroupTimeoutError naming
    ``operation`` and the group (a dead peer is a peer that will never arrive)."""
    def describe(exc: BaseException, outcome: str, reason: str) -> str:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{operation} over {info.label} {outcome} on local rank {info.rank}: {reason}: {first}"

    with timeouts_named(lambda exc: describe(exc, "timed out", "a peer never arrived (does every rank of the "
                                                               "group call it in the same order?)")):
        try:
            yield
        except (RuntimeError, dist.DistError) as exc:
            if not is_peer_lost(exc):
                raise
            raise GroupTimeoutError(describe(exc, "failed", "a peer left (its process died or closed the "
                                                            "connection)")) from exc
