"""Pure rank math: sizes + an order string → the meshes, and the rank groups of any mode.

No torch.distributed, no processes: layouts can be planned and checked offline at any world
size. One :class:`Topology` holds three meshes over the same ranks (:mod:`pgroups.mesh`):

- ``dense``: tp × cp × dp × pp in the config's ``order`` (fastest first, Megatron-Core's
  convention). The default ``"tp-pp-dp"`` is the classic InternLM layout::

      rank = tp + tensor * pp + tensor * pipeline * dp

- ``expert``: etp × ep × edp × pp — Megatron-Core's decoupled expert RankGenerator (the same
  order string with tp→etp, cp of size 1, dp→edp) under ``expert_layout: megatron``; or
  InternEvo's, each pipeline stage's ranks re-factored as etp × ep × edp, under
  ``expert_layout: internevo``;
- ``weight``: each pipeline stage's ranks re-factored as wp × wdp (InternEvo's ISP).

Ask for any mode by name — a built-in (``"tp"``, ``"zero1"``, ``"embedding"`` …; aliases such as ``"tensor"`` too) or a
combination of one mesh's axes (``"tp-cp"``, ``"dp-cp"``, ``"tp-ep-pp"``)::

    topology.groups("tp-cp")          # every group, O(world)
    topology.group_of(rank, "tp-cp")  # one rank's group, O(group size)
    topology.layout_key("tp-cp")      # equal keys == identical groups (one communicator)

Groups are always sorted lists of global ranks (``new_group`` sorts its ranks too, so a rank's
local rank is its position in the list).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import attrs

from .errors import ConfigError, UnknownModeError, allowed
from .mesh import GridMesh, Mesh, RankGroups, SplitMesh, merge_runs
from .modes import (BUILTIN_MODE_NAMES, COMBINATION_HELP, AxisMode, ModeLike, ParallelMode, axis_mode,
                    canonical_name, mode_name)

#: The axes an order string may name; tp, pp and dp are required, cp and ep optional.
ORDER_AXES: Tuple[str, ...] = ("tp", "cp", "ep", "dp", "pp")
REQUIRED_ORDER_AXES: Tuple[str, ...] = ("tp", "pp", "dp")
#: The dense axes (the classic three first) and the config key that gives each one's size.
AXES: Tuple[str, ...] = ("tp", "pp", "dp")
AXIS_KEYS: Dict[str, str] = {"tp": "tensor", "cp": "context", "pp": "pipeline", "dp": "data",
                             "ep": "expert", "etp": "expert_tensor", "edp": "expert_data",
                             "wp": "weight", "wdp": "weight_data"}
DEFAULT_ORDER = "tp-pp-dp"
EXPERT_LAYOUTS = ("megatron", "internevo")
#: Modes every context builds, whatever the config (the classic InternLM set).
CLASSIC_MODES: Tuple[str, ...] = ("global", "tp", "pp", "dp", "tp-pp", "zero1", "nettest")


def parse_order(order: object) -> Tuple[str, ...]:
    """Parse ``"tp-cp-ep-dp-pp"`` into ``("tp", "cp", "ep", "dp", "pp")``.

    Raises ConfigError unless the string names each of tp, pp, dp exactly once, and at most
    cp and ep besides (each once).
    """
    if not isinstance(order, str):
        raise ConfigError(f"parallel.order must be a string such as {DEFAULT_ORDER!r}, got {order!r}")
    axes = tuple(part.strip() for part in order.split("-"))
    if (len(set(axes)) != len(axes) or not set(axes) <= set(ORDER_AXES)
            or not set(REQUIRED_ORDER_AXES) <= set(axes)):
        raise ConfigError(
            f"parallel.order {order!r} must list each of tp, pp, dp exactly once, and may add cp "
            f"and ep, fastest-varying first (e.g. {DEFAULT_ORDER!r}, 'tp-dp-pp' or 'tp-cp-ep-dp-pp')")
    return axes


@attrs.frozen
class Topology:
    """A validated layout of ``world_size`` ranks and its meshes.

    Build it with :meth:`create` (which validates and raises ConfigError showing the
    arithmetic); the fields are then consistent: ``tensor * context * pipeline * data ==
    world_size``, zero1 divides the ranks it shards over, expert and weight sizes divide the
    ranks of a pipeline stage. ``expert_tensor`` is resolved (default: ``tensor``);
    ``weight`` is None when ISP weight parallelism is off.
    """

    world_size: int
    tensor: int
    pipeline: int
    data: int
    zero1: int
    nettest: int
    order: Tuple[str, ...]
    context: int = 1
    expert: int = 1
    expert_tensor: Optional[int] = None
    weight: Optional[int] = None
    virtual_pipeline: int = 1
    expert_layout: str = "megatron"
    dense: GridMesh = attrs.field(init=False, eq=False, repr=False)
    expert_mesh: Mesh = attrs.field(init=False, eq=False, repr=False)
    weight_mesh: Mesh = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        # A Topology is valid whoever builds it: the same checks as create(), and the sizes given
        # must be the ones they derive (a 12-rank layout cannot claim a 16-rank world).
        sizes = validated_sizes(self.world_size, self.tensor, self.pipeline, self.data, self.zero1, self.nettest,
                                self.order, context=self.context, expert=self.expert,
                                expert_tensor=self.expert_tensor, weight=self.weight,
                                virtual_pipeline=self.virtual_pipeline, expert_layout=self.expert_layout)
        object.__setattr__(self, "order", sizes["order"])
        if self.expert_tensor is None:
            object.__setattr__(self, "expert_tensor", self.tensor)
        dense_axes = tuple(a for a in self.order if a != "ep") + (() if "cp" in self.order else ("cp",))
        dense_size = {"tp": self.tensor, "cp": self.context, "dp": self.data, "pp": self.pipeline}
        dense = GridMesh("dense", dense_axes, [dense_size[a] for a in dense_axes])
        object.__setattr__(self, "dense", dense)
        stage = ("tp", "cp", "dp")
        if self.expert_layout == "internevo":
            expert = SplitMesh("expert", dense, stage, [("etp", self.expert_tensor), ("ep", self.expert),
                                                        ("edp", self.expert_data)])
        else:  # Megatron-Core: the same order string, tp→etp, cp of size 1, dp→edp
            rename = {"tp": "etp", "dp": "edp", "ep": "ep", "pp": "pp"}
            axes = [rename[a] for a in self.order if a != "cp"] + ([] if "ep" in self.order else ["ep"])
            size = {"etp": self.expert_tensor, "ep": self.expert, "edp": self.expert_data, "pp": self.pipeline}
            expert = GridMesh("expert", axes, [size[a] for a in axes])
        object.__setattr__(self, "expert_mesh", expert)
        wp = self.weight or 1
        object.__setattr__(self, "weight_mesh", SplitMesh(
            "weight", dense, stage, [("wp", wp), ("wdp", self.stage_size // wp)]))

    @classmethod
    def create(
        cls,
        world_size: int,
        tensor: int = 1,
        pipeline: int = 1,
        data: Optional[int] = None,
        zero1: Optional[int] = None,
        nettest: int = 32,
        order: str = DEFAULT_ORDER,
        source: Optional[str] = None,
        *,
        context: int = 1,
        expert: int = 1,
        expert_tensor: Optional[int] = None,
        weight: Optional[int] = None,
        virtual_pipeline: int = 1,
        expert_layout: str = "megatron",
    ) -> "Topology":
        """Validate sizes against ``world_size`` and return the topology.

        ``data`` defaults to ``world_size / (tensor * context * pipeline)``; ``expert_tensor``
        to ``tensor``; ``zero1`` to every rank it can shard over (data × context, or weight_data
        when ``weight`` is set). Raises ConfigError naming the key, the value and the
        arithmetic that failed.
        """
        sizes = validated_sizes(world_size, tensor, pipeline, data, zero1, nettest, order, source, context=context,
                                expert=expert, expert_tensor=expert_tensor, weight=weight,
                                virtual_pipeline=virtual_pipeline, expert_layout=expert_layout)
        return cls(**sizes)

    # ---- sizes ----------------------------------------------------------------------------
    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage: tensor * context * data."""
        return self.tensor * self.context * self.data

    @property
    def expert_data(self) -> int:
        """edp: the ranks of a stage that hold the same experts, ``stage / (expert_tensor * expert)``."""
        return self.stage_size // (self.expert_tensor * self.expert)

    @property
    def weight_data(self) -> int:
        """wdp: ``stage / weight`` (the whole stage when weight parallelism is off)."""
        return self.stage_size // (self.weight or 1)

    @property
    def isp_enabled(self) -> bool:
        """InternEvo ISP: ``parallel.weight`` is set (zero1 then shards weight_data groups)."""
        return self.weight is not None

    @property
    def context_enabled(self) -> bool:
        return self.context > 1

    @property
    def expert_enabled(self) -> bool:
        """Expert modes are worth building: ep > 1, or experts split differently from tensor."""
        return self.expert > 1 or self.expert_tensor != self.tensor

    def default_modes(self) -> Tuple[str, ...]:
        """The built-in modes a context builds for this layout, in creation order, by canonical
        name: the classic seven, then cp (cp > 1), ep, etp, edp (see expert_enabled), wp, wdp
        (weight set). Others are built when a config lists them."""
        modes = list(CLASSIC_MODES)
        if self.context_enabled:
            modes.append("cp")
        if self.expert_enabled:
            modes += ["ep", "etp", "edp"]
        if self.isp_enabled:
            modes += ["wp", "wdp"]
        return tuple(modes)

    # ---- meshes and modes --------------------------------------------------------------------
    def mesh(self, name: str) -> Mesh:
        """The ``"dense"``, ``"expert"`` or ``"weight"`` mesh."""
        meshes = {"dense": self.dense, "expert": self.expert_mesh, "weight": self.weight_mesh}
        try:
            return meshes[name]
        except KeyError:
            raise KeyError(f"no mesh {name!r}; meshes: {', '.join(meshes)}") from None

    def split_mesh(self, name: str, over: Sequence[str], inner: Sequence[Tuple[str, int]]) -> SplitMesh:
        """A new mesh: each group along dense ``over`` axes re-factored into ``inner`` axes
        (``(name, size)``, fastest first), the other dense axes kept — how a plugin declares
        axes of its own. ValueError if the sizes do not multiply to the groups' size."""
        return SplitMesh(name, self.dense, over, inner)

    def grid_mesh(self, name: str, axes: Sequence[str], sizes: Sequence[int]) -> GridMesh:
        """A new mesh over the whole world, axes fastest first; ValueError unless the sizes
        multiply to world_size."""
        if math.prod(sizes) != self.world_size:
            raise ValueError(f"mesh {name!r}: sizes {tuple(sizes)} multiply to {math.prod(sizes)}, "
                             f"not world_size({self.world_size})")
        return GridMesh(name, axes, sizes)

    def resolve(self, mode: ModeLike) -> Tuple[Optional[Mesh], Optional[Tuple[str, ...]], str]:
        """``(mesh, axes, name)`` of an axis mode, ``(None, None, name)`` of a special one.

        Raises UnknownModeError for a name that is neither a built-in mode nor an axis
        combination, ConfigError for a malformed combination.
        """
        name = canonical_name(mode)
        spec = axis_mode(name)
        if spec is not None:
            if spec.mesh == "expert":
                problem = _megatron_expert_problem(self.expert_layout, self.pipeline, self.order, self.tensor,
                                                   self.context, self.data, self.expert_tensor, self.expert,
                                                   self.expert_data)
                if problem:
                    raise ConfigError(f"mode {name!r}: {problem}")
            return self.mesh(spec.mesh), _mesh_axes(spec, self.mesh(spec.mesh)), name
        if name in BUILTIN_MODE_NAMES:
            return None, None, name
        raise UnknownModeError(f"{name!r} is not a built-in mode; built-in modes: "
                               f"{allowed(BUILTIN_MODE_NAMES)}, {COMBINATION_HELP}")

    def groups(self, mode: ModeLike) -> RankGroups:
        """Every group of a built-in ``mode`` (or axis combination). O(world)."""
        mesh, axes, name = self.resolve(mode)
        if mesh is not None:
            return mesh.groups(axes)
        return {"global": lambda: [list(range(self.world_size))], "zero1": self.zero1_groups,
                "nettest": lambda: self.block_groups(self.nettest),
                "embedding": self.embedding_groups}[name]()

    def group_of(self, rank: int, mode: ModeLike) -> Optional[List[int]]:
        """The sorted group of ``rank`` in a built-in ``mode``; None if it is in none
        (embedding: ranks of middle stages). O(group size)."""
        self.check_rank(rank)
        mesh, axes, name = self.resolve(mode)
        if mesh is not None:
            return mesh.group_of(rank, axes)
        return {"global": lambda: list(range(self.world_size)), "zero1": lambda: self.zero1_group(rank),
                "nettest": lambda: self.block_group(rank, self.nettest),
                "embedding": lambda: self.embedding_group(rank)}[name]()

    def layout_key(self, mode: ModeLike) -> Hashable:
        """A canonical description of ``mode``'s group list, computed without listing it.

        Equal keys mean identical groups on every rank — across meshes too (``tp-ep-pp``
        equals ``model`` when the expert and dense meshes agree) — so they share one
        communicator.
        """
        mesh, axes, name = self.resolve(mode)
        if mesh is not None:
            return mesh.layout_key(axes)
        if name == "global":
            return ("runs", merge_runs([(1, self.world_size)]))
        if name == "nettest":
            block = min(self.nettest, self.world_size)
            return ("runs", merge_runs([(1, block)])) if self.world_size % block == 0 else ("blocks", block)
        if name == "embedding":
            if self.pipeline <= 2:  # one or both ends of each pipeline group: singletons / pipe
                return self.layout_key("pp") if self.pipeline == 2 else ("runs", frozenset())
            return ("embedding", self.layout_key("pp"))
        return self._zero1_key()

    # ---- dense axes (the classic API) ----------------------------------------------------------
    def axis_size(self, axis: str) -> int:
        """Size of any mesh axis: ``"tp"``, ``"cp"``, ``"dp"``, ``"pp"``, ``"ep"``, ``"etp"``, ``"wp"`` …"""
        for mesh in (self.dense, self.expert_mesh, self.weight_mesh):
            if axis in mesh.axes:
                return mesh.size(axis)
        raise KeyError(f"no axis {axis!r}; axes: {', '.join(AXIS_KEYS)}")

    def stride(self, axis: str) -> int:
        """How far apart in rank two neighbours along dense ``axis`` are."""
        return self.dense.stride(axis)

    def coordinates(self, rank: int) -> Dict[str, int]:
        """``{"tp": i, "pp": j, "dp": k}`` of ``rank`` on the dense mesh, with ``"cp"`` when
        the order names it."""
        coords = self.dense.coordinates(rank)
        if "cp" not in self.order:
            del coords["cp"]
        return coords

    def rank_at(self, tp: int = 0, pp: int = 0, dp: int = 0, cp: int = 0) -> int:
        """The global rank at the given dense coordinates."""
        return self.dense.rank_at({"tp": tp, "pp": pp, "dp": dp, "cp": cp})

    def check_rank(self, rank: int) -> None:
        self.dense.check_rank(rank)

    def group_along(self, rank: int, axes: Sequence[str]) -> List[int]:
        """The sorted ranks that share every dense coordinate of ``rank`` except those on ``axes``."""
        return self.dense.group_of(rank, axes)

    def groups_along(self, axes: Sequence[str]) -> RankGroups:
        """Every group along dense ``axes``, ordered by smallest member. Cost O(world)."""
        return self.dense.groups(axes)

    # ---- special modes ----------------------------------------------------------------------
    @property
    def zero1_base(self) -> str:
        """The mode zero1 shards: ``"dp-cp"`` (gradients are reduced over data and context, as
        Megatron-Core's distributed optimizer), ``"wdp"`` under ISP (InternEvo)."""
        return "wdp" if self.isp_enabled else "dp-cp"

    def zero1_group(self, rank: int) -> List[int]:
        """The consecutive chunk of ``zero1`` ranks of ``rank``'s zero1_base group that holds it."""
        base = self.group_of(rank, self.zero1_base)
        chunk = base.index(rank) // self.zero1
        return base[chunk * self.zero1:(chunk + 1) * self.zero1]

    def zero1_groups(self) -> RankGroups:
        """Every zero1 group: each zero1_base group (in order) cut into consecutive chunks."""
        return [group[i:i + self.zero1]
                for group in self.groups(self.zero1_base) for i in range(0, len(group), self.zero1)]

    def _zero1_key(self) -> Hashable:
        base = self.layout_key(self.zero1_base)
        if base[0] != "runs":
            return ("zero1", base, self.zero1)
        taken, left = [], self.zero1
        for stride, size in sorted(base[1]):  # a group's sorted members: lowest stride fastest
            if left == 1:
                break
            if left % size == 0:
                taken.append((stride, size))
                left //= size
            elif size % left == 0:
                taken.append((stride, left))
                left = 1
            else:
                return ("zero1", base, self.zero1)
        return ("runs", merge_runs(taken))

    def block_group(self, rank: int, block: int) -> List[int]:
        """The block of ``block`` consecutive ranks holding ``rank`` (the last may be partial)."""
        self.check_rank(rank)
        start = rank // block * block
        return list(range(start, min(start + block, self.world_size)))

    def block_groups(self, block: int) -> RankGroups:
        """Consecutive blocks of ``block`` ranks; the last may be partial."""
        return [list(range(s, min(s + block, self.world_size)))
                for s in range(0, self.world_size, block)]

    def embedding_group(self, rank: int) -> Optional[List[int]]:
        """First and last stage of ``rank``'s pipeline group, if ``rank`` is one of them."""
        pipe = self.group_of(rank, "pp")
        ends = sorted({pipe[0], pipe[-1]})
        return ends if rank in ends else None

    def embedding_groups(self) -> RankGroups:
        """Megatron-Core's embedding groups: ``[first, last]`` of each pipeline group."""
        return [sorted({g[0], g[-1]}) for g in self.groups("pp")]

    def describe(self) -> str:
        order = "-".join(self.order)
        context = f" x context {self.context}" if self.context > 1 else ""
        text = (f"world {self.world_size} = tensor {self.tensor}{context} x pipeline {self.pipeline} "
                f"x data {self.data} (order {order}), zero1 {self.zero1}, nettest {self.nettest}")
        if self.expert_enabled:
            text += (f"; expert {self.expert} x expert_tensor {self.expert_tensor} x expert_data "
                     f"{self.expert_data} ({self.expert_layout} layout)")
        if self.isp_enabled:
            text += f"; weight {self.weight} x weight_data {self.weight_data} per stage"
        if self.virtual_pipeline > 1:
            text += f"; virtual_pipeline {self.virtual_pipeline}"
        return text


