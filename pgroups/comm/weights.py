"""Asynchronous all-gather of a weight shard whose gradient is reduce-scattered back.

:func:`start_weight_gather` starts the gather and returns a :class:`WeightGatherHandle`;
``wait()`` gives the full weight, joined to the shard's autograd graph: backward sums the
full weight's gradient over the group and keeps this rank's slice (weight parallelism /
ZeRO-3). :class:`~pgroups.comm.isp.WeightParallel` is the runtime that drives these per block.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..context import ParallelContext
from .groups import GroupHandle, GroupLike, comm_errors, resolve_group
from .raw import reduce_scatter_raw, start_gather
from .sizes import Sizes, normalize_dim, piece_sizes


class _GatheredWeight(torch.autograd.Function):
    """Connects an already gathered full weight to its shard: backward reduce-scatters."""

    @staticmethod
    def forward(ctx, shard, assemble, dim, sizes, info):
        ctx.dim, ctx.sizes, ctx.info = dim, sizes, info
        return assemble()

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_raw(grad, ctx.dim, ctx.sizes, ctx.info), None, None, None, None


class WeightGatherHandle:
    """An all-gather of a weight shard in flight. :meth:`wait` returns the full weight, joined
    to the shard's autograd graph: its gradient is reduce-scattered (summed over the group)
    back into the shard's gradient. ``wait`` may be called again; it returns the same tensor."""

    def __init__(self, shard: torch.Tensor, dim: int, sizes: Sizes, info: GroupHandle) -> None:
        self.shard, self.dim, self.sizes, self.info = shard, dim, sizes, info
        self._full: Optional[torch.Tensor] = None
        if info.size == 1:
            self._work, self._finish = None, None
        else:
            self._work, self._finish = start_gather(shard, dim, sizes, info, async_op=True)

    def is_completed(self) -> bool:
        """Whether the gather has finished (never blocks)."""
        return self._full is not None or self._work is None or self._work.is_completed()

    def wait(self) -> torch.Tensor:
        """Block until the gather is done; return the full weight (with autograd to the shard)."""
        if self._full is None:
            if self._work is not None:
                with comm_errors(self.info, "weight all-gather"):
                    self._work.wait()
            if self.info.size == 1:
                self._full = self.shard
            else:
                self._full = _GatheredWeight.apply(self.shard, self._finish, self.dim, self.sizes, self.info)
        return self._full

    def __repr__(self) -> str:
        state = "done" if self._full is not None else "in flight"
        return f"<WeightGatherHandle dim {self.dim} sizes {list(self.sizes)} over {self.info.label}: {state}>"


def start_weight_gather(shard: torch.Tensor, dim: int, mode: GroupLike, *, sizes: Optional[Sequence[int]] = None,
                        ctx: Optional[ParallelContext] = None) -> WeightGatherHandle:
    """Start all-gathering a weight shard along ``dim`` (weight parallelism / ZeRO-3 style) and
    return at once; ``handle.wait()`` gives the full weight. Start the next layer's gather
    before computing this one to overlap communication. Backward reduce-scatters (sums) the
    full weight's gradient into the shard's. ``sizes`` as in
    :func:`~.activations.gather_along`.
    """
    info = resolve_group(mode, ctx)
    dim = normalize_dim(dim, shard.dim(), "weight shard")
    sizes = piece_sizes(sizes, info, dim, shard.shape[dim], "sizes")
    return WeightGatherHandle(shard, dim, sizes, info)


def all_gather_weight(shard: torch.Tensor, dim: int, mode: GroupLike, *, sizes: Optional[Sequence[int]] = None,
                      ctx: Optional[ParallelContext] = None) -> torch.Tensor:
    """:func:`start_weight_gather` and wait: the full weight, backward reduce-scatter."""
    return start_weight_gather(shard, dim, mode, sizes=sizes, ctx=ctx).wait()
