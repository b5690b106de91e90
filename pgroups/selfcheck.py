"""The main job: build every group of every mode and prove each one with a real collective.

Every rank all-reduces its global rank over its device group and its CPU group of each mode;
the result must equal the sum of the group's ranks. Failures are counted per mode and summed
over the world, and rank 0 returns the summary.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from .deadlines import wait_within
from .config import ConfigLike
from .context import ParallelContext
from .progress import NullProgress, Progress
from .ranks import format_ranks


def all_reduce_every_mode(ctx: ParallelContext) -> Dict[str, Dict[str, Any]]:
    """Run the all-reduce check on every built mode; return ``{mode: figures}`` (same on every rank).

    Figures: ``groups`` (count), ``group_size`` (this rank's), ``device_failures`` and
    ``cpu_failures`` (ranks whose sum was wrong, over the world), ``shares`` (mode whose
    communicator it reuses, or None). Collective over the world.
    """
    device = ctx.backend.device_for_tensors()
    modes = [m for m in ctx.modes]
    wrong = torch.zeros(2 * len(modes), dtype=torch.int64)
    for i, mode in enumerate(modes):
        if not ctx.is_member(mode):  # e.g. embedding: middle pipeline stages hold none
            continue
        ranks = ctx.get_ranks_in_group(mode)
        expected = sum(ranks)
        for j, (group, dev) in enumerate(((ctx.get_group(mode), device),
                                          (ctx.get_cpu_group(mode), torch.device("cpu")))):
            value = torch.tensor([ctx.get_global_rank()], dtype=torch.int64, device=dev)
            kind = "device" if j == 0 else "cpu"
            wait_within(dist.all_reduce(value, group=group, async_op=True), ctx.backend.timeout,
                        lambda exc, mode=mode, kind=kind, ranks=ranks: (
                            f"the {kind} all_reduce of mode {mode!r} with ranks {format_ranks(ranks)} timed out "
                            f"after {ctx.backend.timeout.total_seconds():g}s on rank {ctx.get_global_rank()}: "
                            "a peer never joined"), group)
            wrong[2 * i + j] = int(value.item() != expected)
    dist.all_reduce(wrong, group=ctx.get_cpu_group("global"))
    summary: Dict[str, Dict[str, Any]] = {}
    for i, mode in enumerate(modes):
        summary[mode] = {
            "groups": len(ctx.get_rank_groups(mode)),  # (the largest group: nettest's last may be partial)
            "group_size": max(len(g) for g in ctx.get_rank_groups(mode)),
            "device_failures": int(wrong[2 * i]),
            "cpu_failures": int(wrong[2 * i + 1]),
            "shares": ctx._modes[mode].shares_with,
        }
    return summary


def selfcheck_worker(config: ConfigLike, progress_started: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """One rank of ``pgroups run``: init from the environment, check, destroy. Rank 0 returns
    figures and, given ``progress_started`` (the command's start, a monotonic reading), prints
    progress lines on stderr."""
    shown = os.environ.get("RANK", "0") == "0" and progress_started is not None
    progress = Progress("pgroups run", started=progress_started) if shown else NullProgress()
    progress.update(f"rank 0: joining the rendezvous of {os.environ.get('WORLD_SIZE', '?')} ranks, "
                    "building the groups", force=True)
    ctx = ParallelContext()
    start = time.perf_counter()
    ctx.init_from_config(config)
    init_s = time.perf_counter() - start
    checked_all = False
    try:
        rank = ctx.get_global_rank()
        progress.update(f"groups built in {init_s:.1f}s; all-reducing over each", force=True)
        if ctx.model_names:  # each model is checked by its ranks; its first rank reports it
            summary = {}
            for name in ctx.model_names:
                model = ctx.model(name)
                if model.is_in_model():
                    checked = all_reduce_every_mode(model)
                    if rank == model.ranks[0]:
                        summary.update({f"{name}.{mode}": figures for mode, figures in checked.items()})
            layout = "models " + ", ".join(f"{n} ({ctx.model(n).topology.describe()})" for n in ctx.model_names)
        else:
            summary, layout = all_reduce_every_mode(ctx), ctx.topology.describe()
        result = {"modes": summary, "init_s": init_s, "calls": ctx.backend.calls,
                  "backend": ctx.backend.device_backend, "strategy": ctx.backend.strategy,
                  "layout": layout}
        checked_all = True
        progress.update("checked; destroying the groups", force=True)
        return result if rank == 0 or summary and ctx.model_names else None
    finally:
        ctx.destroy(sync=checked_all)  # after a failure a peer may be gone: no meeting


def merge_results(values: List[Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """One summary from the ranks' results: rank 0's, with every model's modes (each reported by
    its model's first rank) in rank order."""
    result = dict(values[0] or next(v for v in values if v))
    result["modes"] = {}
    for value in values:
        if value:
            result["modes"].update(value["modes"])
    return result


def format_selfcheck(result: Dict[str, Any], world_size: int) -> str:
    """The per-mode table ``pgroups run`` prints."""
    width = max([10] + [len(mode) for mode in result["modes"]])
    lines = [f"pgroups run: {result['layout']}",
             f"backend {result['backend']}, strategy {result['strategy']}, "
             f"{result['calls']} group-creation calls on rank 0, init {result['init_s']:.2f}s",
             f"{'mode':<{width}} {'groups':>6} {'size':>5}  {'device all_reduce':<18} {'cpu all_reduce':<16} shares",
             ]
    for mode, fig in result["modes"].items():
        dev = "ok" if fig["device_failures"] == 0 else f"FAIL on {fig['device_failures']} ranks"
        cpu = "ok" if fig["cpu_failures"] == 0 else f"FAIL on {fig['cpu_failures']} ranks"
        lines.append(f"{mode:<{width}} {fig['groups']:>6} {fig['group_size']:>5}  {dev:<18} {cpu:<16} "
                     f"{fig['shares'] or '-'}")
    bad = sum(f["device_failures"] + f["cpu_failures"] for f in result["modes"].values())
    lines.append(f"{'all groups passed' if bad == 0 else f'{bad} failures'} "
                 f"({len(result['modes'])} modes, world {world_size})")
    return "\n".join(lines)
