"""Gradients of the ISP runtime: the sharded weights' reduce-scatters, accumulation (in
``reduce_dtype`` when it differs from the parameters'), the all-reduces of ``finish_grads``,
and fp32 master weights for the optimizer.

Contract of :class:`GradReducer`. ``start`` launches one parameter's reduce-scatter (after the
schedule completed the one in flight for it); ``complete`` waits for it and adds this rank's
rows into the parameter's accumulator. With ``reduce_dtype`` set and a parameter of another
dtype (bf16 weights, fp32 reduction), *every* parameter the runtime reduces — sharded or
replicated (embedding, norms, head) — accumulates in ``reduce_dtype`` in ``param.main_grad``:
the sharded ones from the reduce-scatter, the replicated ones by a post-accumulate-grad hook
that moves each backward's ``param.grad`` into ``main_grad`` (so micro-batches add in fp32, not
in bf16). ``finish`` all-reduces the accumulators in their dtype (the shards' over the data
group, the replicated ones' over the weight and data groups), averages, and hands them to the
optimizer: ``master.grad = main_grad`` for the fp32 masters of :meth:`master_parameters`, else
``param.grad`` in the parameter's dtype. ``main_grad`` keeps the step's reduced gradient until
the next step's first accumulation zeroes it.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ...handle import GroupHandle
from ..groups import comm_errors
from ..pool import BufferPool
from ..raw import reduce_scatter_single
from .sharded import Sharded


class _Reduce:
    """One parameter's gradient reduce-scatter in flight."""

    def __init__(self, sharded: Sharded, work: Optional[dist.Work], send: torch.Tensor, recv: torch.Tensor,
                 dtype: torch.dtype) -> None:
        self.sharded, self.work, self.send, self.recv, self.dtype = sharded, work, send, recv, dtype


