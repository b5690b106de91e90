"""Activation collectives with autograd, on any mode's group.

- :func:`gather_along` — forward all-gathers along ``dim``; backward keeps this rank's slice.
- :func:`split_along` — forward keeps this rank's slice; backward all-gathers.
- :func:`reduce_scatter_along` — forward sums over the group and keeps this rank's slice;
  backward all-gathers.
- :func:`all_to_all` — scatters one dim and gathers another, several tensors in one
  communication; backward is the same exchange with the dims swapped. :func:`seq_to_head` /
  :func:`head_to_seq` name the two DeepSpeed-Ulysses directions (sequence-sharded <->
  head-sharded).

Slices follow ``torch.tensor_split`` (see :mod:`.sizes`); pass ``sizes`` / ``gather_sizes``
where ranks hold pieces whose sizes this rank cannot know (:func:`~.raw.exchange_sizes`
learns them). Every rank of the group must call the same function in the same order and run
the backward pass (it is a collective too).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ..context import ParallelContext
from .groups import GroupHandle, GroupLike, resolve_group
from .raw import all_to_all_raw, gather_raw, reduce_scatter_raw, split_raw
from .sizes import Sizes, normalize_dim, piece_sizes, split_sizes

TensorOrTensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def _split_slice(tensor: torch.Tensor, dim: int, sizes: Sizes, info: GroupHandle) -> torch.Tensor:
    return split_raw(tensor, dim, sizes, info.rank)


class _AlongDim(torch.autograd.Function):
    """One collective along a dim in forward, its adjoint in backward: gather / keep a slice
    (gather_along), keep a slice / gather (split_along), reduce-scatter / gather
    (reduce_scatter_along)."""

    @staticmethod
    def forward(ctx, tensor, dim, sizes, info, forward_op, backward_op):
        ctx.dim, ctx.sizes, ctx.info, ctx.backward_op = dim, sizes, info, backward_op
        return forward_op(tensor, dim, sizes, info)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_op(grad, ctx.dim, ctx.sizes, ctx.info), None, None, None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, *tensors):
        scatter_dim, gather_dim, scatter_sizes, gather_sizes, info = plan
        ctx.plan = plan
        return tuple(all_to_all_raw(tensors, scatter_dim, gather_dim, scatter_sizes, gather_sizes, info))

    @staticmethod
    def backward(ctx, *grads):
        scatter_dim, gather_dim, scatter_sizes, gather_sizes, info = ctx.plan
        # the inverse exchange: what was gathered is scattered back by the same sizes
        return (None,) + tuple(all_to_all_raw(grads, gather_dim, scatter_dim, gather_sizes, scatter_sizes, info))


def _along(tensor: torch.Tensor, dim: int, mode: GroupLike, ctx: Optional[ParallelContext],
           sizes: Optional[Sequence[int]], sizes_of: Callable[..., Sizes], forward_op: Callable,
           backward_op: Callable) -> torch.Tensor:
    """Resolve the group, validate ``dim`` and ``sizes`` (through ``sizes_of``), and run
    ``forward_op`` with ``backward_op`` as its adjoint; identity on a group of one."""
    info = resolve_group(mode, ctx)
    dim = normalize_dim(dim, tensor.dim())
    sizes = sizes_of(sizes, info, dim, tensor.shape[dim], "sizes")
    if info.size == 1:
        return tensor
    return _AlongDim.apply(tensor, dim, sizes, info, forward_op, backward_op)


def gather_along(tensor: torch.Tensor, dim: int, mode: GroupLike, *, sizes: Optional[Sequence[int]] = None,
                 ctx: Optional[ParallelContext] = None) -> torch.Tensor:
    """All-gather ``tensor`` along ``dim`` over ``mode``'s group (pieces in local-rank order).

    Backward keeps this rank's slice of the gradient (no communication): the contract of a
    gather whose result feeds *identical* computation on every rank (Megatron's
    gather-from-tensor-parallel region). For a result used differently per rank, use
    :func:`~.weights.start_weight_gather` (backward sums). ``sizes``: every rank's size along
    ``dim``, for uneven pieces (default: all equal to this rank's). Raises ValueError for a bad
    dim or sizes.
    """
    return _along(tensor, dim, mode, ctx, sizes, piece_sizes, gather_raw, _split_slice)


def split_along(tensor: torch.Tensor, dim: int, mode: GroupLike, *, sizes: Optional[Sequence[int]] = None,
                ctx: Optional[ParallelContext] = None) -> torch.Tensor:
    """This rank's slice of a (replicated) ``tensor`` along ``dim``; no communication.

    Slices follow ``torch.tensor_split`` unless ``sizes`` (one per rank, summing to the dim's
    size) is given. Backward all-gathers the gradient slices into the full gradient.
    """
    return _along(tensor, dim, mode, ctx, sizes, split_sizes, _split_slice, gather_raw)


def reduce_scatter_along(tensor: torch.Tensor, dim: int, mode: GroupLike, *,
                         sizes: Optional[Sequence[int]] = None,
                         ctx: Optional[ParallelContext] = None) -> torch.Tensor:
    """Sum ``tensor`` over ``mode``'s group and keep this rank's slice along ``dim``.

    Slices follow ``torch.tensor_split`` unless ``sizes`` is given. Backward all-gathers the
    gradient slices (the gradient of a sum reaches every addend).
    """
    return _along(tensor, dim, mode, ctx, sizes, split_sizes, reduce_scatter_raw, gather_raw)


def all_to_all(tensors: TensorOrTensors, mode: GroupLike, *, scatter_dim: int, gather_dim: int,
               scatter_sizes: Optional[Sequence[int]] = None, gather_sizes: Optional[Sequence[int]] = None,
               ctx: Optional[ParallelContext] = None) -> TensorOrTensors:
    """Scatter ``scatter_dim`` and gather ``gather_dim`` over ``mode``'s group, for one tensor
    or several (e.g. q, k, v) in a single communication; returns the same form it was given.

    Each tensor's ``scatter_dim`` is cut by ``scatter_sizes`` (default: ``tensor_split`` of
    that tensor's size, so q and k/v may have different head counts); ``gather_sizes`` gives
    every rank's size along ``gather_dim`` (default: all equal to this rank's; shared by all
    tensors). Backward is the inverse all-to-all. Raises ValueError for equal or out-of-range
    dims, an empty list, or size lists that do not fit.
    """
    single = isinstance(tensors, torch.Tensor)
    tensor_list = [tensors] if single else list(tensors)
    if not tensor_list or not all(isinstance(t, torch.Tensor) for t in tensor_list):
        raise ValueError("all_to_all needs a tensor or a non-empty sequence of tensors")
    info = resolve_group(mode, ctx)
    sdim = normalize_dim(scatter_dim, tensor_list[0].dim(), "tensor" if single else "tensor 0")
    gdim = normalize_dim(gather_dim, tensor_list[0].dim(), "tensor" if single else "tensor 0")
    if sdim == gdim:
        raise ValueError(f"scatter_dim ({scatter_dim}) and gather_dim ({gather_dim}) name the same dim "
                         f"of the {tensor_list[0].dim()}-d tensor")
    scatter_all, gather_all = [], []
    for index, tensor in enumerate(tensor_list):
        if tensor.dim() != tensor_list[0].dim():
            raise ValueError(f"all_to_all: tensor {index} is {tensor.dim()}-d but tensor 0 is "
                             f"{tensor_list[0].dim()}-d; tensors exchanged together need the same number of dims")
        scatter_all.append(split_sizes(scatter_sizes, info, sdim, tensor.shape[sdim], "scatter_sizes"))
        gather_all.append(piece_sizes(gather_sizes, info, gdim, tensor.shape[gdim], "gather_sizes"))
    if info.size == 1:
        return tensors if single else list(tensor_list)
    plan = (sdim, gdim, tuple(scatter_all), tuple(gather_all), info)
    outputs = _AllToAll.apply(plan, *tensor_list)
    return outputs[0] if single else list(outputs)


def seq_to_head(tensors: TensorOrTensors, mode: GroupLike, *, seq_dim: int = 1, head_dim: int = 2,
                seq_sizes: Optional[Sequence[int]] = None,
                ctx: Optional[ParallelContext] = None) -> TensorOrTensors:
    """DeepSpeed-Ulysses, before attention: sequence-sharded ``[b, s/p, h, d]`` (by default)
    → head-sharded ``[b, s, h/p, d]``. ``seq_sizes``: every rank's sequence length, for uneven
    shards. One communication for all tensors; backward is :func:`head_to_seq`'s forward."""
    return all_to_all(tensors, mode, scatter_dim=head_dim, gather_dim=seq_dim, gather_sizes=seq_sizes, ctx=ctx)


def head_to_seq(tensors: TensorOrTensors, mode: GroupLike, *, seq_dim: int = 1, head_dim: int = 2,
                seq_sizes: Optional[Sequence[int]] = None, head_sizes: Optional[Sequence[int]] = None,
                ctx: Optional[ParallelContext] = None) -> TensorOrTensors:
    """DeepSpeed-Ulysses, after attention: head-sharded ``[b, s, h/p, d]`` → sequence-sharded
    ``[b, s/p, h, d]``. ``seq_sizes`` cuts the sequence (default ``tensor_split``);
    ``head_sizes`` gives every rank's head count (default: all equal to this rank's)."""
    return all_to_all(tensors, mode, scatter_dim=seq_dim, gather_dim=head_dim, scatter_sizes=seq_sizes,
                      gather_sizes=head_sizes, ctx=ctx)
