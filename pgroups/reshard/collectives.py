"""Activation resharding collectives with autograd, on any mode's group.

Each public function takes ``mode`` — a :class:`~pgroups.modes.ParallelMode`, a mode name
(``"tensor"``, ``"sequence"``, any registered mode) resolved through a
:class:`~pgroups.context.ParallelContext` (default ``pgroups.gpc``), or an explicit
``torch.distributed.ProcessGroup``. A mode the context did not build raises
:class:`~pgroups.errors.ModeNotInitializedError`.

- :func:`gather_along` — forward all-gathers along ``dim``; backward keeps this rank's slice.
- :func:`split_along` — forward keeps this rank's slice; backward all-gathers.
- :func:`reduce_scatter_along` — forward sums over the group and keeps this rank's slice;
  backward all-gathers.
- :func:`all_to_all` — scatters one dim and gathers another, several tensors in one
  communication; backward is the same exchange with the dims swapped. :func:`seq_to_head` /
  :func:`head_to_seq` name the two DeepSpeed-Ulysses directions (sequence-sharded <->
  head-sharded).
- :func:`start_weight_gather` — starts an async all-gather of a weight shard and returns a
  :class:`WeightGatherHandle`; ``wait()`` gives the full weight, whose gradient is
  reduce-scattered (summed) into the shard's.

Example (a ``sequence`` mode registered by the user, weights sharded over ``data``)::

    q, k, v = seq_to_head([q, k, v], "sequence")     # [b, s/p, h, d] -> [b, s, h/p, d], one exchange
    out = head_to_seq(attention(q, k, v), "sequence")
    handle = start_weight_gather(w_shard, 0, "data")  # in flight while other work runs
    y = out @ handle.wait().t()

Slices follow ``torch.tensor_split``: a dim of size ``n`` over ``p`` ranks gives the first
``n % p`` ranks one element more, so uneven sizes work wherever every rank can know them.
Where a rank cannot (the pieces other ranks hold), pass ``sizes`` / ``gather_sizes``; without
them every rank's piece is taken to have this rank's size (:func:`exchange_sizes` learns the
real ones with one small all-gather). Size lists that cannot be right raise ValueError naming
the dim, the size and the group size.

Every rank of the group must call the same function in the same order, and every rank must
run the backward pass (the backward is a collective too). A peer that never arrives raises
:class:`~pgroups.errors.GroupTimeoutError` naming the group and its ranks after the group's
timeout. Gathers and all-to-alls move raw bytes, so any dtype works on gloo and NCCL alike;
reduce-scatter sums in the tensor's own dtype.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import attrs
import torch
import torch.distributed as dist

from ..backend import timeouts_named
from ..context import ParallelContext
from ..modes import ModeLike, ParallelMode, mode_name

GroupLike = Union[ModeLike, dist.ProcessGroup]
Sizes = Tuple[int, ...]

#: byte alignment of each tensor's segment in packed buffers (so views back to any dtype work)
SEGMENT_ALIGN = 16

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---- groups ---------------------------------------------------------------------------------
@attrs.frozen(eq=False)
class GroupInfo:
    """A resolved group: the torch group, its size, this rank's position, and a label for
    messages (``"mode 'tensor' (ranks [0, 1])"``)."""

    group: Optional[dist.ProcessGroup]
    size: int
    rank: int
    label: str
    device: torch.device = torch.device("cpu")   # where helpers put tensors they create


def resolve_group(mode: GroupLike, ctx: Optional[ParallelContext] = None, cpu: bool = False) -> GroupInfo:
    """Resolve ``mode`` (ParallelMode, mode name, or ProcessGroup) to a :class:`GroupInfo`.

    Modes are looked up in ``ctx`` (default ``pgroups.gpc``); ``cpu=True`` takes the mode's CPU
    (gloo) twin. Raises ModeNotInitializedError for a mode not built (or a rank outside it),
    ValueError for a process group this rank is not a member of.
    """
    if isinstance(mode, dist.ProcessGroup):
        rank = dist.get_rank(mode)
        ranks = dist.get_process_group_ranks(mode)
        if rank < 0:
            raise ValueError(f"this rank ({dist.get_rank()}) is not a member of the process group "
                             f"of ranks {_short(ranks)}")
        return GroupInfo(mode, len(ranks), rank, f"group of ranks {_short(ranks)}",
                         _device_for(str(dist.get_backend(mode)).lower(), cpu))
    if not isinstance(mode, (str, ParallelMode)):
        raise TypeError(f"mode must be a ParallelMode, a mode name or a ProcessGroup, got {mode!r}")
    if ctx is None:
        import pgroups  # the package's context, looked up at call time

        ctx = pgroups.gpc
    name = mode_name(mode)
    group = ctx.get_cpu_group(name) if cpu else ctx.get_group(name)
    ranks = ctx.get_ranks_in_group(name)
    backend_name = "gloo" if cpu or ctx.backend is None else ctx.backend.device_backend
    return GroupInfo(group, len(ranks), ctx.get_local_rank(name), f"mode {name!r} (ranks {_short(ranks)})",
                     _device_for(backend_name, cpu))


def _device_for(backend_name: str, cpu: bool) -> torch.device:
    if not cpu and "nccl" in backend_name and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_errors(info: GroupInfo, operation: str):
    """Turn a collective's timeout into GroupTimeoutError naming ``operation`` and the group."""
    return timeouts_named(lambda exc: (
        f"{operation} over {info.label} timed out on local rank {info.rank}: a peer never "
        f"arrived (does every rank of the group call it in the same order?): "
        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"))


# ---- pure size arithmetic ---------------------------------------------------------------------
def even_split_sizes(total: int, parts: int) -> Sizes:
    """Sizes of ``torch.tensor_split(x, parts)`` along a dim of size ``total``: the first
    ``total % parts`` parts get one element more. Raises ValueError for negative input."""
    if total < 0 or parts < 1:
        raise ValueError(f"cannot split a size of {total} into {parts} parts")
    base, extra = divmod(total, parts)
    return tuple(base + 1 if i < extra else base for i in range(parts))


def offsets_of(sizes: Sequence[int]) -> Sizes:
    """Start offset of each piece when pieces of ``sizes`` are laid end to end."""
    result, start = [], 0
    for size in sizes:
        result.append(start)
        start += size
    return tuple(result)


def normalize_dim(dim: int, ndim: int, what: str = "tensor") -> int:
    """``dim`` as a non-negative index into an ``ndim``-d tensor, or ValueError naming both."""
    if ndim == 0:
        raise ValueError(f"the {what} is 0-d (a scalar): it has no dim {dim!r} to split or gather")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim!r} is out of range for the {ndim}-d {what} "
                         f"(allowed {-ndim}..{ndim - 1})")
    return dim % ndim


