"""Weight sync between a training layout and a generation layout: our planner + executor vs the
naive schemes, in the same run, on local gloo ranks.

    python bench/bench_reshard.py                    # world 8, ~512 MB bf16 model, tensor 4 x pipeline 2
                                                     #   -> tensor 2 x data 4 (colocated)
    python bench/bench_reshard.py --size-mb 128 --reps 2
    python bench/bench_reshard.py --size-mb 256 --reps 3 --markdown docs/benchmarks.md   # and rewrite its section

Methods (every one leaves each rank with its generation shard; results are checked equal):
- ``reshard``: ``plan_reshard`` + a kept ``Resharder`` (atomic: everything staged, destination
  written at the end; buffers kept between syncs, as a trainer syncing every iteration would);
- ``reshard, streaming``: the same with ``atomic=False`` within ``max_staging_bytes`` = 4 buckets:
  batches whose packed chunks fit two buffer regions, each unpacked once its batch completed;
- ``reshard, streaming, bf16 -> fp8``: streaming with every 2-D tensor quantized to fp8-e4m3 at
  the sender (not compared with the others' shards; its bytes are fp8 + scales);
- ``reshard, 1 MiB buckets``: the atomic one with small buckets;
- ``reshard, one-shot execute_plan``: fresh staging buffers on every call;
- ``same messages, bare send/recv``: the ceiling of the plan's message pattern on this wire —
  every message a rank exchanges (same peers, sizes and step order) sent from and received into
  preallocated flat buffers, all posted at once, no packing, no unpacking, no destination;
- ``broadcast-all``: rank 0 holds the full model, broadcasts it in 64 MiB buckets, each rank slices;
- ``all-gather``: every rank all-gathers every training shard (the full model), then slices.
The baselines keep their buffers between repetitions too.

Reported: the slowest rank's wall time (median over ``--reps`` rounds that interleave the methods,
after one untimed warm-up round), the most CPU seconds any rank's process used in it (all its
threads: on loopback the wire is the CPU, so this is the cost that load cannot hide), bytes
received per rank, and
ratios against ``reshard``; each method's effective throughput (the most bytes any rank receives /
the slowest rank's time) against the pairwise send/recv busbw measured on the same ranks in the
same run, the way ``pgroups nettest`` measures pairs (its own ``Bench.measure_pair``: bidirectional
``batch_isend_irecv`` on the world group, every pair of a round at once — here rank r with
r xor world/2 —, each operation waited and timed, best repetition's mean; busbw = bytes / time);
the all_reduce busbw; the point-to-point vs broadcast measurement behind the executor's
transport choice; and the simulator's time (:mod:`pgroups.reshard.plan`) for the same plan and
for its bare messages, on one host whose ranks' ports run at the pairwise busbw measured here,
with the measured / simulated factor.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping

import torch
import torch.distributed as dist

from pgroups.reshard import (ParallelLayout, Resharder, cut_shards, empty_shards, execute_plan, llama_like,
                             plan_reshard)
from pgroups.reshard.executor import _checksum
from pgroups.spawn import run_local
from pgroups.topology import Topology

from _report import Report, add_markdown_argument, markdown_path  # bench/ is the script's directory

MiB = 1 << 20


def synthetic_model(size_mb: int):
    """A Llama-like bf16 model of about ``size_mb`` MiB (hidden 1024, GQA 16/4, ffn 2816)."""
    per_layer = llama_like(hidden=1024, layers=1, heads=16, kv_heads=4, ffn=2816, vocab=32000).nbytes
    ends = llama_like(hidden=1024, layers=0, heads=16, kv_heads=4, ffn=2816, vocab=32000).nbytes
    layers = max(1, round((size_mb * MiB - ends) / (per_layer - ends)))
    return llama_like(hidden=1024, layers=layers, heads=16, kv_heads=4, ffn=2816, vocab=32000, name="bench")


def full_tensor(model, name: str) -> torch.Tensor:
    spec = model[name]
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randint(-30000, 30000, spec.shape, dtype=torch.int16, generator=generator).view(spec.dtype)


def _timed(fn: Callable[[], Any]) -> float:
    """Slowest rank's seconds for ``fn`` (all ranks start together)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def _fingerprint(shards: Mapping[str, torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(2, dtype=torch.int64)
    for name in sorted(shards):
        total += _checksum(shards[name].reshape(-1).view(torch.uint8), 0)
    return total


