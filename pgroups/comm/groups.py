"""Resolve a mode (or an explicit process group) to the group a collective runs on.

Every collective of :mod:`pgroups.comm` takes ``mode`` — a :class:`~pgroups.handle.GroupHandle`
(``ctx.group("tp")``), a mode name or :class:`~pgroups.modes.ParallelMode` looked up as
``ctx.group(mode)`` in a :class:`~pgroups.context.ParallelContext` (default ``pgroups.gpc``), or
a ``torch.distributed.ProcessGroup`` — and resolves it once to a GroupHandle.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch.distributed as dist

from ..backend import tensor_device
from ..deadlines import is_peer_lost, timeouts_named
from ..context import ParallelContext
from ..errors import GroupTimeoutError
from ..handle import GroupHandle
from ..modes import ModeLike, ParallelMode
from ..ranks import format_ranks

GroupLike = Union[ModeLike, dist.ProcessGroup, GroupHandle]

#: Deprecated: what :func:`resolve_group` returned before the group handle; it returns a
#: :class:`~pgroups.handle.GroupHandle` now (same ``group``, ``size``, ``rank``, ``label``,
#: ``device``). Kept as a name only.
GroupInfo = GroupHandle


def resolve_group(mode: GroupLike, ctx: Optional[ParallelContext] = None, cpu: bool = False) -> GroupHandle:
    """The :class:`~pgroups.handle.GroupHandle` a collective over ``mode`` runs on.

    A handle is returned as given; a mode (name or ParallelMode) is ``ctx.group(mode)`` (``ctx``
    default ``pgroups.gpc``), which creates what is still lazy; a ProcessGroup is wrapped in a
    handle with no mode (labelled by its ranks). ``cpu=True`` gives the handle on the group's
    CPU (gloo) twin (:meth:`GroupHandle.on_cpu`). Raises ModeNotInitializedError for a mode not
    built (or a rank outside it), ValueError for a process group this rank is not a member of
    or a group with no CPU twin, TypeError for anything else.
    """
    if isinstance(mode, dist.ProcessGroup):
        handle = process_group_handle(mode)
    elif isinstance(mode, GroupHandle):
        handle = mode
    elif isinstance(mode, (str, ParallelMode)):
        if ctx is None:
            import pgroups  # the package's context, looked up at call time

            ctx = pgroups.gpc
        handle = ctx.group(mode)
    else:
        raise TypeError(f"mode must be a ParallelMode, a mode name, a GroupHandle or a ProcessGroup, got {mode!r}")
    return handle.on_cpu() if cpu else handle


def process_group_handle(group: dist.ProcessGroup) -> GroupHandle:
    """A handle on a torch ProcessGroup this rank belongs to (no mode: labelled by its ranks).
    On a gloo group the group is its own CPU twin. ValueError when this rank is not a member."""
    rank = dist.get_rank(group)
    ranks = tuple(dist.get_process_group_ranks(group))
    if rank < 0:
        raise ValueError(f"this rank ({dist.get_rank()}) is not a member of the process group "
                         f"of ranks {format_ranks(ranks)}")
    backend = str(dist.get_backend(group)).lower()
    return GroupHandle(None, group, group if backend == "gloo" else None, ranks, rank, tensor_device(backend, False))


@contextlib.contextmanager
def comm_errors(info: GroupHandle, operation: str) -> Iterator[None]:
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
