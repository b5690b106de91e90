"""Parallel modes: the names by which groups are built and queried — and what each one *is*.

One vocabulary. A mode's **canonical name** is Megatron-Core's / DeviceMesh's word for it: an axis
token (``"tp"``, ``"cp"``, ``"dp"``, ``"pp"``, ``"ep"``, ``"etp"``, ``"edp"``) or a combination of
one mesh's axes joined with ``"-"`` (``"tp-pp"``, ``"dp-cp"``, ``"tp-dp-cp"``, ``"tp-ep-pp"`` —
the tokens of Megatron-Core's ``RankGenerator.get_ranks``). Modes with no such word keep their
name (``"global"``, ``"zero1"``, ``"nettest"``, ``"embedding"``; the ISP weight axes ``"wp"``,
``"wdp"`` are this package's own axis tokens). The canonical name is what code, JSON and
messages say (:func:`canonical_name`); the InternEvo names and the :class:`ParallelMode` enum
are aliases, accepted everywhere (:data:`VOCABULARY`, the one table). Every API accepts:

- a canonical name or an alias (``"tp"``, ``"tensor"``, ``ParallelMode.TENSOR``);
- any combination of one mesh's axes in any order (``"cp-dp"`` is ``"dp-cp"``);
- a user mode registered with an initializer (``"micro_data"`` …), which is its own name.

The built-in modes are *data*: :data:`AXIS_MODES` says which axes of which mesh each one runs
along; only ``global``, ``zero1``, ``nettest`` and ``embedding`` have rules of their own
(:data:`SPECIAL_MODES`, rank math in :mod:`pgroups.topology`).
"""
from __future__ import annotations

import enum
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple, Union

import attrs

from .errors import ConfigError
from .mesh import parse_axes


class ParallelMode(str, enum.Enum):
    """The built-in modes under their InternEvo names: aliases of the canonical names
    (``ParallelMode.TENSOR`` is ``"tp"``; see :data:`VOCABULARY`). The value is the InternEvo
    name, accepted wherever a mode is."""

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

    def __str__(self) -> str:  # "tensor", not "ParallelMode.TENSOR", where formatted directly
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
        """The canonical token (see :func:`axis_token`)."""
        return axis_token(self)


#: THE vocabulary: each built-in mode's canonical name, the aliases accepted for it (InternEvo's
#: names; the first is the :class:`ParallelMode` value), and what it is. Configs, the CLI and
#: every API accept any of them; code, JSON and messages say the canonical name.
#:
#: ===========  ===========================  ==========================  ===========================
#: canonical    aliases                      ParallelMode                groups
#: ===========  ===========================  ==========================  ===========================
#: global       —                            GLOBAL                      every rank
#: tp           tensor                       TENSOR                      dense tp axis
#: cp           context                      CONTEXT                     dense cp axis
#: dp           data                         DATA                        dense dp axis
#: pp           pipe, pipeline               PIPELINE                    dense pp axis
#: tp-pp        model                        MODEL                       dense tp and pp axes
#: ep           expert                       EXPERT                      expert ep axis
#: etp          expert_tensor                EXPERT_TENSOR               expert etp axis
#: edp          expert_data                  EXPERT_DATA                 expert edp axis
#: wp           weight                       WEIGHT                      weight (ISP) wp axis
#: wdp          weight_data                  WEIGHT_DATA                 weight (ISP) wdp axis
#: zero1        —                            ZERO1                       chunks of dp-cp groups
#: nettest      —                            NETTEST                     blocks of consecutive ranks
#: embedding    —                            EMBEDDING                   first and last pp stage
#: ===========  ===========================  ==========================  ===========================
VOCABULARY: Tuple[Tuple[str, Tuple[str, ...], ParallelMode, str], ...] = (
    ("global", (), ParallelMode.GLOBAL, "every rank"),
    ("tp", ("tensor",), ParallelMode.TENSOR, "dense tp axis"),
    ("cp", ("context",), ParallelMode.CONTEXT, "dense cp axis"),
    ("dp", ("data",), ParallelMode.DATA, "dense dp axis"),
    ("pp", ("pipe", "pipeline"), ParallelMode.PIPELINE, "dense pp axis"),
    ("tp-pp", ("model",), ParallelMode.MODEL, "dense tp and pp axes"),
    ("ep", ("expert",), ParallelMode.EXPERT, "expert ep axis"),
    ("etp", ("expert_tensor",), ParallelMode.EXPERT_TENSOR, "expert etp axis"),
    ("edp", ("expert_data",), ParallelMode.EXPERT_DATA, "expert edp axis"),
    ("wp", ("weight",), ParallelMode.WEIGHT, "weight (ISP) wp axis"),
    ("wdp", ("weight_data",), ParallelMode.WEIGHT_DATA, "weight (ISP) wdp axis"),
    ("zero1", (), ParallelMode.ZERO1, "chunks of dp-cp groups"),
    ("nettest", (), ParallelMode.NETTEST, "blocks of consecutive ranks"),
    ("embedding", (), ParallelMode.EMBEDDING, "first and last pp stage"),
)
#: alias → canonical name, for every alias of :data:`VOCABULARY`.
ALIASES: Dict[str, str] = {alias: canonical for canonical, aliases, _, _ in VOCABULARY for alias in aliases}
#: The canonical names of the built-in modes, in :data:`VOCABULARY` order.
BUILTIN_MODE_NAMES: Tuple[str, ...] = tuple(canonical for canonical, _, _, _ in VOCABULARY)
#: Every name that means a built-in mode: canonical names and aliases.
BUILTIN_SPELLINGS: FrozenSet[str] = frozenset(BUILTIN_MODE_NAMES) | frozenset(ALIASES)