def _buckets(model, bucket_bytes: int) -> List[List[Any]]:
    buckets, current, size = [], [], 0
    for spec in model.tensors:
        if current and size + spec.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    return buckets + ([current] if current else [])


def _buffer(cache: Dict[Any, torch.Tensor], key: Any, size: int) -> torch.Tensor:
    """A uint8 buffer kept between repetitions (every method keeps its buffers, like Resharder)."""
    if key not in cache or cache[key].numel() < size:
        cache[key] = torch.empty(size, dtype=torch.uint8)
    return cache[key][:size]


def broadcast_all(model, gen: ParallelLayout, rank: int, full: Dict[str, torch.Tensor],
                  dst: Dict[str, torch.Tensor], cache: Dict[Any, torch.Tensor]) -> int:
    """Baseline (a): rank 0 broadcasts the full model in 64 MiB buckets; each rank slices."""
    tp = gen.coordinates(rank)["tp"]
    received = 0
    for bucket in _buckets(model, 64 * MiB):
        size = sum(s.nbytes for s in bucket)
        buffer = _buffer(cache, "bucket", size)
        if rank == 0:
            offset = 0
            for spec in bucket:
                buffer[offset:offset + spec.nbytes].copy_(full[spec.name].reshape(-1).view(torch.uint8))
                offset += spec.nbytes
        dist.broadcast(buffer, src=0)
        received += size if rank != 0 else 0
        offset = 0
        for spec in bucket:
            whole = buffer[offset:offset + spec.nbytes].view(spec.dtype).view(spec.shape)
            dst[spec.name].copy_(spec.shard(whole, gen.topology.tensor, tp))
            offset += spec.nbytes
    return received


