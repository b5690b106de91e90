"""The pure resharding planner: (src layout, dst layout, model, hosts) → a :class:`Plan`.

For every destination rank and tensor it intersects the intervals the rank needs (its TP
pieces in the dst layout, sub-block by sub-block for fused layouts) with the intervals every
source TP rank holds, so any TP sizes work (no divisibility), any pipeline repartition (each
tensor's stage comes from each layout's stage policy) and any data parallelism.

Sender choice, per unit (a maximal interval with one set of holders):
1. the destination rank itself holds the bytes in the source layout → a local copy;
2. else the least-loaded holder on the destination's host;
3. else the least-loaded holder anywhere (every replica of every TP rank that holds it).
The units a destination needs from one set of holders form a group served by one sender (so
each rank talks to few peers: few steps, few messages). Loads are the bytes each sender has
been given so far (updated on every choice), and groups are assigned largest first, so
replicas share the work.

Network transfers are grouped into *steps*: every (sender, receiver) pair talks in exactly
one step and, within a step, each rank sends to at most one peer and receives from at most one
(a proper edge colouring of the bipartite sender/receiver graph, so the number of steps is the
largest number of peers any rank has — the least possible).

The plan reports, per destination rank, the bytes received and the lower bound (bytes it
needs that it does not already hold); by construction they are equal (ratio 1.0).
Pure: no processes; identical inputs give an identical plan on every rank.
"""
from __future__ import annotations

import bisect
import heapq
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import attrs

from ..errors import ConfigError
from .layout import ParallelLayout, format_ranks
from .spec import ModelSpec, Piece, TensorSpec

Box = Tuple[Tuple[int, int], ...]   # per dim (start, stop)