def check_sizes(sizes: Sequence[int], info: GroupInfo, dim: int, local_size: int, what: str) -> Sizes:
    """Validate a per-rank size list: one non-negative int per rank, this rank's entry equal to
    ``local_size``. Returns it as a tuple; ValueError names the dim, sizes and group size."""
    sizes = tuple(sizes)
    if len(sizes) != info.size or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes):
        raise ValueError(f"{what} must list one non-negative size per rank along dim {dim}: got "
                         f"{list(sizes)} for {info.label}, which has {info.size} ranks")
    if sizes[info.rank] != local_size:
        raise ValueError(f"this rank's tensor has size {local_size} along dim {dim}, but {what}"
                         f"[{info.rank}] = {sizes[info.rank]} ({info.label}, {info.size} ranks)")
    return sizes


def check_split_sizes(sizes: Sequence[int], info: GroupInfo, dim: int, total: int, what: str) -> Sizes:
    """Validate sizes that split a dim of size ``total`` over the group (one per rank, summing
    to ``total``). ValueError names the dim, the size and the group size."""
    sizes = tuple(sizes)
    if len(sizes) != info.size or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes) \
            or sum(sizes) != total:
        raise ValueError(f"{what} must split dim {dim} of size {total} into one non-negative size per "
                         f"rank of {info.label} ({info.size} ranks): got {list(sizes)}")
    return sizes


def with_size(shape: Sequence[int], dim: int, size: int) -> Tuple[int, ...]:
    """``shape`` with entry ``dim`` replaced by ``size``."""
    shape = list(shape)
    shape[dim] = size
    return tuple(shape)


