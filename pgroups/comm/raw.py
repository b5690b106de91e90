"""Collectives on a resolved group, without autograd: the building blocks of
:mod:`.activations` and :mod:`.weights`.

Uneven pieces are padded to the largest and moved as bytes, so any dtype and any size list
work on gloo and NCCL alike. Every call runs under :func:`~.groups.comm_errors`: a peer that
never arrives raises GroupTimeoutError naming the operation and the group.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..context import ParallelContext
from .groups import GroupHandle, GroupLike, comm_errors, resolve_group
from .packing import as_bytes, pack_tensors, packed_nbytes, unpack_tensors
from .sizes import Sizes, offsets_of, with_size

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to all_gather_single /
# reduce_scatter_single (the old names now warn); older torch (setup.cfg allows 2.4) has only
# the old names. The one place that picks.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def pad_along(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``tensor`` zero-padded at the end of ``dim`` to ``size`` (itself when already that size)."""
    if tensor.shape[dim] == size:
        return tensor
    padded = tensor.new_zeros(with_size(tensor.shape, dim, size))
    padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return padded


def start_gather(tensor: torch.Tensor, dim: int, sizes: Sizes, info: GroupHandle, async_op: bool,
                 out: Optional[torch.Tensor] = None) -> Tuple[Optional[dist.Work], Callable[[], torch.Tensor]]:
    """Start an all-gather of ``tensor`` (this rank's piece, ``sizes`` per rank along ``dim``).

    Returns the work handle (None when done synchronously) and a function that, once the work
    is complete, assembles the full tensor. Pieces are padded to the largest size and moved as
    bytes. ``out``: a uint8 buffer of ``group size x padded piece bytes`` to receive into
    (a memory pool's); a fresh one otherwise. When the pieces are equal along dim 0 the full
    tensor is a view of that buffer (no copy).
    """
    padded_size = max(sizes)
    piece = pad_along(tensor.detach(), dim, padded_size)
    piece_bytes = as_bytes(piece)
    nbytes = info.size * piece_bytes.numel()
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=tensor.device)
    elif out.dtype != torch.uint8 or out.numel() != nbytes:
        raise ValueError(f"all-gather buffer must be {nbytes} uint8 bytes, got {out.numel()} {out.dtype}")
    with comm_errors(info, "all-gather"):
        work = all_gather_single(out, piece_bytes, group=info.group, async_op=async_op)
    piece_shape = tuple(piece.shape)

    def finish() -> torch.Tensor:
        full = out.view(tensor.dtype)
        if dim == 0 and len(set(sizes)) == 1:  # already the concatenation: no copy
            return full.reshape(with_size(piece_shape, 0, padded_size * info.size))
        pieces = full.reshape((info.size,) + piece_shape).unbind(0)
        return torch.cat([p.narrow(dim, 0, size) for p, size in zip(pieces, sizes)], dim=dim)

    return work, finish


def gather_raw(tensor: torch.Tensor, dim: int, sizes: Sizes, info: GroupHandle) -> torch.Tensor:
    """All-gather along ``dim`` (no autograd); pieces in local-rank order."""
    work, finish = start_gather(tensor, dim, sizes, info, async_op=False)
    if work is not None:
        with comm_errors(info, "all-gather"):
            work.wait()
    return finish()


def exchange_sizes(local_size: int, mode: GroupLike, *, ctx: Optional[ParallelContext] = None) -> Sizes:
    """Every rank's ``local_size`` in local-rank order (one all-gather of one int per rank):
    the ``sizes`` to pass to :func:`~.activations.gather_along` when ranks hold pieces of
    unknown sizes."""
    info = resolve_group(mode, ctx)
    if info.size == 1:
        return (int(local_size),)
    mine = torch.tensor([int(local_size)], dtype=torch.int64, device=info.device)
    return tuple(int(v) for v in gather_raw(mine, 0, (1,) * info.size, info).tolist())


def stack_for_reduce_scatter(tensor: torch.Tensor, dim: int, sizes: Sizes) -> torch.Tensor:
    """``tensor`` cut along ``dim`` by ``sizes``, each piece padded to the largest and the
    pieces laid end to end: the input layout of ``reduce_scatter_tensor`` (itself when the
    pieces are equal along dim 0)."""
    if dim == 0 and len(set(sizes)) == 1:
        return tensor.detach().contiguous()
    padded_size = max(sizes)
    chunks = torch.split(tensor.detach(), list(sizes), dim=dim)
    return torch.stack([pad_along(c, dim, padded_size) for c in chunks])


def reduce_scatter_raw(tensor: torch.Tensor, dim: int, sizes: Sizes, info: GroupHandle) -> torch.Tensor:
    """Sum ``tensor`` over the group and return this rank's slice (``sizes`` along ``dim``)."""
    padded_size = max(sizes)
    stacked = stack_for_reduce_scatter(tensor, dim, sizes)
    out = torch.empty(with_size(tensor.shape, dim, padded_size), dtype=tensor.dtype, device=tensor.device)
    with comm_errors(info, "reduce-scatter"):  # flat buffers: the one layout every backend takes
        reduce_scatter_single(out.view(-1), stacked.reshape(-1), op=dist.ReduceOp.SUM, group=info.group)
    return out.narrow(dim, 0, sizes[info.rank]) if sizes[info.rank] != padded_size else out


def split_raw(tensor: torch.Tensor, dim: int, sizes: Sizes, rank: int) -> torch.Tensor:
    """This rank's slice of ``tensor`` along ``dim`` (a copy, contiguous)."""
    return tensor.narrow(dim, offsets_of(sizes)[rank], sizes[rank]).clone(memory_format=torch.contiguous_format)


def all_to_all_raw(tensors: Sequence[torch.Tensor], scatter_dim: int, gather_dim: int,
                   scatter_sizes: Sequence[Sizes], gather_sizes: Sequence[Sizes],
                   info: GroupHandle) -> List[torch.Tensor]:
    """One all-to-all for all ``tensors`` (no autograd).

    Tensor ``t`` is cut along ``scatter_dim`` by ``scatter_sizes[t]`` (slice ``j`` goes to
    local rank ``j``); what arrives from rank ``i`` has ``gather_sizes[t][i]`` elements along
    ``gather_dim`` and is concatenated there in rank order. All tensors travel as bytes in one
    ``all_to_all_single``, whatever their dtypes.
    """
    me = info.rank
    send_pieces, send_splits = [], []
    for j in range(info.size):
        pieces = [t.narrow(scatter_dim, offsets_of(s)[j], s[j]) for t, s in zip(tensors, scatter_sizes)]
        send_pieces.extend(pieces)
        send_splits.append(packed_nbytes([(p.shape, p.dtype) for p in pieces]))
    layouts = [[(with_size(with_size(t.shape, scatter_dim, s[me]), gather_dim, g[i]), t.dtype)
                for t, s, g in zip(tensors, scatter_sizes, gather_sizes)] for i in range(info.size)]
    recv_splits = [packed_nbytes(layout) for layout in layouts]
    send = pack_tensors(send_pieces)
    recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=send.device)
    with comm_errors(info, "all-to-all"):
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=info.group)
    arrived = [unpack_tensors(chunk, layout) for chunk, layout in zip(torch.split(recv, recv_splits), layouts)]
    return [torch.cat([arrived[i][t] for i in range(info.size)], dim=gather_dim) for t in range(len(tensors))]
