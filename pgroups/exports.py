"""Exports of a context's groups to other frameworks: a torch ``DeviceMesh`` and a Megatron-Core
``ProcessGroupCollection``-shaped object. Both reuse the context's communicators; neither ever
creates a group of its own (a mode built lazily is built by the context, as for any query).

Dimensions and fields are named by *axes* of the layout: a short axis name (``"tp"``), a
combination of axes joined with ``-`` (``"tp-pp"``, order irrelevant), or a mode whose groups run
along axes (``"tensor"``, ``"pipe"``, ``"data"``, ``"model"``, ``"global"``). The group of an axis
set is the group of the built mode with exactly those groups.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ModeNotInitializedError, allowed
from .topology import Topology

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh

    from .backend import ProcessGroup
    from .context import ParallelContext

Axes = Tuple[str, ...]


# ---- pure: names → axes → the ranks of a mesh -------------------------------------------------
def dim_axes(name: str, topology: Topology, mode_axes: Mapping[str, Axes]) -> Axes:
    """The layout axes a mesh dimension named ``name`` runs along, in layout order (fastest first).

    ``name`` is an axis of ``topology`` (``"tp"``), axes joined with ``-`` (``"dp-tp"``), or a
    mode in ``mode_axes`` (mode → its axes). Raises ValueError naming what is allowed.
    """
    axes = mode_axes.get(name)
    if axes is None:
        parts = [part.strip() for part in name.split("-")] if isinstance(name, str) else [name]
        if not all(part in topology.order for part in parts) or len(set(parts)) != len(parts):
            raise ValueError(
                f"{name!r} is not an axis, an axis combination or an axis mode of this layout; "
                f"allowed: axes {allowed(topology.order)}, combinations such as "
                f"{'-'.join(topology.order[:2])!r}, modes {allowed(mode_axes)}")
        axes = tuple(parts)
    return tuple(a for a in topology.order if a in axes)


def mesh_ranks(topology: Topology, rank: int, dims: Sequence[Axes]) -> Any:
    """The rank mesh around ``rank`` with one dimension per entry of ``dims`` (nested lists).

    Along a dimension the ranks are sorted, so a rank's coordinate on it is its local rank in the
    group along those axes (the order ``new_group`` gives it); the other axes keep ``rank``'s
    coordinates. Cost O(mesh size). Raises ValueError if two dimensions share an axis.
    """
    seen = [a for axes in dims for a in axes]
    if len(seen) != len(set(seen)):
        raise ValueError(f"mesh dimensions {['-'.join(d) for d in dims]} share an axis; each axis "
                         "may appear in one dimension only")
    coords = topology.coordinates(rank)
    base = rank - sum(coords[a] * topology.stride(a) for a in seen)
    offsets = [sorted(sum(step) for step in itertools.product(
        *[[i * topology.stride(a) for i in range(topology.axis_size(a))] for a in axes])) for axes in dims]

    def build(level: int, start: int) -> Any:
        if level == len(offsets):
            return start
        return [build(level + 1, start + off) for off in offsets[level]]

    return build(0, base)


# ---- DeviceMesh --------------------------------------------------------------------------------
def device_mesh(ctx: "ParallelContext", dims: Union[str, Sequence[str]],
                device_type: Optional[str] = None) -> "DeviceMesh":
    """A torch DeviceMesh over ``dims`` whose dimension groups are ``ctx``'s own groups.

    ``mesh_dim_names`` are the names given. ``device_type`` defaults to ``"cuda"`` on an NCCL
    job (its device groups) and ``"cpu"`` otherwise; ``"cpu"`` on an NCCL job uses the gloo twins.
    Collective only when a mode it needs is still lazy (built as by ``get_group``).
    """
    from torch.distributed.device_mesh import DeviceMesh

    names = (dims,) if isinstance(dims, str) else tuple(dims)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"device_mesh needs one or more distinct dimension names, got {names!r}")
    topology = ctx.topology
    axes = [dim_axes(name, topology, axis_modes(ctx)) for name in names]
    ranks = mesh_ranks(topology, ctx.get_global_rank(), axes)
    if device_type is None:
        device_type = "cuda" if ctx.backend.device_backend == "nccl" else "cpu"
    twins = device_type == "cpu" and ctx.backend.device_backend == "nccl"
    get = ctx.get_cpu_group if twins else ctx.get_group
    groups = [get(ctx.mode_along(a)) for a in axes]
    import torch

    return DeviceMesh.from_group(groups, device_type, mesh=torch.tensor(ranks, dtype=torch.int),
                                 mesh_dim_names=names)


def axis_modes(ctx: "ParallelContext") -> Dict[str, Axes]:
    """Every built mode whose groups run along axes of the layout → those axes."""
    result = {}
    for mode in ctx.modes:
        axes = getattr(ctx.get_initializer(mode), "axes", None)
        if axes is not None:
            result[mode] = tuple(axes)
    result.setdefault("global", tuple(ctx.topology.order))
    return result


# ---- Megatron-Core -------------------------------------------------------------------------------
#: Megatron-Core ``ProcessGroupCollection`` field → the axes of its groups (Megatron's
#: ``RankGenerator.get_ranks`` names; ``etp``/``edp`` are the expert mesh's tensor and data axes),
#: and what the field holds.
MEGATRON_FIELDS: Dict[str, Tuple[str, str]] = {
    "tp": ("tp", "tensor parallel"),
    "pp": ("pp", "pipeline parallel"),
    "mp": ("tp-pp", "model parallel: tensor x pipeline"),
    "embd": ("embedding", "embedding: the first and last stage of each pipeline group"),
    "cp": ("cp", "context parallel"),
    "tp_cp": ("tp-cp", "tensor x context parallel"),
    "ep": ("ep", "expert parallel"),
    "expt_tp": ("etp", "expert tensor parallel"),
    "tp_ep": ("etp-ep", "expert tensor x expert parallel"),
    "tp_ep_pp": ("etp-ep-pp", "expert tensor x expert x pipeline parallel"),
    "tp_dp_cp": ("tp-dp-cp", "tensor x data x context parallel"),
    "dp": ("dp", "data parallel"),
    "dp_cp": ("dp-cp", "data x context parallel"),
    "expt_dp": ("edp", "expert data parallel"),
}
#: The expert axes when the layout has no expert mesh: Megatron's defaults (expert 1,
#: expert_tensor = tensor) make the expert mesh the dense one with context parallelism folded in.
_EXPERT_DEFAULTS = {"etp": ("tp",), "ep": (), "edp": ("dp", "cp")}


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
            modes[field] = _megatron_mode(ctx, spec)
        except ModeNotInitializedError as exc:
            raise ModeNotInitializedError(f"megatron group {field!r} ({meaning}): {exc}") from None
        groups[field] = ctx.get_group(modes[field]) if ctx.is_member(modes[field]) else None
    return MegatronGroups(groups, modes)


def _megatron_mode(ctx: "ParallelContext", spec: str) -> str:
    if spec == "embedding":
        if not ctx.is_initialized("embedding"):
            raise ModeNotInitializedError(
                f"this context has no 'embedding' mode; built modes: {allowed(ctx.modes)}")
        return "embedding"
    axes: List[str] = []
    for part in spec.split("-"):
        for axis in _EXPERT_DEFAULTS.get(part, (part,)):
            if axis in ctx.topology.order:  # axes the layout lacks have size 1
                axes.append(axis)
    return ctx.mode_along(tuple(axes))
