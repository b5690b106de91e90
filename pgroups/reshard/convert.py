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

**Block-scaled fp8** (``fp8_scales="block"``: the format of DeepSeek-V3's and Qwen3's FP8
checkpoints, which SGLang and vLLM load). One float32 scale per 128 x 128 block of the last two
dims of the destination's *local* shard (per index of any leading dim, e.g. per expert of a
grouped ``[E, out, in]`` weight); edge blocks are partial. The destination holds it as
``"<name>_scale_inv"`` (:func:`scale_name`), shaped ``[..., ceil(out / 128), ceil(in / 128)]``,
and ``w[i, j] ≈ q[i, j].float() * scale_inv[i // 128, j // 128]``, with ``scale_inv`` = the
block's amax / 448 (1.0 where it is 0) and q as above. Where every shard starts at a multiple of
128 (what those loaders require of a TP shard), the local blocks are the checkpoint's global
ones. A sender quantizes only whole blocks: every transfer of such a tensor must start at a
multiple of 128 on the destination (:func:`scale_cut_problem`), which the plan's cuts give
whenever the shards of both layouts do.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import attrs
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


#: ``fp8_scales`` values: one scale per index of the dims a transfer may cut, or per 128 x 128 block
SCALE_FORMATS = ("row", "block")
#: the block edge of block-scaled fp8
FP8_BLOCK = 128
BLOCK_SCALE_SUFFIX = "_scale_inv"


@attrs.frozen
class ScaleLayout:
    """Where the fp8 scales of a tensor of ``ndim`` dims sit: one per index of ``dims``, and with
    ``block`` > 0 one per ``block`` x ``block`` block of the last two dims (1 on every other dim)."""

    dims: Tuple[int, ...]
    block: int = 0
    ndim: int = 0

    def __contains__(self, dim: object) -> bool:
        """Whether ``dim`` has one scale per index."""
        return dim in self.dims

    @property
    def blocked(self) -> Tuple[int, ...]:
        return (self.ndim - 2, self.ndim - 1) if self.block else ()

    def shape(self, shape: Sequence[int]) -> Tuple[int, ...]:
        return tuple(n if d in self.dims else -(-n // self.block) if d in self.blocked else 1
                     for d, n in enumerate(shape))

    def box(self, box: Sequence[Tuple[int, int]]) -> Tuple[Tuple[int, int], ...]:
        """The box of a region's scales (the region starts at a multiple of ``block`` on the
        blocked dims: :func:`scale_cut_problem`)."""
        return tuple(span if d in self.dims else (span[0] // self.block, -(-span[1] // self.block))
                     if d in self.blocked else (0, 1) for d, span in enumerate(box))


Scales = Union[ScaleLayout, Sequence[int]]


def _layout(scales: Scales) -> ScaleLayout:
    return scales if isinstance(scales, ScaleLayout) else ScaleLayout(tuple(scales))


def scale_name(name: str, scales: Optional[Scales] = None) -> str:
    """The destination state's name of the fp8 scale of tensor ``name``: ``"<name>_scale"``, or
    ``"<name>_scale_inv"`` when ``scales`` is block-scaled."""
    block = scales is not None and _layout(scales).block
    return name + (BLOCK_SCALE_SUFFIX if block else SCALE_SUFFIX)


def is_scaled(dtype: torch.dtype) -> bool:
    return dtype in FP8_MAX


def scale_dims(spec, fp8_scales: str = "row") -> ScaleLayout:
    """Where the fp8 scales of ``spec`` sit. ``"row"``: per index of the dims a transfer may cut —
    its axis, and the expert dim of a grouped expert weight; ``"block"``: per 128 x 128 block of
    the last two dims, per index of the leading ones."""
    if fp8_scales == "block":
        ndim = len(spec.shape)
        return ScaleLayout(tuple(range(max(ndim - 2, 0))), FP8_BLOCK, ndim)
    experts = getattr(spec, "experts", None)
    dims = {spec.axis} | ({experts.dim} if experts is not None and experts.dim is not None else set())
    return ScaleLayout(tuple(sorted(dims)), 0, len(spec.shape))


def check_scale_format(fp8_scales: str) -> str:
    """``fp8_scales`` if it is known; ReshardError naming the allowed values."""
    if fp8_scales not in SCALE_FORMATS:
        raise ReshardError(f"fp8_scales {fp8_scales!r} is not known; allowed: {', '.join(map(repr, SCALE_FORMATS))}")
    return fp8_scales


def format_mismatch(name: str, scales: ScaleLayout, tensors: Mapping[str, torch.Tensor]) -> str:
    """One line on the fp8 scale tensor of ``name`` the wire format needs, naming the other
    format's scale tensor when ``tensors`` holds it (the destination stores another format)."""
    want = ("block-scaled fp8 (float32 '{}', one scale per {} x {} block)".format(scale_name(name, scales), scales.block,
                                                                                   scales.block)
            if scales.block else f"fp8 with per-row scales (float32 '{scale_name(name)}')")
    other = scale_name(name, None if scales.block else ScaleLayout((), FP8_BLOCK, scales.ndim))
    if other in tensors:
        return (f"the destination holds {other!r}, another fp8 storage format, but the plan's wire format is {want}: "
                "the destination's storage format and the wire format differ (fp8_scales must match on every rank)")
    return f"the plan's wire format for {name!r} is {want}; pass it (Resharder.destination_shards() makes them)"


def scale_shape(shape: Sequence[int], scales: Scales) -> Tuple[int, ...]:
    """The scale's shape for a region of ``shape``: per index of the scaled dims (and per block
    of the blocked ones), 1 elsewhere."""
    return _layout(scales).shape(shape)


def scale_cut_problem(name: str, dst_box: Sequence[Tuple[int, int]], dst_shape: Sequence[int],
                      scales: ScaleLayout) -> Optional[str]:
    """Why a transfer landing on ``dst_box`` of a destination shard of ``dst_shape`` would leave
    its sender without every value of a scale it computes (None when it would not). Block-scaled:
    on each blocked dim the transfer must start at a multiple of the block and end at one or at the
    shard's end. Per row: it must span every dim the scale reduces over (a transfer from an ISP
    source holding some rows of a row-parallel weight does not)."""
    for d in scales.blocked:
        start, stop = dst_box[d]
        if start % scales.block or (stop % scales.block and stop != dst_shape[d]):
            return (f"tensor {name!r}: a transfer brings rows [{start}, {stop}) of dim {d} of a destination shard of "
                    f"shape {tuple(dst_shape)}, which splits a {scales.block} x {scales.block} block: block-scaled fp8 "
                    f"needs every block of a destination shard held whole by one source shard (shards of both layouts "
                    f"starting at multiples of {scales.block}); use fp8_scales='row' for this layout pair")
    for d, (start, stop) in enumerate(dst_box):
        if not scales.block and d not in scales.dims and (start, stop) != (0, dst_shape[d]):
            return (f"tensor {name!r}: a transfer brings rows [{start}, {stop}) of dim {d} of a destination shard of "
                    f"shape {tuple(dst_shape)}, but an fp8 scale per index of dim(s) {list(scales.dims)} needs the "
                    f"sender to hold all of dim {d}; use fp8_scales='block' (block-aligned shards) for this layout pair")
    return None


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


def wire_layout(shape: Sequence[int], dst_dtype: torch.dtype, dims: Scales) -> Tuple[int, int]:
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


def scale_box(box: Sequence[Tuple[int, int]], dims: Scales) -> Tuple[Tuple[int, int], ...]:
    """The box of a region's scales in the scale tensor (see :meth:`ScaleLayout.box`)."""
    return _layout(dims).box(box)


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

    def quantize(self, source: torch.Tensor, dims: Scales, q_out: torch.Tensor,
                 scale_out: torch.Tensor) -> None:
        """Write ``source`` as fp8 into ``q_out`` (same shape) and its scales into ``scale_out``
        (float32, :func:`scale_shape` of the region). See the module docstring for the rule.

        The amax is taken in the source dtype (max, min and negation are exact, so it equals the
        float32 amax); then, block by block, the values are copied to float32, divided by their
        scale, clamped and cast: the same float32 arithmetic as ``w.float() / scale``."""
        layout = _layout(dims)
        if layout.block:
            self._quantize_blocks(source, layout.block, q_out, scale_out)
            return
        dims = layout.dims
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

    def _quantize_blocks(self, source: torch.Tensor, block: int, q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
        """Block-scaled: for each band of ``block`` rows of the last two dims (per leading index),
        runs of whole blocks that fit the scratch are copied to float32, their amax taken per
        block, divided by their scale, clamped and cast — the arithmetic of the per-row rule."""
        limit = FP8_MAX[q_out.dtype]
        rows, cols = source.shape[-2:]
        width = max(1, self.scratch.numel() // (block * block)) * block   # columns per pass: whole blocks
        flat, q_flat, s_flat = _three_d(source), _three_d(q_out), _three_d(scale_out)
        for lead in range(flat.shape[0]):
            for r0 in range(0, rows, block):
                r1 = min(rows, r0 + block)
                for c0 in range(0, cols, width):
                    c1 = min(cols, c0 + width)
                    full, edge = (c1 - c0) // block, (c1 - c0) % block
                    for a, b, n, w in ((c0, c0 + full * block, full, block), (c0 + full * block, c1, 1, edge)):
                        if b <= a:
                            continue
                        values = self.scratch[:(r1 - r0) * (b - a)].view(r1 - r0, n, w)
                        values.copy_(flat[lead, r0:r1, a:b].unflatten(1, (n, w)))
                        scale = s_flat[lead, r0 // block, a // block:a // block + n]
                        extrema = self.extrema[:2 * n]
                        torch.amax(values, dim=(0, 2), out=extrema[:n])
                        torch.amin(values, dim=(0, 2), out=extrema[n:])
                        extrema[n:].neg_()
                        torch.maximum(extrema[:n], extrema[n:], out=scale)
                        scale.div_(limit)
                        mask = self.mask[:n]
                        torch.eq(scale, 0, out=mask)
                        scale.masked_fill_(mask, 1.0)
                        values.div_(scale.view(1, n, 1))
                        values.clamp_(-limit, limit)
                        q_flat[lead, r0:r1, a:b].copy_(values.flatten(1))


def _three_d(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as ``[leading, rows, cols]`` (a view for 2-D and 3-D tensors, the ones with
    block-scaled weights)."""
    if tensor.dim() == 2:
        return tensor.unsqueeze(0)
    return tensor if tensor.dim() == 3 else tensor.flatten(0, -3)
