"""The executor's v2 contract on real gloo processes (worlds 2-3, tiny tensors):

- plan agreement: a rank given a different plan makes every rank raise, naming it, before any
  byte moves (destinations untouched); a rank whose tensors are wrong makes its peers fail at once;
- dtype conversion at the sender: bf16 / fp16 equal a local ``.to()`` of the source shard bit for
  bit; fp8-e4m3 equals a quantization written here from the documented rule (one float32 scale
  per index of the split axis); bytes are counted in the destination dtype;
- repeated syncs: a Resharder built once runs 10 syncs of changing weights, each bit-exact, and
  the second and later syncs allocate nothing (buffers are reused from the second sync on, so a
  leak or a stale buffer shows by the third; 100 syncs guarded nothing more and cost 8 CPU-s) (its own counter, and no new tensor storage seen
  by a torch dispatch mode);
- after a timeout the staging is dropped: a retry gets the right data in fresh buffers, while the
  late message from the failed attempt lands in the abandoned ones.
"""
from __future__ import annotations

import datetime
import zlib
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from pgroups.errors import GroupTimeoutError
from pgroups.reshard import ReshardError, Resharder, cut_shards, empty_shards, execute_plan, llama_like, plan_reshard
from pgroups.reshard.convert import resolve_dst_dtypes, scale_name
from pgroups.reshard.executor import _Buffers
from pgroups.reshard.wire import first_disagreement
from pgroups.spawn import run_local
from test_reshard_executor import SENTINEL, _init, layout, reference, same_bytes, sentinel_shards, tiny_model

E4M3_MAX = 448.0


# ---- independent references ------------------------------------------------------------------------
def smooth_full(model, name: str, seed: int) -> torch.Tensor:
    """A finite full tensor (normal values of varied magnitude, the first slice of dim 0 zero so
    that the zero-amax rule is exercised), seeded by name and ``seed``; integers stay random."""
    spec = model[name]
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7919 * seed)
    if not spec.dtype.is_floating_point:
        return torch.randint(-1000, 1000, spec.shape, generator=generator).to(spec.dtype)
    values = torch.randn(spec.shape, generator=generator) * (1.0 + 50.0 * torch.rand(spec.shape, generator=generator))
    if values.dim() >= 2:
        values[0].zero_()
    return values.to(spec.dtype)


