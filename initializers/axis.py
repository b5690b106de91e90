"""Shared base for modes whose groups run along axes of the layout (tensor, pipe, data, model)."""
from __future__ import annotations

from typing import ClassVar, List, Tuple

from pgroups.initializer import ProcessGroupInitializer
from pgroups.topology import RankGroups, Topology


class AxisInitializer(ProcessGroupInitializer):
    """Groups of ranks that differ only in their coordinates on ``axes``."""

    axes: ClassVar[Tuple[str, ...]] = ()

    def rank_groups(self, topology: Topology) -> RankGroups:
        return topology.groups_along(self.axes)

    def layout_key(self, topology: Topology):
        return topology.axes_key(self.axes)

    def group_of(self, topology: Topology, rank: int) -> List[int]:
        return topology.group_along(rank, self.axes)
