"""Packing and unpacking (:class:`.transfer._Run` mixes it in): the bytes a chunk is sent from —
a view of the source tensor, or packed into a buffer (copy, cast, fp8 quantize) —, where a chunk
lands, unpacking into the destination, the atomic commit, and the local copies and padding fills."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from .. import convert
from ..convert import region as _region
from ..convert import scale_box as _scale_box
from ..wire import Chunk, Piece


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous ``tensor`` (no copy)."""
    return tensor.reshape(-1).view(torch.uint8)


class _Packing:
    owner: Any
    src: Mapping[str, torch.Tensor]
    dst: Mapping[str, torch.Tensor]
    staging: Optional[torch.Tensor]
    staging_at: Dict[int, int]
    scale_dims: Mapping[str, Any]
    quantizer: Any
    packed: int
    unpacked: int

    def _send_source(self, chunk: Chunk, buffer: Optional[torch.Tensor]) -> torch.Tensor:
        """The bytes of ``chunk`` to post: a view of the source tensor (direct: no copy), or
        packed into the start of ``buffer``."""
        if chunk.direct:
            piece = chunk.pieces[0]
            data = _flat_bytes(_region(self.src[piece.transfer.tensor], piece.transfer.src_box))
            data = data[chunk.lo - piece.offset:chunk.hi - piece.offset]
        else:
            assert buffer is not None
            data = buffer[:chunk.nbytes]
            for piece in chunk.pieces:
                self._encode(piece, data[piece.offset - chunk.lo:piece.end - chunk.lo])
                self.packed += piece.nbytes
        if self.owner.verify:
            self._sum(("out", chunk.step), data, chunk.lo)
        return data

    def _encode(self, piece: Piece, out: torch.Tensor) -> None:
        """Write ``piece`` in its wire form (destination dtype, then fp8 scales) into ``out``."""
        t = piece.transfer
        region = _region(self.src[t.tensor], t.src_box)
        dtype = self.owner.dst_dtypes[t.tensor]
        values = out[:piece.payload].view(dtype).view(region.shape)
        if convert.is_scaled(dtype):
            scales = out[-(-piece.payload // 4) * 4:piece.nbytes]
            dims = self.scale_dims[t.tensor]
            keep = convert.scale_shape(region.shape, dims)
            self.quantizer.quantize(region, dims, values, scales.view(convert.SCALE_DTYPE).view(keep))
        else:
            values.copy_(region)

    # ---- receiving --------------------------------------------------------------------------------
    def _recv_target(self, chunk: Chunk, buffer: Optional[torch.Tensor]) -> torch.Tensor:
        """Where ``chunk`` lands: the atomic staging; streaming, the destination region itself
        (direct: no copy), else the start of ``buffer``."""
        if self.owner.atomic:
            start = self.staging_at[chunk.step] + chunk.lo
            return self.staging[start:start + chunk.nbytes]
        if buffer is None:
            piece = chunk.pieces[0]
            target = _flat_bytes(_region(self.dst[piece.transfer.tensor], piece.transfer.dst_box))
            return target[chunk.lo - piece.offset:chunk.hi - piece.offset]
        return buffer[:chunk.nbytes]

    def _received(self, chunk: Chunk, data: torch.Tensor, buffered: bool) -> None:
        """A chunk arrived in ``data``: checksum it (verify); from a buffer region: unpack it."""
        if self.owner.verify:
            self._sum(("in", chunk.step), data, chunk.lo)
        if buffered:
            for piece in chunk.pieces:   # a packed chunk holds whole pieces (wire.chunks_of)
                self._decode(piece, data[piece.offset - chunk.lo:piece.end - chunk.lo])

    def _decode(self, piece: Piece, wire: torch.Tensor) -> None:
        """Write one piece's wire bytes (values, then fp8 scales) into the destination."""
        t = piece.transfer
        target = _region(self.dst[t.tensor], t.dst_box)
        target.copy_(wire[:piece.payload].view(target.dtype).view(target.shape))
        if convert.is_scaled(target.dtype):
            start = -(-piece.payload // 4) * 4
            dims = self.scale_dims[t.tensor]
            scale = _region(self.dst[convert.scale_name(t.tensor, dims)], _scale_box(t.dst_box, dims))
            scale.copy_(wire[start:piece.nbytes].view(convert.SCALE_DTYPE).view(scale.shape))
        self.unpacked += piece.nbytes

    def _commit(self) -> None:
        """Atomic mode: write every staged message into the destination (all bytes arrived)."""
        for step, message in self.owner.recv_messages.items():
            base = self.staging_at[step]
            for piece in message.pieces:
                self._decode(piece, self.staging[base + piece.offset:base + piece.end])

    def _local_copies(self) -> None:
        for fill in self.owner.fills:
            target = _region(self.dst[fill.tensor], fill.dst_box)
            target.zero_()
            if convert.is_scaled(target.dtype):
                dims = self.scale_dims[fill.tensor]
                _region(self.dst[convert.scale_name(fill.tensor, dims)], _scale_box(fill.dst_box, dims)).fill_(1)
        for t in self.owner.copies:
            target = _region(self.dst[t.tensor], t.dst_box)
            source = _region(self.src[t.tensor], t.src_box)
            if convert.is_scaled(target.dtype):
                dims = self.scale_dims[t.tensor]
                scale = _region(self.dst[convert.scale_name(t.tensor, dims)], _scale_box(t.dst_box, dims))
                self.quantizer.quantize(source, dims, target, scale)
            else:
                target.copy_(source)