def _short(ranks: Sequence[int], limit: int = 16) -> str:
    ranks = list(ranks)
    return str(ranks) if len(ranks) <= limit else f"[{', '.join(map(str, ranks[:limit]))}, … ({len(ranks)} ranks)]"


# ---- byte packing (any dtype through one buffer) ------------------------------------------------
def _aligned(nbytes: int) -> int:
    return -(-nbytes // SEGMENT_ALIGN) * SEGMENT_ALIGN


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate the tensors' bytes, each segment padded to SEGMENT_ALIGN."""
    parts = []
    for tensor in tensors:
        raw = _as_bytes(tensor)
        parts.append(raw)
        pad = _aligned(raw.numel()) - raw.numel()
        if pad:
            parts.append(raw.new_zeros(pad))
    if not parts:
        device = tensors[0].device if tensors else torch.device("cpu")
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.cat(parts)


def _unpack(buffer: torch.Tensor, layout: Sequence[Tuple[Tuple[int, ...], torch.dtype]]) -> List[torch.Tensor]:
    """Views of ``buffer`` (aligned uint8, from :func:`_pack`) as tensors of ``layout``."""
    result, offset = [], 0
    for shape, dtype in layout:
        nbytes = _nbytes(shape, dtype)
        result.append(buffer.narrow(0, offset, nbytes).view(dtype).reshape(shape))
        offset += _aligned(nbytes)
    return result


# ---- raw collectives (no autograd) -------------------------------------------------------------
def _pad_along(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] == size:
        return tensor
    padded = tensor.new_zeros(with_size(tensor.shape, dim, size))
    padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return padded


def _start_gather(tensor: torch.Tensor, dim: int, sizes: Sizes, info: GroupInfo,
                  async_op: bool) -> Tuple[Optional[dist.Work], Callable[[], torch.Tensor]]:
    """Start an all-gather of ``tensor`` (this rank's piece, ``sizes`` per rank along ``dim``).

    Returns the work handle (None when done synchronously) and a function that, once the work
    is complete, assembles the full tensor. Pieces are padded to the largest size and moved as
    bytes, so uneven sizes and any dtype work on every backend.
    """
    padded_size = max(sizes)
    piece = _pad_along(tensor.detach(), dim, padded_size)
    piece_bytes = _as_bytes(piece)
    gathered = torch.empty(info.size * piece_bytes.numel(), dtype=torch.uint8, device=tensor.device)
    with comm_errors(info, "all-gather"):
        work = _all_gather_single(gathered, piece_bytes, group=info.group, async_op=async_op)
    piece_shape = tuple(piece.shape)

    def finish() -> torch.Tensor:
        full = gathered.view(tensor.dtype)
        if dim == 0 and len(set(sizes)) == 1:  # already the concatenation: no copy
            return full.reshape(with_size(piece_shape, 0, padded_size * info.size))
        pieces = full.reshape((info.size,) + piece_shape).unbind(0)
        return torch.cat([p.narrow(dim, 0, size) for p, size in zip(pieces, sizes)], dim=dim)

    return work, finish


def exchange_sizes(local_size: int, mode: GroupLike, *, ctx: Optional[ParallelContext] = None) -> Sizes:
    """Every rank's ``local_size`` in local-rank order (one all-gather of one int per rank):
    the ``sizes`` to pass to :func:`gather_along` when ranks hold pieces of unknown sizes."""
    info = resolve_group(mode, ctx)
    if info.size == 1:
        return (int(local_size),)
    mine = torch.tensor([int(local_size)], dtype=torch.int64, device=info.device)
    return tuple(int(v) for v in gather_raw(mine, 0, (1,) * info.size, info).tolist())


def gather_raw(tensor: torch.Tensor, dim: int, sizes: Sizes, info: GroupInfo) -> torch.Tensor:
    """All-gather along ``dim`` (no autograd); pieces in local-rank order."""
    work, finish = _start_gather(tensor, dim, sizes, info, async_op=False)
    if work is not None:
        with comm_errors(info, "all-gather"):
            work.wait()
    return finish()


def reduce_scatter_raw(tensor: torch.Tensor, dim: int, sizes: Sizes, info: GroupInfo) -> torch.Tensor:
    """Sum ``tensor`` over the group and return this rank's slice (``sizes`` along ``dim``)."""
    padded_size = max(sizes)
    if dim == 0 and len(set(sizes)) == 1:
        stacked = tensor.detach().contiguous()
    else:
        chunks = torch.split(tensor.detach(), list(sizes), dim=dim)
        stacked = torch.stack([_pad_along(c, dim, padded_size) for c in chunks])
    out = torch.empty(with_size(tensor.shape, dim, padded_size), dtype=tensor.dtype, device=tensor.device)
    with comm_errors(info, "reduce-scatter"):  # flat buffers: the one layout every backend takes
        _reduce_scatter_single(out.view(-1), stacked.reshape(-1), op=dist.ReduceOp.SUM, group=info.group)
    return out.narrow(dim, 0, sizes[info.rank]) if sizes[info.rank] != padded_size else out


def split_raw(tensor: torch.Tensor, dim: int, sizes: Sizes, rank: int) -> torch.Tensor:
    """This rank's slice of ``tensor`` along ``dim`` (a copy, contiguous)."""
    return tensor.narrow(dim, offsets_of(sizes)[rank], sizes[rank]).clone(memory_format=torch.contiguous_format)


def all_to_all_raw(tensors: Sequence[torch.Tensor], scatter_dim: int, gather_dim: int,
                   scatter_sizes: Sequence[Sizes], gather_sizes: Sequence[Sizes],
                   info: GroupInfo) -> List[torch.Tensor]:
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
        send_splits.append(sum(_aligned(_nbytes(p.shape, p.dtype)) for p in pieces))
    layouts = [[(with_size(with_size(t.shape, scatter_dim, s[me]), gather_dim, g[i]), t.dtype)
                for t, s, g in zip(tensors, scatter_sizes, gather_sizes)] for i in range(info.size)]
    recv_splits = [sum(_aligned(_nbytes(shape, dtype)) for shape, dtype in layout) for layout in layouts]
    send = _pack(send_pieces)
    recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=send.device)
    with comm_errors(info, "all-to-all"):
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=info.group)
    arrived = [_unpack(chunk, layout) for chunk, layout in zip(torch.split(recv, recv_splits), layouts)]
    return [torch.cat([arrived[i][t] for i in range(info.size)], dim=gather_dim) for t in range(len(tensors))]


