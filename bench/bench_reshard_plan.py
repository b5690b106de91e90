"""Plan cost: one rank's share of a reshard plan vs the whole plan, up to world 16,384.

Every rank needs only what it sends and receives (``plan_share``); before, every rank planned
the whole world (6.6 s at world 4096 with that global planner, measured before the rework). Next to it,
the whole plan (``plan_reshard``, what ``pgroups reshard-plan`` builds offline: every
destination's receives, worked out once per tensor kind) up to ``--full-max``, with its
transfer count and cost per transfer. Also timed: the 64-bit plan digest every rank computes
for the agreement.

Model: a Llama-3-8B-shaped decoder (32 layers) plus 5 small tensors = 200 tensors. Layouts:
training tensor 8 x pipeline 4 x data W/32 → inference tensor 4 x data W/4, colocated, 8
ranks per host. Shares are timed for ``--ranks`` spread over the world (first call of a
process included: that is what a rank pays), median reported.

    .venv/bin/python bench/bench_reshard_plan.py [--worlds 1024 4096 16384] [--full-max 4096] [--markdown docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import Report, add_markdown_argument, markdown_path  # noqa: E402

from pgroups.reshard import (ModelSpec, ParallelLayout, TensorSpec, llama_like, plan_digest,  # noqa: E402
                             plan_reshard, plan_share)
from pgroups.topology import Topology  # noqa: E402


def model_200() -> ModelSpec:
    base = llama_like(layers=32)
    extra = [TensorSpec.create(f"layers.{i}.attn.scale", (128,), "float32", None, i) for i in range(5)]
    return ModelSpec.create(list(base.tensors) + extra, base.num_layers, "llama-3-8b-shapes+5")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--full-max", type=int, default=4096, help="largest world to build the whole plan at")
    parser.add_argument("--ranks", type=int, default=7, help="ranks whose share is timed per world")
    add_markdown_argument(parser)
    args = parser.parse_args(argv)
    report = Report("reshard-plan", argv, markdown_path(parser, args), script=Path(__file__).name)
    model = model_200()
    report.note(f"model: {len(model.tensors)} tensors; training tp8 x pp4 → inference tp4, colocated, 8 ranks/host; "
                "baseline: the previous global planner built the whole plan on every rank, 6.6 s at world 4096 "
                "(measured before the rework)")
    table = report.table("", ["world", "share median s", "share max s", "transfers/rank", "digest s", "whole plan s",
                              "whole transfers", "us/transfer", "whole / share"], stream=True)
    for world in args.worlds:
        src = ParallelLayout.create(Topology.create(world, 8, 4))
        dst = ParallelLayout.create(Topology.create(world, 4, 1))
        hosts = [f"node{r // 8}" for r in range(world)]
        ranks = sorted({(world - 1) * i // max(1, args.ranks - 1) for i in range(args.ranks)})
        times, counts = [], []
        for rank in ranks:
            started = time.perf_counter()
            share = plan_share(src, dst, model, rank, hosts)
            times.append(time.perf_counter() - started)
            counts.append(len(share.sends) + len(share.recvs) + len(share.copies))
        started = time.perf_counter()
        plan_digest(src, dst, model, hosts)
        digest_s = time.perf_counter() - started
        whole = count = per = ratio = "-"
        if world <= args.full_max:
            started = time.perf_counter()
            plan = plan_reshard(src, dst, model, hosts)
            whole_s = time.perf_counter() - started
            whole, count = f"{whole_s:.2f}", f"{len(plan.transfers):,}"
            per = f"{whole_s / len(plan.transfers) * 1e6:.1f}"
            ratio = f"{whole_s / statistics.median(times):.0f}x"
            del plan
        table.add(world, statistics.median(times), max(times), int(statistics.median(counts)), digest_s,
                  whole, count, per, ratio)
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
