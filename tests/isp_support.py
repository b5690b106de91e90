"""Contexts with the ISP modes for the weight-parallel tests: the built-in ``weight`` /
``weight_data`` modes of the layout (``parallel.weight``), plus a ``tensor`` (sequence) group."""
from __future__ import annotations

from typing import List

from pgroups import ParallelContext


def isp_context(weight: int, tensor: int = 1, timeout_s: float = 60.0, pipeline: int = 1) -> ParallelContext:
    """A context over the current (gloo) world with ``weight`` × ``weight_data`` groups (within
    each of ``pipeline`` stages) and a ``tensor`` (sequence) group, on every rank."""
    return ParallelContext().init_from_config(
        {"parallel": {"tensor": tensor, "weight": weight, "pipeline": pipeline}, "backend": "gloo",
         "timeout_s": timeout_s})


def sequence_slice(ctx: ParallelContext) -> List[int]:
    """``[data_index, data_parallel_size, seq_rank, seq_size]`` of this rank: samples are split
    over tensor groups (in group order), the sequence over the ranks of one."""
    groups = ctx.get_rank_groups("tensor")
    mine = ctx.get_ranks_in_group("tensor")
    return [groups.index(mine), len(groups), ctx.get_local_rank("tensor"), len(mine)]
