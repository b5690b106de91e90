"""The wire layout is pure and symmetric: for every message of random plans, the sender and the
receiver compute the same pieces and chunks alone; the pieces of a transfer tile it exactly; every
piece is aligned; a chunk is at most ``bucket_bytes`` unless it holds one packed piece; bytes are
counted in the destination dtype (fp8 with one float32 scale per index of the scale dims)."""
from __future__ import annotations

import collections
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgroups.reshard import Resharder, plan_reshard
from pgroups.reshard.convert import resolve_dst_dtypes, scale_dims
from pgroups.reshard.wire import ALIGN, Shapes, may_post, messages, needs_recv_buffer
from test_reshard_executor import layout, tiny_model

SHAPES = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4), (3, 1)]


def _rows(box, axis):
    return box[axis][1] - box[axis][0] if box else 1


@settings(max_examples=40, deadline=None)
@given(src=st.sampled_from(SHAPES), dst=st.sampled_from(SHAPES), bucket=st.sampled_from([64, 300, 1000, 1 << 20]),
       target=st.sampled_from([None, torch.float16, torch.float8_e4m3fn]))
def test_both_ends_compute_the_same_messages_and_pieces_tile_transfers(src, dst, bucket, target):
    model = tiny_model()
    src_layout = layout(4, *src, list(range(src[0] * src[1])))
    dst_layout = layout(4, *dst, list(range(4 - dst[0] * dst[1], 4)))
    plan = plan_reshard(src_layout, dst_layout, model)
    wanted = {} if target is None else {s.name: target for s in model.tensors
                                        if s.dtype.is_floating_point and len(s.shape) >= 2}
    dtypes = resolve_dst_dtypes(model, wanted)
    shapes = Shapes(plan)
    for rank in plan.ranks:
        sends = plan.transfers_of(rank)[0]
        for step, out in messages(sends, lambda t: t.dst, shapes, dtypes, bucket).items():
            inc = messages(plan.transfers_of(out.peer)[1], lambda t: t.src, shapes, dtypes, bucket)[step]
            assert inc.peer == rank
            assert (inc.pieces, inc.size) == (out.pieces, out.size)
            assert [(c.index, c.lo, c.hi, c.pieces) for c in inc.chunks] == \
                [(c.index, c.lo, c.hi, c.pieces) for c in out.chunks]
            position = 0
            for piece in out.pieces:
                assert piece.offset % ALIGN == 0 and piece.offset >= position
                position = piece.end
            for chunk in out.chunks:
                assert chunk.nbytes <= bucket or (len(chunk.pieces) == 1 and not chunk.direct)
            # bytes in the destination dtype: values, then (fp8) one float32 scale per index of the
            # scale dims; summed over pieces they equal the same sums over the step's transfers
            values = scales = 0
            for t in [t for t in sends if t.step == step]:
                spec, dtype = model[t.tensor], dtypes[t.tensor]
                values += t.nbytes // spec.itemsize * dtype.itemsize
                if dtype == torch.float8_e4m3fn:
                    scales += 4 * math.prod(b - a for d, (a, b) in enumerate(t.src_box) if d in scale_dims(spec))
            assert sum(p.payload for p in out.pieces) == values
            assert sum(p.nbytes - (-(-p.payload // 4) * 4 if p.nbytes != p.payload else p.payload)
                       for p in out.pieces) == scales
            # the pieces of each transfer tile it along its axis
            rows = {}
            for piece in out.pieces:
                t = piece.transfer
                rows[t.tensor] = rows.get(t.tensor, 0) + _rows(t.src_box, t.axis)
            for name, count in rows.items():
                assert count == sum(_rows(t.src_box, t.axis) for t in sends if t.step == step and t.tensor == name)


# ---- posting ahead cannot deadlock ----------------------------------------------------------------------
class _Rank:
    def __init__(self, rounds, send_ring: int, recv_ring: int) -> None:
        self.rounds, self.next = rounds, 0
        self.flight: "collections.deque" = collections.deque()   # (kind, key, peer, buffer taken)
        self.posted: set = set()
        self.free = {"send": send_ring, "recv": recv_ring}


def _ops(current):
    """The operations of a round: (kind, key, peer, needs a buffer: 'send' / 'recv' / None)."""
    key = (current.step, current.index)
    out = []
    if current.recv is not None:
        out.append(("recv", key, current.recv.peer, None if current.checksum else current.recv))
    if current.send is not None:
        out.append(("send", key, current.send.peer, None if current.checksum else current.send))
    return out


def simulate(per_rank, atomic: bool, limit: int, send_ring: int, recv_ring: int) -> bool:
    """Every rank posts rounds while ``may_post`` allows and waits on its oldest operation, which
    completes only once its peer posted the matching one and finished every operation ordered
    before it (the stricter, NCCL-like rule: one stream per rank). True if everything completes."""
    ranks = {r: _Rank(rounds, send_ring, recv_ring) for r, rounds in per_rank.items()}
    progress = True
    while progress:
        progress = False
        for me, st in ranks.items():
            while st.next < len(st.rounds) and may_post(st.rounds[st.next], len(st.flight), st.free["send"],
                                                        st.free["recv"], atomic, limit):
                for kind, key, peer, chunk in _ops(st.rounds[st.next]):
                    taken = chunk is not None and (not chunk.direct if kind == "send"
                                                   else needs_recv_buffer(chunk, atomic))
                    st.free[kind] -= taken
                    st.flight.append((kind, key, peer, taken))
                    st.posted.add((kind, key, peer))
                st.next += 1
                progress = True
            if st.flight:
                kind, key, peer, taken = st.flight[0]
                other = ranks[peer]
                matched = ("send" if kind == "recv" else "recv", key, me) in other.posted
                if matched and (not other.flight or other.flight[0][1] >= key):
                    st.flight.popleft()
                    st.free[kind] += taken
                    progress = True
    return all(st.next == len(st.rounds) and not st.flight for st in ranks.values())


class _Context:
    config = None

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def get_global_rank(self) -> int:
        return self.rank


@settings(max_examples=40, deadline=None)
@given(src=st.sampled_from(SHAPES), dst=st.sampled_from(SHAPES), bucket=st.sampled_from([64, 300, 1000]),
       atomic=st.booleans(), verify=st.booleans(), limit=st.integers(1, 8), send_ring=st.integers(1, 3),
       recv_ring=st.integers(1, 3))
def test_posting_rounds_ahead_never_deadlocks(src, dst, bucket, atomic, verify, limit, send_ring, recv_ring):
    model = tiny_model()
    plan = plan_reshard(layout(4, *src, list(range(src[0] * src[1]))),
                        layout(4, *dst, list(range(4 - dst[0] * dst[1], 4))), model)
    per_rank = {r: Resharder(plan, context=_Context(r), bucket_bytes=bucket, verify=verify).rounds for r in range(4)}
    for r, rounds in per_rank.items():   # one order: by step, then chunk
        assert [(x.step, x.index) for x in rounds] == sorted((x.step, x.index) for x in rounds)
    assert simulate(per_rank, atomic, limit, send_ring, recv_ring)
