"""Simulated weight-sync time at cluster scale: the real plan and the executor's real schedule
(:mod:`pgroups.reshard.plan`) on a stated network, next to the NIC lower bound.

    .venv/bin/python bench/bench_reshard_sim.py                       # worlds 1024, semantics nccl
    .venv/bin/python bench/bench_reshard_sim.py --worlds 1024 4096 --pairs dense-tp4 moe --nics 4

Pairs (RLHF-shaped; training → inference): :mod:`pgroups.reshard.plan.scenarios` (``dense-tp4``,
``dense-tp8``, ``dense-disjoint``, ``moe``, ``moe-etp``).

``--layers-per-stage`` keeps that many decoder layers per training stage (default: all — 20 of
the dense model's 80, 12 of the MoE's 48): every layer of a stage moves between the same ranks,
so fewer layers keep the peer pattern and scale every message down (and the run time: the plan
has O(world x layers) transfers). The bound and the makespan are both reported for the model
actually simulated. Network: ``--ranks-per-host`` ranks (8) per host, ``--nics`` NICs per host
of ``--nic-gbit`` Gb/s each way, rank-to-NIC affinity in contiguous blocks, intra-host ports of
``--intra-gbs`` GB/s per rank each way, ``--latency-us`` per message; 64 MiB buckets, atomic staging, the executor's posting rule
(:func:`pgroups.reshard.wire.batches`: by default every rank posts its whole sync as one group;
``--cap-mb``: a batch buffers at most that many MiB each way, as ``max_staging_bytes`` sets it;
``--per-step``: one batch per step, as with a progress callback). Columns: makespan and lower bound (the busiest
NIC port's bytes / its bandwidth, or the intra-host one's), their ratio, the host bound (the
busiest host's NIC bytes / all its NICs' bandwidth: any spreading of the same host traffic over
its NICs) and the makespan over it, how many of the NICs that
could carry bytes did (out / in), the busiest NIC's utilisation and the mean over NICs that
carried bytes, per-host NIC bytes max/mean (out, in), point-to-point messages, and the seconds
the plan and the simulation took on this machine.

``--compare`` adds a table: resharding next to the naive syncs simulated on the same network and
model (:mod:`pgroups.reshard.plan.baselines`: rank-0 broadcast — gather on rank 0, then a chain
through every destination rank —, and all-gather within every source copy, then slice; both in
their fluid limit, which favours them).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import Report, add_markdown_argument, markdown_path  # noqa: E402  (bench/ is the script's directory)

from pgroups.reshard import plan_reshard  # noqa: E402
from pgroups.reshard.plan import Network, SimResult, rank_rounds, simulate  # noqa: E402
from pgroups.reshard.plan.network import max_over_mean  # noqa: E402
from pgroups.reshard.plan.baselines import allgather_schedule, broadcast_schedule, model_bytes  # noqa: E402
from pgroups.reshard.plan.scenarios import PAIRS, pairs  # noqa: E402

MiB = 1 << 20


COLUMNS = ["pair", "world", "semantics", "makespan s", "NIC bound s", "intra bound s", "makespan / bound",
           "host bound s", "makespan / host bound", "NICs carrying bytes", "NIC utilisation max / mean",
           "per-host NIC bytes max/mean (out, in)", "messages", "plan + sim s (this machine)"]
COMPARE_COLUMNS = ["pair", "world", "semantics", "model GB", "resharding s", "NIC bound s", "rank-0 broadcast s",
                   "all-gather, then slice s", "broadcast / resharding", "all-gather / resharding"]


def row(name: str, world: int, result: SimResult, network: Network, plan_s: float, sim_s: float) -> list:
    """One row of the main table (:data:`COLUMNS`)."""
    hosts = world // network.ranks_per_host
    util = result.nic_utilisation()
    used_out = sum(1 for p in util if p[0] == "nic_out")
    used_in = len(util) - used_out
    per_host = result.host_nic_bytes()
    nics = hosts * network.nics_per_host
    return [name, world, result.semantics, f"{result.makespan_s:.3f}", f"{result.bound.nic_s:.3f}",
            f"{result.bound.intra_s:.3f}", f"{result.ratio:.2f}", f"{result.host_bound_s:.3f}",
            f"{result.makespan_s / result.host_bound_s if result.host_bound_s else 1.0:.2f}",
            f"{used_out}/{nics} out, {used_in}/{nics} in",
            f"{max(util.values(), default=0):.2f} / {statistics.mean(util.values()) if util else 0:.2f}",
            f"{max_over_mean(b[0] for b in per_host.values()):.2f}, {max_over_mean(b[1] for b in per_host.values()):.2f}",
            f"{result.messages:,}", f"{plan_s:.0f} + {sim_s:.0f}"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1024])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=PAIRS)
    parser.add_argument("--semantics", nargs="+", default=["nccl"], choices=["nccl", "gloo"])
    parser.add_argument("--layers-per-stage", type=int, default=0, help="decoder layers per training stage (0: all)")
    parser.add_argument("--ranks-per-host", type=int, default=8)
    parser.add_argument("--nics", type=int, default=8)
    parser.add_argument("--nic-gbit", type=float, default=400.0)
    parser.add_argument("--intra-gbs", type=float, default=450.0)
    parser.add_argument("--latency-us", type=float, default=5.0)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--cap-mb", type=float, default=None,
                        help="a batch buffers at most this many MiB of packed sends and of received chunks")
    parser.add_argument("--per-step", action="store_true", help="one batch per step (as with a progress callback)")
    parser.add_argument("--compare", action="store_true",
                        help="also simulate the naive syncs (rank-0 broadcast; all-gather, then slice) on the "
                             "same network and print them next to resharding")
    add_markdown_argument(parser)
    args = parser.parse_args(argv)
    report = Report("reshard-sim", argv, markdown_path(parser, args), script=Path(__file__).name)
    network = Network(ranks_per_host=args.ranks_per_host, nics_per_host=args.nics, nic_bw=args.nic_gbit / 8 * 1e9,
                      intra_bw=args.intra_gbs * 1e9, latency_s=args.latency_us * 1e-6)
    report.note(f"network: {args.ranks_per_host} ranks/host, {args.nics} NICs/host x {args.nic_gbit:g} Gb/s each way, "
                f"intra-host {args.intra_gbs:g} GB/s per rank each way, {args.latency_us:g} us per message; "
                f"{args.bucket_mb} MiB buckets, atomic staging")
    table = report.table("", COLUMNS, "lrlrrrrrrlllrr", stream=True)
    compared = []
    for world in args.worlds:
        hosts = [f"node{r // args.ranks_per_host}" for r in range(world)]
        for name, (make_model, src, dst) in pairs(world, args.layers_per_stage).items():
            if name not in args.pairs:
                continue
            started = time.perf_counter()
            model = make_model()
            plan = plan_reshard(src, dst, model, hosts)
            schedule = rank_rounds(plan, args.bucket_mb * MiB)
            del plan
            plan_s = time.perf_counter() - started
            for semantics in args.semantics:
                started = time.perf_counter()
                cap = None if args.cap_mb is None else int(args.cap_mb * MiB)
                result = simulate(schedule, network, semantics, caps=None if cap is None else (cap, cap),
                                  per_step=args.per_step)
                label = name + (" (per step)" if args.per_step else "") + (f" (cap {args.cap_mb:g} MiB)" if cap else "")
                table.add(*row(label, world, result, network, plan_s, time.perf_counter() - started))
                if args.compare:
                    naive = [simulate(make(src, dst, model), network, semantics, per_step=True)
                             for make in (broadcast_schedule, allgather_schedule)]
                    compared.append((label, world, semantics, model_bytes(model), result, naive))
    if compared:
        compare = report.table("", COMPARE_COLUMNS, "lrlrrrrrrr")
        for label, world, semantics, nbytes, result, (bcast, gather) in compared:
            compare.add(label, world, semantics, f"{nbytes / 1e9:.2f}", f"{result.makespan_s:.3f}",
                        f"{result.lower_bound_s:.3f}", f"{bcast.makespan_s:.3f}", f"{gather.makespan_s:.3f}",
                        f"{bcast.makespan_s / result.makespan_s:.1f}", f"{gather.makespan_s / result.makespan_s:.1f}")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
