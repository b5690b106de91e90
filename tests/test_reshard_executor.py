"""The reshard executor on real gloo processes: every destination shard equals, bit for bit,
the shard cut from the full reference tensor, over many layout pairs (TP 1/2/3/4, PP 1/2/4, DP;
colocated, disjoint, overlapping), in both receive modes (atomic staging, and streaming through
a bounded ring of buffers); and failures (a source rank dies or hangs mid-transfer, a
corrupted message) raise on the others within the timeout, naming the step and the ranks,
with the destination untouched.

Several layout pairs run in one spawned job (process start-up dominates on this machine).
Hosts are simulated with PGROUPS_HOSTNAME.
"""
from __future__ import annotations

import os
import time
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist

from pgroups.errors import GroupTimeoutError
from pgroups.reshard import (ModelSpec, ParallelLayout, ReshardError, TensorSpec, cut_shards, empty_shards,
                             execute_plan, llama_like, plan_reshard, reshard)
from pgroups.spawn import run_local
from pgroups.topology import Topology

SENTINEL = 7  # every destination byte starts as this value


def tiny_model() -> ModelSpec:
    """A small Llama-like model (bf16, fused QKV with GQA, fused gate/up) plus an fp32 tensor,
    an int64 tensor and a 0-d tensor: about 40 KB."""
    base = llama_like(hidden=24, layers=4, heads=6, kv_heads=2, ffn=36, vocab=50, dtype="bfloat16", name="tiny")
    extra = [TensorSpec.create("layers.1.rotary.freq", (6, 5), "float32", 0, 1),
             TensorSpec.create("layers.2.router.bias", (7,), "int64", 0, 2),
             TensorSpec.create("head.scale", (), "float32", None, "head")]
    return ModelSpec.create(list(base.tensors) + extra, base.num_layers, "tiny")


def reference(model: ModelSpec, name: str) -> torch.Tensor:
    """The full tensor ``name``: random bytes seeded by the name (NaNs included: compare bytes)."""
    spec = model[name]
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    data = torch.randint(0, 256, (spec.nbytes,), dtype=torch.uint8, generator=generator)
    return data.view(spec.dtype).reshape(spec.shape)


def layout(world: int, tensor: int, pipeline: int, ranks: Optional[Sequence[int]] = None,
           stages: Any = "even") -> ParallelLayout:
    ranks = list(ranks) if ranks is not None else None
    size = len(ranks) if ranks is not None else world
    return ParallelLayout.create(Topology.create(size, tensor, pipeline), ranks, stages)


def sentinel_shards(dst: ParallelLayout, model: ModelSpec, rank: int) -> Dict[str, torch.Tensor]:
    """Destination shards whose every byte is SENTINEL."""
    shards = empty_shards(dst, model, rank)
    for tensor in shards.values():
        tensor.reshape(-1).view(torch.uint8).fill_(SENTINEL)
    return shards


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _init(world: int) -> Any:
    from pgroups import gpc

    gpc.init_from_config({"parallel": {"tensor": 1, "pipeline": 1}, "backend": "gloo", "timeout_s": 60,
                          "groups": "lazy"})
    return gpc


# ---- workers (module level: children are spawned) -----------------------------------------------------
def reshard_cases_worker(world: int, cases: List[Dict[str, Any]]) -> List[Tuple[int, str]]:
    """Run every case in order; return (case index, problem) for each mismatch on this rank."""
    gpc = _init(world)
    rank, model = gpc.get_global_rank(), tiny_model()
    problems = []
    for index, case in enumerate(cases):
        src, dst = layout(world, *case["src"]), layout(world, *case["dst"])
        full = lambda name: reference(model, name)  # noqa: E731
        src_shards = cut_shards(src, model, rank, full)
        dst_shards = sentinel_shards(dst, model, rank)
        plan, stats = reshard(src, dst, model, src_shards, dst_shards, bucket_bytes=case.get("bucket", 1 << 20),
                              verify=case.get("verify", False), timeout_s=30, atomic=case.get("atomic", True),
                              max_staging_bytes=case.get("staging"))
        expected = cut_shards(dst, model, rank, full)
        for name, tensor in expected.items():
            if not same_bytes(dst_shards[name], tensor):
                problems.append((index, f"rank {rank}: tensor {name} differs"))
        assert plan.rank == rank   # reshard() plans only this rank's share
        report = plan.report
        if report is not None and stats.bytes_received != report.lower_bound_bytes:
            problems.append((index, f"rank {rank}: received {stats.bytes_received} != bound "
                                    f"{report.lower_bound_bytes}"))
        if stats.bytes_received + stats.bytes_copied != (report.needed_bytes if report else 0):
            problems.append((index, f"rank {rank}: received + copied != needed"))
    gpc.destroy()
    return problems


