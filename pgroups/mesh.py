"""Named meshes: the same ranks factored into named axes. Pure rank math, no torch.distributed.

A mesh lists its axes fastest-varying first (Megatron-Core's convention) and answers, for any
combination of its axes, which ranks form the groups along them — "the ranks that share every
coordinate except those on these axes" (Megatron-Core's ``RankGenerator.get_ranks("tp-cp")``,
torch's ``DeviceMesh`` sub-mesh). Two kinds:

- :class:`GridMesh` — ``rank = sum(coordinate[a] * stride[a])`` over the whole world: the dense
  mesh tp·cp·dp·pp in the config's order; Megatron-Core's expert mesh etp·ep·edp·pp.
- :class:`SplitMesh` — each group of a base mesh along ``over`` axes, taken in sorted order, is
  re-factored into new *inner* axes (fastest first); the base's other axes are kept. The ISP
  weight mesh wp·wdp re-factors each pipeline stage; InternEvo's expert mesh etp·ep·edp too; a
  plugin can split cp into two axes of its own.

Contracts: groups are sorted lists of global ranks; a group list is ordered by smallest member;
one rank's group costs O(group size); listing every group costs O(world). :meth:`Mesh.layout_key`
describes a group list canonically without listing it, so that identical groups of different
meshes share one communicator.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, FrozenSet, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError

RankGroups = List[List[int]]
#: ``(stride, size)``: ``size`` ranks ``stride`` apart — one digit of the rank in mixed radix.
Run = Tuple[int, int]


def merge_runs(runs: Iterable[Run]) -> FrozenSet[Run]:
    """Canonical form of a set of runs: drop size-1 runs, merge runs that continue each other
    (``(1, 2)`` and ``(2, 4)`` → ``(1, 8)``). Equal results mean equal groups on every rank."""
    ordered = sorted((s, n) for s, n in runs if n > 1)
    merged: List[Run] = []
    for stride, size in ordered:
        if merged and merged[-1][0] * merged[-1][1] == stride:
            merged[-1] = (merged[-1][0], merged[-1][1] * size)
        else:
            merged.append((stride, size))
    return frozenset(merged)


def _prefix_products(sizes: Sequence[int]) -> List[int]:
    out, acc = [], 1
    for size in sizes:
        out.append(acc)
        acc *= size
    return out


class Mesh:
    """Ranks ``0..world_size-1`` factored into named axes (see the module docstring).

    Subclasses give :meth:`coordinates`, :meth:`rank_at` and :meth:`runs`; groups, listings and
    layout keys follow from those.
    """

    name: str
    axes: Tuple[str, ...]
    sizes: Tuple[int, ...]

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes)

    def size(self, axis: str) -> int:
        """The size of ``axis``; KeyError naming the mesh's axes if it has no such axis."""
        try:
            return self.sizes[self.axes.index(axis)]
        except ValueError:
            raise KeyError(f"the {self.name} mesh has no axis {axis!r}; its axes: "
                           f"{', '.join(self.axes)}") from None

    def shape(self) -> Dict[str, int]:
        return dict(zip(self.axes, self.sizes))

    def coordinates(self, rank: int) -> Dict[str, int]:
        raise NotImplementedError

    def rank_at(self, coords: Mapping[str, int]) -> int:
        """The rank at ``coords`` (axes left out are 0)."""
        raise NotImplementedError

    def runs(self, axes: Iterable[str]) -> Optional[FrozenSet[Run]]:
        """The groups along ``axes`` as merged runs in rank space, or None if they are not a grid."""
        raise NotImplementedError

    def _check_axes(self, axes: Iterable[str]) -> Tuple[str, ...]:
        axes = tuple(axes)
        for axis in axes:
            self.size(axis)
        if len(set(axes)) != len(axes):
            raise KeyError(f"axes {'-'.join(axes)!r} name an axis twice")
        return axes

    def group_of(self, rank: int, axes: Iterable[str]) -> List[int]:
        """The sorted ranks sharing every coordinate of ``rank`` except those on ``axes``. O(group size)."""
        axes = self._check_axes(axes)
        coords = self.coordinates(rank)
        ranges = [range(self.size(a)) for a in axes]
        members = []
        for values in itertools.product(*ranges):
            coords.update(zip(axes, values))
            members.append(self.rank_at(coords))
        return sorted(members)

    def groups(self, axes: Iterable[str]) -> RankGroups:
        """Every group along ``axes``, ordered by smallest member. O(world)."""
        axes = self._check_axes(axes)
        others = [a for a in self.axes if a not in axes]
        leaders = []
        for values in itertools.product(*(range(self.size(a)) for a in others)):
            leaders.append(self.rank_at(dict(zip(others, values))))
        groups = [self.group_of(lead, axes) for lead in leaders]
        groups.sort(key=lambda g: g[0])
        return groups

    def layout_key(self, axes: Iterable[str]) -> Hashable:
        """A canonical description of the groups along ``axes``, computed without listing them.

        Equal keys (from any meshes over the same world) mean identical groups on every rank.
        """
        axes = self._check_axes(axes)
        runs = self.runs(axes)
        if runs is not None:
            return ("runs", runs)
        return self._fallback_key(axes)

    def _fallback_key(self, axes: Tuple[str, ...]) -> Hashable:
        return ("mesh", self.name, self.axes, self.sizes, frozenset(a for a in axes if self.size(a) > 1))

    def check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank!r} is outside 0..{self.world_size - 1}")

    def __repr__(self) -> str:
        shape = " x ".join(f"{a}({s})" for a, s in zip(self.axes, self.sizes))
        return f"<{type(self).__name__} {self.name}: {shape}>"