#: The order of tokens in a canonical combination: Megatron-Core's spellings (``tp-pp``,
#: ``dp-cp``, ``tp-dp-cp``, ``tp-ep-pp``) put tp first, dp before cp, ep and pp last.
TOKEN_ORDER: Tuple[str, ...] = ("tp", "etp", "wp", "dp", "edp", "wdp", "cp", "ep", "pp")


def axis_token(spec: AxisMode) -> str:
    """The canonical name of the groups along ``spec``'s axes: its axis tokens in
    :data:`TOKEN_ORDER` joined with ``"-"``. Next to ``ep`` the expert mesh's etp and edp are
    written ``tp`` and ``dp``, as Megatron-Core's expert RankGenerator does (``"tp-ep-pp"``);
    alone they stay ``etp``/``edp`` (``"tp"`` alone is the dense axis). Parsing the result
    gives ``spec`` back (:func:`parse_combination`).

    >>> axis_token(AxisMode("dense", frozenset({"cp", "dp"})))
    'dp-cp'
    >>> axis_token(AxisMode("expert", frozenset({"pp", "ep", "etp"})))
    'tp-ep-pp'
    """
    tokens = sorted(spec.axes, key=TOKEN_ORDER.index)
    if spec.mesh == "expert" and "ep" in spec.axes:
        short = {expert: dense for dense, expert in EXPERT_ALIASES.items()}
        tokens = [short.get(t, t) for t in tokens]
    return "-".join(tokens)


#: The built-in modes that are views of a mesh (which axes of which mesh), by canonical name.
AXIS_MODES: Dict[str, AxisMode] = {
    "tp": AxisMode("dense", frozenset({"tp"})),
    "cp": AxisMode("dense", frozenset({"cp"})),
    "pp": AxisMode("dense", frozenset({"pp"})),
    "dp": AxisMode("dense", frozenset({"dp"})),
    "tp-pp": AxisMode("dense", frozenset({"tp", "pp"})),
    "ep": AxisMode("expert", frozenset({"ep"})),
    "etp": AxisMode("expert", frozenset({"etp"})),
    "edp": AxisMode("expert", frozenset({"edp"})),
    "wp": AxisMode("weight", frozenset({"wp"})),
    "wdp": AxisMode("weight", frozenset({"wdp"})),
}
#: Built-in modes with a rule of their own (rank math in pgroups.topology).
SPECIAL_MODES: Dict[str, str] = {
    "global": "every rank: the default group",
    "zero1": "consecutive chunks of zero1 ranks of each dp-cp group (of each wdp group under ISP)",
    "nettest": "consecutive blocks of nettest ranks, the last one maybe partial",
    "embedding": "the first and last stage of each pipeline group (Megatron-Core's embedding group)",
}
COMBINATION_HELP = ("or any combination of one mesh's axes joined with '-': dense tp, cp, dp, pp; "
                    "expert etp (tp), ep, edp (dp), pp; weight wp, wdp, pp (e.g. 'tp-cp', 'tp-ep-pp')")


def mode_name(mode: ModeLike) -> str:
    """The string ``mode`` was given as (a ParallelMode's value, or the str itself), not
    canonicalised: the key of a registered user mode. Messages use :func:`canonical_name`.

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
    name = ALIASES.get(name, name)
    if name in AXIS_MODES:
        return AXIS_MODES[name]
    if is_combination(name):
        return parse_combination(name)
    return None


def is_builtin(mode: ModeLike) -> bool:
    """A built-in name (canonical or alias) or an axis combination (as opposed to a user mode)."""
    name = mode_name(mode)
    return name in BUILTIN_SPELLINGS or is_combination(name)


def canonical_name(mode: ModeLike) -> str:
    """The one name code, JSON and messages use for ``mode``: ``"tensor"``,
    ``ParallelMode.TENSOR``, ``"tp"`` → ``"tp"``; ``"cp-dp"`` → ``"dp-cp"``; ``"model"`` →
    ``"tp-pp"``; ``"tp-ep-pp"`` and ``"etp-pp-ep"`` → ``"tp-ep-pp"``. Special modes, user modes
    and malformed combinations are their own names (a label never raises for those).

    Two spellings name the same mode exactly when their canonical names are equal. Raises
    TypeError only for something that is not a mode at all (see :func:`mode_name`).
    """
    name = mode_name(mode)
    name = ALIASES.get(name, name)
    try:
        found = axis_mode(name)
    except ConfigError:
        return name
    return axis_token(found) if found is not None else name


def aliases_of(mode: ModeLike) -> Tuple[str, ...]:
    """The aliases :data:`VOCABULARY` lists for ``mode``'s canonical name (empty for others)."""
    canonical = canonical_name(mode)
    return next((aliases for name, aliases, _, _ in VOCABULARY if name == canonical), ())


def with_aliases(names: Iterable[str]) -> List[str]:
    """``names`` and every alias of each: the candidates of a did-you-mean (``"tensr"`` is
    near ``"tensor"``, the alias of a built ``"tp"``)."""
    names = list(names)
    return names + [alias for name in names for alias in aliases_of(name)]
