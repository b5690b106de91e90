"""dtype conversion at the sender: the destination dtype of each tensor, and the fp8 quantizer.

Conversions allowed (source → destination): a floating source (float32 / bfloat16 / float16)
to ``bfloat16``, ``float16``, ``float32`` (a plain cast, ``Tensor.copy_``: round to nearest even)
or ``float8_e4m3fn`` (scaled). Integer tensors keep their dtype.

**fp8 scale (the contract).** One float32 scale per index of the dims a transfer may cut —
the tensor's split axis (its TP dim; dim 0 for a replicated tensor) and, for a grouped expert
weight, its expert dim (:func:`scale_dims`) —, the amax taken over every other dim: the sender
always holds every value one scale covers. For a column-parallel weight ``[out, in]`` (split on
dim 0) that is one scale per output row; for a row-parallel weight (split on dim 1) one per input
column; for a grouped expert weight ``[E, out, in]`` split on dim 1, one per (expert, row). The
destination holds it as ``"<name>_scale"`` (:func:`scale_name`), float32, shaped like the local
shard with 1 on every other dim (:func:`scale_shape`), so it broadcasts: ``w ≈ q.float() * scale``,
with

    scale = amax / 448   (1.0 where amax is 0)       q = clamp(w.float() / scale, -448, 448) → e4m3

fp8 needs a tensor of at least 2 dims (a norm or bias would get one scale per value).
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import ReshardError

FP8_MAX = {torch.float8_e4m3fn: 448.0}
#: what a floating source may become on the destination
TARGET_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)
SCALE_DTYPE = torch.float32
SCALE_SUFFIX = "_scale"
#: float32 elements the quantizer converts at once (1 MiB: the float32 copy stays in cache)
BLOCK_ELEMENTS = 1 << 18
#: bytes per extremum the quantizer may need (a float64 source at most)
EXTREMA_ITEMSIZE = 8


def scale_name(name: str) -> str:
    """The destination state's name of the fp8 scale of tensor ``name``."""
    return name + SCALE_SUFFIX


def is_scaled(dtype: torch.dtype) -> bool:
    return dtype in FP8_MAX


def scale_dims(spec) -> Tuple[int, ...]:
    """The dims a transfer of ``spec`` may cut (one scale per index of them): its axis, and the
    expert dim of a grouped expert weight."""
    experts = getattr(spec, "experts", None)
    dims = {spec.axis} | ({experts.dim} if experts is not None and experts.dim is not None else set())
    return tuple(sorted(dims))


def scale_shape(shape: Sequence[int], dims: Sequence[int]) -> Tuple[int, ...]:
    """The scale's shape for a region of ``shape`` scaled per index of ``dims``: 1 elsewhere."""
    return tuple(n if dim in dims else 1 for dim, n in enumerate(shape))


def resolve_dst_dtypes(model, dst_dtypes: Optional[Mapping[str, torch.dtype]]) -> Dict[str, torch.dtype]:
    """``{tensor name: destination dtype}`` for every tensor of ``model`` (its own dtype unless
    ``dst_dtypes`` names another). Raises ReshardError naming the tensor and what is allowed."""
    result = {spec.name: spec.dtype for spec in model.tensors}
    for name, dtype in (dst_dtypes or {}).items():
        if name not in result:
            raise ReshardError(f"dst_dtypes names {name!r}, which is not a tensor of model {model.name!r}")
        spec = model[name]
        if dtype == spec.dtype:
            continue
        if not spec.dtype.is_floating_point or dtype not in TARGET_DTYPES:
            raise ReshardError(f"dst_dtypes[{name!r}]: {spec.dtype} -> {dtype} is not a conversion we do; "
                               f"a floating source converts to one of {[str(d) for d in TARGET_DTYPES]}")
        if is_scaled(dtype) and len(spec.shape) < 2:
            raise ReshardError(f"dst_dtypes[{name!r}]: {dtype} needs a tensor of at least 2 dims (one scale per "
                               f"index of the split axis); {name!r} has shape {tuple(spec.shape)}")
        result[name] = dtype
    return result


def converted_dtypes(model, dst_dtypes: Mapping[str, torch.dtype]) -> Dict[str, torch.dtype]:
    """``{tensor name: destination dtype}`` of the tensors of ``model`` whose destination dtype
    (from :func:`resolve_dst_dtypes`) differs from their own: what the sender converts."""
    return {name: dtype for name, dtype in dst_dtypes.items() if dtype != model[name].dtype}


