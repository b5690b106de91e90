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
from pgroups.reshard.wire import ALIGN, Shapes, batches, may_post, messages
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


# ---- posting batches cannot deadlock -------------------------------------------------------------------
def _ops(current):
    """The operations of a round: (kind, key, peer)."""
    key = (current.step, current.index, current.checksum)
    out = []
    if current.recv is not None:
        out.append(("recv", key, current.recv.peer))
    if current.send is not None:
        out.append(("send", key, current.send.peer))
    return out


def simulate(per_rank, atomic: bool, caps, per_step: bool) -> bool:
    """Every rank cuts its rounds with ``batches`` and posts them while ``may_post`` allows; under
    the strict NCCL-like rule a rank's batches run one at a time in order (a batch starts once its
    previous one completed) and an operation completes once the peer's matching operation is in
    a started batch; a batch completes when all its operations have. True if everything completes."""
    cut = {r: batches(rounds, atomic, caps, per_step) for r, rounds in per_rank.items()}
    posted = {r: 0 for r in per_rank}        # batches posted
    current = {r: 0 for r in per_rank}       # the batch running on the rank's stream
    regions = {r: 1 if len(b) == 1 else 2 for r, b in cut.items()}

    def running(rank):
        """The operations of the batch on the rank's stream (empty if it is not posted yet)."""
        if current[rank] >= posted[rank]:
            return set()
        batch = cut[rank][current[rank]]
        return {(kind, key, peer) for x in per_rank[rank][batch.start:batch.stop] for kind, key, peer in _ops(x)}

    started = {r: set() for r in per_rank}   # operations of every batch that has started
    moved = True
    while moved:
        moved = False
        for me in per_rank:
            while posted[me] < len(cut[me]) and may_post(cut[me][posted[me]], posted[me] - current[me], regions[me]):
                regions[me] -= cut[me][posted[me]].needs_region
                posted[me] += 1
                moved = True
            mine = running(me)
            started[me] |= mine
            if mine and all(("send" if kind == "recv" else "recv", key, me) in started[peer] | running(peer)
                            for kind, key, peer in mine):
                regions[me] += cut[me][current[me]].needs_region
                current[me] += 1     # every operation's peer has it started: the batch completes
                moved = True
    return all(current[r] == len(cut[r]) for r in per_rank)


class _Context:
    config = None

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def get_global_rank(self) -> int:
        return self.rank


@settings(max_examples=40, deadline=None)
@given(src=st.sampled_from(SHAPES), dst=st.sampled_from(SHAPES), bucket=st.sampled_from([64, 300, 1000]),
       atomic=st.booleans(), verify=st.booleans(), caps=st.one_of(st.none(), st.tuples(st.integers(0, 3000), st.integers(0, 3000))),
       per_step=st.booleans())
def test_posting_batches_never_deadlocks(src, dst, bucket, atomic, verify, caps, per_step):
    model = tiny_model()
    plan = plan_reshard(layout(4, *src, list(range(src[0] * src[1]))),
                        layout(4, *dst, list(range(4 - dst[0] * dst[1], 4))), model)
    per_rank = {r: Resharder(plan, context=_Context(r), bucket_bytes=bucket, verify=verify).rounds for r in range(4)}
    for r, rounds in per_rank.items():   # one order: by step, then chunk
        assert [(x.step, x.index) for x in rounds] == sorted((x.step, x.index) for x in rounds)
    assert simulate(per_rank, atomic, caps, per_step)


def test_the_checker_sees_the_deadlock_of_rounds_out_of_the_one_order():
    # a ring 0 -> 1 -> 2 -> 0 (steps 1, 2, 3) where rank 0 waits for its receive (step 3) before
    # its send (step 1): every rank waits on the one before it; in the one order it completes
    from pgroups.reshard.plan.schedule import SimChunk
    from pgroups.reshard.wire import Round

    def ring(first_rank_order):
        send = lambda step, peer: Round(step, 0, None, SimChunk(peer, 8, True))  # noqa: E731
        recv = lambda step, peer: Round(step, 0, SimChunk(peer, 8, True), None)  # noqa: E731
        return {0: first_rank_order([send(1, 1), recv(3, 2)]), 1: [recv(1, 0), send(2, 2)],
                2: [recv(2, 1), send(3, 0)]}

    assert simulate(ring(list), atomic=True, caps=None, per_step=True)
    assert not simulate(ring(lambda rounds: rounds[::-1]), atomic=True, caps=None, per_step=True)
