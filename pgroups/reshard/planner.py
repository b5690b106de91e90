"""The pure resharding planner: (src layout, dst layout, model, hosts) → a :class:`Plan`, or one
rank's :class:`PlanShare` of it.

What a destination rank needs is its shard of every tensor of its stage (the spec's TP pieces,
sub-block by sub-block, and for routed experts its EP range; see :mod:`.spec`). Intersected
with what every source shard holds, this gives *units*: maximal regions with one set of source
holders. Any TP / EP / pipeline repartition and any data parallelism work; the shards compute
(see :mod:`.spec` and ``tests/test_reshard_functional.py``).

Who sends a unit is a deterministic rule that both ends evaluate alone:
1. the destination rank itself holds the bytes in the source layout → a local copy;
2. else, with hosts known, a holder on the destination's host if there is one;
3. else a holder anywhere. Holders are the replicas of the source shards that hold the unit,
   numbered replica-major; the receiver at position ``p`` (its shard index times the number of
   its replicas, plus its replica index) takes holder ``p mod #holders`` — so replicas share the
   work round-robin, and a sender finds its own receivers by inverting the rule
   (``p ≡ its index``), without looking at the rest of the world.
One rank's share (:func:`plan_share`) therefore costs O(its transfers + tensors × shards it
overlaps); the whole plan (:func:`plan_reshard`) is the union of every destination's share, each
rank's regions and senders worked out once per tensor kind (O(total transfers)).

Network transfers are grouped into *steps*: the pair (sender ``s``, receiver ``d``) talks in step
``(s + d) mod W`` (``W`` = the largest rank + 1). In step ``c`` a rank ``r`` exchanges with one
peer only, ``(c - r) mod W`` — it sends to it, receives from it, or both (two ranks that feed each
other do it in one step) —, every rank knows the step of each of its pairs locally, and a rank
takes part in as many steps as it has peers. Ranks run their steps in increasing order, so no
cycle of waits can form.

Every rank computes the same :func:`plan_digest` (a 64-bit hash of everything the plan is a
function of), which the executor compares over the world before any byte moves.

The plan reports, per destination rank, the bytes received and the lower bound (bytes it
needs that it does not already hold); by construction they are equal (ratio 1.0).
Pure: no processes; identical inputs give an identical plan on every rank.
"""
from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import hashlib
import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import attrs

from ..errors import ConfigError, ReshardError
from .layout import ParallelLayout, format_ranks, layer_stages
from .spec import Block, LayerRef, ModelSpec, Piece, TensorSpec

Box = Tuple[Tuple[int, int], ...]   # per dim (start, stop)

#: bumped whenever the rule that turns inputs into a plan changes (it is part of the digest)
PLAN_RULE_VERSION = "pgroups-reshard-plan/3"


@attrs.frozen
class Transfer:
    """Bytes of one tensor going from global rank ``src`` to ``dst`` (``src == dst``: a local copy).

    ``global_box`` is the region of the full tensor; ``src_box`` / ``dst_box`` are the same
    region in the source / destination rank's local shard. They cover the full extent of every
    dim but ``axis`` (the TP split dim, or 0 for a replicated tensor) and, for a grouped expert
    weight, its expert dim; a 0-d tensor has empty boxes. ``step`` is the transfer step (-1 for
    local copies).
    """

    tensor: str
    src: int
    dst: int
    axis: int
    global_box: Box
    src_box: Box
    dst_box: Box
    nbytes: int
    step: int

    @property
    def is_local(self) -> bool:
        return self.src == self.dst

    @property
    def rows(self) -> int:
        """Length along ``axis``."""
        if not self.global_box:
            return 1
        start, stop = self.global_box[self.axis]
        return stop - start


@attrs.frozen
class ZeroFill:
    """Rows of a destination shard no source holds — vocabulary padding — that the executor
    zero-fills on rank ``dst`` (``dst_box`` in its local shard); never sent."""

    tensor: str
    dst: int
    axis: int
    dst_box: Box
    nbytes: int


@attrs.frozen
class ReceiverReport:
    """What one destination rank needs, holds and receives (bytes)."""

    rank: int
    needed_bytes: int          # the rank's whole destination shard
    held_bytes: int            # of which it already holds in the source layout
    received_bytes: int        # over the network, per the plan
    local_copy_bytes: int
    senders: Tuple[int, ...]

    @property
    def lower_bound_bytes(self) -> int:
        return self.needed_bytes - self.held_bytes

    @property
    def ratio(self) -> float:
        """received / lower bound (1.0 when both are 0)."""
        if self.lower_bound_bytes == 0:
            return 1.0 if self.received_bytes == 0 else float("inf")
        return self.received_bytes / self.lower_bound_bytes


def _transfers_of(transfers: Sequence[Transfer], rank: int) -> Tuple[List[Transfer], List[Transfer], List[Transfer]]:
    sends = [t for t in transfers if t.src == rank and not t.is_local]
    recvs = [t for t in transfers if t.dst == rank and not t.is_local]
    copies = [t for t in transfers if t.is_local and t.dst == rank]
    return sends, recvs, copies