def allgather_all(model, train: ParallelLayout, gen: ParallelLayout, rank: int,
                  src: Dict[str, torch.Tensor], dst: Dict[str, torch.Tensor], cache: Dict[Any, torch.Tensor]) -> int:
    """Baseline (b): all-gather every rank's training shards (the full model), rebuild, slice."""
    world = dist.get_world_size()
    names = [s.name for s in model.tensors]
    mine = [src[n].reshape(-1).view(torch.uint8) for n in names if n in src]
    size = torch.tensor([sum(t.numel() for t in mine)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    packed = _buffer(cache, "packed", longest)
    if mine:
        torch.cat(mine, out=packed[:int(size)])
    gathered = [_buffer(cache, ("gathered", r), longest) for r in range(world)]
    dist.all_gather(gathered, packed)
    stages = train.stage_map(model)
    offsets = {r: 0 for r in range(world)}
    shards: Dict[int, Dict[str, torch.Tensor]] = {r: {} for r in range(world)}
    for spec in model.tensors:       # where each tensor sits in each rank's packed buffer
        for r in range(world):
            c = train.coordinates(r)
            if c["pp"] == stages[spec.layer]:
                shape = spec.local_shape(train.topology.tensor, c["tp"])
                nbytes = spec.itemsize * math.prod(shape)
                shards[r][spec.name] = gathered[r][offsets[r]:offsets[r] + nbytes].view(spec.dtype).view(shape)
                offsets[r] += nbytes
    tp = gen.coordinates(rank)["tp"]
    for spec in model.tensors:
        whole = torch.empty(spec.shape, dtype=spec.dtype)
        for t in range(train.topology.tensor):
            holder = train.global_rank(t, stages[spec.layer], 0)
            local = shards[holder][spec.name]
            if spec.tp_dim is None:
                whole.copy_(local)
                continue
            for g0, g1, l0 in spec.pieces(train.topology.tensor, t):
                whole.narrow(spec.tp_dim, g0, g1 - g0).copy_(local.narrow(spec.tp_dim, l0, g1 - g0))
        dst[spec.name].copy_(spec.shard(whole, gen.topology.tensor, tp))
    return (world - 1) * longest


def bare_messages(resharder: Resharder) -> Callable[[], int]:
    """The ceiling of the plan's message pattern: this rank's messages (same peers, sizes, step
    order) from and into kept flat buffers, all posted at once, then waited for."""
    sends = {s: torch.zeros(m.wire_bytes, dtype=torch.uint8) for s, m in resharder.send_messages.items()}
    recvs = {s: torch.empty(m.wire_bytes, dtype=torch.uint8) for s, m in resharder.recv_messages.items()}

    def run() -> int:
        ops = []
        for step in resharder.steps:
            if step in recvs:
                ops.append(dist.P2POp(dist.irecv, recvs[step], resharder.recv_messages[step].peer))
            if step in sends:
                ops.append(dist.P2POp(dist.isend, sends[step], resharder.send_messages[step].peer))
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        return sum(t.numel() for t in recvs.values())

    return run


def _bandwidths(gpc, rank: int, world: int, nbytes: int, reps: int) -> Dict[str, float]:
    """busbw of all_reduce, and the pairwise send/recv busbw as ``pgroups nettest`` measures a
    pair round (rank r with r xor world/2, all pairs at once): median and slowest pair."""
    from pgroups.nettest import diagnosis, metrics
    from pgroups.testing.nettest_faults import ActiveFaults
    from pgroups.nettest.bench import Bench
    from pgroups.nettest.control import Coordinator

    data = torch.ones(nbytes // 4, dtype=torch.float32)
    ar = statistics.median(_timed(lambda: dist.all_reduce(data)) for _ in range(reps))
    coordinator = Coordinator.from_default_group(900.0, gpc.get_hostnames())
    bench = Bench(torch.device("cpu"), coordinator, ActiveFaults(), 900.0, warmup=1, iters=reps)
    partner = rank ^ (world // 2)
    dist.barrier()
    record = bench.measure_pair(partner, rank, nbytes, repeats=2)
    mine = torch.tensor(record["times"] + [record["op_best"]], dtype=torch.float64)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    records = [dict(record, rank=r, times=t[:-1].tolist(), op_best=float(t[-1])) for r, t in enumerate(everyone)]
    pairs = []
    for low in range(world):
        if low < low ^ (world // 2):
            both = [records[low], records[low ^ (world // 2)]]
            m = diagnosis.aggregate(f"pair{low}", 2, both)
            pairs.append(metrics.busbw("sendrecv", 2, m.size_bytes, m.time_s))
    return {"allreduce_busbw": nbytes / ar * 2 * (world - 1) / world / 1e9,
            "sendrecv": statistics.median(pairs), "sendrecv_min": min(pairs)}


def _p2p_vs_broadcast(gpc, rank: int, nbytes: int, reps: int) -> Dict[str, float]:
    """One sender to 1 and to 3 receivers over existing groups (pipe: pairs, tensor: fours):
    batched point-to-point vs broadcast. Returns receive GB/s per receiver."""
    from pgroups.modes import ParallelMode

    result = {}
    for label, mode in (("1->1", ParallelMode.PIPELINE), ("1->3", ParallelMode.TENSOR)):
        members, group = gpc.get_ranks_in_group(mode), gpc.get_group(mode)
        root = members[0]
        buffer = torch.ones(nbytes, dtype=torch.uint8)

        def p2p():
            ops = ([dist.P2POp(dist.isend, buffer, r) for r in members[1:]] if rank == root
                   else [dist.P2POp(dist.irecv, buffer, root)])
            for work in dist.batch_isend_irecv(ops):
                work.wait()

        t_p2p = statistics.median(_timed(p2p) for _ in range(reps))
        t_bcast = statistics.median(_timed(lambda: dist.broadcast(buffer, root, group=group)) for _ in range(reps))
        result[f"{label} p2p"] = nbytes / t_p2p / 1e9
        result[f"{label} broadcast"] = nbytes / t_bcast / 1e9
    return result


def bench_worker(size_mb: int, reps: int, bucket_mb: int) -> Dict[str, Any]:
    from pgroups import gpc

    # one intra-op thread per rank, as one GPU per rank: OMP_NUM_THREADS in the child's environment
    # comes after torch was imported (by unpickling this function), too late for torch's thread
    # pool, and 8 ranks x 2 spinning OpenMP threads on 2 cores inflated every copy's CPU time
    torch.set_num_threads(1)

    gpc.init_from_config({"parallel": {"tensor": 4, "pipeline": 2}, "backend": "gloo", "timeout_s": 900})
    rank, world = gpc.get_global_rank(), dist.get_world_size()
    model = synthetic_model(size_mb)
    train = ParallelLayout.create(gpc.topology, stages="balanced")
    gen = ParallelLayout.create(Topology.create(world, 2, 1))
    started = time.perf_counter()
    plan = plan_reshard(train, gen, model, gpc.get_hostnames())
    plan_seconds = time.perf_counter() - started
    src = cut_shards(train, model, rank, lambda n: full_tensor(model, n))
    dst = empty_shards(gen, model, rank)
    bucket = bucket_mb * MiB
    resharder, small_buckets = Resharder(plan, bucket_bytes=bucket), Resharder(plan, bucket_bytes=MiB)
    streaming = Resharder(plan, bucket_bytes=bucket, atomic=False, max_staging_bytes=4 * bucket)
    fp8 = {s.name: torch.float8_e4m3fn for s in model.tensors if len(s.shape) >= 2}
    quantizing = Resharder(plan, bucket_bytes=bucket, atomic=False, max_staging_bytes=8 * bucket, dst_dtypes=fp8)
    fp8_dst = quantizing.destination_shards()
    full = {s.name: full_tensor(model, s.name) for s in model.tensors} if rank == 0 else {}
    bcast_cache: Dict[Any, torch.Tensor] = {}
    gather_cache: Dict[Any, torch.Tensor] = {}
    methods: Dict[str, Callable[[], int]] = {
        "reshard": lambda: resharder.run(src, dst).bytes_received,
        "reshard, streaming": lambda: streaming.run(src, dst).bytes_received,
        "reshard, streaming, bf16 -> fp8": lambda: quantizing.run(src, fp8_dst).bytes_received,
        "reshard, 1 MiB buckets": lambda: small_buckets.run(src, dst).bytes_received,
        "reshard, one-shot execute_plan (fresh staging)":
            lambda: execute_plan(plan, src, dst, bucket_bytes=bucket_mb * MiB).bytes_received,
        "same messages, bare send/recv (ceiling)": bare_messages(resharder),
        "broadcast-all": lambda: broadcast_all(model, gen, rank, full, dst, bcast_cache),
        "all-gather": lambda: allgather_all(model, train, gen, rank, src, dst, gather_cache),
    }
    seconds: Dict[str, List[float]] = {label: [] for label in methods}
    cpu: Dict[str, List[float]] = {label: [] for label in methods}
    received: Dict[str, int] = {}
    fingerprints: Dict[str, torch.Tensor] = {}
    # one untimed warm-up each (first-touch page faults, connection set-up), then rounds that
    # interleave the methods, so load changes on this shared machine hit every method alike
    for round_index in range(reps + 1):
        for label, method in methods.items():
            for t in dst.values():
                t.zero_()
            box: Dict[str, int] = {}
            used = time.process_time()
            elapsed = _timed(lambda: box.setdefault("bytes", method()))
            used = torch.tensor([time.process_time() - used], dtype=torch.float64)
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
            if round_index:
                seconds[label].append(elapsed)
                cpu[label].append(float(used))
            received[label] = box["bytes"]
            if "fp8" not in label and "bare" not in label:
                fingerprints[label] = _fingerprint(dst)
    rows: Dict[str, Dict[str, float]] = {}
    for label in methods:
        most = torch.tensor([received[label]], dtype=torch.int64)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        rows[label] = {"seconds": statistics.median(seconds[label]), "cpu": statistics.median(cpu[label]),
                       "bytes": int(most)}
    same = all(torch.equal(fingerprints["reshard"], f) for f in fingerprints.values())
    for cache in (full, bcast_cache, gather_cache):
        cache.clear()
    staging = {"reshard": resharder.staging_bytes, "reshard, streaming": streaming.staging_bytes,
               "reshard, streaming, bf16 -> fp8": quantizing.staging_bytes}
    most_staging = torch.tensor([staging[k] for k in staging], dtype=torch.int64)
    dist.all_reduce(most_staging, op=dist.ReduceOp.MAX)
    for r in (resharder, small_buckets, streaming, quantizing):
        r.release()
    fp8_dst.clear()
    gpc_hosts = gpc.get_hostnames()
    bandwidth = _bandwidths(gpc, rank, world, 64 * MiB, reps)
    transport = _p2p_vs_broadcast(gpc, rank, 64 * MiB, reps)
    gpc.destroy()
    return {"rows": rows, "same": same, "staging": dict(zip(staging, most_staging.tolist())),
            "hosts": list(gpc_hosts),
            "bandwidth": bandwidth, "transport": transport,
            "model_bytes": model.nbytes, "tensors": len(model.tensors), "plan_seconds": plan_seconds,
            "steps": plan.num_steps, "lower_bound_max": max(r.lower_bound_bytes for r in plan.receivers),
            "ratio": plan.ratio, "load": (plan.sender_load_max, plan.sender_load_mean)}


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=8)
    add_markdown_argument(parser)
    args = parser.parse_args(argv)
    report = Report("reshard", argv, markdown_path(parser, args), script=Path(__file__).name)
    outcomes = run_local(args.nproc, bench_worker, (args.size_mb, args.reps, args.bucket_mb), timeout_s=3000,
                         env={"OMP_NUM_THREADS": "1"})
    bad = [o for o in outcomes if not o.ok]
    if bad:
        for o in bad:
            print(f"rank {o.rank}: {o.error}", file=sys.stderr)
        return 1
    r = outcomes[0].value
    report.note(f"world {args.nproc} gloo, model {r['model_bytes'] / MiB:.0f} MiB bf16 ({r['tensors']} tensors); "
                f"tensor 4 x pipeline 2 (balanced stages) -> tensor 2 x data 4, colocated; median of {args.reps} "
                f"interleaved rounds")
    report.note(f"plan: {r['plan_seconds'] * 1e3:.0f} ms, {r['steps']} steps, ratio {r['ratio']:.3f}, sender load "
                f"max/mean {r['load'][0] / r['load'][1]:.2f}; all methods give identical shards: {r['same']}")
    base, bw = r["rows"]["reshard"], r["bandwidth"]
    bare = r["rows"]["same messages, bare send/recv (ceiling)"]
    table = report.table("", ["method", "wall s (slowest rank)", "CPU s (max rank)", "MiB received (max rank)",
                              "time / reshard", "GB/s per receiver", "/ pairwise send/recv", "/ same messages bare",
                              "staging MiB (max rank)"])
    ceiling = bare["bytes"] / bare["seconds"] / 1e9
    for label, row in r["rows"].items():
        eff = row["bytes"] / row["seconds"] / 1e9
        staging = f"{r['staging'][label] / MiB:.0f}" if label in r["staging"] else "-"
        table.add(label, f"{row['seconds']:.2f}", f"{row['cpu']:.2f}", f"{row['bytes'] / MiB:.0f}",
                  f"{row['seconds'] / base['seconds']:.2f}x", f"{eff:.2f}", f"{eff / bw['sendrecv']:.2f}x",
                  f"{eff / ceiling:.2f}x", staging)
    report.note(f"same run, 64 MiB messages: pairwise send/recv busbw (nettest's pair method, 4 pairs at once) median "
                f"{bw['sendrecv']:.2f} GB/s, slowest pair {bw['sendrecv_min']:.2f}; all_reduce busbw "
                f"{bw['allreduce_busbw']:.2f} GB/s")
    t = r["transport"]
    report.note(f"transport, 64 MiB, GB/s per receiver: 1->1 p2p {t['1->1 p2p']:.2f} vs broadcast "
                f"{t['1->1 broadcast']:.2f}; 1->3 p2p {t['1->3 p2p']:.2f} vs broadcast {t['1->3 broadcast']:.2f}")
    _report_simulated(report, r, args)
    report.finish()
    return 0 if r["same"] else 1


def _report_simulated(report: Report, r: Dict[str, Any], args: argparse.Namespace) -> None:
    """The simulator (:mod:`pgroups.reshard.plan`) on this run's plan, next to the measured times:
    gloo semantics, one host, every rank's intra-host port at the pairwise send/recv busbw
    measured in this run (all pairs at once), no latency."""
    from pgroups.reshard.plan import Network, rank_rounds, simulate

    world = args.nproc
    plan = plan_reshard(ParallelLayout.create(Topology.create(world, 4, 2), stages="balanced"),
                        ParallelLayout.create(Topology.create(world, 2, 1)), synthetic_model(args.size_mb), r["hosts"])
    busbw = r["bandwidth"]["sendrecv"] * 1e9
    net = Network(ranks_per_host=world, nics_per_host=1, intra_bw=busbw)
    rows = {"reshard": simulate(rank_rounds(plan, args.bucket_mb * MiB), net, "gloo"),
            # bare: every message posted at once, from and into preallocated buffers (no rings)
            "same messages, bare send/recv (ceiling)": simulate(rank_rounds(plan, 1 << 62), net, "gloo")}
    table = report.table(f"simulated (pgroups.reshard.plan, gloo semantics, one host, intra-host port "
                         f"{busbw / 1e9:.2f} GB/s per rank each way = this run's pairwise busbw, latency 0): lower "
                         f"bound {rows['reshard'].lower_bound_s:.3f} s",
                         ["method", "simulated s", "measured s", "measured / simulated"])
    for label, result in rows.items():
        measured = r["rows"][label]["seconds"]
        table.add(label, f"{result.makespan_s:.3f}", f"{measured:.3f}", f"{measured / result.makespan_s:.2f}")


if __name__ == "__main__":
    sys.exit(main())
