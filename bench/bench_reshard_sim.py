"""Simulated weight-sync time at cluster scale: the real plan and the executor's real schedule
(:mod:`pgroups.reshard.plan`) on a stated network, next to the NIC lower bound.

    .venv/bin/python bench/bench_reshard_sim.py                       # worlds 1024, semantics nccl
    .venv/bin/python bench/bench_reshard_sim.py --worlds 1024 4096 --pairs dense-tp4 moe --nics 4

Pairs (RLHF-shaped; training → inference):
- ``dense-tp4``: a 70B-shaped dense model (hidden 8192, GQA 64/8, ffn 28672, vocab 128256, bf16),
  tensor 8 x pipeline 4 x data → tensor 4 x data, colocated (same ranks);
- ``dense-tp8``: the same → tensor 8 x data, colocated;
- ``dense-disjoint``: tensor 8 x pipeline 4 on the first half of the ranks → tensor 4 on the other half;
- ``moe``: a MoE model (hidden 2048, 128 experts of ffn 768 per layer, GQA 32/4, vocab 151936, bf16),
  tensor 2 x pipeline 4, expert 8 x expert-tensor 1 → tensor 4, expert 16 x expert-tensor 1, colocated.

``--layers-per-stage`` keeps that many decoder layers per training stage (default: all — 20 of
the dense model's 80, 12 of the MoE's 48): every layer of a stage moves between the same ranks,
so fewer layers keep the peer pattern and scale every message down (and the run time: the plan
has O(world x layers) transfers). The bound and the makespan are both reported for the model
actually simulated. Network: ``--ranks-per-host`` ranks (8) per host, ``--nics`` NICs per host
of ``--nic-gbit`` Gb/s each way, rank-to-NIC affinity in contiguous blocks, intra-host ports of
``--intra-gbs`` GB/s per rank each way, ``--latency-us`` per message; 64 MiB buckets, atomic
staging, the executor's in-flight limit and rings (``--all-at-once``: a what-if with every
operation posted at once — no limit, unbounded rings; under ``gloo`` semantics every message then
moves as soon as both ends are posted, i.e. at once). Columns: makespan and lower bound (the busiest
NIC port's bytes / its bandwidth, or the intra-host one's), their ratio, how many of the NICs that
could carry bytes did (out / in), the busiest NIC's utilisation and the mean over NICs that
carried bytes, per-host NIC bytes max/mean (out, in), point-to-point messages, and the seconds
the plan and the simulation took on this machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgroups.reshard import ModelSpec, ParallelLayout, llama_like, plan_reshard  # noqa: E402
from pgroups.reshard.plan import Network, SimResult, rank_rounds, simulate  # noqa: E402
from pgroups.reshard.plan.network import max_over_mean  # noqa: E402
from pgroups.topology import Topology  # noqa: E402

MiB = 1 << 20
MOE_ORDER = "tp-cp-ep-dp-pp"   # Megatron-Core's default order


def dense_70b(layers: int = 80) -> ModelSpec:
    return llama_like(hidden=8192, layers=layers, heads=64, kv_heads=8, ffn=28672, vocab=128256, name="dense-70b-shapes")


def moe_model(layers: int = 48) -> ModelSpec:
    return llama_like(hidden=2048, layers=layers, heads=32, kv_heads=4, ffn=768, vocab=151936, experts=128,
                      name="moe-128x768")


def _layout(world: int, ranks, **sizes) -> ParallelLayout:
    return ParallelLayout.create(Topology.create(len(ranks), **sizes), list(ranks))


def pairs(world: int, layers_per_stage: int) -> Dict[str, Tuple[Callable[[], ModelSpec], ParallelLayout, ParallelLayout]]:
    """``{name: (model, training layout, inference layout)}`` at ``world`` ranks."""
    dense = lambda: dense_70b(4 * layers_per_stage if layers_per_stage else 80)  # noqa: E731
    moe = lambda: moe_model(4 * layers_per_stage if layers_per_stage else 48)  # noqa: E731
    every, first, second = range(world), range(world // 2), range(world // 2, world)
    return {
        "dense-tp4": (dense, _layout(world, every, tensor=8, pipeline=4), _layout(world, every, tensor=4)),
        "dense-tp8": (dense, _layout(world, every, tensor=8, pipeline=4), _layout(world, every, tensor=8)),
        "dense-disjoint": (dense, _layout(world, first, tensor=8, pipeline=4), _layout(world, second, tensor=4)),
        "moe": (moe, _layout(world, every, tensor=2, pipeline=4, expert=8, expert_tensor=1, order=MOE_ORDER),
                _layout(world, every, tensor=4, expert=16, expert_tensor=1, order=MOE_ORDER)),
    }


def row(name: str, world: int, result: SimResult, network: Network, plan_s: float, sim_s: float) -> str:
    hosts = world // network.ranks_per_host
    util = result.nic_utilisation()
    used_out = sum(1 for p in util if p[0] == "nic_out")
    used_in = len(util) - used_out
    per_host = result.host_nic_bytes()
    nics = hosts * network.nics_per_host
    return (f"| {name} | {world} | {result.semantics} | {result.makespan_s:.3f} | {result.bound.nic_s:.3f} "
            f"| {result.bound.intra_s:.3f} | {result.ratio:.2f} | {used_out}/{nics} out, {used_in}/{nics} in "
            f"| {max(util.values(), default=0):.2f} / {statistics.mean(util.values()) if util else 0:.2f} "
            f"| {max_over_mean(b[0] for b in per_host.values()):.2f}, {max_over_mean(b[1] for b in per_host.values()):.2f} "
            f"| {result.messages:,} | {plan_s:.0f} + {sim_s:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1024])
    parser.add_argument("--pairs", nargs="+", default=["dense-tp4", "dense-tp8", "dense-disjoint", "moe"])
    parser.add_argument("--semantics", nargs="+", default=["nccl"], choices=["nccl", "gloo"])
    parser.add_argument("--layers-per-stage", type=int, default=0, help="decoder layers per training stage (0: all)")
    parser.add_argument("--ranks-per-host", type=int, default=8)
    parser.add_argument("--nics", type=int, default=8)
    parser.add_argument("--nic-gbit", type=float, default=400.0)
    parser.add_argument("--intra-gbs", type=float, default=450.0)
    parser.add_argument("--latency-us", type=float, default=5.0)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--all-at-once", action="store_true",
                        help="what-if: every operation posted at once (no in-flight limit, unbounded rings)")
    args = parser.parse_args()
    network = Network(ranks_per_host=args.ranks_per_host, nics_per_host=args.nics, nic_bw=args.nic_gbit / 8 * 1e9,
                      intra_bw=args.intra_gbs * 1e9, latency_s=args.latency_us * 1e-6)
    print(f"network: {args.ranks_per_host} ranks/host, {args.nics} NICs/host x {args.nic_gbit:g} Gb/s each way, "
          f"intra-host {args.intra_gbs:g} GB/s per rank each way, {args.latency_us:g} us per message; "
          f"{args.bucket_mb} MiB buckets, atomic staging; load average {os.getloadavg()[0]:.1f}")
    print("| pair | world | semantics | makespan s | NIC bound s | intra bound s | makespan / bound "
          "| NICs carrying bytes | NIC utilisation max / mean | per-host NIC bytes max/mean (out, in) "
          "| messages | plan + sim s (this machine) |")
    print("|---|---:|---|---:|---:|---:|---:|---|---|---|---:|---:|")
    for world in args.worlds:
        hosts = [f"node{r // args.ranks_per_host}" for r in range(world)]
        for name, (make_model, src, dst) in pairs(world, args.layers_per_stage).items():
            if name not in args.pairs:
                continue
            started = time.perf_counter()
            plan = plan_reshard(src, dst, make_model(), hosts)
            schedule = rank_rounds(plan, args.bucket_mb * MiB)
            del plan
            plan_s = time.perf_counter() - started
            for semantics in args.semantics:
                started = time.perf_counter()
                unbounded = dict(limit=1 << 40, send_ring=1 << 40, recv_ring=1 << 40) if args.all_at_once else {}
                result = simulate(schedule, network, semantics, **unbounded)
                label = f"{name} (all at once)" if args.all_at_once else name
                print(row(label, world, result, network, plan_s, time.perf_counter() - started), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
