"""Every rank's rounds of a plan, as the executor posts them, without processes (pure).

The executor (:class:`~pgroups.reshard.executor.Resharder`) turns a rank's sends and receives into
messages (:func:`.wire.messages`: one per step and peer, cut into chunks of at most
``bucket_bytes``) and the messages into rounds (:func:`.wire.rounds`). :func:`rank_rounds` runs the
same two functions for every rank of a plan at once, keeping of each chunk only what the
simulator and :func:`.wire.batches` read — its peer, its bytes on the wire, whether it is
*direct* (needs no send / receive buffer) — so that a world of 16,384 ranks fits in memory.

Both ends of a message compute the same chunks (``tests/test_reshard_wire.py``), so the message
is computed once, on its receiver, and given to its sender too.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch

from .. import convert
from ..planner import Plan, Transfer
from ..wire import DEFAULT_BUCKET_BYTES, Round, Shapes, messages, rounds

#: bytes of one checksum message (two int64, :func:`pgroups.reshard.executor.checksum._checksum`)
CHECKSUM_BYTES = 16


@attrs.frozen
class SimChunk:
    """What the schedule needs of a :class:`.wire.Chunk`: the peer (the other end, seen from the
    rank holding it), the bytes on the wire, and ``direct`` (read by :func:`.wire.round_needs`)."""

    peer: int
    nbytes: int
    direct: bool


@attrs.frozen
class SimMessage:
    """A message's chunks (what :func:`.wire.rounds` reads)."""

    peer: int
    chunks: Tuple[SimChunk, ...]


def rank_rounds(plan: Plan, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                dst_dtypes: Optional[Mapping[str, torch.dtype]] = None,
                verify: bool = False) -> Dict[int, Tuple[Round, ...]]:
    """``{rank: its rounds}`` for every rank of ``plan`` (ranks without network transfers get
    ``()``), equal to each rank's ``Resharder(plan, bucket_bytes=..., dst_dtypes=..., verify=...)
    .rounds`` with its chunks reduced to :class:`SimChunk`. O(network transfers)."""
    dtypes = convert.resolve_dst_dtypes(plan.model, dst_dtypes)
    shapes = Shapes(plan)
    by_receiver: Dict[int, List[Transfer]] = {}
    for t in plan.transfers:
        if not t.is_local:
            by_receiver.setdefault(t.dst, []).append(t)
    sends: Dict[int, Dict[int, SimMessage]] = {}
    recvs: Dict[int, Dict[int, SimMessage]] = {}
    for receiver, transfers in by_receiver.items():
        for step, message in messages(transfers, _sender_of, shapes, dtypes, bucket_bytes).items():
            sizes = [(c.nbytes, c.direct) for c in message.chunks]
            recvs.setdefault(receiver, {})[step] = SimMessage(
                message.peer, tuple(SimChunk(message.peer, n, d) for n, d in sizes))
            sends.setdefault(message.peer, {})[step] = SimMessage(
                receiver, tuple(SimChunk(receiver, n, d) for n, d in sizes))
    return {rank: rounds(sends.get(rank, {}), recvs.get(rank, {}), verify) for rank in plan.ranks}


def _sender_of(t: Transfer) -> int:
    return t.src


def round_bytes(current: Round) -> Tuple[int, int]:
    """``(bytes received, bytes sent)`` in a round (a checksum round: 16 each way it has)."""
    if current.checksum:
        return (CHECKSUM_BYTES if current.recv is not None else 0, CHECKSUM_BYTES if current.send is not None else 0)
    return (current.recv.nbytes if current.recv is not None else 0, current.send.nbytes if current.send is not None else 0)


def message_list(schedule: Mapping[int, Sequence[Round]]) -> List[Tuple[int, int, int]]:
    """Every point-to-point message of a schedule as ``(src, dst, nbytes)``, from the senders' rounds."""
    out = []
    for rank, rank_rounds_ in schedule.items():
        for current in rank_rounds_:
            if current.send is not None:
                out.append((rank, current.send.peer, round_bytes(current)[1]))
    return out


def describe_rounds(rounds_: Sequence[Round]) -> List[Tuple[Any, ...]]:
    """A comparable form of rounds: ``(step, index, checksum, recv (peer, bytes, direct), send ...)``."""
    def chunk(c: Any) -> Optional[Tuple[int, int, bool]]:
        return None if c is None else (c.peer, c.nbytes, bool(c.direct))
    return [(r.step, r.index, r.checksum, chunk(r.recv), chunk(r.send)) for r in rounds_]
