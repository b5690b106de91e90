"""Several tensors of any dtypes through one uint8 buffer (one collective instead of many).

Each tensor's bytes start at a multiple of :data:`SEGMENT_ALIGN`, so views back to any dtype
are aligned. ``unpack_tensors(pack_tensors(ts), [(t.shape, t.dtype) for t in ts])`` gives
tensors equal to ``ts`` (views of the buffer, no copy).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

#: byte alignment of each tensor's segment in packed buffers (so views back to any dtype work)
SEGMENT_ALIGN = 16

Layout = Sequence[Tuple[Tuple[int, ...], torch.dtype]]


def aligned_nbytes(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of SEGMENT_ALIGN."""
    return -(-nbytes // SEGMENT_ALIGN) * SEGMENT_ALIGN


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize


def packed_nbytes(layout: Layout) -> int:
    """Size of the buffer :func:`pack_tensors` makes for tensors of ``layout``."""
    return sum(aligned_nbytes(tensor_nbytes(shape, dtype)) for shape, dtype in layout)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (a view when it is contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def pack_tensors(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate the tensors' bytes, each segment padded to SEGMENT_ALIGN (one uint8 tensor
    on the first tensor's device; empty on CPU for no tensors)."""
    parts = []
    for tensor in tensors:
        raw = as_bytes(tensor)
        parts.append(raw)
        pad = aligned_nbytes(raw.numel()) - raw.numel()
        if pad:
            parts.append(raw.new_zeros(pad))
    if not parts:
        device = tensors[0].device if tensors else torch.device("cpu")
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.cat(parts)


def unpack_tensors(buffer: torch.Tensor, layout: Layout) -> List[torch.Tensor]:
    """Views of ``buffer`` (aligned uint8, from :func:`pack_tensors`) as tensors of ``layout``."""
    result, offset = [], 0
    for shape, dtype in layout:
        nbytes = tensor_nbytes(shape, dtype)
        result.append(buffer.narrow(0, offset, nbytes).view(dtype).reshape(shape))
        offset += aligned_nbytes(nbytes)
    return result
