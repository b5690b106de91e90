"""DeepSpeed-Ulysses attention over a sequence-parallel group (InternEvo's
``DistributedAttention`` on the ``tensor`` group in ISP mode).

Each rank holds a slice of the sequence. Before attention one all-to-all turns q, k and v
(together, one communication) from sequence-sharded ``[b, s/p, h, d]`` into head-sharded
``[b, s, h/p, d]``; any local attention function then sees the whole sequence for its heads;
a second all-to-all turns the output back. Autograd runs both exchanges in reverse.

GQA: with fewer key/value heads than ranks (``h_kv < p``, ``p % h_kv == 0``) every KV head is
repeated ``p / h_kv`` times (adjacent copies, as InternEvo's ``expandKVPacked``) so that each
rank receives the KV head its query heads use; the gradients of the copies add up. With
``h_kv >= p`` the KV heads must divide evenly over the ranks, as must the query heads.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..context import ParallelContext

from .activations import all_to_all
from .groups import GroupLike, resolve_group
from .sizes import piece_sizes


def kv_repeats(query_heads: int, kv_heads: int, group_size: int) -> int:
    """How many times each KV head is repeated so q, k, v split evenly over ``group_size``
    ranks with every rank's query heads matching its KV heads (1 = no repetition).

    Raises ValueError naming the head counts and the group size when no layout works.
    """
    if query_heads < 1 or kv_heads < 1 or query_heads % kv_heads:
        raise ValueError(f"query heads ({query_heads}) must be a positive multiple of key/value heads ({kv_heads})")
    if query_heads % group_size:
        raise ValueError(f"Ulysses attention splits heads over the group: query heads ({query_heads}) must be "
                         f"divisible by the group size ({group_size})")
    if kv_heads >= group_size:
        if kv_heads % group_size:
            raise ValueError(f"key/value heads ({kv_heads}) must be divisible by the group size ({group_size}) "
                             f"or divide it")
        return 1
    if group_size % kv_heads:
        raise ValueError(f"key/value heads ({kv_heads}) fewer than the group size ({group_size}) must divide it "
                         "(each is repeated group_size / kv_heads times)")
    return group_size // kv_heads


class UlyssesAttention(nn.Module):
    """``UlyssesAttention(attn_fn, mode="tp")(q, k, v, *args, **kwargs)``; ``mode`` is a mode
    (resolved through ``ctx.group(mode)`` at each call) or a :class:`~pgroups.handle.GroupHandle`.

    ``attn_fn(q, k, v, *args, **kwargs)`` is any local attention (a function or a module) on
    head-sharded ``[b, s, h/p, d]`` tensors returning ``[b, s, h_q/p, d]``; it may do GQA
    itself (``k``, ``v`` have ``h_kv/p`` heads, or one repeated head). ``q``: ``[b, s/p, h_q, d]``,
    ``k`` / ``v``: ``[b, s/p, h_kv, d]`` (``seq_dim`` / ``head_dim`` move them). ``seq_sizes``
    gives every rank's sequence length when they differ (default: all equal to this rank's).
    Returns ``[b, s/p, h_q, d]``. Every rank of the group calls it in the same order.
    """

    def __init__(self, attn_fn: Callable[..., torch.Tensor], mode: GroupLike = "tp", *, seq_dim: int = 1,
                 head_dim: int = 2, ctx: Optional[ParallelContext] = None) -> None:
        super().__init__()
        self.attn_fn = attn_fn
        self.mode, self.seq_dim, self.head_dim, self.ctx = mode, seq_dim, head_dim, ctx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any,
                seq_sizes: Optional[Sequence[int]] = None, **kwargs: Any) -> torch.Tensor:
        info = resolve_group(self.mode, self.ctx)  # once: both exchanges run on this handle
        if k.shape[self.head_dim] != v.shape[self.head_dim]:
            raise ValueError(f"k has {k.shape[self.head_dim]} heads but v has {v.shape[self.head_dim]}")
        repeats = kv_repeats(q.shape[self.head_dim], k.shape[self.head_dim], info.size)
        if repeats > 1:
            k = k.repeat_interleave(repeats, dim=self.head_dim)
            v = v.repeat_interleave(repeats, dim=self.head_dim)
        sizes = piece_sizes(seq_sizes, info, self.seq_dim, q.shape[self.seq_dim], "seq_sizes")
        q, k, v = all_to_all([q, k, v], info, scatter_dim=self.head_dim,
                             gather_dim=self.seq_dim, gather_sizes=sizes, ctx=self.ctx)
        out = self.attn_fn(q, k, v, *args, **kwargs)
        return all_to_all(out, info, scatter_dim=self.seq_dim,
                          gather_dim=self.head_dim, scatter_sizes=sizes, ctx=self.ctx)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, seq_dim={self.seq_dim}, head_dim={self.head_dim}"
