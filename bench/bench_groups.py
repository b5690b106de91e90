"""Group-initialization cost per rank: ours (per strategy) vs the classic InternLM approach.

The classic approach (the baseline) has every rank call ``new_group`` for every group of every
mode, plus a gloo twin for each. We count this rank's group-creation calls (deterministic) and
time the creation (noisy: medians, and ratios within one run).

    python bench/bench_groups.py                 # fake backend at 1024/4096/16384, gloo at 4/8/16
    python bench/bench_groups.py --fake-only --worlds 1024 4096
    python bench/bench_groups.py --markdown docs/benchmarks.md   # also rewrite its section there

Two layouts on the fake backend: the classic one (tensor 8, pipeline 4) and an N-axis one
(tensor 8, context 2, expert 8, pipeline 4, order tp-cp-ep-dp-pp, with *every* built-in mode
and Megatron's combinations built). The baseline builds the same modes the classic way.

Fake backend: one process plays one rank (a sample of ranks per world). Real gloo: N local
processes on this machine; rank 0's figures are reported. The ``split`` strategy needs NCCL
with a device-bound default group and cannot run here; by construction it makes one
``split_group`` call per mode, like ``local``'s one ``new_group`` per mode.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch.distributed as dist

from pgroups.config import load_config
from pgroups.context import ParallelContext, make_initializers
from pgroups.initializer import default_registry
from pgroups.launch import from_environment, init_distributed
from pgroups.modes import BUILTIN_MODE_NAMES

from _report import Report, add_markdown_argument, markdown_path  # bench/ is the script's directory

CONFIG = {"parallel": {"tensor": 8, "pipeline": 4, "zero1": 4, "nettest": 32},
          "groups": "eager", "cpu_groups": "eager", "timeout_s": 300}
#: Every built-in mode, and the combinations Megatron-Core builds.
NAXIS_CONFIG = {"parallel": {"tensor": 8, "context": 2, "expert": 8, "pipeline": 4, "nettest": 32,
                             "order": "tp-cp-ep-dp-pp",
                             "modes": list(BUILTIN_MODE_NAMES) + ["tp-cp", "dp-cp", "tp-dp-cp", "tp-ep",
                                                                  "tp-ep-pp"]},
                "groups": "eager", "cpu_groups": "eager", "timeout_s": 300}
LAYOUTS = {"classic": (CONFIG, "tensor 8, pipeline 4, zero1 4, nettest 32"),
           "n-axis": (NAXIS_CONFIG, "tensor 8, context 2, expert 8, pipeline 4, every built-in mode "
                                    f"({len(BUILTIN_MODE_NAMES)}) + tp-cp, dp-cp, tp-dp-cp, tp-ep, tp-ep-pp")}
SMALL_CONFIG = {"parallel": {"tensor": 2, "pipeline": 2, "nettest": 4},
                "groups": "eager", "cpu_groups": "eager", "timeout_s": 300}


def classic_init(config: dict, twin_backend: str) -> Tuple[int, float]:
    """The baseline: every rank creates every group of every mode, plus a gloo twin of each."""
    cfg = load_config(config)
    topology = cfg.topology(dist.get_world_size())
    modes = [m for m in make_initializers(default_registry, cfg, topology) if m != "global"]
    calls, start = 0, time.perf_counter()
    for mode in modes:  # global is the default group in both approaches
        for ranks in topology.groups(mode):
            dist.new_group(ranks)
            dist.new_group(ranks, backend=twin_backend)
            calls += 2
    return calls, time.perf_counter() - start


def ours_init(config: dict, strategy: str) -> Tuple[int, float]:
    ctx = ParallelContext()
    start = time.perf_counter()
    ctx.init_from_config({**config, "strategy": strategy})
    elapsed = time.perf_counter() - start
    calls = ctx.backend.calls + ctx.backend.placeholders  # placeholders are new_group calls too
    ctx.backend.destroy()
    ctx._reset()  # keep the default group: the next approach reuses it
    return calls, elapsed


APPROACHES = ("classic", "all", "local")


def measure_fake(world: int, rank: int, approach: str, repeats: int, config: dict = CONFIG) -> Tuple[int, float]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    times, calls = [], 0
    for _ in range(repeats):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            if approach == "classic":
                calls, elapsed = classic_init(config, "fake")
            else:
                calls, elapsed = ours_init(config, approach)
        finally:
            dist.destroy_process_group()
        times.append(elapsed)
    return calls, statistics.median(times)


def gloo_worker(approach: str) -> Tuple[int, float]:
    init_distributed(from_environment(), "gloo", 300)
    try:
        if approach == "classic":
            return classic_init(SMALL_CONFIG, "gloo")
        return ours_init(SMALL_CONFIG, approach)
    finally:
        dist.destroy_process_group()


COLUMNS = ["world", "approach", "calls/rank", "init s", "calls vs classic", "time vs classic"]


def add_rows(table, rows: List[Dict[str, object]]) -> None:
    for row in rows:
        table.add(row["world"], row["approach"], row["calls"], f"{row['seconds']:.4f}", f"{row['calls_ratio']:.4f}x",
                  f"{row['time_ratio']:.3f}x")


def with_ratios(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    base = {r["world"]: r for r in rows if r["approach"] == "classic"}
    for r in rows:
        b = base[r["world"]]
        r["calls_ratio"] = r["calls"] / b["calls"]
        r["time_ratio"] = r["seconds"] / b["seconds"]
    return rows


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--gloo-worlds", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fake-only", action="store_true")
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    add_markdown_argument(parser)
    args = parser.parse_args(argv)
    # the N-axis layout alone has a section of its own (it is run on its own, without gloo)
    section = "groups-n-axis" if args.layouts == ["n-axis"] else "groups"
    report = Report(section, argv, markdown_path(parser, args), script=Path(__file__).name)

    for name in args.layouts:
        config, what = LAYOUTS[name]
        rows = []
        for world in args.worlds:
            for approach in APPROACHES:
                samples = [measure_fake(world, rank, approach, args.repeats, config)
                           for rank in (0, world // 2 + 3)]
                rows.append({"world": world, "approach": approach, "calls": max(c for c, _ in samples),
                             "seconds": statistics.median(t for _, t in samples)})
        add_rows(report.table(f"fake backend, {name} layout ({what}; device + cpu twins; max calls over ranks 0 "
                              "and world/2+3, median time)", COLUMNS, "rlrrrr"), with_ratios(rows))
    if not args.fake_only:
        from pgroups.spawn import run_local

        rows = []
        for world in args.gloo_worlds:
            for approach in APPROACHES:
                outcomes = run_local(world, gloo_worker, (approach,), timeout_s=600)
                bad = [o for o in outcomes if not o.ok]
                if bad:
                    print(f"world {world} {approach}: {bad[0].error}", file=sys.stderr)
                    return 1
                rows.append({"world": world, "approach": approach, "calls": max(o.value[0] for o in outcomes),
                             "seconds": statistics.median(o.value[1] for o in outcomes)})
        add_rows(report.table("real gloo processes on this machine (tensor 2, pipeline 2, nettest 4; max calls over "
                              "ranks, median time over ranks)", COLUMNS, "rlrrrr"), with_ratios(rows))
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