# ---- autograd functions -----------------------------------------------------------------------
class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, dim, sizes, info):
        ctx.dim, ctx.sizes, ctx.info = dim, sizes, info
        return gather_raw(tensor, dim, sizes, info)

    @staticmethod
    def backward(ctx, grad):
        return split_raw(grad, ctx.dim, ctx.sizes, ctx.info.rank), None, None, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, dim, sizes, info):
        ctx.dim, ctx.sizes, ctx.info = dim, sizes, info
        return split_raw(tensor, dim, sizes, info.rank)

    @staticmethod
    def backward(ctx, grad):
        return gather_raw(grad, ctx.dim, ctx.sizes, ctx.info), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, dim, sizes, info):
        ctx.dim, ctx.sizes, ctx.info = dim, sizes, info
        return reduce_scatter_raw(tensor, dim, sizes, info)

    @staticmethod
    def backward(ctx, grad):
        return gather_raw(grad, ctx.dim, ctx.sizes, ctx.info), None, None, None


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


class _GatheredWeight(torch.autograd.Function):
    """Connects an already gathered full weight to its shard: backward reduce-scatters."""

    @staticmethod
    def forward(ctx, shard, assemble, dim, sizes, info):
        ctx.dim, ctx.sizes, ctx.info = dim, sizes, info
        return assemble()

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_raw(grad, ctx.dim, ctx.sizes, ctx.info), None, None, None, None


# ---- public API --------------------------------------------------------------------------------
def gather_along(tensor: torch.Tensor, dim: int, mode: GroupLike, *, sizes: Optional[Sequence[int]] = None,
                 ctx: Optional[ParallelContext] = None) -> torch.Tensor:
    """All-gather ``tensor`` along ``dim`` over ``mode``'s group (pieces in local-rank order).

    Backward keeps this rank's slice of the gradient (no communication): the contract of a
    gather whose result feeds *identical* computation on every rank (Megatron's
    gather-from-tensor-parallel region). For a result used differently per rank, use
    :func:`start_weight_gather` (backward sums). ``sizes``: every rank's size along ``dim``,
    for uneven pieces (default: all equal to this rank's). Raises ValueError for a bad dim or
    sizes.
    """
    info = resolve_group(mode, ctx)
    dim = normalize_dim(dim, tensor.dim())
    sizes = _piece_sizes(sizes, info, dim, tensor.shape[dim], "sizes")
    if info.size == 1:
        return tensor
    return _Gather.apply(tensor, dim, sizes, info)