def _mesh_axes(spec: AxisMode, mesh: Mesh) -> Tuple[str, ...]:
    return tuple(a for a in mesh.axes if a in spec.axes)


def _megatron_expert_problem(layout: str, pipeline: int, axes: Tuple[str, ...], tensor: int, context: int,
                             data: int, expert_tensor: int, expert: int, expert_data: int) -> Optional[str]:
    """What Megatron-Core's two checks on its expert RankGenerator say, or None if they pass."""
    if layout != "megatron" or pipeline == 1:
        return None
    dense_size = {"tp": tensor, "cp": context, "dp": data, "ep": 1}
    expert_size = {"tp": expert_tensor, "cp": 1, "dp": expert_data, "ep": expert}
    before_pp = axes[:axes.index("pp")]
    dense_stride = math.prod(dense_size[a] for a in before_pp)
    expert_stride = math.prod(expert_size[a] for a in before_pp)
    order = "-".join(axes)
    if dense_stride != expert_stride:
        return (f"parallel.expert_tensor: with order {order!r} the expert mesh's pipeline groups "
                f"differ from the dense mesh's ({'*'.join(before_pp)} before pp: {expert_stride} expert "
                f"ranks vs {dense_stride} dense ranks), which Megatron-Core requires equal; use an order "
                "ending in pp, expert_tensor equal to tensor, or parallel.expert_layout: internevo")
    if axes[-1] != "pp" and expert_data != data:
        return (f"parallel.expert: with pipeline > 1 and order {order!r} not ending in pp, "
                f"Megatron-Core requires expert_data({expert_data}) == data({data}); use an order ending "
                "in pp or parallel.expert_layout: internevo")
    return None


