"""Several models in one job at world 16,384 (fake backend): creation calls and communicators per
rank, ours against building each model's groups Megatron-style.

    python bench/bench_models.py                  # world 16384, ranks 0, 8191, 9000, 16383
    python bench/bench_models.py --world 4096
    python bench/bench_models.py --markdown docs/models.md   # also rewrite its section there

The config is RLHF-shaped: an actor tp8 x pp4 x dp on the first half of the world, its rollout
engine tp4 x dp colocated on the same ranks, a reward model and a reference model tp8 x dp on a
quarter each. Baseline (Megatron-style, one HyperCommGrid per model): every rank of the world
enters ``new_group`` for every group of every model's modes (``new_subgroups_by_enumeration``),
device groups only. Ours: members-only creation (strategy ``local``), device groups only
(``cpu_groups: lazy``, as by default), identical groups shared across models. Deterministic
counts, and the median init time of 3 runs on this machine (noisy; ratios in one run).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch.distributed as dist

from pgroups.config import load_config
from pgroups.context import ParallelContext
from pgroups.model_context import plan_models
from pgroups.initializer import default_registry

from _report import Report, add_markdown_argument, markdown_path  # bench/ is the script's directory


def rlhf_config(world: int) -> dict:
    half, quarter = world // 2, world // 4
    return {"models": {
        "actor": {"parallel": {"tensor": 8, "pipeline": 4}, "ranks": f"0-{half - 1}"},
        "rollout": {"parallel": {"tensor": 4}, "ranks": f"0-{half - 1}"},
        "reward": {"parallel": {"tensor": 8}, "ranks": f"{half}-{half + quarter - 1}"},
        "reference": {"parallel": {"tensor": 8}, "ranks": f"{half + quarter}-{world - 1}"}},
        "strategy": "local", "cpu_groups": "lazy"}


def megatron_style(config: dict, world: int) -> Tuple[int, float]:
    """Every rank enters every group of every model (global excluded: the default group)."""
    calls, start = 0, time.perf_counter()
    for _, (_, topology, inits, _) in plan_models(default_registry, load_config(config), world).items():
        for mode, init in inits.items():
            if mode == "global":
                continue
            for ranks in init.rank_groups(topology):
                dist.new_group(ranks)
                calls += 1
    return calls, time.perf_counter() - start


def ours(config: dict) -> Tuple[int, int, float]:
    ctx = ParallelContext()
    start = time.perf_counter()
    ctx.init_from_config(config)
    elapsed = time.perf_counter() - start
    groups = {id(state.group) for name in ctx.model_names for state in ctx.model(name)._modes.values()
              if state.group is not None}
    calls = ctx.backend.calls + ctx.backend.placeholders
    ctx.backend.destroy()
    ctx._reset()
    return calls, len(groups), elapsed


def measure(world: int, rank: int, repeats: int) -> Dict[str, object]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    config = rlhf_config(world)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        runs = [ours(config) for _ in range(repeats)]
        base = [megatron_style(config, world) for _ in range(repeats)]
    finally:
        dist.destroy_process_group()
    return {"rank": rank, "ours_calls": runs[0][0], "communicators": runs[0][1],
            "ours_s": statistics.median(r[2] for r in runs), "base_calls": base[0][0],
            "base_s": statistics.median(b[1] for b in base)}


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    add_markdown_argument(parser)
    args = parser.parse_args(argv)
    report = Report("models", argv, markdown_path(parser, args), script=Path(__file__).name)
    world = args.world
    ranks = [0, world // 2 - 1, world // 2 + world // 16, world - 1]
    table = report.table(f"fake backend, world {world}: actor tp8 x pp4 and rollout tp4 on ranks 0-{world // 2 - 1}, "
                         f"reward and reference tp8 on a quarter each (device groups; median of {args.repeats})",
                         ["rank", "ours calls", "communicators", "ours s", "megatron calls", "megatron s",
                          "calls ratio", "time ratio"], align="r" * 8)
    for rank in ranks:
        r = measure(world, rank, args.repeats)
        table.add(r["rank"], r["ours_calls"], r["communicators"], f"{r['ours_s']:.4f}", r["base_calls"],
                  f"{r['base_s']:.4f}", f"{r['ours_calls'] / r['base_calls']:.5f}x", f"{r['ours_s'] / r['base_s']:.4f}x")
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
