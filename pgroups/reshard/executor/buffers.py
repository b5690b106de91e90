"""The staging buffers a Resharder owns, and what is left of them after a failed run."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch


class _Buffers:
    """The staging a Resharder owns on one device: named uint8 buffers, allocated once and kept.
    ``allocations`` counts every buffer ever allocated (a repeated sync adds none)."""

    def __init__(self) -> None:
        self._buffers: Dict[str, torch.Tensor] = {}
        self.allocations = 0
        self.abandoned: List[Any] = []     # (works not completed, buffers) failed runs left posted

    def get(self, key: str, nbytes: int, device: torch.device, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.device != device or buffer.numel() < nbytes or buffer.dtype != dtype:
            buffer = self._buffers[key] = torch.empty(max(nbytes, 1), dtype=dtype, device=device)
            self.allocations += 1
        return buffer

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def drop(self, works: Optional[Sequence[Any]] = None) -> None:
        """Forget every buffer: the next run allocates fresh ones. With ``works`` (after a failed
        run: the operations it left posted), the buffers are kept alive while any of those
        operations has not completed — never reused, so a late message lands where nobody looks —
        and released once all have: a failure with nothing in flight keeps nothing, and every
        call lets go of the sets whose operations completed since."""
        self.abandoned = [(left, kept) for left, kept in self.abandoned if _pending(left)]
        left = _pending(works or ())
        if left:
            self.abandoned.append((left, dict(self._buffers)))
        self._buffers.clear()


def _pending(works: Sequence[Any]) -> List[Any]:
    """The works of ``works`` not completed yet (a work that cannot say counts as completed)."""
    out = []
    for work in works:
        try:
            done = work.is_completed()
        except Exception:   # an aborted or failed work: nothing will land any more
            done = True
        if not done:
            out.append(work)
    return out
