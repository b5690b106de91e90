"""The nettest mode: blocks of ``nettest`` consecutive ranks for network checks (last may be partial).

World 12, nettest 5: ``[0..4], [5..9], [10, 11]``; nettest larger than the world: one group.
"""
from typing import List

from pgroups.initializer import ProcessGroupInitializer, builtin_initializer
from pgroups.modes import ParallelMode
from pgroups.topology import RankGroups, Topology


@builtin_initializer(ParallelMode.NETTEST)
class NettestInitializer(ProcessGroupInitializer):
    def rank_groups(self, topology: Topology) -> RankGroups:
        return topology.block_groups(topology.nettest)

    def layout_key(self, topology: Topology):
        return topology.axes_key(()) if topology.nettest == 1 else topology.block_key(topology.nettest)

    def group_of(self, topology: Topology, rank: int) -> List[int]:
        return topology.block_group(rank, topology.nettest)
