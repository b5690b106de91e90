"""verl's hybrid-engine pattern as a ready helper: a trainer with tensor parallelism ``t`` and
an inference engine with tensor parallelism ``i`` (``i`` divides ``t``) on the same ranks.

Each training TP group then holds ``m = t / i`` inference replicas. The ``m`` consecutive
ranks that will hold the *same* inference shard form a **micro-data-parallel** group — the
``micro_data`` mode that ships as the plugin :mod:`pgroups.plugins.micro_data`::

    plugins: [pgroups.plugins.micro_data]
    extra_modes:
      micro_data: {inference_tensor: 2}

Training TP ranks ``[0, 1, 2, 3]`` with ``i = 2`` give micro groups ``[0, 1]`` and ``[2, 3]``;
the inference TP groups are the strided ``[0, 2]`` and ``[1, 3]`` (as in verl), so inference
shard ``k`` is the concatenation of the training shards held by micro group ``k``.

:class:`MicroDataSharding` does the three things the trainer-to-engine hand-off needs:

- **weights** — :meth:`~MicroDataSharding.iter_inference_params`: all-gather each
  tensor-parallel training shard over the micro group (bucketed: one collective per bucket,
  not one per tensor) and re-assemble the inference shard, sub-block by sub-block for fused
  layouts (QKV with GQA, gate/up). Every rank receives exactly the bytes of its inference
  shard it does not hold: the minimum for this placement.
- **batch pre-processing** — :meth:`~MicroDataSharding.preprocess`: broadcast the batch within
  the training TP group from its first rank, then keep this rank's chunk per micro-DP rank.
- **batch post-processing** — :meth:`~MicroDataSharding.postprocess`: all-gather the generated
  batch over the micro group, then over the pipeline group (pipeline stages act as data
  parallel ranks during generation).

A batch is a tensor or a mapping of names to tensors sharing the batch dim (verl's
``DataProto.batch``). Batches travel as one byte buffer with a small header (names, dtypes,
shapes) — any dtype mix in two collectives, no ``*_object`` collectives, and ranks that do not
yet hold the batch (or hold a stale one) simply receive it.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ..context import ParallelContext
from ..errors import ConfigError, ModeNotInitializedError
from ..handle import GroupHandle
from ..modes import ModeLike, canonical_name
from ..comm import (GroupLike, aligned_nbytes, comm_errors, gather_raw, normalize_dim, pack_tensors,
                    resolve_group, unpack_tensors)

Batch = Union[torch.Tensor, Mapping[str, torch.Tensor]]
Entry = Tuple[str, torch.dtype, Tuple[int, ...]]

#: dtypes a batch header can name (the code is the index)
HEADER_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                 torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
#: default bucket size of the weight all-gather
WEIGHT_BUCKET_BYTES = 256 * 2 ** 20
MICRO_DATA_MODE = "micro_data"
_SINGLE_KEY = ""


# ---- batch header (pure) ------------------------------------------------------------------------
def encode_header(entries: Sequence[Entry], single: bool = False) -> List[int]:
    """Integers describing a batch: ``[single, count, (name length, *utf-8 bytes, dtype code,
    ndim, *shape) per entry]``. Raises ValueError for a dtype outside HEADER_DTYPES."""
    values = [int(single), len(entries)]
    for name, dtype, shape in entries:
        if dtype not in HEADER_DTYPES:
            raise ValueError(f"batch entry {name!r} has dtype {dtype}, which cannot be sent; allowed: "
                             f"{', '.join(str(d).replace('torch.', '') for d in HEADER_DTYPES)}")
        raw = name.encode("utf-8")
        values += [len(raw), *raw, HEADER_DTYPES.index(dtype), len(shape), *shape]
    return values


def decode_header(values: Sequence[int]) -> Tuple[List[Entry], bool]:
    """The inverse of :func:`encode_header`: ``(entries, single)``."""
    values = [int(v) for v in values]
    single, count, pos, entries = bool(values[0]), values[1], 2, []
    for _ in range(count):
        length = values[pos]
        name = bytes(values[pos + 1:pos + 1 + length]).decode("utf-8")
        pos += 1 + length
        dtype, ndim = HEADER_DTYPES[values[pos]], values[pos + 1]
        shape = tuple(values[pos + 2:pos + 2 + ndim])
        pos += 2 + ndim
        entries.append((name, dtype, shape))
    return entries, single


def _as_entries(batch: Batch) -> Tuple[Dict[str, torch.Tensor], bool]:
    if isinstance(batch, torch.Tensor):
        return {_SINGLE_KEY: batch}, True
    if not isinstance(batch, Mapping) or not batch:
        raise ValueError("a batch must be a tensor or a non-empty mapping of names to tensors, "
                         f"got {type(batch).__name__}")
    for name, value in batch.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"batch entry {name!r} must map a str to a tensor, got {type(value).__name__}")
    return dict(batch), False


def _as_batch(entries: Dict[str, torch.Tensor], single: bool) -> Batch:
    return entries[_SINGLE_KEY] if single else entries


def _encode_message(tensors: Dict[str, torch.Tensor], single: bool, device: torch.device) -> torch.Tensor:
    """One uint8 buffer: the header (int64, padded to the packing alignment) then the packed tensors."""
    header = encode_header([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], single)
    header_len = aligned_nbytes((len(header) + 1) * 8) // 8
    header_tensor = torch.zeros(header_len, dtype=torch.int64, device=device)
    header_tensor[0] = len(header)
    header_tensor[1:1 + len(header)] = torch.tensor(header, dtype=torch.int64)
    payload = pack_tensors([t.to(device) for t in tensors.values()])
    return torch.cat([header_tensor.view(torch.uint8), payload])


def _decode_message(buffer: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], bool]:
    length = int(buffer[:8].view(torch.int64)[0])
    header_len = aligned_nbytes((length + 1) * 8)
    entries, single = decode_header(buffer[8:8 + 8 * length].view(torch.int64).tolist())
    tensors = unpack_tensors(buffer[header_len:], [(shape, dtype) for _, dtype, shape in entries])
    return {name: t for (name, _, _), t in zip(entries, tensors)}, single


# ---- batch collectives -------------------------------------------------------------------------
def broadcast_batch(batch: Optional[Batch], mode: GroupLike = "tp", *, src: int = 0,
                    cpu: bool = False, ctx: Optional[ParallelContext] = None) -> Batch:
    """Every rank of ``mode``'s group gets local rank ``src``'s batch (two broadcasts).

    Other ranks may pass None or a stale batch (ignored). ``src`` returns its own batch; the
    others get new tensors on the group's device (``cpu=True``: the mode's CPU group, CPU
    tensors). Data only: no autograd. Raises ValueError for a bad batch or ``src``.
    """
    info = resolve_group(mode, ctx, cpu=cpu)
    if not 0 <= src < info.size:
        raise ValueError(f"src {src} is not a local rank of {info.label} (0..{info.size - 1})")
    if info.rank == src:
        if batch is None:
            raise ValueError(f"the source rank of broadcast_batch over {info.label} passed no batch")
        tensors, single = _as_entries(batch)
        if info.size == 1:
            return batch
        message = _encode_message(tensors, single, info.device)
        size = torch.tensor([message.numel()], dtype=torch.int64, device=info.device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=info.device)
    global_src = dist.get_global_rank(info.group, src)
    with comm_errors(info, "batch broadcast"):
        dist.broadcast(size, src=global_src, group=info.group)
        if info.rank != src:
            message = torch.empty(int(size.item()), dtype=torch.uint8, device=info.device)
        dist.broadcast(message, src=global_src, group=info.group)
    if info.rank == src:
        return batch
    return _as_batch(*_decode_message(message))


def chunk_batch(batch: Batch, parts: int, index: int, dim: int = 0) -> Batch:
    """Chunk ``index`` of ``parts`` of every tensor along ``dim`` (``torch.tensor_split``:
    uneven batches give the first chunks one row more). Pure; returns views.

    Raises ValueError when the tensors disagree on the size of ``dim``, naming them.
    """
    tensors, single = _as_entries(batch)
    if not 0 <= index < parts:
        raise ValueError(f"chunk index {index} is outside 0..{parts - 1}")
    sizes = {name: t.shape[normalize_dim(dim, t.dim(), f"batch entry {name!r}")] for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch entries disagree on the size of dim {dim}: "
                         + ", ".join(f"{name or 'tensor'}={size}" for name, size in sizes.items()))
    return _as_batch({name: torch.tensor_split(t, parts, dim)[index] for name, t in tensors.items()}, single)


def all_gather_batch(batch: Batch, mode: GroupLike, *, dim: int = 0, cpu: bool = False,
                     ctx: Optional[ParallelContext] = None) -> Batch:
    """Concatenate every rank's batch along ``dim`` in local-rank order (two collectives).

    Ranks may hold different numbers of rows; names, dtypes and every other dim must agree —
    otherwise every rank raises the same ValueError naming the entry and the ranks. Results
    are new tensors on the group's device. Data only: no autograd.
    """
    info = resolve_group(mode, ctx, cpu=cpu)
    tensors, single = _as_entries(batch)
    for name, tensor in tensors.items():
        normalize_dim(dim, tensor.dim(), f"batch entry {name!r}")
    if info.size == 1:
        return batch
    message = _encode_message(tensors, single, info.device)
    size = torch.tensor([message.numel()], dtype=torch.int64, device=info.device)
    sizes = gather_raw(size, 0, (1,) * info.size, info).tolist()
    longest = max(sizes)
    padded = torch.cat([message, message.new_zeros(longest - message.numel())])
    everyone = gather_raw(padded, 0, (longest,) * info.size, info).view(info.size, longest)
    decoded = [_decode_message(row) for row in everyone]
    _check_gatherable(decoded, dim, info)
    names = list(decoded[0][0])
    return _as_batch({name: torch.cat([entries[name] for entries, _ in decoded], dim=dim) for name in names}, single)


def _check_gatherable(decoded: Sequence[Tuple[Dict[str, torch.Tensor], bool]], dim: int, info: GroupHandle) -> None:
    first, first_single = decoded[0]
    for rank, (entries, single) in enumerate(decoded[1:], start=1):
        if set(entries) != set(first) or single != first_single:
            extra = sorted(set(entries) ^ set(first))
            raise ValueError(f"all_gather_batch over {info.label}: local rank {rank} holds entries "
                             f"{sorted(entries)} but local rank 0 holds {sorted(first)} (differing: {extra})")
        for name, tensor in entries.items():
            ref = first[name]
            d = dim % ref.dim() if ref.dim() else 0
            if tensor.dtype != ref.dtype or tensor.dim() != ref.dim() or \
                    tensor.shape[:d] + tensor.shape[d + 1:] != ref.shape[:d] + ref.shape[d + 1:]:
                raise ValueError(
                    f"all_gather_batch over {info.label}: entry {name or 'tensor'!r} is {ref.dtype} "
                    f"{tuple(ref.shape)} on local rank 0 but {tensor.dtype} {tuple(tensor.shape)} on "
                    f"local rank {rank}; only dim {dim} may differ")


# ---- weights (pure assembly) ---------------------------------------------------------------------
def assemble_inference_shard(pieces: Sequence[torch.Tensor], dim: int,
                             sub_blocks: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The inference shard from the training shards of one micro group (in micro-rank order).

    Without ``sub_blocks`` it is their concatenation along ``dim``. A fused layout lists the
    sizes of its sub-blocks within one training shard along ``dim`` (QKV with GQA: ``(q, k,
    v)`` rows per shard; gate/up: ``(n, n)``): the result concatenates, per sub-block, that
    sub-block of every piece. Raises ValueError if the sub-blocks do not tile a shard.
    """
    dim = normalize_dim(dim, pieces[0].dim(), "weight shard")
    if sub_blocks is None:
        return torch.cat(list(pieces), dim=dim)
    sub_blocks = [int(s) for s in sub_blocks]
    if sum(sub_blocks) != pieces[0].shape[dim] or any(s < 0 for s in sub_blocks):
        raise ValueError(f"sub_blocks {sub_blocks} must tile dim {dim} of the training shard "
                         f"(size {pieces[0].shape[dim]})")
    split = [torch.split(piece, sub_blocks, dim=dim) for piece in pieces]
    return torch.cat([blocks[b] for b in range(len(sub_blocks)) for blocks in split], dim=dim)


