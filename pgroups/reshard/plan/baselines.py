"""The naive weight syncs as schedules for the simulator (pure): what resharding is compared with.

Both are modelled in their *fluid* limit — a pipelined chain or ring with chunks small enough
that its fill time vanishes: every link of the chain or ring is one message, all posted in one
batch, so the simulated time is that of the busiest port (plus one latency). Real NCCL adds a
fill of about one chunk per hop; leaving it out favours the baselines.

- :func:`broadcast_schedule` (rank-0 broadcast): the source's first copy is gathered on rank 0
  of the source layout (every rank of that copy sends it an even share of the model), then rank
  0 broadcasts the whole model down a chain through every destination rank in rank order (NCCL's
  ring broadcast); each destination keeps its shard. The two phases are steps 0 and 1 (simulate
  with ``per_step=True`` to run them in order).
- :func:`allgather_schedule` (all-gather, then slice): the ranks of every copy of the source
  (dense: one data-parallel replica, tp x pp ranks; MoE: one expert-data replica, etp x ep x pp
  ranks) ring-all-gather the model, each contributing an even share; a destination rank in the
  source layout then slices its shard locally; a destination rank outside it (a disjoint
  rollout placement) receives its shard from the source rank paired with it, after that rank's
  all-gather (a later step: with ``per_step=True`` the simulator runs the two phases in order).

``model_bytes`` is every tensor of the model once, in its own dtype.
"""
from __future__ import annotations

import math
from typing import Dict, List

from ..layout import ParallelLayout, local_shapes
from ..spec import ModelSpec
from ..wire import Round
from .schedule import SimChunk

Schedule = Dict[int, List[Round]]


def model_bytes(model: ModelSpec) -> int:
    """Bytes of every tensor of ``model``, once."""
    return sum(math.prod(spec.shape) * spec.itemsize for spec in model.tensors)


def shard_bytes(layout: ParallelLayout, model: ModelSpec, rank: int) -> int:
    """Bytes of ``rank``'s shards in ``layout``."""
    itemsize = {spec.name: spec.itemsize for spec in model.tensors}
    return sum(math.prod(shape) * itemsize[name] for name, shape in local_shapes(layout, model, rank).items())


def _add(schedule: Schedule, src: int, dst: int, nbytes: int, step: int) -> None:
    """One message ``src`` → ``dst`` of ``nbytes`` in ``step`` (both ends' rounds)."""
    if src == dst or nbytes <= 0:
        return
    schedule.setdefault(src, []).append(Round(step, 0, None, SimChunk(dst, nbytes, True)))
    schedule.setdefault(dst, []).append(Round(step, 0, SimChunk(src, nbytes, True), None))


def _sorted(schedule: Schedule) -> Schedule:
    # a rank's rounds in (step, index) order; a rank with two rounds of one step (receive from
    # one neighbour, send to the other) keeps both: their keys differ by peer
    return {r: sorted(rounds, key=lambda x: (x.step, x.index)) for r, rounds in schedule.items()}


def _copies(layout: ParallelLayout, model: ModelSpec) -> List[List[int]]:
    """The source's copies of the model: ranks grouped by their (expert-)data replica index."""
    expert = any(spec.is_expert for spec in model.tensors)
    groups: Dict[int, List[int]] = {}
    for rank in sorted(layout.ranks):
        coords = layout.mesh_coordinates(rank, expert)
        groups.setdefault(coords[2], []).append(rank)
    return [groups[k] for k in sorted(groups)]


def broadcast_schedule(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec) -> Schedule:
    """Rank-0 broadcast (see the module docstring): ``{rank: rounds}`` for :func:`.sim.simulate`."""
    total = model_bytes(model)
    root = min(src.ranks)
    out: Schedule = {}
    copy = _copies(src, model)[0]
    for rank in copy:
        _add(out, rank, root, total // len(copy), 0)
    chain = [root] + [r for r in sorted(dst.ranks) if r != root]
    for a, b in zip(chain, chain[1:]):
        _add(out, a, b, total, 1)
    return _sorted(out)


def allgather_schedule(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec) -> Schedule:
    """All-gather, then slice (see the module docstring): ``{rank: rounds}``."""
    total = model_bytes(model)
    out: Schedule = {}
    copies = _copies(src, model)
    for ring in copies:
        n = len(ring)
        for i, rank in enumerate(ring):   # link i → i+1 carries every share but the receiver's
            _add(out, rank, ring[(i + 1) % n], total - total // n, 0)
    outside = [r for r in sorted(dst.ranks) if r not in src]
    sources = sorted(src.ranks)
    for j, rank in enumerate(outside):
        _add(out, sources[j % len(sources)], rank, shard_bytes(dst, model, rank), 1)
    return _sorted(out)