class GradReducer:
    """See the module docstring. ``launch(kind, what, send, recv, collective)`` counts and runs
    one collective over the weight group (the runtime's)."""

    def __init__(self, info: GroupHandle, data_info: Optional[GroupHandle], pool: BufferPool,
                 reduce_dtype: Optional[torch.dtype], average: bool, overlap: bool,
                 launch: Callable[..., Optional[dist.Work]], comm_counts: Dict[str, int]) -> None:
        self.info, self.data_info, self.pool = info, data_info, pool
        self.reduce_dtype, self.average, self.overlap = reduce_dtype, average, overlap
        self._launch, self.comm_counts = launch, comm_counts
        self._reducing: Dict[Hashable, _Reduce] = {}
        self._main_grads: Dict[int, torch.Tensor] = {}
        self._main_consumed = False          # finish ran: the next accumulation starts from zero
        self._masters: Dict[int, nn.Parameter] = {}
        self._hooks: List = []

    # ---- accumulators ---------------------------------------------------------------------
    def accumulates_apart(self, param: nn.Parameter) -> bool:
        """Whether ``param``'s gradient accumulates in ``main_grad`` (another dtype)."""
        return self.reduce_dtype is not None and self.reduce_dtype != param.dtype

    def main_grad(self, param: nn.Parameter, like: torch.Tensor) -> torch.Tensor:
        """``param``'s accumulator in ``reduce_dtype`` (created zero; zeroed again at the first
        accumulation after a finish)."""
        if self._main_consumed:
            for main in self._main_grads.values():
                main.zero_()
            self._main_consumed = False
        main = self._main_grads.get(id(param))
        if main is None:
            main = self._main_grads[id(param)] = torch.zeros(like.shape, dtype=self.reduce_dtype, device=like.device)
            param.main_grad = main  # Megatron's name for the fp32 accumulator
        return main

    def hook_replicated(self, params: Sequence[nn.Parameter]) -> None:
        """Accumulate the gradients of ``params`` (autograd's, not reduce-scattered) in
        ``main_grad`` when their dtype differs from ``reduce_dtype``."""
        for param in params:
            if param.requires_grad and self.accumulates_apart(param):
                self._hooks.append(param.register_post_accumulate_grad_hook(self._move_to_main))

    def _move_to_main(self, param: nn.Parameter) -> None:
        self.main_grad(param, param).add_(param.grad)
        param.grad = None

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # ---- reduce-scatters ---------------------------------------------------------------------
    def start(self, key: Hashable, sharded: Sharded, compute: Callable[..., torch.Tensor]) -> None:
        """Reduce-scatter the full gradient that ``compute(out=None)`` returns (or writes into
        ``out``) over the weight group under ``key``; asynchronous with overlap. The caller has
        completed any reduce-scatter in flight under ``key``."""
        info, param = self.info, sharded.param
        dtype = self.reduce_dtype or param.dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        piece_numel = sharded.max_rows * sharded.row_numel
        send = self.pool.acquire((sharded.key, "reduce-send"), piece_numel * info.size * itemsize, param.device,
                                 "grad", zero=not sharded.even)
        send_view = send.view(dtype)
        if sharded.even and dtype == param.dtype:  # the matmul writes straight into the buffer
            compute(out=send_view.view(sharded.full_shape))
        else:
            grad = compute()
            if sharded.even:
                send_view.copy_(grad.reshape(-1))
            else:  # rank r's rows at r * max_rows; the padding rows were zeroed once
                padded = send_view.view(info.size, piece_numel)
                flat = grad.reshape(-1)
                for rank, full_offset, count in sharded.pieces():
                    padded[rank].narrow(0, 0, count).copy_(flat.narrow(0, full_offset, count))
        recv = self.pool.acquire((sharded.key, "reduce"), piece_numel * itemsize, param.device, "grad")
        work = self._launch("reduce_scatter", f"gradient reduce-scatter of {sharded.name}", send, recv,
                            lambda: reduce_scatter_single(recv.view(dtype), send_view, op=dist.ReduceOp.SUM,
                                                          group=info.group, async_op=self.overlap))
        self._reducing[key] = _Reduce(sharded, work if self.overlap else None, send, recv, dtype)

    def complete(self, key: Hashable) -> None:
        """Wait for the reduce-scatter under ``key`` and add this rank's rows to the shard's
        gradient (``main_grad`` in ``reduce_dtype``, else ``param.grad``)."""
        reduce = self._reducing.pop(key)
        sharded = reduce.sharded
        if reduce.work is not None:
            with comm_errors(self.info, f"gradient reduce-scatter of {sharded.name}"):
                reduce.work.wait()
        rows = sharded.sizes[self.info.rank]
        shard_grad = reduce.recv.view(reduce.dtype).narrow(0, 0, rows * sharded.row_numel).view(
            (rows,) + sharded.full_shape[1:])
        param = sharded.param
        if self.accumulates_apart(param):
            self.main_grad(param, shard_grad).add_(shard_grad)
        elif param.grad is None:
            param.grad = shard_grad.clone()
        else:
            param.grad.add_(shard_grad)
        self.pool.release(reduce.send)
        self.pool.release(reduce.recv)

    # ---- the step ------------------------------------------------------------------------------
    def finish(self, sharded: Sequence[nn.Parameter], replicated: Sequence[nn.Parameter]) -> None:
        """All-reduce and average the accumulated gradients (see the module docstring) and hand
        them to the optimizer. Every reduce-scatter must have completed."""
        data = [self.data_info] if self.data_info is not None and self.data_info.size > 1 else []
        scale = 1.0 / (self.info.size * (self.data_info.size if self.data_info is not None else 1)) \
            if self.average else 1.0
        self._all_reduce([self._accumulator(p) for p in sharded], data, scale)
        self._all_reduce([self._accumulator(p) for p in replicated], [self.info] + data, scale)
        for param in list(sharded) + list(replicated):
            main = self._main_grads.get(id(param))
            master = self._masters.get(id(param))
            if master is not None:
                master.grad = main if main is not None else param.grad
                param.grad = None
            elif main is not None:
                converted = main.to(param.dtype)
                param.grad = converted if param.grad is None else param.grad.add_(converted)
        self._main_consumed = True

    def _accumulator(self, param: nn.Parameter) -> torch.Tensor:
        if self.accumulates_apart(param):
            return self.main_grad(param, param)
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        return param.grad

    def _all_reduce(self, tensors: Sequence[torch.Tensor], groups: Sequence[GroupHandle], scale: float) -> None:
        """Sum ``tensors`` over each of ``groups`` in turn, then multiply by ``scale``: one
        flat buffer per dtype (and device), one all-reduce per group."""
        by_kind: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
        for tensor in tensors:
            by_kind.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        for (dtype, device), members in by_kind.items():
            if not groups:
                if scale != 1.0:
                    for tensor in members:
                        tensor.mul_(scale)
                continue
            numel = sum(t.numel() for t in members)
            buffer = self.pool.acquire(("all-reduce", str(dtype), len(groups)), numel * members[0].element_size(),
                                       device, "grad")
            flat = buffer.view(dtype)
            offset = 0
            for tensor in members:
                flat.narrow(0, offset, tensor.numel()).copy_(tensor.reshape(-1))
                offset += tensor.numel()
            for info in groups:
                self.comm_counts["all_reduce_calls"] += 1
                self.comm_counts["all_reduce_bytes"] += buffer.numel()
                with comm_errors(info, "gradient all-reduce"):
                    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=info.group)
            if scale != 1.0:
                flat.mul_(scale)
            offset = 0
            for tensor in members:
                tensor.copy_(flat.narrow(0, offset, tensor.numel()).view_as(tensor))
                offset += tensor.numel()
            self.pool.release(buffer)

    # ---- fp32 master weights ---------------------------------------------------------------------
    def master_parameters(self, params: Sequence[nn.Parameter]) -> List[nn.Parameter]:
        """For each of ``params``: an fp32 (``reduce_dtype``) master copy when the parameter is
        in another dtype, else the parameter itself; created once, same order."""
        masters = []
        for param in params:
            if not self.accumulates_apart(param):
                masters.append(param)
                continue
            master = self._masters.get(id(param))
            if master is None:
                master = self._masters[id(param)] = nn.Parameter(param.detach().to(self.reduce_dtype).clone(),
                                                                 requires_grad=param.requires_grad)
            masters.append(master)
        return masters

    def copy_masters(self, params: Sequence[nn.Parameter]) -> None:
        """Write every master's value into its parameter (rounded to the parameter's dtype):
        after the optimizer stepped the masters."""
        with torch.no_grad():
            for param in params:
                master = self._masters.get(id(param))
                if master is not None:
                    param.copy_(master)
