"""The transfer path's copies and conversions:

- zero-copy: a contiguous, unconverted transfer of at least the packing threshold is sent from
  the source tensor and, when streaming, received into the destination tensor — the executor's
  own counters of bytes packed / unpacked equal what torch's ``is_contiguous`` on the two
  regions and the documented threshold predict, on real gloo ranks, and every shard is bit-exact
  (non-contiguous pieces — row-parallel columns — still go through buffers and arrive right);
- the fp8 quantizer works a block at a time (the float32 scratch is one block, not a bucket):
  for any block size, strided regions and grouped scale dims, it equals the documented rule
  written here independently; the blocks tile a region exactly.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgroups.reshard import Resharder, cut_shards, plan_reshard
from pgroups.reshard.convert import Quantizer, blocks, scale_shape
from pgroups.reshard.layout import local_shapes
from pgroups.reshard.wire import PACK_BELOW_BYTES
from pgroups.spawn import run_local
from test_reshard_executor import _init, layout, reference, same_bytes, sentinel_shards, tiny_model
from test_reshard_pipeline import E4M3_MAX, smooth_full

# (source layout, destination layout, bucket_bytes); world 4
CASES = [((2, 1), (1, 2), 256), ((1, 2), (2, 2), 100), ((4, 1), (2, 1), 300), ((2, 2), (1, 1, [3]), 512)]


def _contiguous(shape, box) -> bool:
    """torch's own answer: is the region ``box`` of a contiguous tensor of ``shape`` contiguous?"""
    view = torch.empty(shape, dtype=torch.uint8)
    for dim, (start, stop) in enumerate(box):
        view = view.narrow(dim, start, stop - start)
    return view.is_contiguous()


