"""Parallel modes: the names by which groups are built and queried — and what each one *is*.

Every API accepts a :class:`ParallelMode` member or its string value. A mode is a plain string:

- a built-in name (``"tensor"``, ``"zero1"``, ``"expert_data"`` …, the enum below);
- any combination of one mesh's axes, short names joined with ``"-"`` in any order
  (``"tp-cp"``, ``"dp-cp"``, ``"tp-ep-pp"``, ``"wdp"`` — Megatron-Core's ``get_ranks`` tokens);
- a user mode registered with an initializer (``"micro_data"`` …).

The built-in modes are *data*: :data:`AXIS_MODES` says which axes of which mesh each one runs
along; only ``global``, ``zero1``, ``nettest`` and ``embedding`` have rules of their own
(:data:`SPECIAL_MODES`, rank math in :mod:`pgroups.topology`).
"""
from __future__ import annotations

import enum
from typing import Dict, FrozenSet, Hashable, Optional, Tuple, Union

import attrs

from .errors import ConfigError
from .mesh import parse_axes


class ParallelMode(str, enum.Enum):
    """The built-in modes. The value is the name used in configs, the CLI and JSON."""

    GLOBAL = "global"
    DATA = "data"
    MODEL = "model"
    PIPELINE = "pipe"
    TENSOR = "tensor"
    ZERO1 = "zero1"
    NETTEST = "nettest"
    CONTEXT = "context"
    EXPERT = "expert"
    EXPERT_TENSOR = "expert_tensor"
    EXPERT_DATA = "expert_data"
    WEIGHT = "weight"
    WEIGHT_DATA = "weight_data"
    EMBEDDING = "embedding"

    def __str__(self) -> str:  # "tensor", not "ParallelMode.TENSOR", in messages
        return self.value


ModeLike = Union[ParallelMode, str]

#: The meshes and their axes, fastest first as far as the mesh fixes it (the dense mesh
#: follows the config's ``order``). Every mesh covers every rank of the world.
MESH_AXES: Dict[str, Tuple[str, ...]] = {
    "dense": ("tp", "cp", "dp", "pp"),      # tensor, context, data, pipeline
    "expert": ("etp", "ep", "edp", "pp"),   # expert tensor, expert, expert data, pipeline
    "weight": ("wp", "wdp", "pp"),          # ISP weight, weight data (within each stage), pipeline
}
#: Megatron-Core's expert RankGenerator calls etp "tp" and edp "dp": accepted in combinations
#: that name an expert axis (``"tp-ep"`` is ``"etp-ep"``).
EXPERT_ALIASES: Dict[str, str] = {"tp": "etp", "dp": "edp"}
ALL_AXES: FrozenSet[str] = frozenset(a for axes in MESH_AXES.values() for a in axes)


@attrs.frozen
class AxisMode:
    """Groups along ``axes`` of mesh ``mesh``: ranks that differ only in those coordinates."""

    mesh: str
    axes: FrozenSet[str]

    def ordered_axes(self) -> Tuple[str, ...]:
        return tuple(a for a in MESH_AXES[self.mesh] if a in self.axes)

    def __str__(self) -> str:
        return "-".join(self.ordered_axes())


#: The built-in modes that are views of a mesh (which axes of which mesh).
AXIS_MODES: Dict[str, AxisMode] = {
    "tensor": AxisMode("dense", frozenset({"tp"})),
    "context": AxisMode("dense", frozenset({"cp"})),
    "pipe": AxisMode("dense", frozenset({"pp"})),
    "data": AxisMode("dense", frozenset({"dp"})),
    "model": AxisMode("dense", frozenset({"tp", "pp"})),
    "expert": AxisMode("expert", frozenset({"ep"})),
    "expert_tensor": AxisMode("expert", frozenset({"etp"})),
    "expert_data": AxisMode("expert", frozenset({"edp"})),
    "weight": AxisMode("weight", frozenset({"wp"})),
    "weight_data": AxisMode("weight", frozenset({"wdp"})),
}
#: Built-in modes with a rule of their own (rank math in pgroups.topology).
SPECIAL_MODES: Dict[str, str] = {
    "global": "every rank: the default group",
    "zero1": "consecutive chunks of zero1 ranks of each dp-cp group (of each wdp group under ISP)",
    "nettest": "consecutive blocks of nettest ranks, the last one maybe partial",
    "embedding": "the first and last stage of each pipeline group (Megatron-Core's embedding group)",
}
BUILTIN_MODE_NAMES: Tuple[str, ...] = tuple(m.value for m in ParallelMode)
COMBINATION_HELP = ("or any combination of one mesh's axes joined with '-': dense tp, cp, dp, pp; "
                    "expert etp (tp), ep, edp (dp), pp; weight wp, wdp, pp (e.g. 'tp-cp', 'tp-ep-pp')")


def mode_name(mode: ModeLike) -> str:
    """Return the canonical string name of ``mode`` (a ParallelMode or a str).

    Raises TypeError for anything else, naming the type received.
    """
    if isinstance(mode, ParallelMode):
        return mode.value
    if isinstance(mode, str) and mode:
        return mode
    raise TypeError(f"a parallel mode must be a ParallelMode or a non-empty str, got {mode!r}")


def is_combination(name: str) -> bool:
    """Whether ``name`` is written as axis short names joined with '-' (valid or not)."""
    parts = [p.strip() for p in name.split("-")]
    return all(p in ALL_AXES for p in parts)


def parse_combination(name: str) -> AxisMode:
    """``"tp-cp"`` → groups along tp and cp of the dense mesh; ``"tp-ep"`` → etp, ep of the expert mesh.

    The order of the names does not matter. The dense mesh is tried first, then the expert
    mesh (where tp, dp mean etp, edp, as in Megatron-Core), then the weight mesh. Raises
    ConfigError naming the meshes' axes when the names fit no single mesh or repeat an axis.
    """
    parts = parse_axes(name, "mode")
    for mesh, axes in MESH_AXES.items():
        names = [EXPERT_ALIASES.get(p, p) if mesh == "expert" else p for p in parts]
        if mesh == "expert" and not set(parts) & {"etp", "ep", "edp"}:
            continue  # tp/dp alone are dense axes; the aliases apply next to an expert axis
        if all(n in axes for n in names):
            if len(set(names)) != len(names):
                raise ConfigError(f"mode {name!r} names the same axis of the {mesh} mesh twice")
            return AxisMode(mesh, frozenset(names))
    raise ConfigError(f"mode {name!r} mixes axes of different meshes; one mesh per mode: "
                      + "; ".join(f"{m} {', '.join(a)}" for m, a in MESH_AXES.items()))


def axis_mode(mode: ModeLike) -> Optional[AxisMode]:
    """What ``mode`` runs along, if it is a built-in axis mode or an axis combination; else None.

    Raises ConfigError for a malformed combination (see :func:`parse_combination`).
    """
    name = mode_name(mode)
    if name in AXIS_MODES:
        return AXIS_MODES[name]
    if is_combination(name):
        return parse_combination(name)
    return None


def is_builtin(mode: ModeLike) -> bool:
    """A built-in name or an axis combination (as opposed to a user mode)."""
    name = mode_name(mode)
    return name in BUILTIN_MODE_NAMES or is_combination(name)


def mode_identity(mode: ModeLike) -> Hashable:
    """What makes two names the same mode: ``"tp"``, ``"tensor"`` → one identity; ``"cp-dp"``
    and ``"dp-cp"`` → one. User modes and special modes are their own names."""
    name = mode_name(mode)
    try:
        found = axis_mode(name)
    except ConfigError:
        return name
    return found if found is not None else name