def fault_worker(world: int, case: Dict[str, Any], fault: str, victim: int, at_step: int,
                 timeout_s: float) -> Dict[str, Any]:
    """Reshard once while ``victim`` dies (``die``) or stops answering (``hang``) before the
    ``at_step``-th step it takes part in (0-based), or corrupts its first packed message after the
    checksum was taken (``corrupt``)."""
    gpc = _init(world)
    rank, model = gpc.get_global_rank(), tiny_model()
    src, dst = layout(world, *case["src"]), layout(world, *case["dst"])
    plan = plan_reshard(src, dst, model, gpc.get_hostnames())
    full = lambda name: reference(model, name)  # noqa: E731
    src_shards = cut_shards(src, model, rank, full)
    dst_shards = sentinel_shards(dst, model, rank)
    victim_steps_all = sorted({t.step for t in plan.transfers if victim in (t.src, t.dst) and not t.is_local})
    fault_step = victim_steps_all[at_step] if at_step < len(victim_steps_all) else None

    def progress(step: int) -> None:
        if rank == victim and step == fault_step and fault == "die":
            os._exit(1)
        if rank == victim and step == fault_step and fault == "hang":
            # silent until every other rank has finished (or 120 s): whatever they raised, they
            # raised it while the victim had sent nothing
            store, waited = dist.distributed_c10d._get_default_store(), 0.0
            while int(store.add("finished", 0)) < world - 1 and waited < 120:
                time.sleep(0.1)
                waited += 0.1
            raise RuntimeError("the hung victim stops")

    if fault == "corrupt" and rank == victim:
        import pgroups.reshard.executor as executor

        honest = executor._Run._send_source

        def corrupted(run, *args):  # what goes on the wire differs from what was checksummed
            data = honest(run, *args).clone()
            data[0] ^= 0xFF
            return data

        executor._Run._send_source = corrupted
    started = time.monotonic()
    error = error_type = None
    try:
        execute_plan(plan, src_shards, dst_shards, bucket_bytes=case["bucket"], timeout_s=timeout_s,
                     verify=fault == "corrupt", progress=progress)
    except (ReshardError, GroupTimeoutError) as exc:
        error, error_type = str(exc), type(exc).__name__
    elapsed = time.monotonic() - started
    if rank != victim and fault == "hang":   # (a dead victim took the store it hosted with it)
        dist.distributed_c10d._get_default_store().add("finished", 1)
    untouched = all(bool((t.reshape(-1).view(torch.uint8) == SENTINEL).all()) for t in dst_shards.values())
    correct = all(same_bytes(dst_shards[n], t) for n, t in cut_shards(dst, model, rank, full).items())
    victim_steps = sorted({t.step for t in plan.transfers if t.src == victim and t.dst == rank and not t.is_local})
    return {"rank": rank, "error": error, "type": error_type, "seconds": elapsed, "untouched": untouched,
            "correct": correct, "num_steps": plan.num_steps,
            "victim_step": victim_steps_all.index(victim_steps[0]) if victim_steps else None,
            "victim_step_value": victim_steps[0] if victim_steps else None}


def _two_hosts(world: int):
    return lambda rank: {"PGROUPS_HOSTNAME": f"host{rank * 2 // world}"}


def _run(world: int, target, args, timeout_s: float):
    return run_local(world, target, args, timeout_s=timeout_s, env={"OMP_NUM_THREADS": "1"},
                     env_per_rank=_two_hosts(world))


# ---- world 8 ----------------------------------------------------------------------------------------------
# (tensor, pipeline, ranks or None, stages)
WORLD8_CASES = [
    {"src": (4, 2), "dst": (2, 1)},                                           # training -> generation
    {"src": (4, 2), "dst": (2, 1), "bucket": 300, "atomic": False},           # streaming, ring of 2
    {"src": (2, 1), "dst": (4, 2), "bucket": 512},                            # and back, many buckets
    {"src": (2, 1), "dst": (4, 2), "bucket": 512, "atomic": False, "staging": 4096, "verify": True},
    {"src": (2, 2), "dst": (4, 1), "verify": True},
    {"src": (1, 4, None, "balanced"), "dst": (2, 2), "bucket": 100},
    {"src": (4, 2), "dst": (1, 1)},                                           # every rank gets it all
    {"src": (2, 2), "dst": (2, 2)},                                           # identity: local copies
    {"src": (2, 2, range(4)), "dst": (4, 1, range(4, 8))},                    # disjoint
    {"src": (4, 1, range(4)), "dst": (1, 2, range(4, 8)), "verify": True},
    {"src": (3, 2, range(6)), "dst": (2, 1, range(2, 8))},                    # overlapping, TP 3
    {"src": (3, 1, range(5, 8)), "dst": (2, 2, range(4))},
    {"src": (1, 1, range(4)), "dst": (1, 1, range(4, 8)), "bucket": 4096},    # DP 4 -> DP 4 disjoint
    {"src": (1, 4, None, (1, 1, 2, 0)), "dst": (4, 2, None, (3, 1))},         # explicit stages
]


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_reshard_world8_every_shard_bit_exact():
    outcomes = _run(8, reshard_cases_worker, (8, WORLD8_CASES), timeout_s=140)
    failures = [f"rank {o.rank}: {o.error}" for o in outcomes if not o.ok]
    assert not failures, "\n".join(failures)
    problems = [f"case {i} {WORLD8_CASES[i]}: {p}" for o in outcomes for i, p in o.value]
    assert not problems, "\n".join(problems[:20])


