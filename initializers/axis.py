"""AxisInitializer: a user mode whose groups run along axes of a mesh — a built-in one, or a
mesh the initializer declares (new axes, e.g. cp split into head × context groups)."""
from __future__ import annotations

from typing import ClassVar, Hashable, List, Optional, Tuple, Union

from pgroups.initializer import ProcessGroupInitializer
from pgroups.mesh import Mesh, parse_axes
from pgroups.modes import parse_combination
from pgroups.topology import RankGroups, Topology


class AxisInitializer(ProcessGroupInitializer):
    """Groups of ranks that differ only in their coordinates on ``axes`` of :meth:`mesh`.

    ``axes`` is ``"tp-cp"``-style text or a tuple. By default the mesh is the built-in one the
    axes belong to; override :meth:`mesh` to declare axes of your own::

        @register_initializer("head")
        class HeadParallel(AxisInitializer):          # InternEvo's 2D sequence parallel
            axes = "hcp"
            def __init__(self, head: int = 2):
                self.head = head
            def mesh(self, topology):
                return topology.split_mesh("cp2d", over=("cp",),
                                           inner=[("hcp", self.head), ("icp", topology.context // self.head)])

    Its groups get a layout key like the built-ins', so a declared axis whose groups equal a
    built-in mode's shares that mode's communicator.
    """

    axes: ClassVar[Union[str, Tuple[str, ...]]] = ()

    def axis_names(self) -> Tuple[str, ...]:
        return parse_axes(self.axes, f"{type(self).__qualname__}.axes") if isinstance(self.axes, str) \
            else tuple(self.axes)

    def mesh(self, topology: Topology) -> Optional[Mesh]:
        """The mesh the axes belong to; None (the default): the built-in mesh that holds them."""
        return None

    def _target(self, topology: Topology) -> Tuple[Mesh, Tuple[str, ...]]:
        mesh = self.mesh(topology)
        if mesh is None:
            spec = parse_combination("-".join(self.axis_names()))
            return topology.mesh(spec.mesh), tuple(spec.axes)
        return mesh, self.axis_names()

    def validate(self, topology: Topology) -> None:
        mesh, axes = self._target(topology)
        for axis in axes:
            mesh.size(axis)

    def rank_groups(self, topology: Topology) -> RankGroups:
        mesh, axes = self._target(topology)
        return mesh.groups(axes)

    def group_of(self, topology: Topology, rank: int) -> List[int]:
        mesh, axes = self._target(topology)
        return mesh.group_of(rank, axes)

    def layout_key(self, topology: Topology) -> Hashable:
        mesh, axes = self._target(topology)
        return mesh.layout_key(axes)
