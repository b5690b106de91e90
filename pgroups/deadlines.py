"""Deadlines: how long pgroups waits, and how a wait that ends badly is named.

One rule for every backend: **every wait pgroups makes in Python ends (with an error naming the
group and its ranks) before the communicator's own watchdog could fire.** gloo has no watchdog,
so its groups keep the configured ``timeout``. NCCL groups are created with
``timeout + NCCL_WATCHDOG_MARGIN_S`` (:func:`communicator_timeout`), while pgroups' Python waits
(:func:`wait_within`) end at ``timeout``: with torch's default
``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` the watchdog tears the process down when it fires, so a
wait that lasted as long as the watchdog would race a teardown instead of raising
:class:`~pgroups.errors.GroupTimeoutError`.

Every module that waits for a collective goes through this one: :func:`wait_within` for an
async work, :func:`timeouts_named` around a blocking call, :func:`classify` /
:func:`is_timeout` / :func:`is_peer_lost` to tell a hung peer from a dead one.
``tests/test_deadlines.py`` enumerates the package's ``.wait(`` call sites, so a new waiter
cannot bypass the rule unnoticed.
"""
from __future__ import annotations

import contextlib
import datetime
from typing import Callable, Iterator, Optional

import torch.distributed as dist

from .errors import GroupTimeoutError

#: NCCL communicators are created with this much more than pgroups' Python deadline, so that
#: every Python-side wait ends first (see the module docstring). gloo groups get no margin.
NCCL_WATCHDOG_MARGIN_S = 60.0

#: lower-cased fragments of torch / gloo / NCCL error texts that mean a peer's process is gone
PEER_LOST_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                     "connection refused", "remote process exited", "ncclremoteerror")


def communicator_timeout(backend: str, timeout: datetime.timedelta) -> datetime.timedelta:
    """The timeout a communicator of ``backend`` is created with, for the Python deadline
    ``timeout``: ``timeout + NCCL_WATCHDOG_MARGIN_S`` when ``backend`` names NCCL, else
    ``timeout`` (pure)."""
    if "nccl" in str(backend).lower():
        return timeout + datetime.timedelta(seconds=NCCL_WATCHDOG_MARGIN_S)
    return timeout


def seconds(timeout_s: float) -> datetime.timedelta:
    """``timeout_s`` as a timedelta (the form torch.distributed's waits take)."""
    return datetime.timedelta(seconds=float(timeout_s))


def is_timeout(exc: BaseException) -> bool:
    """True if ``exc`` (from torch.distributed or its store) reports an expired deadline."""
    text = str(exc).lower()
    return (isinstance(exc, (TimeoutError, getattr(dist, "DistStoreError", TimeoutError)))
            or "timeout" in text or "timed out" in text)


def is_peer_lost(exc: BaseException) -> bool:
    """True if a collective failed because a peer's process went away (not a usage error)."""
    text = str(exc).lower()
    return any(marker in text for marker in PEER_LOST_MARKERS)


def classify(exc: BaseException) -> Optional[str]:
    """``"peer lost"``, ``"timeout"`` or None (neither: a usage error, a bug) for a failure of
    a collective or store call. A lost peer is checked first: gloo reports some lost
    connections with a text that also says "timeout"."""
    if is_peer_lost(exc):
        return "peer lost"
    if is_timeout(exc):
        return "timeout"
    return None


@contextlib.contextmanager
def timeouts_named(describe: Callable[[BaseException], str]) -> Iterator[None]:
    """Re-raise a torch.distributed timeout inside the block as GroupTimeoutError(describe(exc)),
    so that a hung peer is reported by group and ranks; other errors pass through unchanged."""
    try:
        yield
    except GroupTimeoutError:
        raise
    except (RuntimeError, dist.DistError) as exc:
        if is_timeout(exc):
            raise GroupTimeoutError(describe(exc)) from exc
        raise


def wait_within(work: "dist.Work", timeout: datetime.timedelta, describe: Callable[[BaseException], str],
                group: Optional["dist.ProcessGroup"] = None) -> None:
    """Wait for an async collective (``async_op=True``) at most ``timeout``; a peer that never
    joins raises GroupTimeoutError(describe(exc)) — on NCCL too, where a plain call returns as
    soon as the kernel is enqueued.

    gloo: ``Work.wait(timeout)`` raises when the deadline passes (and aborts that operation, so
    never call it in slices). NCCL (torch 2.13, ProcessGroupNCCL.hpp, ``WorkNCCL::wait``): with a
    timeout it blocks the CPU until the kernel completes or the deadline passes, then throws; the
    stuck communicator of ``group`` is then aborted (``ProcessGroup.abort()``), so the watchdog —
    which fires ``NCCL_WATCHDOG_MARGIN_S`` later — does not also tear the process down for that
    work, and the group cannot be used again (destroy the context). The NCCL path is written from
    torch's source and is exercised only by tests/gpu (not run here).
    """
    try:
        with timeouts_named(describe):
            work.wait(timeout)
    except GroupTimeoutError:
        if group is not None and "nccl" in str(dist.get_backend(group)).lower():
            with contextlib.suppress(RuntimeError, dist.DistError):
                group.abort()
        raise