@attrs.frozen
class PlanShare:
    """One rank's part of a plan: what it sends, receives and copies locally (each in plan
    order), from :func:`plan_share` or :meth:`Plan.share`. The executor runs a share exactly as
    it runs the whole plan; ``digest()`` is the whole plan's (identical on every rank)."""

    rank: int
    src: ParallelLayout
    dst: ParallelLayout
    model: ModelSpec
    sends: Tuple[Transfer, ...]
    recvs: Tuple[Transfer, ...]
    copies: Tuple[Transfer, ...]
    report: Optional[ReceiverReport]          # None when the rank is not in the dst layout
    hosts: Optional[Tuple[str, ...]] = None
    fills: Tuple[ZeroFill, ...] = ()

    @property
    def transfers(self) -> Tuple[Transfer, ...]:
        return self.copies + self.sends + self.recvs

    @property
    def num_steps(self) -> int:
        """One more than the largest step this rank takes part in (0 without network transfers)."""
        return max((t.step for t in self.sends + self.recvs), default=-1) + 1

    @property
    def steps(self) -> List[int]:
        """The steps this rank takes part in, in order (one per peer pair)."""
        return sorted({t.step for t in self.sends + self.recvs})

    @property
    def sent_bytes(self) -> int:
        return sum(t.nbytes for t in self.sends)

    @property
    def received_bytes(self) -> int:
        return sum(t.nbytes for t in self.recvs)

    def transfers_of(self, rank: int) -> Tuple[List[Transfer], List[Transfer], List[Transfer]]:
        """``(sends, receives, local copies)`` of ``rank`` (only this share's rank)."""
        if rank != self.rank:
            raise ReshardError(f"this plan share is rank {self.rank}'s; rank {rank} asked for its transfers — "
                               "each rank computes its own share with plan_share(..., rank)")
        return list(self.sends), list(self.recvs), list(self.copies)

    def summary(self, dst_dtypes: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """A JSON-ready summary of this rank's share (``dst_dtypes``: see :meth:`Plan.summary`)."""
        r = self.report
        return {
            "rank": self.rank, "plan_hash": f"{self.digest() & (2 ** 64 - 1):016x}",
            "src": self.src.describe(), "dst": self.dst.describe(),
            "experts": {"src": list(owned_experts(self.src, self.model, self.rank) or ()),
                        "dst": list(owned_experts(self.dst, self.model, self.rank) or ())},
            "vocab_padding": vocab_report(self.src, self.dst, self.model),
            "dst_dtypes": _dtype_counts(self.model.tensors, dst_dtypes),
            "wire_received_bytes": sum(_wire_bytes(self.model, self.recvs, dst_dtypes).values()),
            "wire_sent_bytes": sum(_wire_bytes(self.model, self.sends, dst_dtypes).values()),
            "sends": len(self.sends), "sent_bytes": self.sent_bytes,
            "receives": len(self.recvs), "received_bytes": self.received_bytes,
            "local_copies": len(self.copies), "local_copy_bytes": sum(t.nbytes for t in self.copies),
            "zero_filled_bytes": sum(f.nbytes for f in self.fills),
            "needed_bytes": r.needed_bytes if r else 0, "lower_bound_bytes": r.lower_bound_bytes if r else 0,
            "ratio": r.ratio if r else 1.0, "steps": self.steps,
            "send_peers": sorted({t.dst for t in self.sends}), "receive_peers": sorted({t.src for t in self.recvs}),
        }

    def fills_of(self, rank: int) -> List[ZeroFill]:
        """The padding regions ``rank`` zero-fills (only this share's rank)."""
        self.transfers_of(rank)
        return list(self.fills)

    def digest(self) -> int:
        """The plan's 64-bit hash (a signed int64), identical on every rank: :func:`plan_digest`."""
        return plan_digest(self.src, self.dst, self.model, self.hosts)


@attrs.frozen
class Plan:
    """A whole reshard; see the module docstring. ``transfers`` are the local copies, then the
    network transfers sorted by (step, src, dst, tensor order, position): both ends of a pair see
    them in one order."""

    src: ParallelLayout
    dst: ParallelLayout
    model: ModelSpec
    transfers: Tuple[Transfer, ...]
    num_steps: int
    receivers: Tuple[ReceiverReport, ...]
    sender_bytes: Mapping[int, int]   # every source rank → bytes it sends over the network
    hosts: Optional[Tuple[str, ...]] = None
    fills: Tuple[ZeroFill, ...] = ()

    @property
    def ranks(self) -> List[int]:
        """Every global rank taking part (source or destination), sorted."""
        return sorted(set(self.src.ranks) | set(self.dst.ranks))

    @property
    def received_bytes(self) -> int:
        return sum(r.received_bytes for r in self.receivers)

    @property
    def lower_bound_bytes(self) -> int:
        return sum(r.lower_bound_bytes for r in self.receivers)

    @property
    def ratio(self) -> float:
        low = self.lower_bound_bytes
        return 1.0 if low == 0 and self.received_bytes == 0 else self.received_bytes / low if low else float("inf")

    @property
    def max_ratio(self) -> float:
        return max((r.ratio for r in self.receivers), default=1.0)

    @property
    def sender_load_max(self) -> int:
        return max(self.sender_bytes.values(), default=0)

    @property
    def sender_load_mean(self) -> float:
        return sum(self.sender_bytes.values()) / len(self.sender_bytes) if self.sender_bytes else 0.0

    @property
    def pair_count(self) -> int:
        """Distinct (sender, receiver) pairs that exchange bytes over the network."""
        return len({(t.src, t.dst) for t in self.transfers if not t.is_local})

    @property
    def max_rank_steps(self) -> int:
        """The most steps any rank takes part in (its number of peer pairs)."""
        steps: Dict[int, set] = {}
        for t in self.transfers:
            if not t.is_local:
                steps.setdefault(t.src, set()).add(t.step)
                steps.setdefault(t.dst, set()).add(t.step)
        return max((len(s) for s in steps.values()), default=0)

    def transfers_of(self, rank: int) -> Tuple[List[Transfer], List[Transfer], List[Transfer]]:
        """``(sends, receives, local copies)`` of global ``rank``, in plan order."""
        return _transfers_of(self.transfers, rank)

    def fills_of(self, rank: int) -> List[ZeroFill]:
        """The padding regions ``rank`` zero-fills."""
        return [f for f in self.fills if f.dst == rank]

    def share(self, rank: int) -> PlanShare:
        """``rank``'s part of this plan (equal to ``plan_share(src, dst, model, rank, hosts)``)."""
        sends, recvs, copies = self.transfers_of(rank)
        report = next((r for r in self.receivers if r.rank == rank), None)
        return PlanShare(rank, self.src, self.dst, self.model, tuple(sends), tuple(recvs), tuple(copies), report,
                         self.hosts, tuple(self.fills_of(rank)))

    def digest(self) -> int:
        """The plan's 64-bit hash (a signed int64): :func:`plan_digest` of its inputs."""
        return plan_digest(self.src, self.dst, self.model, self.hosts)

    def summary(self, dst_dtypes: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """A JSON-ready summary (no per-transfer list). ``dst_dtypes`` (``{tensor: dtype}``, as the
        executor takes them) adds the bytes each receiver gets on the wire in those dtypes."""
        wire = _wire_bytes(self.model, [t for t in self.transfers if not t.is_local], dst_dtypes)
        return {
            "model": {"name": self.model.name, "tensors": len(self.model.tensors), "bytes": self.model.nbytes,
                      "expert_tensors": sum(1 for t in self.model.tensors if t.is_expert),
                      "dtypes": _dtype_counts(self.model.tensors)},
            "src": self.src.describe(), "dst": self.dst.describe(),
            "plan_hash": f"{self.digest() & (2 ** 64 - 1):016x}",
            "experts": expert_report(self.src, self.dst, self.model),
            "vocab_padding": vocab_report(self.src, self.dst, self.model),
            "dst_dtypes": _dtype_counts(self.model.tensors, dst_dtypes),
            "received_bytes": self.received_bytes, "lower_bound_bytes": self.lower_bound_bytes,
            "wire_received_bytes": sum(wire.values()),
            "ratio": self.ratio, "max_rank_ratio": self.max_ratio,
            "local_copy_bytes": sum(r.local_copy_bytes for r in self.receivers),
            "zero_filled_bytes": sum(f.nbytes for f in self.fills),
            "steps": self.max_rank_steps, "pairs": self.pair_count,
            "sender_load": {"max": self.sender_load_max, "mean": self.sender_load_mean,
                            "max_over_mean": (self.sender_load_max / self.sender_load_mean
                                              if self.sender_load_mean else 1.0)},
            "receivers": [{"rank": r.rank, "needed": r.needed_bytes, "held": r.held_bytes,
                           "received": r.received_bytes, "lower_bound": r.lower_bound_bytes,
                           "ratio": r.ratio, "local_copy": r.local_copy_bytes, "senders": list(r.senders),
                           "wire_received": wire.get(r.rank, 0),
                           "experts": list(owned_experts(self.dst, self.model, r.rank) or ())}
                          for r in self.receivers],
        }


# ---- interval geometry (pure) --------------------------------------------------------------------
@attrs.frozen
class _Unit:
    """A maximal interval of one dst TP piece with one set of source holders."""

    start: int
    stop: int
    dst_local: int
    holders: Tuple[Tuple[int, int], ...]   # (src tp, src local start of this unit)


def _segment_holders(bounds: List[int], src_pieces: Sequence[Sequence[Piece]]) -> List[Dict[int, int]]:
    """For each elementary segment ``[bounds[i], bounds[i+1])``: ``{src tp: src local start}``."""
    holders: List[Dict[int, int]] = [{} for _ in range(len(bounds) - 1)]
    for tp, pieces in enumerate(src_pieces):
        for start, stop, local in pieces:
            first, last = bisect.bisect_left(bounds, start), bisect.bisect_left(bounds, stop)
            for seg in range(first, last):
                holders[seg][tp] = local + bounds[seg] - start
    return holders


def _merge_units(dst_pieces: Sequence[Piece], bounds: List[int], holders: List[Dict[int, int]]) -> List[_Unit]:
    """Cut ``dst_pieces`` at every boundary, then merge neighbours with the same holders whose
    local positions continue on every side."""
    units: List[_Unit] = []
    for start, stop, local in dst_pieces:
        first, last = bisect.bisect_left(bounds, start), bisect.bisect_left(bounds, stop)
        for seg in range(first, last):
            seg_start, seg_stop = bounds[seg], bounds[seg + 1]
            held = holders[seg]
            if not held:
                raise ReshardError(f"rows [{seg_start}, {seg_stop}) of its split dim are needed by the destination "
                                   "but held by no source TP rank (sub-blocks that do not cover the dim)")
            dst_local = local + seg_start - start
            prev = units[-1] if units else None
            if (prev is not None and prev.stop == seg_start and prev.dst_local + prev.stop - prev.start == dst_local
                    and len(prev.holders) == len(held)
                    and all(tp in held and held[tp] == off + prev.stop - prev.start for tp, off in prev.holders)):
                units[-1] = attrs.evolve(prev, stop=seg_stop)
            else:
                units.append(_Unit(seg_start, seg_stop, dst_local, tuple(sorted(held.items()))))
    return units


@functools.lru_cache(maxsize=4096)
def _row_units(blocks: Tuple[Block, ...], axis_len: int, split: bool, vocab: bool,
               src_multiple: Optional[int], dst_multiple: Optional[int], src_tp_size: int,
               dst_tp_size: int, dst_tp: int) -> Tuple[_Unit, ...]:
    """The units of dst TP rank ``dst_tp``'s pieces along the split axis (cached: every layer's
    tensor of one kind has the same answer)."""
    geometry = TensorSpec("", (axis_len,), None, 0, 0, blocks, None, vocab)   # type: ignore[arg-type]

    def pieces(tp_size: int, tp: int, multiple: Optional[int]) -> Tuple[Piece, ...]:
        if not split:
            return ((0, axis_len, 0),)
        return geometry.pieces(tp_size, tp, multiple)

    src_pieces = [pieces(src_tp_size, tp, src_multiple) for tp in range(src_tp_size)]
    dst_pieces = pieces(dst_tp_size, dst_tp, dst_multiple)
    bounds = sorted({p for ps in src_pieces + [dst_pieces] for a, b, _ in ps for p in (a, b)})
    return tuple(_merge_units(dst_pieces, bounds, _segment_holders(bounds, src_pieces)))


@attrs.frozen
class _Need:
    """One region a dst shard needs with one set of holders: an expert range (grouped weights
    only), a row unit, and the EP rank of the source holders."""

    experts: Optional[Tuple[int, int, int, int]]    # (global start, global stop, dst local, src local)
    unit: _Unit
    src_ep: int


def _ep_overlaps(spec: TensorSpec, first: int, stop: int, ep_size: int) -> Iterator[Tuple[int, int, int, int]]:
    """EP ranks of ``ep_size`` owning experts in ``[first, stop)``: ``(ep, start, stop, its first)``."""
    if stop <= first:
        return
    for ep in range(spec.experts.owner(ep_size, first), spec.experts.owner(ep_size, stop - 1) + 1):
        own0, own1 = spec.experts.owned(ep_size, ep)
        yield ep, max(first, own0), min(stop, own1), own0


# ---- the rule ------------------------------------------------------------------------------------
class _Rule:
    """Everything both ends of a pair evaluate: stages, meshes, the units a dst shard needs, the
    sender a destination takes, and its inverse. Built once per (src, dst, model, hosts)."""

    def __init__(self, src: ParallelLayout, dst: ParallelLayout, model: ModelSpec,
                 hosts: Optional[Sequence[str]]) -> None:
        if hosts is not None:
            top = max(max(src.ranks), max(dst.ranks))
            if len(hosts) <= top:
                raise ConfigError(f"hosts names {len(hosts)} ranks but the layouts use ranks up to {top}")
        self.src, self.dst, self.model, self.hosts = src, dst, model, hosts
        self.src_stage, self.dst_stage = src.stage_map(model), dst.stage_map(model)
        self.world = max(max(src.ranks), max(dst.ranks)) + 1
        self.order = {spec.name: i for i, spec in enumerate(model.tensors)}
        self._by_host: Dict[Tuple[str, str], List[int]] = {}
        self._local: Dict[Any, List[int]] = {}
        self._coords: Dict[Tuple[bool, int, bool], Optional[Tuple[int, int, int, int]]] = {}
        self._senders: Dict[Any, int] = {}
        self._bytes: Dict[Any, int] = {}
        self._kinds: Dict[str, int] = {}
        self._held_specs: Dict[Tuple[bool, int, int, int], List[Tuple[TensorSpec, bool, int, int]]] = {}
        self._kind_ids: Dict[Tuple, int] = {}
        _check_computable(src, dst, model)

    # ---- what a dst shard needs
    def needs(self, spec: TensorSpec, dst_tp: int, dst_ep: int) -> Iterator[_Need]:
        expert = spec.is_expert
        src_tp_size, src_ep_size, _ = self.src.mesh_sizes(expert)
        dst_tp_size, dst_ep_size, _ = self.dst.mesh_sizes(expert)
        try:
            units = _row_units(spec.blocks, spec.axis_len, spec.tp_dim is not None, spec.vocab,
                               self.src.vocab_multiple, self.dst.vocab_multiple, src_tp_size, dst_tp_size, dst_tp)
        except ReshardError as exc:
            raise ReshardError(f"tensor {spec.name!r}: {exc}") from None
        if spec.experts is None:
            chunks: List[Tuple[Optional[Tuple[int, int, int, int]], int]] = [(None, 0)]
        elif spec.experts.index is not None:
            chunks = [(None, spec.experts.owner(src_ep_size, spec.experts.index))]
        else:
            first, stop = spec.experts.owned(dst_ep_size, dst_ep)
            chunks = [((a, b, a - first, a - own), ep) for ep, a, b, own in _ep_overlaps(spec, first, stop, src_ep_size)]
        for experts, src_ep in chunks:
            for unit in units:
                yield _Need(experts, unit, src_ep)

    # ---- who sends
    def coords(self, source: bool, rank: int, expert: bool) -> Optional[Tuple[int, int, int, int]]:
        """``mesh_coordinates`` of ``rank`` in the source (or destination) layout, memoised."""
        key = (source, rank, expert)
        found = self._coords.get(key, ())
        if found == ():
            found = self._coords[key] = (self.src if source else self.dst).mesh_coordinates(rank, expert)
        return found

    def host(self, rank: int) -> Optional[str]:
        return self.hosts[rank] if self.hosts is not None else None

    def on_host(self, side: str, host: str) -> List[int]:
        """Ranks of layout ``side`` on ``host``, sorted (built for all hosts at first use)."""
        if not self._by_host:
            for name, layout in (("src", self.src), ("dst", self.dst)):
                for rank in sorted(layout.ranks):
                    self._by_host.setdefault((name, self.hosts[rank]), []).append(rank)
        return self._by_host.get((side, host), [])

    def stages(self, source: bool, spec: TensorSpec) -> Tuple[int, ...]:
        """The stages holding ``spec`` in the source (or destination) layout."""
        return layer_stages(self.src_stage if source else self.dst_stage, spec.layer)

    def replica(self, source: bool, rank: int, expert: bool, stages: Tuple[int, ...]) -> Tuple[int, int]:
        """``(replica index, replicas)`` of ``rank`` among the copies of its shard: data (or expert
        data) replicas of every stage in ``stages`` (two for a tied tensor), stage-major."""
        _, _, replica, pp = self.coords(source, rank, expert)
        replicas = (self.src if source else self.dst).mesh_sizes(expert)[2]
        return stages.index(pp) * replicas + replica, replicas * len(stages)

    def rank_at(self, source: bool, tp: int, ep: int, index: int, stages: Tuple[int, ...], expert: bool) -> int:
        """The rank of replica ``index`` (as :meth:`replica` numbers them) of shard (tp, ep)."""
        layout = self.src if source else self.dst
        replicas = layout.mesh_sizes(expert)[2]
        return layout.mesh_rank(tp, ep, index % replicas, stages[index // replicas], expert)

    def local_holders(self, host: str, holders: Tuple[Tuple[int, int], ...], stages: Tuple[int, ...],
                      expert: bool) -> List[int]:
        """Source ranks on ``host`` holding one of the shards ``holders`` ((tp, ep) pairs) at ``stages``."""
        key = (host, holders, stages, expert)
        found = self._local.get(key)
        if found is None:
            wanted = set(holders)
            found = self._local[key] = [
                r for r in self.on_host("src", host)
                if (lambda c: c[3] in stages and (c[0], c[1]) in wanted)(self.coords(True, r, expert))]
        return found

    def position(self, rank: int, expert: bool, stages: Tuple[int, ...]) -> int:
        """``p`` of a destination rank: its shard index times its replicas, plus its replica index."""
        tp, ep, _, _ = self.coords(False, rank, expert)
        index, replicas = self.replica(False, rank, expert, stages)
        return (ep * self.dst.mesh_sizes(expert)[0] + tp) * replicas + index

    def sender(self, rank: int, holders: Tuple[Tuple[int, int], ...], spec: TensorSpec) -> int:
        """The source rank that sends dst ``rank`` a unit of ``spec`` held by shards ``holders``
        (rules 2-3)."""
        key = (rank, holders, spec.layer, spec.is_expert)
        found = self._senders.get(key)
        if found is None:
            found = self._senders[key] = self._sender(rank, holders, spec)
        return found

    def _sender(self, rank: int, holders: Tuple[Tuple[int, int], ...], spec: TensorSpec) -> int:
        expert, stages = spec.is_expert, self.stages(True, spec)
        p = self.position(rank, expert, self.stages(False, spec))
        if self.hosts is not None:
            local = self.local_holders(self.hosts[rank], holders, stages, expert)
            if local:
                return local[p % len(local)]
        replicas = self.src.mesh_sizes(expert)[2] * len(stages)
        k = p % (len(holders) * replicas)
        tp, ep = holders[k % len(holders)]
        return self.rank_at(True, tp, ep, k // len(holders), stages, expert)

    def holds(self, rank: int, spec: TensorSpec, need: _Need) -> Optional[int]:
        """Where ``rank`` holds ``need`` in its source shard (the row offset), or None."""
        coords = self.coords(True, rank, spec.is_expert)
        if coords is None or coords[3] not in self.stages(True, spec) or coords[1] != need.src_ep:
            return None
        return dict(need.unit.holders).get(coords[0])

    # ---- transfers
    def transfer(self, spec: TensorSpec, sender: int, receiver: int, need: _Need, src_local: int) -> Transfer:
        unit = need.unit
        full = [(0, n) for n in spec.shape]
        glob, at_src, at_dst = list(full), list(full), list(full)
        if need.experts is not None:
            a, b, dst_local, src_local_e = need.experts
            dim = spec.experts.dim
            glob[dim], at_src[dim], at_dst[dim] = (a, b), (src_local_e, src_local_e + b - a), (dst_local, dst_local + b - a)
        if spec.tp_dim is not None:
            rows = unit.stop - unit.start
            axis = spec.tp_dim
            glob[axis] = (unit.start, unit.stop)
            at_src[axis], at_dst[axis] = (src_local, src_local + rows), (unit.dst_local, unit.dst_local + rows)
        nbytes = math.prod(b - a for a, b in glob) * spec.itemsize
        step = -1 if sender == receiver else (receiver + sender) % self.world
        return Transfer(spec.name, sender, receiver, spec.axis, tuple(glob), tuple(at_src), tuple(at_dst), nbytes, step)

    def sort_key(self, t: Transfer) -> Tuple:
        return (t.step, t.src, t.dst, self.order[t.tensor], t.global_box)

    def kind(self, spec: TensorSpec) -> int:
        """A number for what a tensor's transfers depend on besides its name: geometry, dtype,
        experts and the stages holding it on each side. Tensors of one kind (every layer's q/k/v
        of a stage, say) get the same transfers, so a rank works them out once per kind."""
        found = self._kinds.get(spec.name)
        if found is None:
            key = (spec.shape, spec.dtype, spec.tp_dim, spec.blocks, spec.experts, spec.vocab,
                   self.stages(True, spec), self.stages(False, spec))
            found = self._kinds[spec.name] = self._kind_ids.setdefault(key, len(self._kind_ids))
        return found

    def receive(self, rank: int) -> Tuple[List[Transfer], List[Transfer], int, List[ZeroFill]]:
        """``(network receives, local copies, needed bytes, zero fills)`` of destination ``rank``;
        receives in plan order (:meth:`sort_key`), copies in model order."""
        by_sender, copies, needed, fills = self.receive_by_sender(rank)
        return [t for run in by_sender.values() for t in run], copies, needed, fills

    def receive_by_sender(self, rank: int) -> Tuple[Dict[int, List[Transfer]], List[Transfer], int, List[ZeroFill]]:
        """Like :meth:`receive`, with the receives as ``{sender: its transfers}`` in step order.

        The regions and senders are worked out once per tensor :meth:`kind` and shard, sorted by
        position; tensors are visited in model order, so each sender's run (and the copies) come
        out in plan order without sorting the transfers."""
        by_sender: Dict[int, List[Transfer]] = {}
        copies: List[Transfer] = []
        fills: List[ZeroFill] = []
        needed = 0
        by_kind: Dict[Tuple[int, int, int], Tuple[List[Tuple], int, Optional[Tuple[Box, int]]]] = {}
        for spec, tp, _, ep, _ in self._held(self.dst, self.dst_stage, rank):
            key = (self.kind(spec), tp, ep)
            found = by_kind.get(key)
            if found is None:
                found = by_kind[key] = self._receive_regions(rank, spec, tp, ep)
            regions, real, fill = found
            needed += real
            if fill is not None:
                fills.append(ZeroFill(spec.name, rank, spec.axis, fill[0], fill[1]))
            name, axis = spec.name, spec.axis
            for sender, glob, at_src, at_dst, nbytes, step in regions:
                transfer = Transfer(name, sender, rank, axis, glob, at_src, at_dst, nbytes, step)
                if step < 0:
                    copies.append(transfer)
                else:
                    run = by_sender.get(sender)
                    if run is None:
                        run = by_sender[sender] = []
                    run.append(transfer)
        world = self.world
        ordered = {s: by_sender[s] for s in sorted(by_sender, key=lambda s: (s + rank) % world)}
        return ordered, copies, needed, fills

    def _receive_regions(self, rank: int, spec: TensorSpec, tp: int,
                         ep: int) -> Tuple[List[Tuple], int, Optional[Tuple[Box, int]]]:
        """``([(sender, global box, src box, dst box, bytes, step)], real bytes, padding fill)`` of
        ``rank``'s shard (tp, ep) of a tensor like ``spec``; the sender is ``rank`` for local copies."""
        regions: List[Tuple] = []
        real, padded = self._shard_bytes(spec, self.dst, tp, ep)
        fill = None
        if padded > real:
            zero = self._fill(spec, rank, tp, ep, real, padded)
            fill = (zero.dst_box, zero.nbytes)
        for need in self.needs(spec, tp, ep):
            sender = rank
            at_sender = self.holds(rank, spec, need)
            if at_sender is None:
                holders = tuple((tp_s, need.src_ep) for tp_s, _ in need.unit.holders)
                sender = self.sender(rank, holders, spec)
                at_sender = self.holds(sender, spec, need)
                if at_sender is None:
                    raise ReshardError(f"tensor {spec.name!r}: the rule chose rank {sender} to send to rank {rank}, "
                                       "but it does not hold the region (a planner invariant is broken)")
            t = self.transfer(spec, sender, rank, need, at_sender)
            if t.nbytes:
                regions.append((sender, t.global_box, t.src_box, t.dst_box, t.nbytes, t.step))
        regions.sort(key=lambda region: region[1])
        return regions, real, fill

    def _fill(self, spec: TensorSpec, rank: int, tp: int, ep: int, real: int, padded: int) -> ZeroFill:
        """The padding rows of a vocabulary shard: after its real rows, to the padded length."""
        shape = spec.local_shape(self.dst.mesh_sizes(spec.is_expert)[0], tp, 1, 0, self.dst.vocab_multiple)
        box = [(0, n) for n in shape]
        rows = real // (padded // shape[spec.axis])
        box[spec.axis] = (rows, shape[spec.axis])
        return ZeroFill(spec.name, rank, spec.axis, tuple(box), padded - real)

    def send(self, rank: int) -> List[Transfer]:
        """Network sends of source ``rank``: the receives of other ranks whose rule picks it."""
        sends: List[Transfer] = []
        my_host = self.host(rank)
        for spec, tp, _, ep, _ in self._held(self.src, self.src_stage, rank):
            expert = spec.is_expert
            stages, dst_stages = self.stages(True, spec), self.stages(False, spec)
            replica, src_replicas = self.replica(True, rank, expert, stages)
            dst_tp_size = self.dst.mesh_sizes(expert)[0]
            dst_replicas = self.dst.mesh_sizes(expert)[2] * len(dst_stages)
            for dst_ep in self._dst_eps(spec, ep):
                for dst_tp in range(dst_tp_size):
                    shard = dst_ep * dst_tp_size + dst_tp
                    for need in self.needs(spec, dst_tp, dst_ep):
                        mine = dict(need.unit.holders).get(tp)
                        if need.src_ep != ep or mine is None:
                            continue
                        holders = tuple((tp_s, need.src_ep) for tp_s, _ in need.unit.holders)
                        count = len(holders) * src_replicas
                        index = replica * len(holders) + holders.index((tp, ep))
                        candidates: List[int] = []
                        if my_host is not None:
                            candidates = [d for d in self.on_host("dst", my_host)
                                          if self._is_shard(d, dst_tp, dst_ep, dst_stages, expert)]
                        for j in range((index - shard * dst_replicas) % count, dst_replicas, count):
                            d = self.rank_at(False, dst_tp, dst_ep, j, dst_stages, expert)
                            if my_host is None or (self.hosts[d] != my_host and not self.local_holders(
                                    self.hosts[d], holders, stages, expert)):
                                candidates.append(d)
                        for d in candidates:
                            if d == rank or self.holds(d, spec, need) is not None:
                                continue
                            if my_host is not None and self.sender(d, holders, spec) != rank:
                                continue
                            transfer = self.transfer(spec, rank, d, need, mine)
                            if transfer.nbytes:
                                sends.append(transfer)
        return sends

    def _dst_eps(self, spec: TensorSpec, src_ep: int) -> Iterator[int]:
        """The dst EP ranks whose shards can overlap src EP rank ``src_ep``'s."""
        if spec.experts is None:
            yield 0
            return
        dst_ep_size = self.dst.mesh_sizes(True)[1]
        if spec.experts.index is not None:
            yield spec.experts.owner(dst_ep_size, spec.experts.index)
            return
        first, stop = spec.experts.owned(self.src.mesh_sizes(True)[1], src_ep)
        for ep, *_ in _ep_overlaps(spec, first, stop, dst_ep_size):
            yield ep

    def _is_shard(self, rank: int, tp: int, ep: int, stages: Tuple[int, ...], expert: bool) -> bool:
        coords = self.coords(False, rank, expert)
        return coords is not None and coords[0] == tp and coords[1] == ep and coords[3] in stages

    def _held(self, layout: ParallelLayout, stages: Mapping[LayerRef, int],
              rank: int) -> Iterator[Tuple[TensorSpec, int, int, int, int]]:
        """Like :func:`.layout.held_tensors`, with the stage map computed once and the tensors of
        a (stage, EP rank) listed once for all its ranks."""
        if rank not in layout:
            return
        source = layout is self.src
        dense, expert = self.coords(source, rank, False), self.coords(source, rank, True)
        key = (source, dense[3], expert[3], expert[1])
        specs = self._held_specs.get(key)
        if specs is None:
            specs = self._held_specs[key] = []
            sizes = {e: layout.mesh_sizes(e) for e in (False, True)}
            for spec in self.model.tensors:
                is_expert = spec.is_expert
                tp_size, ep_size, _ = sizes[is_expert]
                coords = expert if is_expert else dense
                if coords[3] in layer_stages(stages, spec.layer) and spec.held_by(ep_size, coords[1]):
                    specs.append((spec, is_expert, tp_size, ep_size))
        for spec, is_expert, tp_size, ep_size in specs:
            coords = expert if is_expert else dense
            yield spec, coords[0], tp_size, coords[1], ep_size

    def _shard_bytes(self, spec: TensorSpec, layout: ParallelLayout, tp: int, ep: int) -> Tuple[int, int]:
        """``(real bytes, bytes with padding)`` of a shard (equal unless a vocabulary is padded)."""
        key = (spec.shape, spec.dtype, spec.tp_dim, spec.blocks, spec.experts, spec.vocab, layout is self.src, tp, ep)
        found = self._bytes.get(key)
        if found is None:
            tp_size, ep_size, _ = layout.mesh_sizes(spec.is_expert)
            shape = spec.local_shape(tp_size, tp, ep_size, ep, layout.vocab_multiple)
            padded = math.prod(shape) * spec.itemsize
            real = padded
            if spec.padded_rows(tp_size, layout.vocab_multiple) is not None and shape[spec.axis]:
                rows = sum(b - a for a, b, _ in spec.pieces(tp_size, tp, layout.vocab_multiple))
                real = padded // shape[spec.axis] * rows
            found = self._bytes[key] = (real, padded)
        return found


def _check_computable(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec) -> None:
    """ReshardError naming the tensor, its head counts, the TP size and the side, for a layout
    whose shards cannot compute (checked before anything else is planned)."""
    seen = set()
    for spec in model.tensors:
        for side, layout in (("source", src), ("destination", dst)):
            tp_size = layout.mesh_sizes(spec.is_expert)[0]
            key = (spec.blocks, tp_size)
            if key in seen:
                continue
            seen.add(key)
            problem = spec.tp_problem(tp_size)
            if problem is not None:
                raise ReshardError(f"{side} layout ({layout.describe()}): {problem}")


# ---- plans ---------------------------------------------------------------------------------------
def plan_share(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec, rank: int,
               hosts: Optional[Sequence[str]] = None) -> PlanShare:
    """``rank``'s part of the plan moving ``model`` from ``src`` to ``dst``: what it sends,
    receives and copies, in O(its transfers + tensors × the shards it overlaps); equal to
    ``plan_reshard(...).share(rank)``. Raises as :func:`plan_reshard`."""
    rule = _Rule(src, dst, model, hosts)
    recvs, copies, needed, fills = rule.receive(rank) if rank in dst else ([], [], 0, [])
    sends = rule.send(rank) if rank in src else []
    recvs.sort(key=rule.sort_key)
    sends.sort(key=rule.sort_key)
    copies.sort(key=lambda t: (rule.order[t.tensor], t.global_box))
    report = _report(rank, needed, recvs, copies) if rank in dst else None
    return PlanShare(rank, src, dst, model, tuple(sends), tuple(recvs), tuple(copies), report,
                     tuple(hosts) if hosts is not None else None, tuple(fills))


def plan_reshard(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec,
                 hosts: Optional[Sequence[str]] = None) -> Plan:
    """Plan moving every tensor of ``model`` from layout ``src`` to layout ``dst`` (the union of
    every rank's :func:`plan_share`), in O(total transfers): each destination's regions and
    senders are worked out once per tensor kind, then emitted for every tensor of that kind.

    ``hosts[r]`` is global rank r's host name (from the launch: ``gpc.get_hostnames()``);
    None means unknown (no same-host preference). Raises ConfigError if a layout's stage policy
    does not fit the model, or ``hosts`` does not cover every rank of both layouts; ReshardError
    if a layout's shards cannot compute (a TP size above a tensor's query heads).
    """
    with _gc_paused():
        return _whole_plan(_Rule(src, dst, model, hosts), hosts)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a plan's millions of acyclic objects are built: every
    collection would walk all of them again (half the time of a whole plan at world 1024)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _whole_plan(rule: "_Rule", hosts: Optional[Sequence[str]]) -> Plan:
    """Every destination's receives (each rank's regions shared per tensor kind), in plan order."""
    src, dst, model = rule.src, rule.dst, rule.model
    copies: List[Transfer] = []
    reports = []
    fills: List[ZeroFill] = []
    # A receiver's network transfers come in runs of one sender each (the pair's step is fixed);
    # ordering the runs by (step, src, dst) orders the whole plan without sorting every transfer.
    runs: List[Tuple[Tuple[int, int, int], List[Transfer]]] = []
    sender_bytes = {r: 0 for r in sorted(src.ranks)}
    for rank in sorted(dst.ranks):
        by_sender, mine, needed, padding = rule.receive_by_sender(rank)
        fills += padding
        copies += mine
        received = 0
        for sender, run in by_sender.items():
            nbytes = sum(t.nbytes for t in run)
            sender_bytes[sender] += nbytes
            received += nbytes
            runs.append(((run[0].step, sender, rank), run))
        copied = sum(t.nbytes for t in mine)
        reports.append(ReceiverReport(rank, needed, copied, received, copied, tuple(sorted(by_sender))))
    runs.sort(key=lambda run: run[0])
    network = [t for _, run in runs for t in run]
    return Plan(src, dst, model, tuple(copies) + tuple(network), max((key[0] for key, _ in runs), default=-1) + 1,
                tuple(reports), sender_bytes, tuple(hosts) if hosts is not None else None, tuple(fills))


def _report(rank: int, needed: int, recvs: Sequence[Transfer], copies: Sequence[Transfer]) -> ReceiverReport:
    copied = sum(t.nbytes for t in copies)
    return ReceiverReport(rank, needed, copied, sum(t.nbytes for t in recvs), copied,
                          tuple(sorted({t.src for t in recvs})))


# ---- the plan hash -------------------------------------------------------------------------------
def _layout_key(layout: ParallelLayout, model: ModelSpec) -> Tuple:
    t = layout.topology
    return (t.tensor, t.context, t.pipeline, t.data, tuple(t.order), layout.ranks, layout.layer_counts(model),
            layout.mesh_sizes(True), t.expert_layout if t.expert_enabled else None, layout.vocab_multiple)


def plan_digest(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec,
                hosts: Optional[Sequence[str]] = None) -> int:
    """A 64-bit hash (returned as a signed int64, ready for a torch.int64 tensor) of everything a
    plan is a function of: the rule's version, both layouts (sizes, order, ranks, layers per
    stage, expert sizes), every tensor spec, and the hosts. Equal inputs give an equal digest on
    every rank and process (blake2b; no Python ``hash``); O(world + tensors)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in (PLAN_RULE_VERSION, _layout_key(src, model), _layout_key(dst, model), model.num_layers,
                 model.tensors, None if hosts is None else tuple(hosts)):
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return int.from_bytes(digest.digest(), "little", signed=True)


def owned_experts(layout: ParallelLayout, model: ModelSpec, rank: int) -> Optional[Tuple[int, int]]:
    """Experts ``[first, stop)`` (of every MoE layer) ``rank`` owns in ``layout``; None when the
    model has no routed experts or the rank is not placed there."""
    spec = next((t for t in model.tensors if t.experts is not None), None)
    coords = layout.mesh_coordinates(rank, True) if spec is not None else None
    if coords is None:
        return None
    return spec.experts.owned(layout.mesh_sizes(True)[1], coords[1])


def expert_report(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec) -> Optional[Dict[str, Any]]:
    """The routed experts and each side's expert mesh (None without routed experts)."""
    specs = [t for t in model.tensors if t.experts is not None]
    if not specs:
        return None

    def side(layout: ParallelLayout) -> Dict[str, Any]:
        etp, ep, edp = layout.mesh_sizes(True)
        t = layout.topology
        return {"expert_tensor": etp, "expert": ep, "expert_data": edp,
                "layout": t.expert_layout if t.expert_enabled else "dense (no expert parallelism)",
                "experts_per_rank": [b - a for a, b in (specs[0].experts.owned(ep, e) for e in range(ep))]}

    return {"experts": specs[0].experts.num_experts, "tensors": len(specs),
            "grouped": sum(1 for t in specs if t.experts.dim is not None), "src": side(src), "dst": side(dst)}


def vocab_report(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec) -> Optional[Dict[str, Any]]:
    """Vocabulary rows, and each side's padded rows (Megatron's multiple of ``vocab_multiple`` x TP;
    None when no tensor is a vocabulary)."""
    spec = next((t for t in model.tensors if t.vocab), None)
    if spec is None:
        return None

    def side(layout: ParallelLayout) -> Dict[str, Any]:
        tp = layout.mesh_sizes(False)[0]
        per = spec.padded_rows(tp, layout.vocab_multiple)
        rows = spec.axis_len if per is None else per * tp
        return {"multiple": layout.vocab_multiple, "rows": rows, "padding_rows": rows - spec.axis_len}

    return {"rows": spec.axis_len, "tensors": sum(1 for t in model.tensors if t.vocab),
            "src": side(src), "dst": side(dst)}


def _dtype_counts(tensors: Sequence[TensorSpec], dtypes: Optional[Mapping[str, Any]] = None) -> Dict[str, int]:
    """``{dtype name: tensors}`` of the tensors (in ``dtypes`` where it names them)."""
    counts: Dict[str, int] = {}
    for t in tensors:
        name = str((dtypes or {}).get(t.name, t.dtype)).replace("torch.", "")
        counts[name] = counts.get(name, 0) + 1
    return counts


def _wire_bytes(model: ModelSpec, transfers: Sequence[Transfer], dst_dtypes: Optional[Mapping[str, Any]]) -> Dict[int, int]:
    """``{receiver: bytes on the wire}`` with each tensor converted to ``dst_dtypes`` at the sender
    (fp8: the values, then float32 scales; see :mod:`.convert`)."""
    from . import convert   # the executor's own accounting of converted bytes

    out: Dict[int, int] = {}
    for t in transfers:
        dtype = (dst_dtypes or {}).get(t.tensor)
        if dtype is None or dtype == model[t.tensor].dtype:
            nbytes = t.nbytes
        else:
            shape = [b - a for a, b in t.src_box] or [1]
            nbytes = convert.wire_layout(shape, dtype, convert.scale_dims(model[t.tensor]))[1]
        out[t.dst] = out.get(t.dst, 0) + nbytes
    return out


def _describe_context(s: Dict[str, Any], dtypes: Dict[str, int]) -> List[str]:
    """Report lines on experts, vocabulary padding and dtypes (shared by the plan and a share)."""
    lines = []
    experts = s.get("experts_report")
    if experts:
        sides = []
        for name in ("src", "dst"):
            e = experts[name]
            per = sorted(set(e["experts_per_rank"]))
            sides.append(f"{name} etp {e['expert_tensor']} x ep {e['expert']} x edp {e['expert_data']} "
                         f"({e['layout']}; experts per EP rank: {'/'.join(map(str, per))})")
        lines.append(f"routed experts: {experts['experts']} per MoE layer in {experts['tensors']} tensors "
                     f"({experts['grouped']} grouped [E, ...]); {'; '.join(sides)}; each destination rank "
                     "receives only its own experts")
    vocab = s.get("vocab_padding")
    if vocab:
        sides = [f"{name} {v['rows']} rows" + (f" (padded to a multiple of {v['multiple']} x TP: {v['padding_rows']} "
                                               "padding rows)" if v["multiple"] else " (unpadded)")
                 for name, v in (("src", vocab["src"]), ("dst", vocab["dst"]))]
        lines.append(f"vocabulary: {vocab['rows']} rows in {vocab['tensors']} tensors; {'; '.join(sides)}; "
                     "padding rows are never sent, destination padding is zero-filled")
    model_dtypes = ", ".join(f"{n} x{c}" for n, c in dtypes.items())
    dst_dtypes = ", ".join(f"{n} x{c}" for n, c in s["dst_dtypes"].items())
    fp8 = "; fp8 with float32 scales" if "float8" in dst_dtypes else ""
    lines.append(f"dtypes: source {model_dtypes}; destination {dst_dtypes}"
                 + ("" if model_dtypes == dst_dtypes else f" (converted at the sender{fp8})"))
    return lines


def describe_plan(plan: Plan, rank_limit: int = 16, dst_dtypes: Optional[Mapping[str, Any]] = None) -> str:
    """A readable report: summary lines, then one line per destination rank (first ``rank_limit``);
    ``dst_dtypes`` as in :meth:`Plan.summary`."""
    s = plan.summary(dst_dtypes)
    load = s["sender_load"]
    experts = s["model"]["expert_tensors"]
    lines = [
        f"model {plan.model.name}: {len(plan.model.tensors)} tensors"
        f"{f' ({experts} routed-expert)' if experts else ''}, {_fmt_bytes(plan.model.nbytes)}",
        f"src: {plan.src.describe()}",
        f"dst: {plan.dst.describe()}",
        f"plan hash {s['plan_hash']}",
        *_describe_context({**s, "experts_report": s["experts"]}, s["model"]["dtypes"]),
        f"received {_fmt_bytes(plan.received_bytes)} over the network; lower bound "
        f"{_fmt_bytes(plan.lower_bound_bytes)}; ratio {plan.ratio:.3f} (worst rank {plan.max_ratio:.3f}); "
        f"local copies {_fmt_bytes(s['local_copy_bytes'])}; vocabulary padding zero-filled on the destination "
        f"{_fmt_bytes(s['zero_filled_bytes'])} (never sent)",
        f"steps {plan.max_rank_steps} (most any rank takes part in), sender/receiver pairs {plan.pair_count}, "
        f"sender load max "
        f"{_fmt_bytes(load['max'])} / mean {_fmt_bytes(int(load['mean']))} = {load['max_over_mean']:.2f}",
        f"naive baselines, bytes received per rank: broadcast-all {_fmt_bytes(plan.model.nbytes)}, "
        f"all-gather {_fmt_bytes(plan.model.nbytes)}",
    ]
    converted = s["wire_received_bytes"] != s["received_bytes"]
    if converted:
        lines.append(f"on the wire in the destination dtypes: {_fmt_bytes(s['wire_received_bytes'])} received "
                     f"(source dtypes: {_fmt_bytes(s['received_bytes'])})")
    experts = s["experts"] is not None
    lines.append(f"{'rank':>6} {'needs':>10} {'holds':>10} {'receives':>10} {'bound':>10} {'ratio':>6}"
                 + (f" {'wire':>10}" if converted else "") + (f" {'experts':>8}" if experts else "") + "  senders")
    for r, row in zip(plan.receivers[:rank_limit], s["receivers"]):
        lines.append(f"{r.rank:>6} {_fmt_bytes(r.needed_bytes):>10} {_fmt_bytes(r.held_bytes):>10} "
                     f"{_fmt_bytes(r.received_bytes):>10} {_fmt_bytes(r.lower_bound_bytes):>10} "
                     f"{r.ratio:>6.3f}" + (f" {_fmt_bytes(row['wire_received']):>10}" if converted else "")
                     + (f" {_range(row['experts']):>8}" if experts else "")
                     + f"  {format_ranks(r.senders) or '-'}")
    if len(plan.receivers) > rank_limit:
        lines.append(f"   … {len(plan.receivers) - rank_limit} more destination ranks (--json lists all)")
    return "\n".join(lines)


def describe_share(share: PlanShare, dst_dtypes: Optional[Mapping[str, Any]] = None) -> str:
    """A readable report of one rank's share (``dst_dtypes`` as in :meth:`Plan.summary`)."""
    s = share.summary(dst_dtypes)
    mine = s["experts"]
    owns = ([f"routed experts: this rank owns {_range(mine['src']) or 'none'} in the source, "
             f"{_range(mine['dst']) or 'none'} in the destination (of every MoE layer)"]
            if mine["src"] or mine["dst"] else [])
    wire = ([f"on the wire in the destination dtypes: receives {_fmt_bytes(s['wire_received_bytes'])}, sends "
             f"{_fmt_bytes(s['wire_sent_bytes'])}"] if s["wire_received_bytes"] != s["received_bytes"]
            or s["wire_sent_bytes"] != s["sent_bytes"] else [])
    return "\n".join([
        f"rank {share.rank}'s share of the plan moving model {share.model.name} ({len(share.model.tensors)} tensors)",
        f"src: {s['src']}",
        f"dst: {s['dst']}",
        f"plan hash {s['plan_hash']}",
        *owns,
        *_describe_context({**s, "experts_report": expert_report(share.src, share.dst, share.model)},
                           _dtype_counts(share.model.tensors)),
        *wire,
        f"receives {_fmt_bytes(s['received_bytes'])} in {s['receives']} transfers from "
        f"{_peers(s['receive_peers'])}; lower bound {_fmt_bytes(s['lower_bound_bytes'])}, ratio {s['ratio']:.3f}",
        f"sends {_fmt_bytes(s['sent_bytes'])} in {s['sends']} transfers to {_peers(s['send_peers'])}",
        f"local copies {_fmt_bytes(s['local_copy_bytes'])} ({s['local_copies']}); zero-filled padding "
        f"{_fmt_bytes(s['zero_filled_bytes'])}",
        f"steps {len(s['steps'])}: {', '.join(map(str, s['steps'][:16]))}{' …' if len(s['steps']) > 16 else ''}",
    ])


def _range(bounds: Sequence[int]) -> str:
    """``[2, 4]`` → ``"2-3"``, ``[2, 3]`` → ``"2"``, ``[]`` → ``""``."""
    if not bounds:
        return ""
    first, stop = bounds
    return str(first) if stop - first == 1 else f"{first}-{stop - 1}"


def _peers(ranks: Sequence[int], limit: int = 16) -> str:
    if not ranks:
        return "no rank"
    more = f" … ({len(ranks)} ranks)" if len(ranks) > limit else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {format_ranks(ranks[:limit])}{more}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
