"""The ISP weight-parallel runtime (InternEvo's "intern sequence parallel"): every linear
weight of the transformer blocks sharded over the ``weight`` group, gathered block by block
just in time, its gradient reduce-scattered back — driven by module hooks, so a plain
``loss.backward()`` training loop works.

    wp = WeightParallel(model, blocks=model.layers)          # shards every nn.Linear in the blocks
    opt = torch.optim.AdamW(model.parameters())              # after wrapping: it sees the shards
    for batch in data:
        loss_fn(model(batch)).backward()                     # gathers, prefetches, reduce-scatters
        wp.finish_grads()                                     # wait, all-reduce, average
        opt.step(); opt.zero_grad()

Interleaved pipeline schedules: ``chunks=[chunk0.layers, chunk1.layers]`` instead of
``blocks=`` (one block list per model chunk of this rank); prefetching stays within a chunk,
and the scheduler names the chunk it runs next with :meth:`WeightParallel.switch_model_chunk`.

What happens, per block ``i`` of ``blocks`` (``N`` blocks, prefetch depth ``d``); every
decision is :class:`~.schedule.IspSchedule`'s (pure, with the memory bound in its docstring),
this module only carries them out:

- **forward**: before block ``i`` runs, its weights are all-gathered (already in flight when
  block ``i - 1`` prefetched them) and blocks ``i + 1 .. i + d`` of its chunk start
  gathering; after it runs, its full weights are released — except the last block's, kept for the backward pass
  that a plain loop runs next (under a pipeline scheduler, its ``before_backward`` gathers it).
- **backward**: when the gradient reaches block ``i``'s output, its weights are gathered
  again (usually already prefetched) and blocks ``i - 1 .. i - d`` start gathering. Each
  linear computes its input gradient and its full weight gradient, whose **reduce-scatter**
  over the weight group starts at once, asynchronously; the block's full weights are released
  when the last linear that recorded in *that* forward (that micro-batch) has run its backward.
  So at most ``1 + d`` blocks' full weights are alive whatever the interleaving of
  micro-batches (1F1B, two forwards then two backwards), and reduce-scatters of at most
  ``1 + d`` block backwards are in flight (older ones are waited for).
- **finish_grads()** (or the optimizer hook of :meth:`WeightParallel.attach_optimizer`):
  waits for every reduce-scatter, all-reduces the shards' gradients over ``data_mode``
  (``wdp``) if asked, all-reduces the gradients of every parameter that is *not*
  sharded (embedding, norms, head) over the weight and data groups, and averages
  (:mod:`.grads`).

Linear layers keep their class and names; their ``weight`` / ``bias`` become this rank's
shard (rows ``tensor_split`` along dim 0, uneven sizes allowed) and their ``forward`` uses the
gathered weight through an autograd function that saves no full weight (backward gathers it
again, as InternEvo does). ``nn.Embedding`` modules inside blocks are sharded the same way
(rows of the table, i.e. the vocabulary; gathered before use, the gradient built with
``index_add`` and reduce-scattered): pass the embedding and the head as blocks of their own
(``blocks=[model.embed, *model.layers, model.head]``) to shard them, a tied table included
(sharded once, gathered by each block that uses it, its two gradients accumulated). InternEvo
gathers the whole table too, split on the hidden dim (its embedding by default) or on the rows
(its head, and its embedding with ``vocab_parallel``): the same bytes stored and moved; rows
keep each shard contiguous and give a tied table one layout (``docs/isp.md`` says more).
Otherwise they stay replicated, as norms do, and their gradients are all-reduced by
:meth:`~WeightParallel.finish_grads`.

Gradient semantics: each rank's loss is the mean over its own tokens (as with DDP); the
gradients are averaged over the ``wp`` × ``wdp`` ranks (``average=False``: summed).
``reduce_dtype=torch.float32`` with bf16/fp16 parameters accumulates and reduces the gradient
of *every* parameter in fp32 in ``param.main_grad`` (sharded and replicated; InternEvo's fp32
gradients); an optimizer built on :meth:`WeightParallel.master_parameters` (fp32 masters)
steps on those fp32 gradients, one on the parameters themselves gets ``param.grad`` rounded
to their dtype.

Buffers come from a :class:`~pgroups.comm.pool.BufferPool` keyed by the parameter's place in
its block (``"attn.wq.weight"``), so blocks of one structure share buffers and from step 2 on
nothing is allocated (``wp.pool.stats()``). Every collective runs under the group's timeout: a
dead or missing peer raises :class:`~pgroups.errors.GroupTimeoutError` naming the operation, the
mode and its ranks.

Contract: every rank of the weight group runs the same model with the same block structure
(built from the same seed: each rank keeps its slice of the full weights it was given), calls
forward and backward in the same order, and calls ``finish_grads`` at the same points.
Activation checkpointing of whole blocks (``torch.utils.checkpoint``, non-reentrant) works:
a block recomputed during backward uses the weights its backward gathered, records nothing
and releases nothing.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ...context import ParallelContext
from ...errors import ModeNotInitializedError
from ...handle import GroupHandle
from ...modes import ParallelMode, canonical_name
from ...torch_private import tensor_version
from ..groups import GroupLike, comm_errors, resolve_group
from ..pool import BufferPool, PoolStats
from ..raw import all_gather_single
from ..sizes import even_split_sizes, offsets_of
from .autograd import BackwardEntry, ShardedEmbeddingFn, ShardedLinearFn, in_backward, wrap_outputs
from .grads import GradReducer
from .schedule import COMPLETE, GATHER, Action, IspSchedule
from .sharded import Sharded, ShardedLinear

__all__ = ["WeightParallel", "WeightParallelSchedulerHook"]


class _Gather:
    """One parameter's all-gather in flight (or done): buffers, work, and the full tensor."""

    def __init__(self, sharded: Sharded, version: int, work: Optional[dist.Work], recv: torch.Tensor,
                 send: Optional[torch.Tensor]) -> None:
        self.sharded, self.version, self.work, self.recv, self.send = sharded, version, work, recv, send
        self.full: Optional[torch.Tensor] = None
        self.full_buffer: Optional[torch.Tensor] = None


