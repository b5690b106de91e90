"""Interval geometry of a reshard, pure: what a destination shard needs, cut into *units* — maximal
intervals along the split axis with one set of source holders — and, for grouped expert
weights, the expert ranges of the source EP ranks it overlaps."""
from __future__ import annotations

import bisect
import functools
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import attrs

from ...errors import ReshardError
from ..spec import Block, Piece, TensorSpec


@attrs.frozen
class Unit:
    """A maximal interval of one dst TP piece with one set of source holders."""

    start: int
    stop: int
    dst_local: int
    holders: Tuple[Tuple[int, int], ...]   # (src tp, src local start of this unit)


def segment_holders(bounds: List[int], src_pieces: Sequence[Sequence[Piece]]) -> List[Dict[int, int]]:
    """For each elementary segment ``[bounds[i], bounds[i+1])``: ``{src tp: src local start}``."""
    holders: List[Dict[int, int]] = [{} for _ in range(len(bounds) - 1)]
    for tp, pieces in enumerate(src_pieces):
        for start, stop, local in pieces:
            first, last = bisect.bisect_left(bounds, start), bisect.bisect_left(bounds, stop)
            for seg in range(first, last):
                holders[seg][tp] = local + bounds[seg] - start
    return holders


def merge_units(dst_pieces: Sequence[Piece], bounds: List[int], holders: List[Dict[int, int]]) -> List[Unit]:
    """Cut ``dst_pieces`` at every boundary, then merge neighbours with the same holders whose
    local positions continue on every side."""
    units: List[Unit] = []
    for start, stop, local in dst_pieces:
        first, last = bisect.bisect_left(bounds, start), bisect.bisect_left(bounds, stop)
        for seg in range(first, last):
            seg_start, seg_stop = bounds[seg], bounds[seg + 1]
            held = holders[seg]
            if not held:
                raise ReshardError(f"rows [{seg_start}, {seg_stop}) of its split dim are needed by the destination "
                                   "but held by no source TP rank (sub-blocks that do not cover the dim)")
            dst_local = local + seg_start - start
            prev = units[-1] if units else None
            if (prev is not None and prev.stop == seg_start and prev.dst_local + prev.stop - prev.start == dst_local
                    and len(prev.holders) == len(held)
                    and all(tp in held and held[tp] == off + prev.stop - prev.start for tp, off in prev.holders)):
                units[-1] = attrs.evolve(prev, stop=seg_stop)
            else:
                units.append(Unit(seg_start, seg_stop, dst_local, tuple(sorted(held.items()))))
    return units


@functools.lru_cache(maxsize=4096)
def row_units(blocks: Tuple[Block, ...], axis_len: int, split: bool, vocab: bool,
               src_multiple: Optional[int], dst_multiple: Optional[int], src_tp_size: int,
               dst_tp_size: int, dst_tp: int, src_plain: bool = False) -> Tuple[Unit, ...]:
    """The units of dst TP rank ``dst_tp``'s pieces along the split axis (cached: every layer's
    tensor of one kind has the same answer). ``src_plain``: the source splits the axis in plain
    balanced pieces (an ISP source), not by ``blocks``."""
    geometry = TensorSpec("", (axis_len,), None, 0, 0, blocks, None, vocab)   # type: ignore[arg-type]
    plain = TensorSpec("", (axis_len,), None, 0, 0, (Block(axis_len),), None, False)   # type: ignore[arg-type]

    def pieces(tp_size: int, tp: int, multiple: Optional[int], spec: TensorSpec = geometry) -> Tuple[Piece, ...]:
        if not split:
            return ((0, axis_len, 0),)
        return spec.pieces(tp_size, tp, multiple)

    src_pieces = [pieces(src_tp_size, tp, None, plain) if src_plain else pieces(src_tp_size, tp, src_multiple)
                  for tp in range(src_tp_size)]
    dst_pieces = pieces(dst_tp_size, dst_tp, dst_multiple)
    bounds = sorted({p for ps in src_pieces + [dst_pieces] for a, b, _ in ps for p in (a, b)})
    return tuple(merge_units(dst_pieces, bounds, segment_holders(bounds, src_pieces)))


@attrs.frozen
class Need:
    """One region a dst shard needs with one set of holders: an expert range (grouped weights
    only), a row unit, the EP rank of the source holders, and — from an ISP source, whose shards
    split dim 0 while the destination splits another axis — the rows of dim 0 its holder has."""

    experts: Optional[Tuple[int, int, int, int]]    # (global start, global stop, dst local, src local)
    unit: Unit
    src_ep: int
    rows: Optional[Tuple[int, int]] = None          # an ISP source's rows of dim 0 (another dim than the axis)


def ep_overlaps(spec: TensorSpec, first: int, stop: int, ep_size: int) -> Iterator[Tuple[int, int, int, int]]:
    """EP ranks of ``ep_size`` owning experts in ``[first, stop)``: ``(ep, start, stop, its first)``."""
    if stop <= first:
        return
    for ep in range(spec.experts.owner(ep_size, first), spec.experts.owner(ep_size, stop - 1) + 1):
        own0, own1 = spec.experts.owned(ep_size, ep)
        yield ep, max(first, own0), min(stop, own1), own0
