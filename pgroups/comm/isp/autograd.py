"""The ISP runtime's autograd functions: the sharded linear and embedding (gathered weight,
saved input only, gradient handed to the runtime's reduce-scatter) and the identity that
announces a block's backward. They call back into :class:`~.runtime.WeightParallel` through
``ctx.runtime``."""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

import torch
import torch.nn.functional as F

from ...torch_private import autograd_backward_running

__all__ = ["BackwardEntry", "ShardedEmbeddingFn", "ShardedLinearFn", "in_backward", "wrap_outputs"]


def in_backward() -> bool:
    """Whether this code runs inside an autograd backward pass (activation recomputation)."""
    return autograd_backward_running()


class BackwardEntry(torch.autograd.Function):
    """Identity on a block's outputs; its backward tells the runtime that block ``index``'s
    backward pass begins (gather it, prefetch the blocks before it)."""

    @staticmethod
    def forward(ctx, runtime, index, *tensors):
        ctx.runtime, ctx.index = runtime, index
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.runtime._before_block_backward(ctx.index)
        return (None, None) + grads


class ShardedLinearFn(torch.autograd.Function):
    """``F.linear`` with the gathered full weight; saves only the input. Backward gathers the
    weight again, computes the input gradient, and hands the full weight (and bias) gradient
    to the runtime's reduce-scatter; the shards get no gradient from autograd itself."""

    @staticmethod
    def forward(ctx, x, weight_shard, bias_shard, runtime, linear, token):
        weight, bias = runtime._full_params(linear)
        ctx.runtime, ctx.linear, ctx.token = runtime, linear, token
        ctx.save_for_backward(x)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        runtime, linear = ctx.runtime, ctx.linear
        weight, _ = runtime._full_params(linear)
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            runtime._reduce_grad(linear.weight, lambda out=None: torch.mm(
                grad_2d.t(), x.reshape(-1, x.shape[-1]), out=out))
        if linear.bias is not None and ctx.needs_input_grad[2]:
            runtime._reduce_grad(linear.bias, lambda out=None: torch.sum(grad_2d, dim=0, out=out))
        if ctx.token is not None:
            runtime._apply(runtime.schedule.linear_backward_done(ctx.token))
        return grad_x, None, None, None, None, None


class ShardedEmbeddingFn(torch.autograd.Function):
    """``F.embedding`` with the gathered full table; saves only the indices. Backward scatters
    the output gradient into a full-table gradient (``index_add`` accumulated in fp32 or wider,
    the padding row left zero) and hands it to the runtime's reduce-scatter."""

    @staticmethod
    def forward(ctx, tokens, weight_shard, runtime, embedding, token):
        weight, _ = runtime._full_params(embedding)
        module = embedding.module
        ctx.runtime, ctx.embedding, ctx.token = runtime, embedding, token
        ctx.save_for_backward(tokens)
        return F.embedding(tokens, weight, module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)

    @staticmethod
    def backward(ctx, grad_out):
        (tokens,) = ctx.saved_tensors
        runtime, embedding = ctx.runtime, ctx.embedding
        sharded, module = embedding.weight, embedding.module
        if module.scale_grad_by_freq or module.sparse or module.max_norm is not None:
            raise NotImplementedError("WeightParallel shards nn.Embedding without scale_grad_by_freq, sparse "
                                      "or max_norm")
        flat_tokens = tokens.reshape(-1)
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if module.padding_idx is not None:
            flat_grad = flat_grad.masked_fill((flat_tokens == module.padding_idx)[:, None], 0)

        # accumulate in fp32 at least: a token that recurs in the batch adds its gradients up
        # without a bf16 rounding per occurrence (one rounding at most, into a bf16 ``out``)
        accumulate = torch.promote_types(grad_out.dtype, torch.float32)

        def compute(out=None):
            if out is not None and out.dtype == accumulate:
                return out.zero_().index_add_(0, flat_tokens, flat_grad.to(accumulate))
            full = torch.zeros(sharded.full_shape, dtype=accumulate, device=grad_out.device)
            full.index_add_(0, flat_tokens, flat_grad.to(accumulate))
            return out.copy_(full) if out is not None else full

        if ctx.needs_input_grad[1]:
            runtime._reduce_grad(sharded, compute)
        if ctx.token is not None:
            runtime._apply(runtime.schedule.linear_backward_done(ctx.token))
        return None, None, None, None, None


def wrap_outputs(output: Any, wrap: Callable[[List[torch.Tensor]], Tuple[torch.Tensor, ...]]) -> Any:
    """Pass the tensors of ``output`` (a tensor, or a tuple / list holding tensors) that need a
    gradient through ``wrap``; the structure is kept. Returns None (no change) when none do."""
    if isinstance(output, torch.Tensor):
        return wrap([output])[0] if output.requires_grad else None
    if isinstance(output, (tuple, list)):
        positions = [i for i, item in enumerate(output) if isinstance(item, torch.Tensor) and item.requires_grad]
        if not positions:
            return None
        wrapped = wrap([output[i] for i in positions])
        items = list(output)
        for i, tensor in zip(positions, wrapped):
            items[i] = tensor
        return type(output)(items) if isinstance(output, list) else tuple(items)
    return None