def wire_layout(shape: Sequence[int], dst_dtype: torch.dtype, dims: Sequence[int]) -> Tuple[int, int]:
    """``(payload bytes, total bytes)`` of a region of ``shape`` on the wire in ``dst_dtype``: the
    values in the destination dtype, then (fp8) the float32 scales, 4-byte aligned."""
    payload = math.prod(shape) * dst_dtype.itemsize
    if not is_scaled(dst_dtype):
        return payload, payload
    scales = math.prod(scale_shape(shape, dims))
    return payload, -(-payload // 4) * 4 + scales * SCALE_DTYPE.itemsize


def scratch_elements(shape: Sequence[int], dst_dtype: torch.dtype) -> int:
    """float32 scratch elements the quantizer needs for a region of ``shape`` (0 for a cast):
    one block (:data:`BLOCK_ELEMENTS`), or the region if smaller."""
    return min(math.prod(shape), BLOCK_ELEMENTS) if is_scaled(dst_dtype) else 0


def scratch_bytes(scratch: int, scales: int) -> int:
    """Bytes of the quantizer's buffers for ``scratch`` float32 elements and ``scales`` scales
    (:class:`Quantizer`: the block, the extrema in the source dtype, a mask)."""
    return 4 * scratch + (2 * EXTREMA_ITEMSIZE + 1) * scales


def region(tensor: torch.Tensor, box: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """The view of ``tensor`` covered by ``box`` (one ``(start, stop)`` per dim; no copy)."""
    for dim, (start, stop) in enumerate(box):
        if stop - start != tensor.shape[dim]:
            tensor = tensor.narrow(dim, start, stop - start)
    return tensor


def scale_box(box: Sequence[Tuple[int, int]], dims: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
    """The box of a region's scales in the scale tensor (1 on every dim but ``dims``)."""
    return tuple(span if dim in dims else (0, 1) for dim, span in enumerate(box))


def blocks(shape: Sequence[int], limit: int) -> Iterator[Tuple[Tuple[int, int], ...]]:
    """Boxes that tile a region of ``shape`` in order, each of at most ``limit`` elements: runs of
    whole rows of dim 0 where a row fits, else the same one level down (pure)."""
    if not shape:
        yield ()
        return
    inner = math.prod(shape[1:])
    rest = tuple((0, n) for n in shape[1:])
    if inner <= limit:
        rows = max(1, limit // max(inner, 1))
        for start in range(0, shape[0], rows):
            yield ((start, min(shape[0], start + rows)),) + rest
        return
    for row in range(shape[0]):
        for box in blocks(shape[1:], limit):
            yield ((row, row + 1),) + box


class Quantizer:
    """Scaled fp8 quantization into caller-given outputs, using buffers it is handed (so a
    repeated sync allocates nothing): ``scratch`` (float32, one block: a region is converted a
    block at a time, so the float32 copy stays in cache and no bucket-sized scratch exists),
    ``extrema`` (float32, :data:`EXTREMA_ITEMSIZE` // 2 elements per scale: each scale's max and
    min in the source dtype), ``mask`` (bool, one per scale)."""

    def __init__(self, scratch: torch.Tensor, extrema: torch.Tensor, mask: torch.Tensor) -> None:
        self.scratch, self.extrema, self.mask = scratch, extrema, mask

    def quantize(self, source: torch.Tensor, dims: Sequence[int], q_out: torch.Tensor,
                 scale_out: torch.Tensor) -> None:
        """Write ``source`` as fp8 into ``q_out`` (same shape) and its scales into ``scale_out``
        (float32, :func:`scale_shape` of the region). See the module docstring for the rule.

        The amax is taken in the source dtype (max, min and negation are exact, so it equals the
        float32 amax); then, block by block, the values are copied to float32, divided by their
        scale, clamped and cast: the same float32 arithmetic as ``w.float() / scale``."""
        limit = FP8_MAX[q_out.dtype]
        others = [d for d in range(source.dim()) if d not in dims]
        keep = scale_shape(source.shape, dims)
        count = math.prod(keep)
        extrema = self.extrema.view(torch.uint8)[:2 * count * source.element_size()].view(source.dtype)
        high, low = extrema[:count].view(keep), extrema[count:].view(keep)
        torch.amax(source, dim=others, keepdim=True, out=high)
        torch.amin(source, dim=others, keepdim=True, out=low)
        low.neg_()
        torch.maximum(high, low, out=high)
        scale_out.copy_(high)
        scale_out.div_(limit)
        mask = self.mask[:count].view(keep)
        torch.eq(scale_out, 0, out=mask)
        scale_out.masked_fill_(mask, 1.0)
        for box in blocks(source.shape, self.scratch.numel()):
            block = region(source, box)
            values = self.scratch[:block.numel()].view(block.shape)
            values.copy_(block)
            values.div_(region(scale_out, scale_box(box, dims)))
            values.clamp_(-limit, limit)
            region(q_out, box).copy_(values)