def split_along(tensor: torch.Tensor, dim: int, mode: GroupLike, *, sizes: Optional[Sequence[int]] = None,
                ctx: Optional[ParallelContext] = None) -> torch.Tensor:
    """This rank's slice of a (replicated) ``tensor`` along ``dim``; no communication.

    Slices follow ``torch.tensor_split`` unless ``sizes`` (one per rank, summing to the dim's
    size) is given. Backward all-gathers the gradient slices into the full gradient.
    """
    info = resolve_group(mode, ctx)
    dim = normalize_dim(dim, tensor.dim())
    sizes = _split_sizes(sizes, info, dim, tensor.shape[dim], "sizes")
    if info.size == 1:
        return tensor
    return _Split.apply(tensor, dim, sizes, info)


def reduce_scatter_along(tensor: torch.Tensor, dim: int, mode: GroupLike, *,
                         sizes: Optional[Sequence[int]] = None,
                         ctx: Optional[ParallelContext] = None) -> torch.Tensor:
    """Sum ``tensor`` over ``mode``'s group and keep this rank's slice along ``dim``.

    Slices follow ``torch.tensor_split`` unless ``sizes`` is given. Backward all-gathers the
    gradient slices (the gradient of a sum reaches every addend).
    """
    info = resolve_group(mode, ctx)
    dim = normalize_dim(dim, tensor.dim())
    sizes = _split_sizes(sizes, info, dim, tensor.shape[dim], "sizes")
    if info.size == 1:
        return tensor
    return _ReduceScatter.apply(tensor, dim, sizes, info)


TensorOrTensors = Union[torch.Tensor, Sequence[torch.Tensor]]


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
        scatter_all.append(_split_sizes(scatter_sizes, info, sdim, tensor.shape[sdim], "scatter_sizes"))
        gather_all.append(_piece_sizes(gather_sizes, info, gdim, tensor.shape[gdim], "gather_sizes"))
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


class WeightGatherHandle:
    """An all-gather of a weight shard in flight. :meth:`wait` returns the full weight, joined
    to the shard's autograd graph: its gradient is reduce-scattered (summed over the group)
    back into the shard's gradient. ``wait`` may be called again; it returns the same tensor."""

    def __init__(self, shard: torch.Tensor, dim: int, sizes: Sizes, info: GroupInfo) -> None:
        self.shard, self.dim, self.sizes, self.info = shard, dim, sizes, info
        self._full: Optional[torch.Tensor] = None
        if info.size == 1:
            self._work, self._finish = None, None
        else:
            self._work, self._finish = _start_gather(shard, dim, sizes, info, async_op=True)

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
    full weight's gradient into the shard's. ``sizes`` as in :func:`gather_along`.
    """
    info = resolve_group(mode, ctx)
    dim = normalize_dim(dim, shard.dim(), "weight shard")
    sizes = _piece_sizes(sizes, info, dim, shard.shape[dim], "sizes")
    return WeightGatherHandle(shard, dim, sizes, info)


def all_gather_weight(shard: torch.Tensor, dim: int, mode: GroupLike, *, sizes: Optional[Sequence[int]] = None,
                      ctx: Optional[ParallelContext] = None) -> torch.Tensor:
    """:func:`start_weight_gather` and wait: the full weight, backward reduce-scatter."""
    return start_weight_gather(shard, dim, mode, sizes=sizes, ctx=ctx).wait()


def _piece_sizes(sizes: Optional[Sequence[int]], info: GroupInfo, dim: int, local: int, what: str) -> Sizes:
    if sizes is None:
        return (local,) * info.size
    return check_sizes(sizes, info, dim, local, what)


def _split_sizes(sizes: Optional[Sequence[int]], info: GroupInfo, dim: int, total: int, what: str) -> Sizes:
    if sizes is None:
        return even_split_sizes(total, info.size)
    return check_split_sizes(sizes, info, dim, total, what)
