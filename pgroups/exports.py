"""Exports of a context's groups to other frameworks: a torch ``DeviceMesh`` and a Megatron-Core
``ProcessGroupCollection``-shaped object. Both reuse the context's communicators; neither ever
creates a group of its own (a mode built lazily is built by the context, as for any query).

Dimensions and fields are modes: an axis (``"tp"``, ``"cp"``), a combination of one mesh's axes
joined with ``-`` (``"dp-cp"``, order irrelevant), or a built-in axis mode under any alias
(``"tensor"`` is ``"tp"``, ``"model"`` is ``"tp-pp"``; ``"global"`` …). Each is served by the
built mode with exactly its groups (:meth:`ParallelContext.find_mode`): itself, or a mode with
identical groups (``"tp-cp"`` is ``"tp"`` when context is 1).
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ModeNotInitializedError, allowed
from .mesh import GridMesh, Mesh

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh

    from .backend import ProcessGroup
    from .context import ParallelContext
    from .topology import Topology

Axes = Tuple[str, ...]


# ---- pure: names → axes → the ranks of a mesh -------------------------------------------------
def dim_axes(topology: "Topology", names: Sequence[str]) -> Tuple[Mesh, List[Axes]]:
    """The mesh all of ``names`` run along and each name's axes on it (mesh order).

    ``"global"`` is every axis of the dense mesh; ``"pp"`` (a dense name) joins the expert or
    weight mesh when the other names are on it. Raises ValueError for a mode that is not a
    view of a mesh (zero1, nettest, embedding, user modes) or names on different meshes, and
    the topology's UnknownModeError / ConfigError for a name that is no mode at all.
    """
    meshes, axes = [], []
    for name in names:
        if name == "global":
            mesh, dims = topology.mesh("dense"), topology.mesh("dense").axes
        else:
            mesh, dims, _ = topology.resolve(name)
            if mesh is None:
                raise ValueError(f"{name!r} is not a view of a mesh (its groups follow a rule of their "
                                 "own); a mesh dimension is an axis such as 'tp', a combination such as "
                                 "'dp-cp', or 'global'")
        meshes.append(mesh)
        axes.append(tuple(dims))
    others = {m.name: m for m in meshes if m.name != "dense"}
    if len(others) == 1:  # axes the dense mesh shares with it by name (pp) join the other mesh
        (target,) = others.values()
        if all(set(dims) <= set(target.axes) for dims in axes):
            return target, axes
    if len({m.name for m in meshes}) > 1:
        raise ValueError(f"dimensions {list(names)} lie on different meshes "
                         f"({', '.join(sorted({m.name for m in meshes}))}); a DeviceMesh is one mesh")
    return meshes[0], axes


def mesh_ranks(mesh: Mesh, rank: int, dims: Sequence[Axes]) -> Any:
    """The rank mesh around ``rank`` with one dimension per entry of ``dims`` (nested lists).

    Along a dimension the ranks are in sorted order, so a rank's coordinate on it is its local
    rank in the group along those axes (the order ``new_group`` gives it); ``rank``'s other
    coordinates are kept. Cost O(mesh size x dimensions). Raises ValueError if two dimensions
    share an axis, or if a mesh's groups are not laid out alike through every rank of the
    sub-mesh (then no DeviceMesh can hold them).
    """
    seen = [a for axes in dims for a in axes]
    if len(seen) != len(set(seen)):
        raise ValueError(f"mesh dimensions {['-'.join(d) for d in dims]} share an axis; each axis "
                         "may appear in one dimension only")
    home = mesh.coordinates(rank)

    def at(values: Mapping[str, int]) -> int:
        return mesh.rank_at({**home, **values})

    # each dimension's coordinate tuples, in the order of the ranks they give through ``rank``
    steps = [sorted((dict(zip(axes, values)) for values in itertools.product(*(range(mesh.size(a)) for a in axes))),
                    key=at) for axes in dims]

    def build(level: int, values: Dict[str, int]) -> Any:
        if level == len(steps):
            return at(values)
        return [build(level + 1, {**values, **step}) for step in steps[level]]

    ranks = build(0, {})
    if isinstance(mesh, GridMesh):  # a grid's sorted order is its coordinate order everywhere
        return ranks
    for index in itertools.product(*(range(len(s)) for s in steps)):  # every rank: coordinate == local rank
        member = at({k: v for level, i in enumerate(index) for k, v in steps[level][i].items()})
        for level, axes in enumerate(dims):
            if mesh.group_of(member, axes).index(member) != index[level]:
                raise ValueError(f"the groups along {'-'.join(axes)} of the {mesh.name} mesh are not "
                                 "ordered alike through every rank; a DeviceMesh cannot hold them")
    return ranks


# ---- DeviceMesh --------------------------------------------------------------------------------
def device_mesh(ctx: "ParallelContext", dims: Union[str, Sequence[str]],
                device_type: Optional[str] = None) -> "DeviceMesh":
    """A torch DeviceMesh over ``dims`` whose dimension groups are ``ctx``'s own groups.

    ``mesh_dim_names`` are the names given. ``device_type`` defaults to ``"cuda"`` on an NCCL
    job (its device groups) and ``"cpu"`` otherwise; ``"cpu"`` on an NCCL job uses the gloo twins.
    Collective only when a mode it needs is still lazy (built as by ``get_group``).
    """
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    names = (dims,) if isinstance(dims, str) else tuple(dims)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"device_mesh needs one or more distinct dimension names, got {names!r}")
    mesh, axes = dim_axes(ctx.topology, names)
    rank = ctx.topology_rank()  # the rank in the layout's own numbering (a model's ranks are 0..n-1)
    local_ranks = torch.tensor(mesh_ranks(mesh, rank, axes), dtype=torch.long)
    ranks = torch.tensor(ctx.to_job_ranks(range(ctx.topology.world_size)), dtype=torch.int)[local_ranks]
    modes = [ctx.find_mode(name) for name in names]
    for name, mode, dims_axes in zip(names, modes, axes):
        if ctx.get_ranks_in_group(mode) != ctx.to_job_ranks(mesh.group_of(rank, dims_axes)):  # e.g. pp of two meshes
            raise ValueError(f"dimension {name!r}: mode {mode!r}'s groups are not the {mesh.name} "
                             f"mesh's groups along {'-'.join(dims_axes)}")
    if device_type is None:
        device_type = "cuda" if ctx.backend.device_backend == "nccl" else "cpu"
    twins = device_type == "cpu" and ctx.backend.device_backend == "nccl"
    groups = [(ctx.get_cpu_group if twins else ctx.get_group)(mode) for mode in modes]
    return DeviceMesh.from_group(groups, device_type, mesh=ranks, mesh_dim_names=names)


# ---- Megatron-Core -------------------------------------------------------------------------------
#: Megatron-Core ``ProcessGroupCollection`` field → the mode with its groups (Megatron's
#: ``RankGenerator.get_ranks`` tokens, the canonical names of :mod:`pgroups.modes`: ``etp``/``edp``
#: are the expert mesh's tensor and data axes, which Megatron's expert generator calls tp/dp next
#: to ep), and what the field holds.
MEGATRON_FIELDS: Dict[str, Tuple[str, str]] = {
    "tp": ("tp", "tensor parallel"),
    "pp": ("pp", "pipeline parallel"),
    "mp": ("tp-pp", "model parallel: tensor x pipeline"),
    "embd": ("embedding", "embedding: the first and last stage of each pipeline group"),
    "cp": ("cp", "context parallel"),
    "tp_cp": ("tp-cp", "tensor x context parallel"),
    "ep": ("ep", "expert parallel"),
    "expt_tp": ("etp", "expert tensor parallel"),
    "tp_ep": ("tp-ep", "expert tensor x expert parallel"),
    "tp_ep_pp": ("tp-ep-pp", "expert tensor x expert x pipeline parallel"),
    "tp_dp_cp": ("tp-dp-cp", "tensor x data x context parallel"),
    "dp": ("dp", "data parallel"),
    "dp_cp": ("dp-cp", "data x context parallel"),
    "expt_dp": ("edp", "expert data parallel"),
}


class MegatronGroups:
    """Process groups under Megatron-Core's ``ProcessGroupCollection`` field names.

    Pass it where Megatron-Core takes a ``pg_collection`` (it reads attributes), or build theirs
    with ``ProcessGroupCollection(**groups.as_dict())``. ``embd`` is None on ranks in no
    embedding group (middle pipeline stages), exactly as in Megatron-Core. A field that was not
    requested raises AttributeError naming it. ``modes`` maps each field to the mode it came from.
    """

    def __init__(self, groups: Mapping[str, Optional["ProcessGroup"]], modes: Mapping[str, str]) -> None:
        for name, group in groups.items():
            object.__setattr__(self, name, group)
        object.__setattr__(self, "modes", dict(modes))

    def __getattr__(self, name: str) -> Any:
        if name in MEGATRON_FIELDS:
            raise AttributeError(f"megatron group {name!r} was not requested: call "
                                 f"megatron_groups() without fields, or with {name!r} among them")
        raise AttributeError(f"{name!r} is not a Megatron-Core ProcessGroupCollection field; "
                             f"fields: {allowed(MEGATRON_FIELDS)}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("MegatronGroups is read-only")

    def as_dict(self) -> Dict[str, Optional["ProcessGroup"]]:
        """The requested fields and their groups."""
        return {name: getattr(self, name) for name in self.modes}

    def __repr__(self) -> str:
        sizes = [f"{name}({'None' if g is None else g.size()})" for name, g in self.as_dict().items()]
        return f"MegatronGroups({', '.join(sizes)})"


def megatron_groups(ctx: "ParallelContext", fields: Optional[Iterable[str]] = None) -> MegatronGroups:
    """``ctx``'s groups under Megatron-Core's ``ProcessGroupCollection`` names (all 14 fields, or
    ``fields``), resolved in MEGATRON_FIELDS order on every rank (lazy modes are built then:
    collective, in the same order everywhere).

    Raises ValueError for an unknown field, ModeNotInitializedError naming the field and the
    groups it needs when this context has no mode with them — never a silent None.
    """
    wanted = list(MEGATRON_FIELDS) if fields is None else list(fields)
    unknown = [f for f in wanted if f not in MEGATRON_FIELDS]
    if unknown:
        raise ValueError(f"unknown Megatron-Core group field(s) {unknown}; fields: {allowed(MEGATRON_FIELDS)}")
    modes: Dict[str, str] = {}
    groups: Dict[str, Optional["ProcessGroup"]] = {}
    for field in (f for f in MEGATRON_FIELDS if f in wanted):
        spec, meaning = MEGATRON_FIELDS[field]
        try:
            modes[field] = ctx.find_mode(spec)
        except ModeNotInitializedError as exc:
            raise ModeNotInitializedError(f"megatron group {field!r} ({meaning}): {exc}") from None
        groups[field] = ctx.get_group(modes[field]) if ctx.is_member(modes[field]) else None
    return MegatronGroups(groups, modes)
