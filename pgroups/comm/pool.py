"""A pool of communication buffers reused by key, with counters.

The weight-parallel runtime receives every all-gather and reduce-scatter into buffers from a
:class:`BufferPool`: a buffer is *acquired* for a key (which parameter, which role) and a
byte size, and *released* when the gathered weight or the reduced gradient is no longer
needed. A released buffer waits in its key's free list for the next acquire of the same key
and size, so once every key has reached its peak concurrency (step 2 of a training loop)
nothing more is allocated. :meth:`BufferPool.stats` exposes the counters that prove it.

With ``enabled=False`` every acquire allocates and every release drops the buffer (the
counters still count), which is what "no memory pool" means in benchmarks and tests.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Tuple

import attrs
import torch


@attrs.frozen
class PoolStats:
    """Counters of a :class:`BufferPool` (bytes are buffer sizes, not tensor sizes).

    ``allocations``: buffers created; ``reuses``: acquires served from a free list;
    ``buffers`` / ``bytes_held``: buffers the pool owns now (in use or free);
    ``in_use_bytes``: acquired and not yet released; ``peak_in_use_bytes``: the most ever in use
    at once; ``peak_in_use_by_tag``: the same per tag (e.g. ``"weight"`` vs ``"grad"``);
    ``in_use_by_tag``: bytes in use now per tag.
    """

    allocations: int
    reuses: int
    buffers: int
    bytes_held: int
    in_use_bytes: int
    peak_in_use_bytes: int
    peak_in_use_by_tag: Tuple[Tuple[str, int], ...]
    in_use_by_tag: Tuple[Tuple[str, int], ...] = ()

    def peak_for(self, tag: str) -> int:
        """Peak bytes in use under ``tag`` (0 if never used)."""
        return dict(self.peak_in_use_by_tag).get(tag, 0)

    def in_use_for(self, tag: str) -> int:
        """Bytes in use now under ``tag``."""
        return dict(self.in_use_by_tag).get(tag, 0)


class BufferPool:
    """uint8 buffers keyed by ``(key, nbytes)``; see the module docstring.

    Not thread-safe (the runtime calls it from the training thread and autograd's backward,
    which never run at once for one model).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._free: Dict[Tuple[Hashable, int, torch.device], List[torch.Tensor]] = {}
        self._in_use: Dict[int, Tuple[Tuple[Hashable, int, torch.device], str]] = {}
        self._allocations = 0
        self._reuses = 0
        self._held = 0
        self._buffers = 0
        self._in_use_bytes = 0
        self._peak = 0
        self._in_use_by_tag: Dict[str, int] = {}
        self._peak_by_tag: Dict[str, int] = {}

    def acquire(self, key: Hashable, nbytes: int, device: torch.device, tag: str = "",
                zero: bool = False) -> torch.Tensor:
        """A uint8 buffer of ``nbytes`` on ``device`` for ``key``: a released one if the pool
        has it, else a new one. ``zero=True`` zeroes a *new* buffer (a reused one keeps
        whatever its last user left, which callers that zero padding once rely on)."""
        slot = (key, int(nbytes), torch.device(device))
        free = self._free.get(slot)
        if free:
            buffer = free.pop()
            self._reuses += 1
        else:
            maker = torch.zeros if zero else torch.empty
            buffer = maker(int(nbytes), dtype=torch.uint8, device=device)
            self._allocations += 1
            if self.enabled:
                self._held += buffer.numel()
                self._buffers += 1
        self._in_use[id(buffer)] = (slot, tag)
        self._in_use_bytes += buffer.numel()
        self._peak = max(self._peak, self._in_use_bytes)
        used = self._in_use_by_tag.get(tag, 0) + buffer.numel()
        self._in_use_by_tag[tag] = used
        self._peak_by_tag[tag] = max(self._peak_by_tag.get(tag, 0), used)
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        """Give ``buffer`` back (kept for reuse when the pool is enabled). Releasing a buffer
        this pool did not hand out, or one already released, raises ValueError."""
        entry = self._in_use.pop(id(buffer), None)
        if entry is None:
            raise ValueError("released a buffer this pool did not hand out (or released it twice)")
        slot, tag = entry
        self._in_use_bytes -= buffer.numel()
        self._in_use_by_tag[tag] -= buffer.numel()
        if self.enabled:
            self._free.setdefault(slot, []).append(buffer)

    def clear(self) -> None:
        """Drop every free buffer (buffers in use stay valid and are dropped on release)."""
        for buffers in self._free.values():
            for buffer in buffers:
                self._held -= buffer.numel()
                self._buffers -= 1
        self._free.clear()

    def stats(self) -> PoolStats:
        """The counters now (see :class:`PoolStats`)."""
        held = self._held if self.enabled else self._in_use_bytes
        buffers = self._buffers if self.enabled else len(self._in_use)
        return PoolStats(self._allocations, self._reuses, buffers, held, self._in_use_bytes, self._peak,
                         tuple(sorted(self._peak_by_tag.items())), tuple(sorted(self._in_use_by_tag.items())))

    def __repr__(self) -> str:
        s = self.stats()
        return (f"<BufferPool {'on' if self.enabled else 'off'}: {s.allocations} allocations, {s.reuses} reuses, "
                f"{s.in_use_bytes} B in use (peak {s.peak_in_use_bytes} B)>")
