"""Contexts with the ISP modes ``weight`` / ``weight_data`` for the weight-parallel tests.

When the package has the built-in modes (the N-axis layout: ``parallel.weight``) they are
used; until then the same groups come from a plugin registered in a private registry, as any
user would add a mode: ``weight`` groups are ``size`` consecutive ranks (InternEvo's
``Initializer_Weight`` with the tensor axis fastest), ``weight_data`` groups the ranks at the
same place in every weight group.
"""
from __future__ import annotations

from typing import Any, Dict, List

from pgroups import ConfigError, InitializerRegistry, ParallelContext, ProcessGroupInitializer
from pgroups.topology import RankGroups, Topology


class WeightGroups(ProcessGroupInitializer):
    def __init__(self, size: int = 1) -> None:
        self.size = size

    def validate(self, topology: Topology) -> None:
        if topology.world_size % self.size or self.size % topology.tensor:
            raise ConfigError(f"weight({self.size}) must divide the world ({topology.world_size}) and be a "
                              f"multiple of tensor({topology.tensor})")

    def rank_groups(self, topology: Topology) -> RankGroups:
        return topology.block_groups(self.size)


class WeightDataGroups(ProcessGroupInitializer):
    def __init__(self, weight: int = 1) -> None:
        self.weight = weight

    def rank_groups(self, topology: Topology) -> RankGroups:
        return [list(range(j, topology.world_size, self.weight)) for j in range(self.weight)]


def builtin_weight_modes() -> bool:
    """Whether pgroups builds ``weight`` / ``weight_data`` itself (``parallel.weight``)."""
    registry = InitializerRegistry()
    return "weight" in registry and "weight_data" in registry


def isp_context(weight: int, tensor: int = 1, timeout_s: float = 60.0, **extra: Any) -> ParallelContext:
    """A context over the current (gloo) world with ``weight`` × ``weight_data`` groups and a
    ``tensor`` (sequence) group, on every rank."""
    config: Dict[str, Any] = {"parallel": {"tensor": tensor}, "backend": "gloo", "timeout_s": timeout_s, **extra}
    if builtin_weight_modes():
        config["parallel"]["weight"] = weight
        return ParallelContext().init_from_config(config)
    registry = InitializerRegistry()
    registry.register("weight", WeightGroups)
    registry.register("weight_data", WeightDataGroups)
    config["extra_modes"] = {"weight": {"size": weight}, "weight_data": {"weight": weight}}
    return ParallelContext(registry=registry).init_from_config(config)


def sequence_slice(ctx: ParallelContext) -> List[int]:
    """``[data_index, data_parallel_size, seq_rank, seq_size]`` of this rank: samples are split
    over tensor groups (in group order), the sequence over the ranks of one."""
    groups = ctx.get_rank_groups("tensor")
    mine = ctx.get_ranks_in_group("tensor")
    return [groups.index(mine), len(groups), ctx.get_local_rank("tensor"), len(mine)]