def inference_tensor_ranks(tensor_ranks: Sequence[int], micro_size: int, micro_rank: int) -> List[int]:
    """The inference TP group of the rank at ``micro_rank`` of its micro group: the training TP
    ranks at the same position of every micro group (verl's strided groups). Pure."""
    return list(tensor_ranks[micro_rank::micro_size])


# ---- the helper ------------------------------------------------------------------------------------
class MicroDataSharding:
    """Trainer (TP ``t``) → inference engine (TP ``i``) hand-off on the same ranks, verl style.

    Reads the groups of ``ctx`` (default ``pgroups.gpc``): ``tensor_mode``, ``pipeline_mode``
    and ``micro_data_mode`` (built by the ``micro_data`` plugin initializer). Raises
    ModeNotInitializedError, naming the plugin, when the micro-data mode was not built, and
    ConfigError when its groups are not blocks of consecutive training TP ranks. ``cpu=True``
    moves batches over the modes' CPU (gloo) groups; weights always use the device groups.
    """

    def __init__(self, ctx: Optional[ParallelContext] = None, *, micro_data_mode: ModeLike = MICRO_DATA_MODE,
                 tensor_mode: ModeLike = "tp", pipeline_mode: ModeLike = "pp",
                 cpu: bool = False) -> None:
        if ctx is None:
            import pgroups

            ctx = pgroups.gpc
        self.ctx, self.cpu = ctx, cpu
        self.micro_data_mode, self.tensor_mode = canonical_name(micro_data_mode), canonical_name(tensor_mode)
        self.pipeline_mode = canonical_name(pipeline_mode)
        if ctx.is_initialized() and not ctx.is_initialized(self.micro_data_mode):
            raise ModeNotInitializedError(
                f"mode {self.micro_data_mode!r} was not built: add the micro_data initializer to the config "
                "(plugins: [pgroups.plugins.micro_data], see config_examples/micro_data.yaml) and "
                f"extra_modes: {{{self.micro_data_mode}: {{inference_tensor: N}}}}")
        self.tensor_ranks = ctx.get_ranks_in_group(self.tensor_mode)
        self.micro_ranks = ctx.get_ranks_in_group(self.micro_data_mode)
        positions = [self.tensor_ranks.index(r) if r in self.tensor_ranks else -1 for r in self.micro_ranks]
        size = len(positions)
        if (-1 in positions or positions != list(range(positions[0], positions[0] + size))
                or positions[0] % size or len(self.tensor_ranks) % size):
            raise ConfigError(
                f"mode {self.micro_data_mode!r} group {self.micro_ranks} is not a block of consecutive ranks "
                f"of the {self.tensor_mode!r} group {self.tensor_ranks}; micro-data-parallel groups split "
                "each training tensor-parallel group into inference replicas")

    # ---- layout (pure queries) ----
    @property
    def micro_dp_size(self) -> int:
        """Ranks per micro-data-parallel group: training TP / inference TP."""
        return len(self.micro_ranks)

    @property
    def micro_dp_rank(self) -> int:
        return self.micro_ranks.index(self.ctx.get_global_rank())

    @property
    def training_tensor_size(self) -> int:
        return len(self.tensor_ranks)

    @property
    def inference_tensor_size(self) -> int:
        return self.training_tensor_size // self.micro_dp_size

    @property
    def inference_tensor_rank(self) -> int:
        """This rank's position in its inference TP group = the index of its micro group."""
        return self.tensor_ranks.index(self.ctx.get_global_rank()) // self.micro_dp_size

    @property
    def inference_tensor_ranks(self) -> List[int]:
        """Global ranks of this rank's inference TP group (strided within the training TP group)."""
        return inference_tensor_ranks(self.tensor_ranks, self.micro_dp_size, self.micro_dp_rank)

    # ---- batches ----
    def preprocess(self, batch: Optional[Batch]) -> Batch:
        """Before generation: broadcast the batch within the training TP group from its first
        rank (the others may pass None), then keep this rank's chunk per micro-DP rank."""
        batch = broadcast_batch(batch, self.tensor_mode, src=0, cpu=self.cpu, ctx=self.ctx)
        if self.micro_dp_size == 1:
            return batch
        return chunk_batch(batch, self.micro_dp_size, self.micro_dp_rank)

    def postprocess(self, batch: Batch, gather_pipeline: bool = True) -> Batch:
        """After generation: all-gather over the micro-DP group (undoing :meth:`preprocess`'s
        chunking), then, with ``gather_pipeline``, over the pipeline group (stages generate as
        data-parallel ranks), so every rank of a model replica holds the whole batch."""
        batch = all_gather_batch(batch, self.micro_data_mode, cpu=self.cpu, ctx=self.ctx)
        if gather_pipeline:
            batch = all_gather_batch(batch, self.pipeline_mode, cpu=self.cpu, ctx=self.ctx)
        return batch

    # ---- weights ----
    def gather_inference_shard(self, shard: torch.Tensor, dim: int,
                               sub_blocks: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The inference shard of one tensor-parallel weight from this rank's training shard
        (split along ``dim``); ``sub_blocks`` as in :func:`assemble_inference_shard`."""
        return dict(self.iter_inference_params({"w": shard}, {"w": dim},
                                               {"w": sub_blocks} if sub_blocks else None))["w"]

    def iter_inference_params(self, params: Mapping[str, torch.Tensor], tp_dims: Mapping[str, int],
                              sub_blocks: Optional[Mapping[str, Sequence[int]]] = None,
                              bucket_bytes: int = WEIGHT_BUCKET_BYTES) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yield ``(name, inference tensor)`` for every training parameter, bucket by bucket
        (feed it to an engine's ``load_weights``).

        ``params``: this rank's training shards; ``tp_dims``: the dim each tensor-parallel one is
        split along (others are replicated and yielded as they are); ``sub_blocks``: fused
        layouts. Collective over the micro group: every member passes the same names in the
        same order with equally shaped shards. Tensor-parallel shards are packed into buckets of
        at most ``bucket_bytes`` (a larger tensor goes alone), one all-gather per bucket.
        Results are new tensors (detached). Raises ValueError for names in ``tp_dims`` or
        ``sub_blocks`` that are not parameters.
        """
        sub_blocks = dict(sub_blocks or {})
        unknown = sorted((set(tp_dims) | set(sub_blocks)) - set(params))
        if unknown:
            raise ValueError(f"tp_dims / sub_blocks name {unknown}, which are not in params")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        dims = {name: normalize_dim(dim, params[name].dim(), f"parameter {name!r}") for name, dim in tp_dims.items()}
        info = resolve_group(self.micro_data_mode, self.ctx)
        bucket: List[str] = []
        bucket_size = 0
        for name, tensor in params.items():
            if name not in dims:
                yield name, tensor
                continue
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and bucket_size + nbytes > bucket_bytes:
                yield from self._gather_bucket(bucket, params, dims, sub_blocks, info)
                bucket, bucket_size = [], 0
            bucket.append(name)
            bucket_size += nbytes
        if bucket:
            yield from self._gather_bucket(bucket, params, dims, sub_blocks, info)

    def gather_inference_params(self, params: Mapping[str, torch.Tensor], tp_dims: Mapping[str, int],
                                sub_blocks: Optional[Mapping[str, Sequence[int]]] = None,
                                bucket_bytes: int = WEIGHT_BUCKET_BYTES) -> Dict[str, torch.Tensor]:
        """:meth:`iter_inference_params` collected into a dict."""
        return dict(self.iter_inference_params(params, tp_dims, sub_blocks, bucket_bytes))

    def _gather_bucket(self, names: Sequence[str], params: Mapping[str, torch.Tensor], dims: Mapping[str, int],
                       sub_blocks: Mapping[str, Sequence[int]], info: GroupHandle) -> Iterator[Tuple[str, torch.Tensor]]:
        tensors = [params[name].detach() for name in names]
        if info.size == 1:
            for name, tensor in zip(names, tensors):
                yield name, assemble_inference_shard([tensor], dims[name], sub_blocks.get(name))
            return
        message = pack_tensors(tensors)
        rows = gather_raw(message, 0, (message.numel(),) * info.size, info).view(info.size, -1)
        layout = [(tuple(t.shape), t.dtype) for t in tensors]
        pieces = [unpack_tensors(row, layout) for row in rows]
        for index, name in enumerate(names):
            yield name, assemble_inference_shard([per_rank[index] for per_rank in pieces], dims[name],
                                                 sub_blocks.get(name))

    def __repr__(self) -> str:
        return (f"<MicroDataSharding training TP {self.training_tensor_size} -> inference TP "
                f"{self.inference_tensor_size}: micro-DP {self.micro_dp_size} ranks {self.micro_ranks}>")