# ---- the runtime -----------------------------------------------------------------------------------
class WeightParallel:
    """Shard the linear layers of ``blocks`` over ``mode``'s group and run them (see the module
    docstring for the schedule and the contract).

    ``model``: the whole model (its other parameters are the replicated ones whose gradients
    :meth:`finish_grads` all-reduces). ``blocks``: the transformer blocks, in execution order
    (an ``nn.ModuleList`` or a sequence of modules inside ``model``); every ``nn.Linear`` and
    ``nn.Embedding`` inside them is sharded. ``chunks`` (instead of ``blocks``): one block list
    per model chunk this rank holds under an interleaved pipeline schedule (virtual stages), in
    chunk order; prefetching stays inside a chunk, and a scheduler names the chunk it runs next
    with :meth:`switch_model_chunk`. ``mode``: the weight-parallel mode — a name, looked
    up once as ``ctx.group(mode)`` (:class:`~pgroups.handle.GroupHandle`: group, ranks,
    position, device, label), a handle itself, or a ProcessGroup.
    ``data_mode``: the mode over which the weight shards are replicated (their gradients are
    all-reduced over it); None leaves that to the user's optimizer (ZeRO). ``overlap``:
    prefetch gathers and run reduce-scatters asynchronously (False: every collective waits at
    once). ``memory_pool``: reuse buffers (False: allocate per use; counters still count).
    ``prefetch_depth``: blocks gathered ahead (≥ 1; ignored without overlap).
    ``reduce_dtype``: dtype of gradient reduction and accumulation (None: the parameter's).
    ``average``: average gradients over the weight × data ranks (False: sum).
    ``sync_replicated``: all-reduce the gradients of parameters that are not sharded.
    With ``reduce_dtype`` unlike the parameters' dtype, build the optimizer on
    :meth:`master_parameters` to step on fp32 gradients (see :mod:`.grads`).

    ``pool`` / :meth:`stats`: the buffer pool and its counters; ``comm_counts``: calls and
    bytes of this rank's collectives (all-gather outputs, reduce-scatter inputs, all-reduce
    buffers), for benchmarks and tests.

    Raises ValueError for empty blocks or chunks, both or neither of them, blocks outside
    ``model``, a bad prefetch depth, or a linear that appears in two blocks (before changing
    the model);
    ModeNotInitializedError for a mode the context lacks.
    """

    def __init__(self, model: nn.Module, blocks: Optional[Iterable[nn.Module]] = None, mode: GroupLike = "wp", *,
                 chunks: Optional[Sequence[Iterable[nn.Module]]] = None,
                 data_mode: Optional[GroupLike] = "wdp", overlap: bool = True, memory_pool: bool = True,
                 prefetch_depth: int = 1, reduce_dtype: Optional[torch.dtype] = None, average: bool = True,
                 sync_replicated: bool = True, ctx: Optional[ParallelContext] = None) -> None:
        if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or prefetch_depth < 1:
            raise ValueError(f"prefetch_depth must be an integer >= 1 (blocks gathered ahead), got {prefetch_depth!r}")
        self.model = model
        chunk_lists = self._chunk_lists(blocks, chunks)
        self.chunk_sizes = [len(chunk) for chunk in chunk_lists]
        self.blocks: List[nn.Module] = [block for chunk in chunk_lists for block in chunk]
        self.current_chunk = 0
        self.handle = resolve_group(mode, ctx)  # the GroupHandle the weights are sharded over
        self.data_info = self._resolve_data(data_mode, ctx)
        self.overlap, self.prefetch_depth = bool(overlap), prefetch_depth
        self.reduce_dtype, self.average, self.sync_replicated = reduce_dtype, average, sync_replicated
        self.pool = BufferPool(enabled=memory_pool)
        self.comm_counts: Dict[str, int] = {"all_gather_calls": 0, "all_gather_bytes": 0,
                                            "reduce_scatter_calls": 0, "reduce_scatter_bytes": 0,
                                            "all_reduce_calls": 0, "all_reduce_bytes": 0}
        self._linears: List[ShardedLinear] = []
        self._by_block: List[List[Sharded]] = [[] for _ in self.blocks]
        self._gathered: Dict[int, List[_Gather]] = {}
        self.schedule = IspSchedule(self.chunk_sizes, prefetch_depth, overlap=self.overlap)
        self.grads = GradReducer(self.handle, self.data_info, self.pool, reduce_dtype, average, self.overlap,
                                 self._launch, self.comm_counts)
        self._grads_finished = True
        self._hooks: List[Any] = []
        self._shard_blocks()
        self._first_sharded: Dict[int, Sharded] = {}  # id(shard) -> its first use, in block order
        for sharded in self._by_block:
            for entry in sharded:
                self._first_sharded.setdefault(id(entry.param), entry)
        self._sharded_ids = set(self._first_sharded)
        self.grads.hook_replicated([p for _, p in self.replicated_parameters()] if sync_replicated else [])
        self._register_hooks()

    # ---- setup ----------------------------------------------------------------------------
    @staticmethod
    def _chunk_lists(blocks: Optional[Iterable[nn.Module]],
                     chunks: Optional[Sequence[Iterable[nn.Module]]]) -> List[List[nn.Module]]:
        if (blocks is None) == (chunks is None):
            raise ValueError("give WeightParallel blocks= (the transformer blocks, one model chunk) or chunks= (one "
                             "block list per model chunk of an interleaved pipeline), exactly one of them")
        lists = [list(blocks)] if chunks is None else [list(chunk) for chunk in chunks]
        if not lists or not all(lists):
            what = "blocks" if chunks is None else f"chunks (blocks per chunk: {[len(c) for c in lists]})"
            raise ValueError(f"WeightParallel needs at least one block in each chunk, got empty {what} "
                             "(blocks=model.layers, for example)")
        return lists

    @staticmethod
    def _resolve_data(data_mode: Optional[GroupLike], ctx: Optional[ParallelContext]) -> Optional[GroupHandle]:
        if data_mode is None:
            return None
        try:
            return resolve_group(data_mode, ctx)
        except ModeNotInitializedError as exc:
            raise ModeNotInitializedError(
                f"{exc}; WeightParallel all-reduces weight-shard gradients over data_mode="
                f"{canonical_name(data_mode) if isinstance(data_mode, (str, ParallelMode)) else data_mode!r}: "
                "build that mode, or pass data_mode=None to leave it to your optimizer") from None

    def _shard_blocks(self) -> None:
        names = {id(m): n for n, m in self.model.named_modules()}
        owner: Dict[int, int] = {}
        found: List[Tuple[int, str, nn.Linear]] = []
        for index, block in enumerate(self.blocks):  # validate everything before changing anything
            if id(block) not in names:
                raise ValueError(f"block {index} ({type(block).__name__}) is not a submodule of the model")
            for rel_name, module in block.named_modules():
                if not isinstance(module, (nn.Linear, nn.Embedding)):
                    continue
                if id(module) in owner:
                    kind = "linear" if isinstance(module, nn.Linear) else "embedding"
                    raise ValueError(f"{kind} {names[id(module)]!r} is in block {owner[id(module)]} and block "
                                     f"{index}; each sharded module must belong to one block")
                owner[id(module)] = index
                found.append((index, rel_name, module))
        shards: Dict[int, Sharded] = {}  # id(full parameter) -> its shard: a tied weight is sharded once
        for index, rel_name, module in found:
            prefix = f"{rel_name}." if rel_name else ""
            weight = self._shard_param(module, "weight", names[id(module)], prefix + "weight", index, shards)
            bias = getattr(module, "bias", None)
            bias = (self._shard_param(module, "bias", names[id(module)], prefix + "bias", index, shards)
                    if bias is not None else None)
            linear = ShardedLinear(module, index, weight, bias)
            self._linears.append(linear)
            forward = self._linear_forward if isinstance(module, nn.Linear) else self._embedding_forward
            module.forward = functools.partial(forward, linear)

    def _shard_param(self, module: nn.Module, attr: str, module_name: str, key: str, block: int,
                     shards: Dict[int, Sharded]) -> Sharded:
        full: nn.Parameter = getattr(module, attr)
        first = shards.get(id(full))
        if first is None:
            sizes = even_split_sizes(full.shape[0], self.handle.size)
            start = offsets_of(sizes)[self.handle.rank]
            shard = nn.Parameter(full.detach().narrow(0, start, sizes[self.handle.rank]).clone(),
                                 requires_grad=full.requires_grad)
            name, shape = (f"{module_name}.{attr}" if module_name else attr), tuple(full.shape)
        else:  # tied (an embedding and its head): the same shard, gathered by each block that uses it
            shard, sizes, name, shape = first.param, first.sizes, first.name, first.full_shape
        setattr(module, attr, shard)
        sharded = Sharded(name, key, shard, shape, sizes, block)
        shards.setdefault(id(full), sharded)
        self._by_block[block].append(sharded)
        return sharded

    def _register_hooks(self) -> None:
        for index, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(functools.partial(self._before_block_forward, index)))
            self._hooks.append(block.register_forward_hook(functools.partial(self._after_block_forward, index)))

    def remove_hooks(self) -> None:
        """Remove the block hooks and the gradient hooks of replicated parameters (the linears
        stay sharded and gather on demand)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.grads.remove_hooks()

    # ---- queries ----------------------------------------------------------------------------
    def sharded_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        """``(qualified name, shard)`` of every sharded parameter, in block order (a tied one
        once, under its first name)."""
        return [(s.name, s.param) for s in self._first_sharded.values()]

    def replicated_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter of the model that is not sharded."""
        return [(n, p) for n, p in self.model.named_parameters() if id(p) not in self._sharded_ids]

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The model's state dict with every shard replaced by the full tensor (gathered now,
        synchronously; a collective over the weight group, so every rank must call it)."""
        gathered = {key: self._gather_now(sharded) for key, sharded in self._first_sharded.items()}
        full = {name: gathered[id(param)] for name, param in self.model.named_parameters(remove_duplicate=False)
                if id(param) in gathered}  # a tied table under each of its names
        return {name: full.get(name, value.detach()) for name, value in self.model.state_dict().items()}

    def stats(self) -> PoolStats:
        """The memory pool's counters (``self.pool.stats()``)."""
        return self.pool.stats()

    def block_full_bytes(self, index: int) -> int:
        """Bytes of block ``index``'s full (gathered) weights: what one alive block costs."""
        return sum(s.max_rows * self.handle.size * s.row_numel * s.param.element_size() for s in self._by_block[index])

    # ---- gathers -----------------------------------------------------------------------------
    def _apply(self, actions: List[Action]) -> None:
        """Carry out the schedule's decisions, in order."""
        for action in actions:
            if action.kind == GATHER:
                self._start_gather(action.target)
            elif action.kind == COMPLETE:
                self.grads.complete(action.target)
            else:
                self._release_block(action.target)

    def _start_gather(self, index: int) -> None:
        """Start block ``index``'s all-gathers (the schedule gathers a block only when its
        weights are not live)."""
        self._gathered[index] = [self._gather_param(s, async_op=self.overlap) for s in self._by_block[index]]

    def _gather_param(self, sharded: Sharded, async_op: bool) -> _Gather:
        info, shard = self.handle, sharded.param.detach()
        row_bytes = sharded.row_numel * shard.element_size()
        piece_bytes = sharded.max_rows * row_bytes
        send = None
        if sharded.sizes[info.rank] == sharded.max_rows:
            payload = shard.reshape(-1).view(torch.uint8)
        else:  # pad this rank's rows to the largest piece; the padding stays zero across reuses
            send = self.pool.acquire((sharded.key, "gather-send"), piece_bytes, shard.device, "staging", zero=True)
            send.narrow(0, 0, shard.numel() * shard.element_size()).copy_(shard.reshape(-1).view(torch.uint8))
            payload = send
        recv = self.pool.acquire((sharded.key, "gather"), piece_bytes * info.size, shard.device, "weight")
        work = self._launch("all_gather", f"weight all-gather of {sharded.name}", payload, recv,
                            lambda: all_gather_single(recv, payload, group=info.group, async_op=async_op))
        return _Gather(sharded, tensor_version(sharded.param), work if async_op else None, recv, send)

    def _launch(self, kind: str, what: str, send: torch.Tensor, recv: torch.Tensor,
                collective: Callable[[], Optional[dist.Work]]) -> Optional[dist.Work]:
        """Count and run one collective over the weight group (a copy on a group of one)."""
        self.comm_counts[f"{kind}_calls"] += 1
        self.comm_counts[f"{kind}_bytes"] += max(send.numel(), recv.numel())
        if self.handle.size == 1:
            recv.copy_(send)
            return None
        with comm_errors(self.handle, what):
            return collective()

    def _wait_gather(self, gather: _Gather) -> torch.Tensor:
        if gather.full is not None:
            return gather.full
        sharded = gather.sharded
        if gather.work is not None:
            with comm_errors(self.handle, f"weight all-gather of {sharded.name}"):
                gather.work.wait()
            gather.work = None
        if gather.send is not None:
            self.pool.release(gather.send)
            gather.send = None
        dtype = sharded.param.dtype
        if sharded.even:  # the gathered pieces are the full tensor already
            gather.full = gather.recv.view(dtype).view(sharded.full_shape)
            return gather.full
        padded = gather.recv.view(dtype).view((self.handle.size, sharded.max_rows * sharded.row_numel))
        nbytes = sharded.full_numel() * sharded.param.element_size()
        gather.full_buffer = self.pool.acquire((sharded.key, "gather-full"), nbytes, padded.device, "weight")
        full_flat = gather.full_buffer.view(dtype)
        for rank, full_offset, count in sharded.pieces():
            full_flat.narrow(0, full_offset, count).copy_(padded[rank].narrow(0, 0, count))
        self.pool.release(gather.recv)
        gather.recv = None
        gather.full = full_flat.view(sharded.full_shape)
        return gather.full

    def _wait_block(self, index: int) -> List[_Gather]:
        """Block ``index``'s landed gathers, gathered now if the schedule has not (a linear run
        outside its block's hooks) or gathered again if an optimizer step changed the shards
        since (stale)."""
        self._apply(self.schedule.need(index))
        gathers = self._gathered[index]
        if any(g.version != tensor_version(g.sharded.param) for g in gathers):
            self._release_block(index)
            self._start_gather(index)
            gathers = self._gathered[index]
        for gather in gathers:
            self._wait_gather(gather)
        return gathers

    def _release_block(self, index: int) -> None:
        for gather in self._gathered.pop(index, []):
            if gather.work is not None:  # still in flight: it must land before its buffer is reused
                with comm_errors(self.handle, f"weight all-gather of {gather.sharded.name}"):
                    gather.work.wait()
            for buffer in (gather.send, gather.recv, gather.full_buffer):
                if buffer is not None:
                    self.pool.release(buffer)

    def _gather_now(self, sharded: Sharded) -> torch.Tensor:
        gather = self._gather_param(sharded, async_op=False)
        full = self._wait_gather(gather).clone()
        for buffer in (gather.send, gather.recv, gather.full_buffer):
            if buffer is not None:
                self.pool.release(buffer)
        return full

    def _full_params(self, linear: ShardedLinear) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        gathers = {id(g.sharded): g for g in self._wait_block(linear.block)}
        weight = gathers[id(linear.weight)].full
        bias = gathers[id(linear.bias)].full if linear.bias is not None else None
        return weight, bias

    # ---- hooks ------------------------------------------------------------------------------------
    def _linear_forward(self, linear: ShardedLinear, x: torch.Tensor) -> torch.Tensor:
        bias = linear.bias.param if linear.bias is not None else None
        records = torch.is_grad_enabled() and not in_backward() and (
            x.requires_grad or linear.weight.param.requires_grad or (bias is not None and bias.requires_grad))
        token = None
        if records:
            token = self.schedule.record_linear(linear.block)
            self._grads_finished = False
        return ShardedLinearFn.apply(x, linear.weight.param, bias, self, linear, token)

    def _embedding_forward(self, embedding: ShardedLinear, tokens: torch.Tensor) -> torch.Tensor:
        weight = embedding.weight.param
        token = None
        if torch.is_grad_enabled() and not in_backward() and weight.requires_grad:
            token = self.schedule.record_linear(embedding.block)
            self._grads_finished = False
        return ShardedEmbeddingFn.apply(tokens, weight, self, embedding, token)

    def _before_block_forward(self, index: int, module: nn.Module, args: Any) -> None:
        recompute = in_backward()  # activation recomputation inside the block's own backward
        self._apply(self.schedule.forward_begin(index, torch.is_grad_enabled() and not recompute, recompute))
        self._wait_block(index)  # the block runs with its weights landed; the next ones stay in flight

    def _after_block_forward(self, index: int, module: nn.Module, args: Any, output: Any) -> Any:
        if in_backward():  # activation recompute: its backward follows at once and needs the weights
            self._apply(self.schedule.forward_end(index, False, recompute=True))
            return None
        recording = torch.is_grad_enabled()
        self._apply(self.schedule.forward_end(index, recording))
        if not recording:  # no_grad / inference: nothing is registered for backward
            return None
        return wrap_outputs(output, lambda tensors: BackwardEntry.apply(self, index, *tensors))

    def _before_block_backward(self, index: int) -> None:
        self._apply(self.schedule.backward_begin(index))

    # ---- gradients ------------------------------------------------------------------------------------
    def _reduce_grad(self, sharded: Sharded, compute: Callable[..., torch.Tensor]) -> None:
        """Reduce-scatter the full gradient ``compute`` gives over the weight group (see
        :meth:`.grads.GradReducer.start`); without overlap it completes at once."""
        key = id(sharded.param)
        self._apply(self.schedule.before_reduce(key))
        self.grads.start(key, sharded, compute)
        self._grads_finished = False
        if not self.overlap:
            self._apply(self.schedule.wait_reduces())

    def wait_grads(self) -> None:
        """Wait for every gradient reduce-scatter in flight and accumulate it into the shards'
        gradients (no all-reduce, no averaging): what a scheduler calls after each micro-batch."""
        self._apply(self.schedule.wait_reduces())

    def finish_grads(self) -> None:
        """Make every gradient ready for the optimizer; call once per optimizer step, after the
        last ``backward`` (every rank of the groups must call it: it runs collectives).

        Waits for the reduce-scatters, releases every gathered block, all-reduces the shards'
        gradients over ``data_mode``, all-reduces the replicated parameters' gradients over the
        weight and data groups (missing ones count as zero), and averages (:mod:`.grads`). A
        second call with no backward in between does nothing.
        """
        self._apply(self.schedule.finish())
        if self._grads_finished:
            return
        sharded = [param for _, param in self.sharded_parameters() if param.requires_grad]
        replicated = [p for _, p in self.replicated_parameters() if p.requires_grad] if self.sync_replicated else []
        self.grads.finish(sharded, replicated)
        self._grads_finished = True

    def master_parameters(self) -> List[nn.Parameter]:
        """What to build the optimizer on for fp32 steps: for every parameter of the model
        (``model.parameters()`` order), an fp32 master copy when ``reduce_dtype`` differs from
        its dtype, else the parameter itself. :meth:`finish_grads` gives the masters the fp32
        gradients (``master.grad = param.main_grad``); :meth:`attach_optimizer`'s post-step hook
        (or :meth:`copy_masters`) writes the stepped masters back into the parameters."""
        return self.grads.master_parameters(list(self.model.parameters()))

    def copy_masters(self) -> None:
        """Write the fp32 masters into the model's parameters (after ``optimizer.step()``)."""
        self.grads.copy_masters(list(self.model.parameters()))

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        """Call :meth:`finish_grads` before every ``optimizer.step()`` (a step pre-hook) and,
        when the optimizer holds :meth:`master_parameters`, :meth:`copy_masters` after it;
        returns the pre-hook's handle. Calling ``finish_grads`` yourself as well is harmless
        (it runs once)."""
        optimizer.register_step_post_hook(lambda *_: self.copy_masters())
        return optimizer.register_step_pre_hook(lambda *_: self.finish_grads())

    def switch_model_chunk(self, chunk: int) -> None:
        """The model chunk (virtual pipeline stage, an index into ``chunks``) whose forward or
        backward a scheduler runs next: ``before_backward`` of the scheduler hook gathers the
        last block of *this* chunk. InternEvo's ``switch_current_model_chunk``. Raises ValueError
        for a chunk that does not exist."""
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < len(self.chunk_sizes):
            raise ValueError(f"model chunk must be one of 0..{len(self.chunk_sizes) - 1} "
                             f"(blocks per chunk: {self.chunk_sizes}), got {chunk!r}")
        self.current_chunk = chunk

    def last_block_of_chunk(self, chunk: int) -> int:
        """Index (into ``blocks``) of model chunk ``chunk``'s last block: where its backward starts."""
        return sum(self.chunk_sizes[:chunk + 1]) - 1

    def scheduler_hook(self) -> "WeightParallelSchedulerHook":
        """Hooks for a pipeline scheduler (InternEvo's ``SchedulerHook`` interface). From now
        on the scheduler announces each backward (``before_backward``), so the last block's
        weights are no longer kept after a forward for a backward that may come later."""
        self.schedule.lookahead = False
        return WeightParallelSchedulerHook(self)

    def __repr__(self) -> str:
        params = sum(len(b) for b in self._by_block)
        chunks = f" in {len(self.chunk_sizes)} chunks" if len(self.chunk_sizes) > 1 else ""
        return (f"<WeightParallel {len(self.blocks)} blocks{chunks}, {params} sharded parameters over "
                f"{self.handle.label}, overlap {'on' if self.overlap else 'off'}, prefetch {self.prefetch_depth}, pool "
                f"{'on' if self.pool.enabled else 'off'}>")


