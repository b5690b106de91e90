"""The global mode: one group of every rank (the default process group itself)."""
from typing import List

from pgroups.initializer import ProcessGroupInitializer, builtin_initializer
from pgroups.modes import ParallelMode
from pgroups.topology import RankGroups, Topology


@builtin_initializer(ParallelMode.GLOBAL)
class GlobalInitializer(ProcessGroupInitializer):
    def rank_groups(self, topology: Topology) -> RankGroups:
        return [list(range(topology.world_size))]

    def layout_key(self, topology: Topology):
        return topology.axes_key(topology.order)

    def group_of(self, topology: Topology, rank: int) -> List[int]:
        topology.check_rank(rank)
        return list(range(topology.world_size))