# ---- world 4 ----------------------------------------------------------------------------------------------
WORLD4_CASES = [
    {"src": (3, 1, range(3)), "dst": (4, 1)},
    {"src": (2, 2), "dst": (3, 1, range(1, 4)), "bucket": 64, "verify": True},
    {"src": (4, 1), "dst": (1, 4)},
    {"src": (1, 2), "dst": (2, 1), "bucket": 1001},
    {"src": (1, 2), "dst": (2, 1), "bucket": 1001, "atomic": False, "staging": 2002},   # ring of 1
    {"src": (3, 1, range(3)), "dst": (4, 1), "bucket": 128, "atomic": False},
    {"src": (1, 1, [0]), "dst": (1, 1, [1, 2, 3])},                           # one source, fan-out 3
    {"src": (2, 1, [3, 1]), "dst": (3, 1, [2, 0, 1])},                        # shuffled placements
]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_reshard_world4_tp3_and_odd_placements_bit_exact():
    outcomes = _run(4, reshard_cases_worker, (4, WORLD4_CASES), timeout_s=110)
    failures = [f"rank {o.rank}: {o.error}" for o in outcomes if not o.ok]
    assert not failures, "\n".join(failures)
    problems = [f"case {i} {WORLD4_CASES[i]}: {p}" for o in outcomes for i, p in o.value]
    assert not problems, "\n".join(problems[:20])


# ---- failures -------------------------------------------------------------------------------------------
FAULT_CASE = {"src": (2, 1, [0, 1]), "dst": (1, 1, [2, 3]), "bucket": 256}
#: how much later than timeout_s a failure may be reported on a loaded 2-core machine
SLACK_S = 30.0


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault, at_step", [("die", 1), ("hang", 0)])
def test_source_rank_failure_raises_within_timeout_and_leaves_destination_untouched(fault, at_step):
    timeout_s = 3.0
    outcomes = _run(4, fault_worker, (4, FAULT_CASE, fault, 0, at_step, timeout_s), timeout_s=60)
    receivers = [o.value for o in outcomes[2:]]
    assert all(r is not None for r in receivers), [o.error for o in outcomes[2:]]
    assert sorted(r["victim_step"] for r in receivers) == [0, 1], "each receiver needs rank 0 in one of its steps"
    for result in receivers:
        if result["victim_step"] < at_step:   # rank 0 served it before failing: it completes
            assert result["error"] is None and result["correct"], result
            continue
        assert result["error"] is not None, f"rank {result['rank']} finished although rank 0 failed"
        assert result["type"] == ("GroupTimeoutError" if fault == "hang" else "ReshardError"), result
        assert "from rank 0" in result["error"]
        assert f"reshard step {result['victim_step_value'] + 1}/{result['num_steps']}" in result["error"]
        # the contract: the error comes after about timeout_s without progress (the plan agreement
        # and the steps before add a little), never after the victim resumed — it stays silent
        # until every other rank has finished, so a late error would show as a long wait
        assert result["seconds"] < timeout_s + SLACK_S, result
        assert result["untouched"], f"rank {result['rank']} wrote its destination before failing"


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_checksum_mismatch_raises_and_leaves_destination_untouched():
    case = {"src": (1, 1, [0]), "dst": (1, 1, [1]), "bucket": 1 << 20}
    outcomes = _run(2, fault_worker, (2, case, "corrupt", 0, 0, 10.0), timeout_s=50)
    sender, receiver = outcomes[0].value, outcomes[1].value
    assert sender is not None and sender["error"] is None, outcomes[0]
    assert receiver is not None, outcomes[1]
    assert receiver["type"] == "ReshardError" and "checksum mismatch" in receiver["error"], receiver
    assert "from rank 0" in receiver["error"]
    assert receiver["untouched"]


# ---- validation before communication (no processes) --------------------------------------------------------
class _OneRankContext:
    """Just enough context for execute_plan to validate tensors (it fails before any group use)."""

    config = None

    def get_global_rank(self) -> int:
        return 1


def test_wrong_or_missing_shards_raise_before_communication():
    model = tiny_model()
    src, dst = layout(2, 2, 1), layout(2, 1, 2)
    plan = plan_reshard(src, dst, model)
    full = lambda name: reference(model, name)  # noqa: E731
    src_shards = cut_shards(src, model, 1, full)
    dst_shards = empty_shards(dst, model, 1)
    missing = dict(src_shards)
    missing.pop("embed.weight")
    with pytest.raises(ReshardError, match=r"rank 1: source tensor 'embed.weight' \(tp 1 of 2, stage 0\) is missing"):
        execute_plan(plan, missing, dst_shards, context=_OneRankContext())
    wrong = dict(dst_shards)
    wrong["lm_head.weight"] = torch.empty(3, 3, dtype=torch.bfloat16)
    with pytest.raises(ReshardError, match=r"destination tensor 'lm_head.weight'.*shape \(3, 3\).*gives \(50, 24\)"):
        execute_plan(plan, src_shards, wrong, context=_OneRankContext())
