"""Pure rank math: sizes + an order string → coordinates and the rank groups of any mode.

No torch.distributed, no processes: layouts can be planned and checked offline at any world
size. The order string lists axes from fastest- to slowest-varying (Megatron-Core convention);
the default ``"tp-pp-dp"`` is the classic InternLM layout::

    rank = tp + tensor * pp + tensor * pipeline * dp

Groups are always sorted lists of global ranks (``new_group`` sorts its ranks too, so a rank's
local rank is its position in the list). One rank's queries cost O(group size), never O(world);
listing every group of a mode costs O(world).
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import attrs

from .errors import ConfigError

#: The axes a layout is made of, and the config key that gives each one's size.
AXES: Tuple[str, ...] = ("tp", "pp", "dp")
AXIS_KEYS: Dict[str, str] = {"tp": "tensor", "pp": "pipeline", "dp": "data"}
DEFAULT_ORDER = "tp-pp-dp"

RankGroups = List[List[int]]


def parse_order(order: str) -> Tuple[str, ...]:
    """Parse ``"tp-pp-dp"`` into ``("tp", "pp", "dp")``.

    Raises ConfigError unless the string names each of tp, pp, dp exactly once.
    """
    if not isinstance(order, str):
        raise ConfigError(f"parallel.order must be a string such as {DEFAULT_ORDER!r}, got {order!r}")
    axes = tuple(part.strip() for part in order.split("-"))
    if sorted(axes) != sorted(AXES):
        raise ConfigError(
            f"parallel.order {order!r} must list each of tp, pp, dp exactly once, "
            f"fastest-varying first (e.g. {DEFAULT_ORDER!r} or 'tp-dp-pp')"
        )
    return axes


@attrs.frozen
class Topology:
    """A validated layout of ``world_size`` ranks.

    Build it with :meth:`create` (which validates and raises ConfigError showing the
    arithmetic); the fields are then consistent: ``tensor * pipeline * data == world_size``,
    ``zero1`` divides ``data``, ``1 <= nettest``.
    """

    world_size: int
    tensor: int
    pipeline: int
    data: int
    zero1: int
    nettest: int
    order: Tuple[str, ...]

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
    ) -> "Topology":
        """Validate sizes against ``world_size`` and return the topology.

        ``data`` defaults to ``world_size / (tensor * pipeline)``; ``zero1`` defaults to ``data``.
        Raises ConfigError naming the key, the value and the arithmetic that failed.
        """
        where = f"{source}: " if source else ""
        for key, value in (("world_size", world_size), ("parallel.tensor", tensor),
                           ("parallel.pipeline", pipeline), ("parallel.nettest", nettest)):
            _require_positive_int(key, value, where)
        axes = parse_order(order) if isinstance(order, str) else tuple(order)
        model = tensor * pipeline
        if world_size % model:
            raise ConfigError(
                f"{where}world_size({world_size}) is not divisible by "
                f"tensor({tensor}) * pipeline({pipeline}) = {model}"
            )
        implied = world_size // model
        if data is None:
            data = implied
        else:
            _require_positive_int("parallel.data", data, where)
            if data != implied:
                raise ConfigError(
                    f"{where}parallel.data: tensor({tensor}) * pipeline({pipeline}) * data({data}) "
                    f"= {model * data} != world_size({world_size}); data must be {implied} "
                    "or left out"
                )
        if zero1 is None:
            zero1 = data
        else:
            _require_positive_int("parallel.zero1", zero1, where)
            if data % zero1:
                raise ConfigError(
                    f"{where}parallel.zero1({zero1}) must divide data({data}); "
                    f"allowed: {', '.join(str(d) for d in _divisors(data))}"
                )
        return cls(world_size, tensor, pipeline, data, zero1, nettest, axes)

    # ---- axes -------------------------------------------------------------------------
    def axis_size(self, axis: str) -> int:
        """Size of axis ``"tp"``, ``"pp"`` or ``"dp"``."""
        return {"tp": self.tensor, "pp": self.pipeline, "dp": self.data}[axis]

    def stride(self, axis: str) -> int:
        """How far apart in rank two neighbours along ``axis`` are."""
        stride = 1
        for name in self.order:
            if name == axis:
                return stride
            stride *= self.axis_size(name)
        raise KeyError(axis)

    def coordinates(self, rank: int) -> Dict[str, int]:
        """``{"tp": i, "pp": j, "dp": k}`` of ``rank``."""
        self.check_rank(rank)
        coords, rest = {}, rank
        for axis in self.order:
            size = self.axis_size(axis)
            coords[axis] = rest % size
            rest //= size
        return coords

    def rank_at(self, tp: int = 0, pp: int = 0, dp: int = 0) -> int:
        """The global rank at the given coordinates."""
        coords = {"tp": tp, "pp": pp, "dp": dp}
        for axis, value in coords.items():
            if not 0 <= value < self.axis_size(axis):
                raise ValueError(f"{axis} coordinate {value} outside 0..{self.axis_size(axis) - 1}")
        return sum(coords[a] * self.stride(a) for a in AXES)

    def check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank!r} is outside 0..{self.world_size - 1}")

    # ---- groups along axes --------------------------------------------------------------
    def group_along(self, rank: int, axes: Sequence[str]) -> List[int]:
        """The sorted ranks that share every coordinate of ``rank`` except those on ``axes``.

        Cost O(group size).
        """
        coords = self.coordinates(rank)
        base = rank - sum(coords[a] * self.stride(a) for a in axes)
        steps = [[i * self.stride(a) for i in range(self.axis_size(a))] for a in axes]
        return sorted(base + sum(offsets) for offsets in itertools.product(*steps))

    def groups_along(self, axes: Sequence[str]) -> RankGroups:
        """Every group along ``axes``, ordered by smallest member. Cost O(world)."""
        others = [a for a in self.order if a not in axes]
        leaders = [0]
        for axis in others:  # every rank whose coordinates on ``axes`` are all zero
            stride = self.stride(axis)
            leaders = [lead + i * stride for i in range(self.axis_size(axis)) for lead in leaders]
        return [self.group_along(lead, axes) for lead in sorted(leaders)]

    def axes_key(self, axes: Sequence[str]) -> Tuple[str, frozenset]:
        """Layout key of the groups along ``axes``: axes of size 1 change nothing, so drop them."""
        return ("axes", frozenset(a for a in axes if self.axis_size(a) > 1))

    def block_key(self, block: int) -> Tuple:
        """Layout key of consecutive blocks of ``block`` ranks: blocks that coincide with the
        groups along the fastest axes (``tensor`` ranks, ``tensor * pipeline`` …) share their key."""
        if block >= self.world_size:
            return self.axes_key(self.order)
        span = 1
        for k, axis in enumerate(self.order):
            span *= self.axis_size(axis)
            if span == block:
                return self.axes_key(self.order[:k + 1])
        return ("blocks", block)

    # ---- derived groups -------------------------------------------------------------------
    def zero1_group(self, rank: int) -> List[int]:
        """The consecutive chunk of ``zero1`` ranks of ``rank``'s data group that holds it."""
        data_group = self.group_along(rank, ("dp",))
        chunk = data_group.index(rank) // self.zero1
        return data_group[chunk * self.zero1:(chunk + 1) * self.zero1]

    def zero1_groups(self) -> RankGroups:
        """Every zero1 group: each data group (in order) cut into consecutive chunks."""
        return [dg[i:i + self.zero1]
                for dg in self.groups_along(("dp",)) for i in range(0, self.data, self.zero1)]

    def block_group(self, rank: int, block: int) -> List[int]:
        """The block of ``block`` consecutive ranks holding ``rank`` (the last may be partial)."""
        self.check_rank(rank)
        start = rank // block * block
        return list(range(start, min(start + block, self.world_size)))

    def block_groups(self, block: int) -> RankGroups:
        """Consecutive blocks of ``block`` ranks; the last may be partial."""
        return [list(range(s, min(s + block, self.world_size)))
                for s in range(0, self.world_size, block)]

    @property
    def tensor_enabled(self) -> bool:
        return self.tensor > 1

    @property
    def pipeline_enabled(self) -> bool:
        return self.pipeline > 1

    @property
    def data_enabled(self) -> bool:
        return self.data > 1

    def describe(self) -> str:
        order = "-".join(self.order)
        return (f"world {self.world_size} = tensor {self.tensor} x pipeline {self.pipeline} "
                f"x data {self.data} (order {order}), zero1 {self.zero1}, nettest {self.nettest}")


def _require_positive_int(key: str, value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}{key} must be a positive integer, got {value!r}")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
