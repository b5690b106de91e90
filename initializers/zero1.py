"""The zero1 mode: optimizer-state sharding groups, consecutive chunks of each data group.

World 16, tensor 2, pipeline 2, zero1 2: ``[0,4],[8,12],[1,5],[9,13],…``.
"""
from typing import List

from pgroups.initializer import ProcessGroupInitializer, builtin_initializer
from pgroups.modes import ParallelMode
from pgroups.topology import RankGroups, Topology


@builtin_initializer(ParallelMode.ZERO1)
class Zero1Initializer(ProcessGroupInitializer):
    def rank_groups(self, topology: Topology) -> RankGroups:
        return topology.zero1_groups()

    def layout_key(self, topology: Topology):
        if topology.zero1 == topology.data:
            return topology.axes_key(("dp",))
        return topology.axes_key(()) if topology.zero1 == 1 else ("zero1", topology.zero1)

    def group_of(self, topology: Topology, rank: int) -> List[int]:
        return topology.zero1_group(rank)