def copy_bounds(transfers, plan, bucket: int) -> Tuple[int, int]:
    """(least, most) bytes of ``transfers`` that may go through a buffer, by the documented rule:
    a non-contiguous region (on either end) must; a contiguous one of at least min(PACK_BELOW_BYTES,
    half a bucket) must not; smaller contiguous ones may be packed together with others (or go
    alone, unpacked)."""
    threshold = min(PACK_BELOW_BYTES, -(-bucket // 2))
    must = may = 0
    for t in transfers:
        src = local_shapes(plan.src, plan.model, t.src)[t.tensor]
        dst = local_shapes(plan.dst, plan.model, t.dst)[t.tensor]
        if not (_contiguous(src, t.src_box) and _contiguous(dst, t.dst_box)):
            must += t.nbytes
        elif t.nbytes < threshold:
            may += t.nbytes
    return must, must + may


def copies_worker(world: int) -> Tuple[List[str], Dict[int, int], Dict[int, int]]:
    """Problems, and per case the bytes this rank must have moved without a copy, and the bytes
    of non-contiguous regions it sent (through a buffer)."""
    gpc = _init(world)
    rank, model, problems = gpc.get_global_rank(), tiny_model(), []
    direct: Dict[int, int] = {}
    strided: Dict[int, int] = {}
    full = lambda name: reference(model, name)  # noqa: E731
    for index, (src_shape, dst_shape, bucket) in enumerate(CASES):
        src, dst = layout(world, *src_shape), layout(world, *dst_shape)
        plan = plan_reshard(src, dst, model, gpc.get_hostnames())
        sends, recvs, _ = plan.transfers_of(rank)
        packed, unpacked = copy_bounds(sends, plan, bucket), copy_bounds(recvs, plan, bucket)
        for atomic in (True, False):
            resharder = Resharder(plan, bucket_bytes=bucket, atomic=atomic, timeout_s=60)
            out = sentinel_shards(dst, model, rank)
            for sync in range(2):
                stats = resharder.run(cut_shards(src, model, rank, full), out)
                where = f"case {index} rank {rank} {'atomic' if atomic else 'streaming'} sync {sync}"
                wrong = [n for n, t in cut_shards(dst, model, rank, full).items() if not same_bytes(out[n], t)]
                if wrong:
                    problems.append(f"{where}: {wrong} differ")
                unpacked_ok = (stats.bytes_unpacked == stats.bytes_received if atomic
                               else unpacked[0] <= stats.bytes_unpacked <= unpacked[1])
                if not (packed[0] <= stats.bytes_packed <= packed[1] and unpacked_ok):
                    problems.append(f"{where}: packed {stats.bytes_packed} bytes (allowed {packed}), unpacked "
                                    f"{stats.bytes_unpacked} (allowed {unpacked}; received {stats.bytes_received})")
            direct[index] = stats.bytes_sent + stats.bytes_received - packed[1] - unpacked[1]
            strided[index] = packed[0]
    # a conversion always goes through a buffer: every byte packed, and unpacked when streaming
    float_model = tiny_model()
    src, dst = layout(world, 2, 1), layout(world, 1, 2)
    plan = plan_reshard(src, dst, float_model, gpc.get_hostnames())
    halves = {s.name: torch.float16 for s in float_model.tensors if s.dtype.is_floating_point}
    resharder = Resharder(plan, bucket_bytes=256, atomic=False, dst_dtypes=halves, timeout_s=60)
    out = resharder.destination_shards()
    stats = resharder.run(cut_shards(src, float_model, rank, lambda n: smooth_full(float_model, n, 0)), out)
    converted = lambda ts: sum(t.nbytes // float_model[t.tensor].itemsize * 2 for t in ts  # noqa: E731
                               if t.tensor in halves)
    sends, recvs, _ = plan.transfers_of(rank)
    if stats.bytes_packed < converted(sends) or stats.bytes_unpacked < converted(recvs):
        problems.append(f"rank {rank}: converted bytes skipped a buffer: packed {stats.bytes_packed} < "
                        f"{converted(sends)} or unpacked {stats.bytes_unpacked} < {converted(recvs)}")
    gpc.destroy()
    return problems, direct, strided


@pytest.mark.multiprocess
@pytest.mark.timeout(200)
def test_contiguous_transfers_move_without_copies_and_the_rest_through_buffers():
    outcomes = run_local(4, copies_worker, (4,), timeout_s=190, env={"OMP_NUM_THREADS": "1"})
    failures = [f"rank {o.rank}: {o.error}" for o in outcomes if not o.ok]
    assert not failures, "\n".join(failures)
    problems = [p for o in outcomes for p in o.value[0]]
    assert not problems, "\n".join(problems[:20])
    for index in range(len(CASES)):   # every case has both kinds: zero-copy and non-contiguous
        assert sum(o.value[1][index] for o in outcomes) > 0, index
        assert sum(o.value[2][index] for o in outcomes) > 0, index


# ---- the blocked quantizer (pure, one process) --------------------------------------------------------
def rule(x: torch.Tensor, dims: Tuple[int, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The documented fp8 rule, written independently: per index of ``dims``, amax of |x| over the
    other dims; scale = amax / 448 (1 where 0); q = clamp(x / scale, ±448) → e4m3."""
    values = x.to(torch.float32)
    others = [d for d in range(x.dim()) if d not in dims]
    amax = values.abs().amax(dim=others, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return torch.clamp(values / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), limit=st.integers(1, 40))
def test_blocks_tile_a_region_in_order_within_the_limit(shape, limit):
    seen = torch.zeros(shape, dtype=torch.int32)
    order = torch.arange(math.prod(shape)).reshape(shape)
    last = -1
    for box in blocks(shape, limit):
        view, index = seen, order
        for dim, (start, stop) in enumerate(box):
            view, index = view.narrow(dim, start, stop - start), index.narrow(dim, start, stop - start)
        assert 0 < view.numel() <= limit
        assert int(index.min()) > last          # in order: every block after the previous one
        last = int(index.max())
        view += 1
    assert bool((seen == 1).all())


QUANTIZE_CASES = [
    # (full shape, scale dims, the region taken of it: a box or None)
    ((40, 24), (0,), None),                          # column-parallel [out, in]: a scale per row
    ((24, 40), (1,), ((0, 24), (8, 33))),            # row-parallel: a strided column slice
    ((3, 10, 16), (0, 1), ((1, 3), (2, 9), (0, 16))),  # grouped experts: per (expert, row)
    ((5, 7), (0,), None),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
@pytest.mark.parametrize("shape, dims, box", QUANTIZE_CASES)
def test_blocked_quantizer_equals_the_documented_rule(shape, dims, box, block, dtype):
    generator = torch.Generator().manual_seed(block + len(shape))
    full = (torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator) * 300).to(dtype)
    full.select(0, 0).zero_()                      # a zero amax somewhere: scale 1
    region = full
    for dim, (start, stop) in enumerate(box or ()):
        region = region.narrow(dim, start, stop - start)
    keep = scale_shape(region.shape, dims)
    q = torch.empty(region.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(keep, dtype=torch.float32)
    count = math.prod(keep)
    quantizer = Quantizer(torch.empty(block), torch.empty(4 * count), torch.empty(count, dtype=torch.bool))
    quantizer.quantize(region, dims, q, scale)
    want_q, want_scale = rule(region, dims)
    assert same_bytes(scale, want_scale)
    assert same_bytes(q, want_q)