def check_virtual_pipeline(virtual_pipeline: int, pipeline: int, where: str = "") -> None:
    """Megatron-Core's rule: interleaved model chunks (virtual_pipeline > 1) need pipeline > 1."""
    if virtual_pipeline > 1 and pipeline == 1:
        raise ConfigError(f"{where}parallel.virtual_pipeline({virtual_pipeline}) needs pipeline > 1 "
                          f"(got pipeline({pipeline})): model chunks interleave over pipeline stages")


def _insert(axes: Tuple[str, ...], axis: str, after: Optional[str] = None, before: Optional[str] = None) -> str:
    out = list(axes)
    index = out.index(after) + 1 if after else out.index(before)
    out.insert(index, axis)
    return "-".join(out)



def validated_sizes(world_size: int, tensor: int, pipeline: int, data: Optional[int], zero1: Optional[int],
                    nettest: int, order: Union[str, Sequence[str]], source: Optional[str] = None, *,
                    context: int = 1, expert: int = 1, expert_tensor: Optional[int] = None,
                    weight: Optional[int] = None, virtual_pipeline: int = 1,
                    expert_layout: str = "megatron") -> Dict[str, Any]:
    """Check a layout's sizes against ``world_size`` (see :meth:`Topology.create`) and return the
    Topology constructor's arguments with the derived ones filled in. Pure; raises ConfigError."""
    where = f"{source}: " if source else ""
    for key, value in (("world_size", world_size), ("parallel.tensor", tensor),
                       ("parallel.pipeline", pipeline), ("parallel.nettest", nettest),
                       ("parallel.context", context), ("parallel.expert", expert),
                       ("parallel.virtual_pipeline", virtual_pipeline)):
        _require_positive_int(key, value, where)
    for key, value in (("parallel.expert_tensor", expert_tensor), ("parallel.weight", weight)):
        if value is not None:
            _require_positive_int(key, value, where)
    if expert_layout not in EXPERT_LAYOUTS:
        raise ConfigError(f"{where}parallel.expert_layout: {expert_layout!r} is not allowed; "
                          f"allowed: {allowed(EXPERT_LAYOUTS)}")
    try:
        axes = parse_order(order) if isinstance(order, str) else parse_order("-".join(order))
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    order_text = "-".join(axes)
    if context > 1 and "cp" not in axes:
        raise ConfigError(f"{where}parallel.order {order_text!r} has no cp but context({context}) > 1; "
                          f"put cp in the order, e.g. {_insert(axes, 'cp', after='tp')!r}")
    if expert > 1 and "ep" not in axes and expert_layout == "megatron":
        raise ConfigError(
            f"{where}parallel.order {order_text!r} has no ep but expert({expert}) > 1; Megatron-Core's "
            f"expert mesh follows the order: put ep in it, e.g. {_insert(axes, 'ep', before='dp')!r} "
            "(its default is 'tp-cp-ep-dp-pp'), or set parallel.expert_layout: internevo")

    named = [f"tensor({tensor})"] + ([f"context({context})"] if context > 1 else []) + [f"pipeline({pipeline})"]
    model = tensor * context * pipeline
    if world_size % model:
        raise ConfigError(f"{where}world_size({world_size}) is not divisible by "
                          f"{' * '.join(named)} = {model}")
    implied = world_size // model
    if data is None:
        data = implied
    else:
        _require_positive_int("parallel.data", data, where)
        if data != implied:
            raise ConfigError(
                f"{where}parallel.data: {' * '.join(named)} * data({data}) "
                f"= {model * data} != world_size({world_size}); data must be {implied} "
                "or left out (or auto)")
    stage = tensor * context * data
    stage_text = "*".join([f"tensor({tensor})"] + ([f"context({context})"] if context > 1 else [])
                          + [f"data({data})"]) + f"={stage} ranks per stage"
    if expert_tensor is None:
        expert_tensor = tensor
    if stage % (expert_tensor * expert):
        key = "expert" if expert > 1 else "expert_tensor"
        raise ConfigError(f"{where}parallel.{key}: {stage_text} are not divisible by "
                          f"expert_tensor({expert_tensor})*expert({expert})")
    expert_data = stage // (expert_tensor * expert)
    problem = _megatron_expert_problem(expert_layout, pipeline, axes, tensor, context, data, expert_tensor,
                                       expert, expert_data)
    if problem and (expert > 1 or expert_tensor != tensor):  # unused, it fails on request only
        raise ConfigError(f"{where}{problem}")
    if weight is not None and stage % weight:
        raise ConfigError(f"{where}parallel.weight: {stage_text} are not divisible by weight({weight})")
    check_virtual_pipeline(virtual_pipeline, pipeline, where)
    shard, shard_text = ((stage // weight, f"weight_data({stage // weight})") if weight is not None else
                         (data * context, f"data({data})*context({context})={data * context}"
                          if context > 1 else f"data({data})"))
    if zero1 is None:
        zero1 = shard
    else:
        _require_positive_int("parallel.zero1", zero1, where)
        if shard % zero1:
            raise ConfigError(
                f"{where}parallel.zero1({zero1}) must divide {shard_text}; "
                f"allowed: {', '.join(str(d) for d in _divisors(shard))}")
    return dict(world_size=world_size, tensor=tensor, pipeline=pipeline, data=data, zero1=zero1,
                nettest=nettest, order=axes, context=context, expert=expert, expert_tensor=expert_tensor,
                weight=weight, virtual_pipeline=virtual_pipeline, expert_layout=expert_layout)

def _require_positive_int(key: str, value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}{key} must be a positive integer, got {value!r}")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


__all__ = ["AXES", "AXIS_KEYS", "CLASSIC_MODES", "DEFAULT_ORDER", "EXPERT_LAYOUTS", "ParallelMode",
           "RankGroups", "Topology", "parse_order"]