def fp8_reference(shard: torch.Tensor, axis: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The documented rule, written independently: per index of ``axis``, amax over the other
    dims; scale = amax / 448 (1 where amax is 0); q = clamp(x / scale, ±448) cast to e4m3."""
    x = shard.to(torch.float32)
    moved = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    amax = moved.abs().max(dim=1).values
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    scale = scale.reshape(shape)
    q = torch.clamp(x / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def float_model(dtype: str):
    return llama_like(hidden=24, layers=2, heads=6, kv_heads=2, ffn=36, vocab=50, dtype=dtype, name="conv")


# ---- workers -------------------------------------------------------------------------------------
def agreement_worker(world: int) -> List[Dict[str, Any]]:
    """Three attempts: rank 1 holds a different plan; rank 0 holds a different bucket size (it
    must be named even though it is rank 0); rank 2 passes a wrong tensor (it refuses)."""
    gpc = _init(world)
    rank, model = gpc.get_global_rank(), tiny_model()
    full = lambda name: reference(model, name)  # noqa: E731
    src, dst, other_dst = layout(3, 2, 1, [0, 1]), layout(3, 1, 1, [1, 2]), layout(3, 1, 2, [1, 2])
    results = []
    for attempt, (odd, what) in enumerate([(1, "plan"), (0, "bucket"), (2, "tensor")]):
        mine = other_dst if rank == odd and what == "plan" else dst
        plan = plan_reshard(src, mine, model, gpc.get_hostnames())
        src_shards = cut_shards(src, model, rank, full)
        dst_shards = sentinel_shards(mine, model, rank)
        if rank == odd and what == "tensor" and dst_shards:
            name = next(iter(dst_shards))
            dst_shards[name] = torch.zeros(3, dtype=dst_shards[name].dtype)
        bucket = 999 if rank == odd and what == "bucket" else 1000
        try:
            execute_plan(plan, src_shards, dst_shards, bucket_bytes=bucket, timeout_s=60)
            error = None
        except ReshardError as exc:
            error = str(exc)
        untouched = all(bool((t.reshape(-1).view(torch.uint8) == SENTINEL).all())
                        for n, t in dst_shards.items() if t.numel() > 3)
        results.append({"attempt": attempt, "odd": odd, "what": what, "error": error, "untouched": untouched})
    gpc.destroy()
    return results


CONVERT_CASES = [
    # (source dtype, destination dtype for 2-D floating tensors, for 1-D floating ones, src, dst, options)
    ("float32", "bfloat16", "bfloat16", (2, 1), (1, 1, [1]), {"bucket": 1 << 20}),
    ("float32", "float16", "float16", (1, 1, [0]), (2, 1), {"bucket": 200, "atomic": False}),
    ("float32", "float8_e4m3fn", "bfloat16", (2, 1), (1, 2), {"bucket": 1 << 20}),
    ("bfloat16", "float8_e4m3fn", "float16", (2, 1), (1, 1, [1]), {"bucket": 300, "atomic": False}),
    ("bfloat16", "float8_e4m3fn", "bfloat16", (1, 1, [1]), (2, 1), {"bucket": 256, "verify": True}),
]


def convert_worker(world: int) -> List[str]:
    gpc = _init(world)
    rank, problems = gpc.get_global_rank(), []
    for index, (src_dtype, big, small, src_shape, dst_shape, options) in enumerate(CONVERT_CASES):
        model = float_model(src_dtype)
        dtypes = {s.name: getattr(torch, big if len(s.shape) >= 2 else small) for s in model.tensors}
        src, dst = layout(world, *src_shape), layout(world, *dst_shape)
        full = lambda name: smooth_full(model, name, index)  # noqa: E731
        plan = plan_reshard(src, dst, model, gpc.get_hostnames())
        resharder = Resharder(plan, dst_dtypes=dtypes, bucket_bytes=options["bucket"], timeout_s=60,
                              atomic=options.get("atomic", True), verify=options.get("verify", False))
        out = resharder.destination_shards()
        stats = resharder.run(cut_shards(src, model, rank, full), out)
        where = f"case {index} rank {rank}"
        for name, shard in cut_shards(dst, model, rank, full).items():
            if dtypes[name] == torch.float8_e4m3fn:
                q, scale = fp8_reference(shard, model[name].axis)
                if not same_bytes(out[name], q):
                    problems.append(f"{where}: fp8 values of {name} differ from the reference quantization")
                if not same_bytes(out[scale_name(name)], scale):
                    problems.append(f"{where}: fp8 scales of {name} differ from the reference")
            elif not same_bytes(out[name], shard.to(dtypes[name])):
                problems.append(f"{where}: {name} differs from a local .to({dtypes[name]})")
        # bytes on the wire, in the destination dtype (fp8: one float32 scale per axis index)
        expected = 0
        for t in plan.transfers_of(rank)[1]:
            dtype, spec = dtypes[t.tensor], model[t.tensor]
            expected += t.nbytes // spec.itemsize * dtype.itemsize
            if dtype == torch.float8_e4m3fn:
                expected += (t.dst_box[spec.axis][1] - t.dst_box[spec.axis][0]) * 4
        if stats.bytes_received != expected:
            problems.append(f"{where}: received {stats.bytes_received} bytes, expected {expected} in the "
                            "destination dtypes")
    gpc.destroy()
    return problems


class NewStorages(TorchDispatchMode):
    """Records every torch op whose output is a tensor with a storage none of its inputs has."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
                self.ops.append(str(func))
        return out


def repeat_worker(world: int, syncs: int) -> List[str]:
    """Three Resharders built once (atomic; streaming through a ring of 1 KiB buffers; streaming
    with fp8 conversion) each sync ``syncs`` times weights that change in place."""
    gpc = _init(world)
    rank, problems = gpc.get_global_rank(), []
    model = float_model("bfloat16")
    src, dst = layout(world, 2, 1, [0, 1]), layout(world, 1, 2, [1, 2])
    plan = plan_reshard(src, dst, model, gpc.get_hostnames())
    fp8 = {s.name: torch.float8_e4m3fn for s in model.tensors if len(s.shape) >= 2}
    resharders = {
        "atomic": Resharder(plan, bucket_bytes=700, timeout_s=60),
        "streaming": Resharder(plan, bucket_bytes=256, timeout_s=60, atomic=False, max_staging_bytes=1024),
        "fp8": Resharder(plan, bucket_bytes=512, timeout_s=60, atomic=False, dst_dtypes=fp8),
    }
    src_shards = cut_shards(src, model, rank, lambda n: smooth_full(model, n, 0))
    outs = {label: r.destination_shards() for label, r in resharders.items()}
    first: Dict[str, int] = {}
    for sync in range(syncs):
        weights = lambda n: smooth_full(model, n, sync + 1)  # noqa: E731
        for name, tensor in cut_shards(src, model, rank, weights).items():
            src_shards[name].copy_(tensor)
        expected = cut_shards(dst, model, rank, weights)
        for label, resharder in resharders.items():
            watch = NewStorages()
            if sync == 1:
                with watch:
                    resharder.run(src_shards, outs[label])
                if watch.ops:
                    problems.append(f"rank {rank} {label}: sync 2 made new tensor storage in {sorted(set(watch.ops))}")
            else:
                resharder.run(src_shards, outs[label])
            first.setdefault(label, resharder.buffer_allocations)
            if resharder.buffer_allocations != first[label]:
                problems.append(f"rank {rank} {label}: sync {sync + 1} allocated buffers "
                                f"({resharder.buffer_allocations} after, {first[label]} after the first)")
            out = outs[label]
            for name, shard in expected.items():
                if label == "fp8" and name in fp8:
                    ok = same_bytes(out[name], fp8_reference(shard, model[name].axis)[0])
                else:
                    ok = same_bytes(out[name], shard)
                if not ok:
                    problems.append(f"rank {rank} {label}: sync {sync + 1}: {name} differs")
        if len(problems) > 10:
            break
    gpc.destroy()
    return problems


def retry_worker(world: int, timeout_s: float) -> Dict[str, Any]:
    """Rank 0 sends to rank 1. Attempt 1: rank 0 stays silent until rank 1 has timed out, then
    sends stale weights. gloo closes the connection of a timed-out operation, so the retry runs
    the same Resharders on a fresh group; attempt 2 sends the real weights."""
    gpc = _init(world)
    rank, model = gpc.get_global_rank(), float_model("bfloat16")
    src, dst = layout(world, 1, 1, [0]), layout(world, 1, 1, [1])
    plan = plan_reshard(src, dst, model, gpc.get_hostnames())
    resharder = Resharder(plan, bucket_bytes=512, timeout_s=timeout_s if rank == 1 else 120)
    store = dist.distributed_c10d._get_default_store()
    stale = cut_shards(src, model, rank, lambda n: smooth_full(model, n, 1))
    real = cut_shards(src, model, rank, lambda n: smooth_full(model, n, 2))
    out = sentinel_shards(dst, model, rank)
    result: Dict[str, Any] = {"rank": rank}

    def silent_until_peer_failed(step: int) -> None:
        if rank == 0:
            store.wait(["receiver failed"])

    result["allocations_before"] = resharder.buffer_allocations
    try:
        resharder.run(stale, out, progress=silent_until_peer_failed)
        result["first"] = None
    except (GroupTimeoutError, ReshardError) as exc:
        result["first"], result["first_type"] = str(exc), type(exc).__name__
        result["untouched"] = all(bool((t.reshape(-1).view(torch.uint8) == SENTINEL).all()) for t in out.values())
        result["allocations_failed"] = resharder.buffer_allocations
        if rank == 1:
            store.set("receiver failed", "1")
    resharder.group = dist.new_group(backend="gloo")
    resharder.timeout = datetime.timedelta(seconds=120)
    resharder.run(real, out)
    result["allocations_after"] = resharder.buffer_allocations
    expected = cut_shards(dst, model, rank, lambda n: smooth_full(model, n, 2))
    result["wrong"] = [n for n, t in expected.items() if not same_bytes(out[n], t)]
    gpc.destroy()
    return result


# ---- tests ---------------------------------------------------------------------------------------------
def _values(outcomes) -> List[Any]:
    failures = [f"rank {o.rank}: {o.error}" for o in outcomes if not o.ok]
    assert not failures, "\n".join(failures)
    return [o.value for o in outcomes]


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_plan_mismatch_names_the_odd_rank_and_nothing_moves():
    per_rank = _values(run_local(3, agreement_worker, (3,), timeout_s=140, env={"OMP_NUM_THREADS": "1"}))
    for attempt in range(3):
        rows = [results[attempt] for results in per_rank]
        odd, what = rows[0]["odd"], rows[0]["what"]
        for rank, row in enumerate(rows):
            assert row["error"] is not None, f"rank {rank} ran although rank {odd} had a different {what}"
            assert row["untouched"], f"rank {rank} wrote its destination ({what})"
            if what == "tensor" and rank == odd:
                assert "has shape (3,)" in row["error"], row["error"]
            elif what == "tensor":
                assert f"rank {odd} refused to run the plan" in row["error"], row["error"]
            else:
                assert f"rank {odd} has plan hash" in row["error"], row["error"]
                assert "nothing was sent or written" in row["error"], row["error"]


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_sender_side_dtype_conversion_matches_local_references():
    problems = [p for value in _values(run_local(2, convert_worker, (2,), timeout_s=140,
                                                 env={"OMP_NUM_THREADS": "1"})) for p in value]
    assert not problems, "\n".join(problems[:20])


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_10_repeated_syncs_are_bit_exact_and_allocate_nothing_after_the_first():
    problems = [p for value in _values(run_local(3, repeat_worker, (3, 10), timeout_s=230,
                                                 env={"OMP_NUM_THREADS": "1"})) for p in value]
    assert not problems, "\n".join(problems[:20])


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_retry_after_timeout_gets_the_right_data_in_fresh_buffers():
    sender, receiver = _values(run_local(2, retry_worker, (2, 3.0), timeout_s=110, env={"OMP_NUM_THREADS": "1"}))
    assert receiver["first_type"] == "GroupTimeoutError" and "from rank 0" in receiver["first"], receiver
    assert receiver["untouched"], receiver
    # the failed run's buffers were dropped: the retry allocated a fresh set, as many as the first
    fresh = receiver["allocations_after"] - receiver["allocations_failed"]
    assert fresh == receiver["allocations_failed"] - receiver["allocations_before"] > 0, receiver
    assert not receiver["wrong"], receiver
    assert not sender["wrong"]


# ---- pure ------------------------------------------------------------------------------------------------
def test_disagreement_names_the_first_rank_off_the_majority():
    assert first_disagreement([5, 5, 5], [0, 1, 2]) is None
    assert first_disagreement([7, 5, 5, 5], [0, 1, 2, 3]).startswith("rank 0 has plan hash")
    assert first_disagreement([5, 5, 9, 5], [4, 5, 6, 7]).startswith("rank 6 has plan hash")
    assert first_disagreement([5, 0, 0], [0, 1, 2]).startswith("rank 1 refused")
    assert "rank 1 has" in first_disagreement([5, 6], [0, 1])       # a tie: the lowest rank's is the reference


class _OneRankContext:
    config = None

    def get_global_rank(self) -> int:
        return 1


def test_bad_conversions_and_budgets_raise_one_clear_line():
    model = float_model("bfloat16")
    with pytest.raises(ReshardError, match=r"needs a tensor of at least 2 dims.*'norm.weight' has shape \(24,\)"):
        resolve_dst_dtypes(model, {"norm.weight": torch.float8_e4m3fn})
    with pytest.raises(ReshardError, match=r"is not a tensor of model"):
        resolve_dst_dtypes(model, {"nope": torch.float16})
    ints = tiny_model()
    with pytest.raises(ReshardError, match=r"torch.int64 -> torch.float16 is not a conversion we do"):
        resolve_dst_dtypes(ints, {"layers.2.router.bias": torch.float16})
    plan = plan_reshard(layout(2, 2, 1), layout(2, 1, 2), model)
    src = cut_shards(plan.src, model, 1, lambda n: smooth_full(model, n, 0))
    dst = empty_shards(plan.dst, model, 1)
    with pytest.raises(ReshardError, match=r"max_staging_bytes=100 is too small: atomic mode stages all received"):
        execute_plan(plan, src, dst, context=_OneRankContext(), max_staging_bytes=100)
    with pytest.raises(ReshardError, match=r"max_staging_bytes=100 is too small: streaming needs one send"):
        execute_plan(plan, src, dst, context=_OneRankContext(), max_staging_bytes=100, atomic=False,
                     bucket_bytes=256)


class _Work:
    """A posted operation as _Buffers sees it."""

    def __init__(self, done: bool) -> None:
        self.done = done

    def is_completed(self) -> bool:
        return self.done


def test_failed_runs_keep_buffers_only_while_their_operations_are_posted():
    cpu = torch.device("cpu")
    buffers = _Buffers()
    for failure in range(5):   # five failures with nothing in flight, or only completed work: nothing kept
        buffers.get("staging", 64, cpu)
        buffers.drop([] if failure % 2 else [_Work(True), _Work(True)])
        assert buffers.abandoned == []
    staging = buffers.get("staging", 64, cpu)
    late = _Work(False)
    buffers.drop([_Work(True), late])      # a receive still posted: its buffers stay alive, never reused
    assert len(buffers.abandoned) == 1
    works, kept = buffers.abandoned[0]
    assert works == [late] and kept["staging"] is staging
    assert buffers.get("staging", 64, cpu) is not staging
    late.done = True                       # once it completed, the next drop lets them go
    buffers.drop()
    assert buffers.abandoned == []
