"""The wire layout of a reshard, pure: what both ends of every message compute alone from the
plan and the shared options, and the plan agreement's digest.

A rank's transfers of one step with one peer form a *message*: *pieces* in plan order — a transfer,
or a slice of one along its split axis — in the destination dtype (fp8: values, then float32
scales; :mod:`.convert`), each at a multiple of ``ALIGN``. A transfer is sliced into pieces of at
most ``bucket_bytes`` of work when it must be converted or is not contiguous on one end; a
contiguous, unconverted transfer stays whole (*direct*: sent from the source tensor, received as
flat bytes). The message is cut into *chunks* of at most ``bucket_bytes``: a run of small or
packed pieces shares a chunk, a large direct piece gets chunks of its own.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch

from ..errors import ReshardError
from . import convert
from .layout import local_shapes
from .planner import Box, Plan, Transfer

#: pieces smaller than this (or than half a bucket) are packed together; larger contiguous ones
#: are sent straight from the source tensor — packing them would only add a copy
PACK_BELOW_BYTES = 1 << 20
#: every piece starts at a multiple of this in its message (any dtype can be viewed in place)
ALIGN = 16
#: the digest a rank contributes when its own checks failed
REFUSED = 0
#: the largest message (chunk) when the executor is not told otherwise
DEFAULT_BUCKET_BYTES = 64 << 20
#: posted batches a rank keeps in flight when it cuts its rounds into several (two buffer regions:
#: the next batch is packed while the previous one is on the wire)
BATCHES_IN_FLIGHT = 2

# ---- plan agreement (pure) ------------------------------------------------------------------------
def agreement_digest(plan: Any, bucket_bytes: int, dst_dtypes: Mapping[str, torch.dtype], verify: bool,
                     fp8_scales: str = "row") -> int:
    """The int64 the ranks compare: the plan's digest (``plan.digest()``, a hash of everything the
    plan is a function of) and the options that shape the wire (the fp8 scale format only where a
    tensor is converted to fp8)."""
    h = hashlib.blake2b(plan.digest().to_bytes(8, "little", signed=True), digest_size=8)
    options: Tuple = (bucket_bytes, sorted((n, str(d)) for n, d in dst_dtypes.items()), verify)
    if any(convert.is_scaled(d) for d in dst_dtypes.values()) and fp8_scales != "row":
        options += (fp8_scales,)
    h.update(repr(options).encode())
    value = int.from_bytes(h.digest(), "little", signed=True)
    return value if value != REFUSED else 1


def first_disagreement(digests: Sequence[int], ranks: Sequence[int]) -> Optional[str]:
    """None if every rank contributed the same digest; else one line naming the first rank that
    differs from the majority (ties: from the lowest rank's digest) or that refused."""
    refused = [r for r, d in zip(ranks, digests) if d == REFUSED]
    if refused:
        return (f"rank {refused[0]} refused to run the plan (its own error says why)"
                + (f"; {len(refused) - 1} more refused" if len(refused) > 1 else ""))
    counts: Dict[int, int] = {}
    for d in digests:
        counts[d] = counts.get(d, 0) + 1
    if len(counts) == 1:
        return None
    reference = max(counts, key=lambda d: (counts[d], -digests.index(d)))
    holders = [r for r, d in zip(ranks, digests) if d == reference]
    odd = next(r for r, d in zip(ranks, digests) if d != reference)
    return (f"rank {odd} has plan hash {digests[ranks.index(odd)] & (2 ** 64 - 1):016x} but {len(holders)} rank(s) "
            f"(rank {holders[0]} first) have {reference & (2 ** 64 - 1):016x}: every rank must run the same plan "
            "with the same bucket_bytes, dst_dtypes, fp8_scales and verify")


# ---- message layout (pure) ------------------------------------------------------------------------
@attrs.frozen
class Piece:
    """One transfer, or a slice of one along its axis, in a message: ``offset`` in the message,
    ``payload`` bytes of values and ``nbytes`` in all (fp8: then the scales), ``direct`` if it
    may be sent from the source tensor and received into the destination as flat bytes."""

    transfer: Transfer
    offset: int
    payload: int
    nbytes: int
    direct: bool

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@attrs.frozen
class Chunk:
    """One point-to-point message: bytes ``[lo, hi)`` of a pair's stream in a step; ``pieces``
    it touches. ``index`` orders the chunks of the message."""

    step: int
    peer: int
    index: int
    lo: int
    hi: int
    pieces: Tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return self.hi - self.lo

    @property
    def direct(self) -> bool:
        """A slice of one direct piece: sent without packing (a view of the source tensor)."""
        return (len(self.pieces) == 1 and self.pieces[0].direct and self.pieces[0].offset <= self.lo
                and self.hi <= self.pieces[0].end)


@attrs.frozen
class Message:
    step: int
    peer: int
    pieces: Tuple[Piece, ...]
    size: int
    chunks: Tuple[Chunk, ...]

    @property
    def wire_bytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


@attrs.frozen
class Round:
    """What a rank posts together (one ``batch_isend_irecv``): chunk ``index`` of the message it
    receives in ``step`` and chunk ``index`` of the one it sends (either may be None); with
    ``checksum``, the step's checksum exchange instead (after its data; ``recv`` / ``send`` are
    then the messages' first chunks, to name them)."""

    step: int
    index: int
    recv: Optional[Chunk]
    send: Optional[Chunk]
    checksum: bool = False


def rounds(send_messages: Mapping[int, Message], recv_messages: Mapping[int, Message],
           verify: bool) -> Tuple[Round, ...]:
    """One rank's rounds in the order it posts and waits for them: by step, then chunk index
    (then, with ``verify``, the step's checksum exchange). A message's chunk i is in round
    (step, i) on both of its ends, and every rank posts and waits in this one order: the
    globally first unfinished round always has both ends posted, so posting ahead never
    deadlocks."""
    result: List[Round] = []
    for step in sorted(set(send_messages) | set(recv_messages)):
        inc, out = recv_messages.get(step), send_messages.get(step)
        recvs = inc.chunks if inc is not None else ()
        sends = out.chunks if out is not None else ()
        count = max(len(recvs), len(sends))
        result.extend(Round(step, i, recvs[i] if i < len(recvs) else None, sends[i] if i < len(sends) else None)
                      for i in range(count))
        if verify and count:
            result.append(Round(step, count, recvs[0] if recvs else None, sends[0] if sends else None, True))
    return tuple(result)


def needs_recv_buffer(chunk: Chunk, atomic: bool) -> bool:
    """Whether a received ``chunk`` takes room in a buffer region: streaming, and not direct
    (atomic mode receives into its staging; a direct chunk lands in the destination)."""
    return not atomic and not chunk.direct


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of ``ALIGN`` (where the next chunk starts in a region)."""
    return -(-nbytes // ALIGN) * ALIGN


def round_needs(current: Round, atomic: bool) -> Tuple[int, int]:
    """``(send bytes, receive bytes)`` of buffer region that ``current`` takes: its send chunk if
    packed, its received chunk if it :func:`needs_recv_buffer`; a checksum round none."""
    if current.checksum:
        return 0, 0
    send = current.send.nbytes if current.send is not None and not current.send.direct else 0
    recv = current.recv.nbytes if current.recv is not None and needs_recv_buffer(current.recv, atomic) else 0
    return send, recv


@attrs.frozen
class Batch:
    """Rounds ``[start, stop)`` of a rank, posted as one group (one ``batch_isend_irecv``: under
    NCCL one group, whose operations with different peers move concurrently). Its packed send
    chunks lie back to back in a region's send buffer (each at a multiple of ``ALIGN``),
    ``send_bytes`` in all; its buffered receive chunks likewise in the region's receive buffer."""

    start: int
    stop: int
    send_bytes: int
    recv_bytes: int

    @property
    def needs_region(self) -> bool:
        return self.send_bytes > 0 or self.recv_bytes > 0


def _grow(used: int, nbytes: int) -> int:
    return aligned(used) + nbytes if nbytes else used


def batches(rounds_: Sequence[Round], atomic: bool, caps: Optional[Tuple[int, int]] = None,
            cut_at_steps: bool = False) -> Tuple[Batch, ...]:
    """The posting rule (pure): cut a rank's rounds, kept in their one global order, into
    consecutive batches. A batch grows while its send and receive bytes stay within ``caps``
    (None: no limit — every round in one batch, the rank's whole sync posted as one group); a
    round that alone needs more gets a batch of its own; with ``cut_at_steps`` no batch spans two
    steps.

    Any cut is deadlock-free: with every rank's rounds in the one (step, index) order, the
    globally first unfinished round has, on both of its ends, every earlier round finished — so
    both ends' batches holding it are posted and started, and its operations move (the operations
    of a started group progress independently; the group completes when all have)."""
    out: List[Batch] = []
    start, send, recv = 0, 0, 0
    for i, current in enumerate(rounds_):
        s, r = round_needs(current, atomic)
        grown = _grow(send, s), _grow(recv, r)
        if i > start and ((caps is not None and (grown[0] > caps[0] or grown[1] > caps[1]))
                          or (cut_at_steps and current.step != rounds_[start].step)):
            out.append(Batch(start, i, send, recv))
            start, grown = i, (s, r)
        send, recv = grown
    if len(rounds_) > start:
        out.append(Batch(start, len(rounds_), send, recv))
    return tuple(out)


def may_post(batch: Batch, in_flight: int, free_regions: int) -> bool:
    """Whether a rank may post ``batch`` now (pure): always with nothing in flight (every region
    is free then); else while fewer than ``BATCHES_IN_FLIGHT`` batches are in flight and, if it
    needs a region, one is free."""
    if in_flight == 0:
        return True
    if in_flight >= BATCHES_IN_FLIGHT:
        return False
    return not batch.needs_region or free_regions > 0


def box_shape(box: Box) -> Tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def contiguous(box: Box, shape: Sequence[int]) -> bool:
    """Whether the region ``box`` of a contiguous tensor of ``shape`` is contiguous: every dim
    after the last partial one is full, every dim before it has length 1."""
    lengths = box_shape(box)
    partial = [d for d, (n, full) in enumerate(zip(lengths, shape)) if n != full]
    if not partial:
        return True
    last = partial[-1]
    return all(lengths[d] == 1 for d in range(last))


def narrow_box(box: Box, axis: int, start: int, stop: int) -> Box:
    """Rows ``[start, stop)`` (relative to the box) of ``box`` along ``axis``."""
    if not box:
        return box
    a, _ = box[axis]
    return box[:axis] + ((a + start, a + stop),) + box[axis + 1:]


def slices(transfer: Transfer, dst_dtype: torch.dtype, src_itemsize: int, bucket_bytes: int,
            whole: bool, align: int = 1) -> List[Transfer]:
    """``transfer`` whole, or cut along its axis into slices of at most ``bucket_bytes`` of work
    (the larger of source, wire and, for fp8, float32 scratch bytes per element), each a multiple
    of ``align`` rows (a block of block-scaled fp8 stays in one slice; a slice may then exceed
    ``bucket_bytes``)."""
    shape = box_shape(transfer.src_box)
    if whole or not shape:
        return [transfer]
    rows = shape[transfer.axis]
    per_row = math.prod(shape) // max(rows, 1)
    work = max(src_itemsize, dst_dtype.itemsize, 4 if convert.is_scaled(dst_dtype) else 0)
    step = max(1, bucket_bytes // max(1, per_row * work))
    step = -(-step // align) * align
    if step >= rows:
        return [transfer]
    out = []
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        out.append(attrs.evolve(transfer, global_box=narrow_box(transfer.global_box, transfer.axis, lo, hi),
                                src_box=narrow_box(transfer.src_box, transfer.axis, lo, hi),
                                dst_box=narrow_box(transfer.dst_box, transfer.axis, lo, hi),
                                nbytes=transfer.nbytes // rows * (hi - lo)))
    return out


def slice_align(transfer: Transfer, plan_shapes: "Shapes", dst_dtypes: Mapping[str, torch.dtype]) -> int:
    """Rows a slice of ``transfer`` must be a multiple of: the block of a block-scaled fp8 tensor
    blocked on its axis, else 1."""
    scales = plan_shapes.scale_dims(transfer.tensor)
    scaled = convert.is_scaled(dst_dtypes[transfer.tensor])
    return scales.block if scaled and transfer.axis in scales.blocked else 1


def chunks_of(step: int, peer: int, pieces: Sequence[Piece], size: int, bucket_bytes: int) -> Tuple[Chunk, ...]:
    """Cut a message into chunks of at most ``bucket_bytes`` (a single packed piece may exceed
    it): runs of small or packed pieces share a chunk; a large direct piece gets its own."""
    spans: List[Tuple[int, int, List[Piece]]] = []
    run: List[Piece] = []
    pack_below = min(PACK_BELOW_BYTES, -(-bucket_bytes // 2))

    def flush() -> None:
        if run:
            spans.append((run[0].offset, run[-1].end, list(run)))
            run.clear()

    for piece in pieces:
        if piece.direct and piece.nbytes >= pack_below:
            flush()
            spans.extend((lo, min(lo + bucket_bytes, piece.end), [piece])
                         for lo in range(piece.offset, piece.end, bucket_bytes))
            continue
        if run and piece.end - run[0].offset > bucket_bytes:
            flush()
        run.append(piece)
    flush()
    return tuple(Chunk(step, peer, i, lo, hi, tuple(p)) for i, (lo, hi, p) in enumerate(spans))


def messages(transfers: Sequence[Transfer], peer_of: Callable[[Transfer], int], plan_shapes: "Shapes",
              dst_dtypes: Mapping[str, torch.dtype], bucket_bytes: int) -> Dict[int, Message]:
    """Group one rank's sends (or receives) by step: ``{step: _Message}``. Pure: the sender and
    the receiver of a message compute the same."""
    by_step: Dict[int, List[Transfer]] = {}
    for t in transfers:
        by_step.setdefault(t.step, []).append(t)
    messages = {}
    for step, items in by_step.items():
        peers = {peer_of(t) for t in items}
        if len(peers) != 1:
            raise ReshardError(f"plan step {step} gives one rank several peers {sorted(peers)}; "
                               "a plan must come from plan_reshard")
        peer = peers.pop()
        offset, pieces = 0, []
        for t in items:
            dtype, src_dtype = dst_dtypes[t.tensor], plan_shapes.dtype(t.tensor)
            plain = dtype == src_dtype
            whole = plain and contiguous(t.src_box, plan_shapes.src(t.src, t.tensor)) and contiguous(
                t.dst_box, plan_shapes.dst(t.dst, t.tensor))
            scales = plan_shapes.scale_dims(t.tensor)
            for part in slices(t, dtype, src_dtype.itemsize, bucket_bytes, whole, slice_align(t, plan_shapes, dst_dtypes)):
                shape = box_shape(part.src_box)
                payload, nbytes = convert.wire_layout(shape, dtype, scales)
                offset = -(-offset // ALIGN) * ALIGN
                pieces.append(Piece(part, offset, payload, nbytes, whole))
                offset += nbytes
        messages[step] = Message(step, peer, tuple(pieces), offset, chunks_of(step, peer, pieces, offset, bucket_bytes))
    return messages


class Shapes:
    """Local shard shapes of every rank in each layout (cached), and source dtypes."""

    def __init__(self, plan: Plan, fp8_scales: str = "row") -> None:
        self.plan = plan
        self._src: Dict[int, Dict[str, Tuple[int, ...]]] = {}
        self._dst: Dict[int, Dict[str, Tuple[int, ...]]] = {}
        self._dtypes = {spec.name: spec.dtype for spec in plan.model.tensors}
        self._scale_dims = {spec.name: convert.scale_dims(spec, fp8_scales) for spec in plan.model.tensors}

    def src(self, rank: int, name: str) -> Tuple[int, ...]:
        if rank not in self._src:
            self._src[rank] = local_shapes(self.plan.src, self.plan.model, rank)
        return self._src[rank][name]

    def dst(self, rank: int, name: str) -> Tuple[int, ...]:
        if rank not in self._dst:
            self._dst[rank] = local_shapes(self.plan.dst, self.plan.model, rank)
        return self._dst[rank][name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def scale_dims(self, name: str) -> convert.ScaleLayout:
        return self._scale_dims[name]


def first_scale_cut(transfers: Sequence[Transfer], plan_shapes: Shapes,
                      dst_dtypes: Mapping[str, torch.dtype]) -> Optional[str]:
    """Why one of ``transfers`` (a rank's receives, sends and copies) would leave its sender without
    every value of an fp8 scale it computes (:func:`.convert.scale_cut_problem`), naming the ranks;
    None if none does."""
    for t in transfers:
        dtype = dst_dtypes.get(t.tensor)
        if dtype is not None and convert.is_scaled(dtype):
            problem = convert.scale_cut_problem(t.tensor, t.dst_box, plan_shapes.dst(t.dst, t.tensor),
                                                plan_shapes.scale_dims(t.tensor))
            if problem is not None:
                return f"rank {t.src} -> rank {t.dst}: {problem}"
    return None