@attrs.frozen
class Transfer:
    """Bytes of one tensor going from global rank ``src`` to ``dst`` (``src == dst``: a local copy).

    ``global_box`` is the region of the full tensor; ``src_box`` / ``dst_box`` are the same
    region in the source / destination rank's local shard. All three differ only on ``axis``
    (the TP split dim, or 0 for a replicated tensor); a 0-d tensor has empty boxes.
    ``step`` is the transfer step (-1 for local copies).
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


@attrs.frozen
class Plan:
    """A whole reshard; see the module docstring. ``transfers`` are sorted by
    (step, src, dst, tensor order, position): both ends of a pair see them in one order."""

    src: ParallelLayout
    dst: ParallelLayout
    model: ModelSpec
    transfers: Tuple[Transfer, ...]
    num_steps: int
    receivers: Tuple[ReceiverReport, ...]
    sender_bytes: Mapping[int, int]   # every source rank → bytes it sends over the network

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

    def transfers_of(self, rank: int) -> Tuple[List[Transfer], List[Transfer], List[Transfer]]:
        """``(sends, receives, local copies)`` of global ``rank``, in plan order."""
        sends = [t for t in self.transfers if t.src == rank and not t.is_local]
        recvs = [t for t in self.transfers if t.dst == rank and not t.is_local]
        copies = [t for t in self.transfers if t.is_local and t.dst == rank]
        return sends, recvs, copies

    def summary(self) -> Dict[str, Any]:
        """A JSON-ready summary (no per-transfer list)."""
        return {
            "model": {"name": self.model.name, "tensors": len(self.model.tensors), "bytes": self.model.nbytes},
            "src": self.src.describe(), "dst": self.dst.describe(),
            "received_bytes": self.received_bytes, "lower_bound_bytes": self.lower_bound_bytes,
            "ratio": self.ratio, "max_rank_ratio": self.max_ratio,
            "local_copy_bytes": sum(r.local_copy_bytes for r in self.receivers),
            "steps": self.num_steps, "pairs": self.pair_count,
            "sender_load": {"max": self.sender_load_max, "mean": self.sender_load_mean,
                            "max_over_mean": (self.sender_load_max / self.sender_load_mean
                                              if self.sender_load_mean else 1.0)},
            "receivers": [{"rank": r.rank, "needed": r.needed_bytes, "held": r.held_bytes,
                           "received": r.received_bytes, "lower_bound": r.lower_bound_bytes,
                           "ratio": r.ratio, "local_copy": r.local_copy_bytes, "senders": list(r.senders)}
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


def _units(dst_pieces: Sequence[Piece], bounds: List[int], holders: List[Dict[int, int]]) -> List[_Unit]:
    """Cut ``dst_pieces`` at every boundary, then merge neighbours with the same holders whose
    local positions continue on every side."""
    units: List[_Unit] = []
    for start, stop, local in dst_pieces:
        first, last = bisect.bisect_left(bounds, start), bisect.bisect_left(bounds, stop)
        for seg in range(first, last):
            seg_start, seg_stop = bounds[seg], bounds[seg + 1]
            held = holders[seg]
            if not held:
                raise AssertionError(f"interval [{seg_start}, {seg_stop}) is held by no source rank")
            dst_local = local + seg_start - start
            prev = units[-1] if units else None
            if (prev is not None and prev.stop == seg_start and prev.dst_local + prev.stop - prev.start == dst_local
                    and len(prev.holders) == len(held)
                    and all(tp in held and held[tp] == off + prev.stop - prev.start for tp, off in prev.holders)):
                units[-1] = attrs.evolve(prev, stop=seg_stop)
            else:
                units.append(_Unit(seg_start, seg_stop, dst_local, tuple(sorted(held.items()))))
    return units


def _overlap(pieces_a: Sequence[Piece], pieces_b: Sequence[Piece]) -> int:
    """Rows two sets of pieces have in common (pure interval intersection)."""
    return sum(max(0, min(a1, b1) - max(a0, b0)) for a0, a1, _ in pieces_a for b0, b1, _ in pieces_b)


class _Boxes:
    """Boxes of one tensor: the full extent on every dim but the axis."""

    def __init__(self, spec: TensorSpec) -> None:
        self.full = tuple((0, n) for n in spec.shape)
        self.axis = spec.axis

    def box(self, start: int, stop: int) -> Box:
        if not self.full:
            return ()
        return self.full[:self.axis] + ((start, stop),) + self.full[self.axis + 1:]


# ---- sender choice -----------------------------------------------------------------------------
class _SenderPools:
    """Least-loaded choice among holders, preferring the receiver's host; loads only grow, so
    each pool is a heap with lazy refresh of stale entries."""

    def __init__(self, hosts: Optional[Sequence[str]]) -> None:
        self.hosts = hosts
        self.loads: Dict[int, int] = {}
        self._heaps: Dict[Tuple[Any, Optional[str]], List[Tuple[int, int]]] = {}
        self._has_host: Dict[Tuple[Any, str], bool] = {}

    def host(self, rank: int) -> Optional[str]:
        return self.hosts[rank] if self.hosts is not None else None

    def pick(self, key: Any, candidates: Sequence[int], dst: int, nbytes: int,
             partners: Optional[set] = None) -> int:
        """The sender for ``nbytes`` of ``key``'s bytes to ``dst``; its load grows by ``nbytes``.

        Tier: holders on ``dst``'s host if any, else all. Within the tier, a holder already in
        ``partners`` (senders ``dst`` receives from) is preferred, least loaded first; a new
        pair is opened only when none is, so each rank talks to few peers.
        """
        host = self.host(dst)
        if partners:
            same = [r for r in candidates if r in partners and (host is None or self.host(r) == host)]
            tier_has_host = host is not None and self._tier_host(key, candidates, host) is not None
            usable = same if tier_has_host or host is None else [r for r in candidates if r in partners]
            if usable:
                rank = min(usable, key=lambda r: (self.loads.get(r, 0), r))
                self.loads[rank] = self.loads.get(rank, 0) + nbytes
                return rank
        return self._least_loaded(key, candidates, host, nbytes)

    def _tier_host(self, key: Any, candidates: Sequence[int], host: str) -> Optional[str]:
        has = self._has_host.get((key, host))
        if has is None:
            has = self._has_host[(key, host)] = any(self.host(r) == host for r in candidates)
        return host if has else None

    def _least_loaded(self, key: Any, candidates: Sequence[int], host: Optional[str], nbytes: int) -> int:
        pool_host = self._tier_host(key, candidates, host) if host is not None else None
        heap = self._heaps.get((key, pool_host))
        if heap is None:
            members = [r for r in candidates if pool_host is None or self.host(r) == pool_host]
            heap = self._heaps[(key, pool_host)] = [(self.loads.get(r, 0), r) for r in members]
            heapq.heapify(heap)
        while True:
            load, rank = heap[0]
            current = self.loads.get(rank, 0)
            if load == current:
                break
            heapq.heapreplace(heap, (current, rank))
        self.loads[rank] = current + nbytes
        heapq.heapreplace(heap, (current + nbytes, rank))
        return rank


# ---- steps ---------------------------------------------------------------------------------------
def color_pairs(pairs: Iterable[Tuple[int, int]]) -> Dict[Tuple[int, int], int]:
    """A proper edge colouring of the bipartite graph senders → receivers with exactly as many
    colours as the largest degree (König; alternating-path recolouring). Pure."""
    at_sender: Dict[int, Dict[int, int]] = {}
    at_receiver: Dict[int, Dict[int, int]] = {}
    for u, v in pairs:
        sent, got = at_sender.setdefault(u, {}), at_receiver.setdefault(v, {})
        a = next(c for c in range(len(sent) + 1) if c not in sent)
        b = next(c for c in range(len(got) + 1) if c not in got)
        if a in got:
            if b not in sent:
                a = b
            else:
                # flip the a/b path that starts at v along colour a; it cannot reach u
                path, node, colour, on_receiver = [], v, a, True
                while True:
                    table = at_receiver if on_receiver else at_sender
                    nxt = table[node].get(colour)
                    if nxt is None:
                        break
                    path.append((nxt, node, colour) if on_receiver else (node, nxt, colour))
                    node, colour, on_receiver = nxt, (b if colour == a else a), not on_receiver
                for s, r, c in path:
                    del at_sender[s][c], at_receiver[r][c]
                for s, r, c in path:
                    flipped = b if c == a else a
                    at_sender[s][flipped], at_receiver[r][flipped] = r, s
        sent[a], got[a] = v, u
    return {(u, v): c for u, table in at_sender.items() for c, v in table.items()}


# ---- the planner ----------------------------------------------------------------------------------
def plan_reshard(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec,
                 hosts: Optional[Sequence[str]] = None) -> Plan:
    """Plan moving every tensor of ``model`` from layout ``src`` to layout ``dst``.

    ``hosts[r]`` is global rank r's host name (from the launch: ``gpc.get_hostnames()``);
    None means unknown (no same-host preference). Raises ConfigError if a layout's stage policy
    does not fit the model, or ``hosts`` does not cover every rank of both layouts.
    """
    if hosts is not None:
        top = max(max(src.ranks), max(dst.ranks))
        if len(hosts) <= top:
            raise ConfigError(f"hosts names {len(hosts)} ranks but the layouts use ranks up to {top}")
    src_stage, dst_stage = src.stage_map(model), dst.stage_map(model)
    src_tp, dst_tp = src.topology.tensor, dst.topology.tensor
    pools = _SenderPools(hosts)
    # units needed over the network, grouped by (receiver, holders): one sender serves a group
    groups: Dict[Tuple[int, Tuple[int, Tuple[int, ...]]], List[Any]] = {}
    copies: List[Transfer] = []
    needed: Dict[int, int] = {r: 0 for r in dst.ranks}
    held: Dict[int, int] = {r: 0 for r in dst.ranks}
    candidates_by_key: Dict[Tuple[int, Tuple[int, ...]], List[int]] = {}

    src_coords = {r: src.coordinates(r) for r in set(src.ranks) | set(dst.ranks)}
    boxes = {spec.name: _Boxes(spec) for spec in model.tensors}
    for index, spec in enumerate(model.tensors):
        s_stage, d_stage = src_stage[spec.layer], dst_stage[spec.layer]
        row_bytes, box = spec.row_bytes, boxes[spec.name].box
        src_pieces = [spec.pieces(src_tp, tp) for tp in range(src_tp)]
        dst_pieces = [spec.pieces(dst_tp, tp) for tp in range(dst_tp)]
        bounds = sorted({p for pieces in src_pieces + dst_pieces for a, b, _ in pieces for p in (a, b)})
        holders = _segment_holders(bounds, src_pieces)
        for d_tp in range(dst_tp):
            units = _units(dst_pieces[d_tp], bounds, holders)
            need_rows = sum(b - a for a, b, _ in dst_pieces[d_tp])
            for rank in dst.replicas(d_tp, d_stage):
                needed[rank] += need_rows * row_bytes
                mine = src_coords[rank]
                my_tp = mine["tp"] if mine is not None and mine["pp"] == s_stage else None
                if my_tp is not None:
                    held[rank] += _overlap(src_pieces[my_tp], dst_pieces[d_tp]) * row_bytes
                for unit in units:
                    rows = unit.stop - unit.start
                    nbytes = rows * row_bytes
                    if nbytes == 0:
                        continue
                    holder_tps = dict(unit.holders)
                    if my_tp is not None and my_tp in holder_tps:
                        src_local = holder_tps[my_tp]
                        copies.append(Transfer(spec.name, rank, rank, spec.axis, box(unit.start, unit.stop),
                                               box(src_local, src_local + rows),
                                               box(unit.dst_local, unit.dst_local + rows), nbytes, -1))
                    else:
                        key = (s_stage, tuple(sorted(holder_tps)))
                        if key not in candidates_by_key:
                            candidates_by_key[key] = sorted(r for tp in key[1] for r in src.replicas(tp, s_stage))
                        group = groups.setdefault((rank, key), [0, []])
                        group[0] += nbytes
                        group[1].append((spec, unit, index))

    chosen: List[Tuple[int, int, TensorSpec, _Unit, int]] = []   # (src, dst, spec, unit, tensor index)
    partners: Dict[int, set] = {}
    for (rank, key), (nbytes, members) in sorted(groups.items(), key=lambda g: (-g[1][0], g[0])):
        sender = pools.pick(key, candidates_by_key[key], rank, nbytes, partners.setdefault(rank, set()))
        partners[rank].add(sender)
        chosen.extend((sender, rank, spec, unit, index) for spec, unit, index in members)

    steps = color_pairs(sorted({(s, d) for s, d, *_ in chosen}))
    transfers = []
    for sender, rank, spec, unit, index in chosen:
        rows, box, step = unit.stop - unit.start, boxes[spec.name].box, steps[(sender, rank)]
        src_local = dict(unit.holders)[src_coords[sender]["tp"]]
        transfers.append((step, sender, rank, index, unit.start,
                          Transfer(spec.name, sender, rank, spec.axis, box(unit.start, unit.stop),
                                   box(src_local, src_local + rows), box(unit.dst_local, unit.dst_local + rows),
                                   rows * spec.row_bytes, step)))
    order = {name: i for i, name in enumerate(model.names)}
    copies.sort(key=lambda t: (t.dst, order[t.tensor], t.global_box))
    transfers.sort(key=lambda item: item[:5])
    network = [t for *_, t in transfers]

    received: Dict[int, int] = {r: 0 for r in dst.ranks}
    senders: Dict[int, set] = {r: set() for r in dst.ranks}
    for t in network:
        received[t.dst] += t.nbytes
        senders[t.dst].add(t.src)
    copied: Dict[int, int] = {r: 0 for r in dst.ranks}
    for t in copies:
        copied[t.dst] += t.nbytes
    reports = tuple(ReceiverReport(r, needed[r], held[r], received[r], copied[r], tuple(sorted(senders[r])))
                    for r in sorted(dst.ranks))
    sender_bytes = {r: pools.loads.get(r, 0) for r in sorted(src.ranks)}
    return Plan(src, dst, model, tuple(copies) + tuple(network), max(steps.values(), default=-1) + 1,
                reports, sender_bytes)


def describe_plan(plan: Plan, rank_limit: int = 16) -> str:
    """A readable report: summary lines, then one line per destination rank (first ``rank_limit``)."""
    s = plan.summary()
    load = s["sender_load"]
    lines = [
        f"model {plan.model.name}: {len(plan.model.tensors)} tensors, {_fmt_bytes(plan.model.nbytes)}",
        f"src: {plan.src.describe()}",
        f"dst: {plan.dst.describe()}",
        f"received {_fmt_bytes(plan.received_bytes)} over the network; lower bound "
        f"{_fmt_bytes(plan.lower_bound_bytes)}; ratio {plan.ratio:.3f} (worst rank {plan.max_ratio:.3f}); "
        f"local copies {_fmt_bytes(s['local_copy_bytes'])}",
        f"steps {plan.num_steps}, sender/receiver pairs {plan.pair_count}, sender load max "
        f"{_fmt_bytes(load['max'])} / mean {_fmt_bytes(int(load['mean']))} = {load['max_over_mean']:.2f}",
        f"naive baselines, bytes received per rank: broadcast-all {_fmt_bytes(plan.model.nbytes)}, "
        f"all-gather {_fmt_bytes(plan.model.nbytes)}",
        f"{'rank':>6} {'needs':>10} {'holds':>10} {'receives':>10} {'bound':>10} {'ratio':>6}  senders",
    ]
    for r in plan.receivers[:rank_limit]:
        lines.append(f"{r.rank:>6} {_fmt_bytes(r.needed_bytes):>10} {_fmt_bytes(r.held_bytes):>10} "
                     f"{_fmt_bytes(r.received_bytes):>10} {_fmt_bytes(r.lower_bound_bytes):>10} "
                     f"{r.ratio:>6.3f}  {format_ranks(r.senders) or '-'}")
    if len(plan.receivers) > rank_limit:
        lines.append(f"   … {len(plan.receivers) - rank_limit} more destination ranks (--json lists all)")
    return "\n".join(lines)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