class WeightParallelSchedulerHook:
    """What InternEvo's ``ISPCommunicatorSchedulerHook`` does, for a pipeline scheduler that
    calls ``before_forward`` / ``after_forward`` / ``before_criterion`` / ``after_criterion``
    / ``before_backward`` / ``after_backward`` / ``post_helper_func`` around each micro-batch.

    The module hooks already drive the gathers; the scheduler hook adds what only a scheduler
    knows: ``before_backward`` starts the last block's gather for a backward pass that runs
    later than its forward (1F1B), and ``after_backward`` completes the micro-batch's
    reduce-scatters (:meth:`WeightParallel.wait_grads`), so in-flight gradient buffers never
    pile up across micro-batches. ``finish_grads`` stays the optimizer's (attach it). An
    interleaved scheduler calls :meth:`switch_model_chunk` before each chunk's forward and
    backward (InternEvo reads ``gpc.virtual_pipeline_parallel_rank`` there instead).
    """

    def __init__(self, runtime: WeightParallel) -> None:
        self.runtime = runtime

    def switch_model_chunk(self, chunk: int) -> None:
        """:meth:`WeightParallel.switch_model_chunk`."""
        self.runtime.switch_model_chunk(chunk)

    def before_forward(self, scheduler: Any, inputs: Any) -> None:  # noqa: D102 - interface
        pass

    def after_forward(self, scheduler: Any, outputs: Any) -> None:
        pass

    def before_criterion(self, scheduler: Any, outputs: Any, label: Any) -> None:
        pass

    def after_criterion(self, scheduler: Any, loss: Any) -> None:
        pass

    def before_backward(self, scheduler: Any, outputs: Any, outputs_grad: Any) -> None:
        runtime = self.runtime
        runtime._apply(runtime.schedule.expect_backward(runtime.last_block_of_chunk(runtime.current_chunk)))

    def after_backward(self, scheduler: Any, inputs_grad: Any) -> None:
        self.runtime.wait_grads()

    def post_helper_func(self, scheduler: Any, outputs: Any, label: Any) -> None:
        pass