class GridMesh(Mesh):
    """``rank = sum(coordinate[a] * stride[a])``, axes fastest first (Megatron-Core's RankGenerator)."""

    def __init__(self, name: str, axes: Sequence[str], sizes: Sequence[int]) -> None:
        if len(axes) != len(sizes) or len(set(axes)) != len(axes):
            raise ValueError(f"mesh {name!r}: axes {tuple(axes)} and sizes {tuple(sizes)} do not match")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"mesh {name!r}: sizes must be positive integers, got {tuple(sizes)}")
        self.name, self.axes, self.sizes = name, tuple(axes), tuple(sizes)
        self._strides = dict(zip(self.axes, _prefix_products(self.sizes)))

    def stride(self, axis: str) -> int:
        """How far apart in rank two neighbours along ``axis`` are."""
        self.size(axis)
        return self._strides[axis]

    def coordinates(self, rank: int) -> Dict[str, int]:
        self.check_rank(rank)
        return {a: rank // self._strides[a] % s for a, s in zip(self.axes, self.sizes)}

    def rank_at(self, coords: Mapping[str, int]) -> int:
        rank = 0
        for axis, value in coords.items():
            size = self.size(axis)
            if not 0 <= value < size:
                raise ValueError(f"{axis} coordinate {value} outside 0..{size - 1}")
            rank += value * self._strides[axis]
        return rank

    def group_of(self, rank: int, axes: Iterable[str]) -> List[int]:
        axes = self._check_axes(axes)
        coords = self.coordinates(rank)
        base = rank - sum(coords[a] * self._strides[a] for a in axes)
        steps = [[i * self._strides[a] for i in range(self.size(a))] for a in axes]
        return sorted(base + sum(offsets) for offsets in itertools.product(*steps))

    def runs(self, axes: Iterable[str]) -> FrozenSet[Run]:
        return merge_runs((self._strides[a], self.size(a)) for a in self._check_axes(axes))


class SplitMesh(Mesh):
    """Each group of ``base`` along ``over`` (its ranks in sorted order) re-factored into ``inner``.

    ``inner`` lists ``(axis, size)`` fastest first; the product of the sizes must equal the
    size of the groups along ``over``. The mesh's axes are the inner axes, then the base's
    other axes (which keep their names and coordinates).
    """

    def __init__(self, name: str, base: GridMesh, over: Sequence[str],
                 inner: Sequence[Tuple[str, int]]) -> None:
        over = tuple(a for a in base.axes if a in set(over))  # base order: local index order
        outer = tuple(a for a in base.axes if a not in over)
        names = tuple(a for a, _ in inner) + outer
        if len(set(names)) != len(names):
            raise ValueError(f"mesh {name!r}: axis names {names} repeat")
        local_size = math.prod(base.size(a) for a in over)
        if math.prod(s for _, s in inner) != local_size:
            raise ValueError(f"mesh {name!r}: inner sizes {tuple(inner)} do not multiply to "
                             f"{'*'.join(over)} = {local_size}")
        self.name, self.base, self.over, self.outer = name, base, over, outer
        self.inner = tuple((a, s) for a, s in inner)
        self.axes = names
        self.sizes = tuple(s for _, s in inner) + tuple(base.size(a) for a in outer)
        self._local_strides = dict(zip(over, _prefix_products([base.size(a) for a in over])))
        self._inner_strides = dict(zip((a for a, _ in inner), _prefix_products([s for _, s in inner])))

    def coordinates(self, rank: int) -> Dict[str, int]:
        base = self.base.coordinates(rank)
        local = sum(base[a] * self._local_strides[a] for a in self.over)
        coords = {a: local // self._inner_strides[a] % s for a, s in self.inner}
        coords.update((a, base[a]) for a in self.outer)
        return coords

    def rank_at(self, coords: Mapping[str, int]) -> int:
        local, base = 0, {}
        for axis, value in coords.items():
            size = self.size(axis)
            if not 0 <= value < size:
                raise ValueError(f"{axis} coordinate {value} outside 0..{size - 1}")
            if axis in self._inner_strides:
                local += value * self._inner_strides[axis]
            else:
                base[axis] = value
        for axis in self.over:
            base[axis] = local // self._local_strides[axis] % self.base.size(axis)
        return self.base.rank_at(base)

    def runs(self, axes: Iterable[str]) -> Optional[FrozenSet[Run]]:
        axes = self._check_axes(axes)
        rank_runs = [(self.base.stride(a), self.base.size(a)) for a in axes if a in self.outer]
        for local_stride, size in self._local_runs(axes):
            mapped = self._to_rank_runs(local_stride, size)
            if mapped is None:
                return None
            rank_runs.extend(mapped)
        return merge_runs(rank_runs)

    def _local_runs(self, axes: Tuple[str, ...]) -> FrozenSet[Run]:
        return merge_runs((self._inner_strides[a], self.size(a)) for a in axes if a in self._inner_strides)

    def _to_rank_runs(self, stride: int, size: int) -> Optional[List[Run]]:
        """Map a run of the local index onto runs of the rank, or None when it is not aligned
        with the blocks of ``over`` axes that are contiguous in rank space (e.g. 3 of a stage's
        tp(2)·dp(3) ranks when pp sits between tp and dp)."""
        out = []
        for low_block, block_size, rank_stride in self._blocks:
            low, high = max(stride, low_block), min(stride * size, low_block * block_size)
            if low >= high:
                continue
            if low % low_block or (low_block * block_size) % high or high % low:
                return None
            out.append((rank_stride * (low // low_block), high // low))
        return out

    @property
    def _blocks(self) -> List[Tuple[int, int, int]]:
        """The ``over`` axes merged where they continue each other in rank space:
        ``(local stride, size, rank stride)`` per block."""
        blocks: List[List[int]] = []
        for axis in self.over:
            size = self.base.size(axis)
            if size == 1:
                continue
            local, rank = self._local_strides[axis], self.base.stride(axis)
            if blocks and blocks[-1][2] * blocks[-1][1] == rank:
                blocks[-1][1] *= size
            else:
                blocks.append([local, size, rank])
        return [tuple(b) for b in blocks]

    def _fallback_key(self, axes: Tuple[str, ...]) -> Hashable:
        over = tuple((self.base.stride(a), self.base.size(a)) for a in self.over)
        outer = merge_runs((self.base.stride(a), self.base.size(a)) for a in axes if a in self.outer)
        return ("split", over, self._local_runs(axes), outer)


def parse_axes(text: str, what: str = "axes") -> Tuple[str, ...]:
    """``"tp-cp"`` → ``("tp", "cp")``; ConfigError for an empty part."""
    parts = tuple(p.strip() for p in text.split("-"))
    if not text or any(not p for p in parts):
        raise ConfigError(f"{what} {text!r}: expected short axis names joined with '-', e.g. 'tp-cp'")
    return parts
