"""The sender rule, which both ends of every pair evaluate alone (see :mod:`pgroups.reshard.planner`):
a destination rank copies what it holds, else takes a holder on its host, else a holder
anywhere, replicas taking receivers round-robin; a source rank finds its receivers by inverting
the rule. :class:`SenderRule` also emits the transfers, each with its step. Pure: no processes."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ...errors import ConfigError, ReshardError
from ..layout import ParallelLayout, layer_stages
from ..spec import LayerRef, ModelSpec, TensorSpec, balanced_share
from .geometry import Need, Unit, ep_overlaps, row_units
from .types import Box, Transfer, ZeroFill


class SenderRule:
    """Everything both ends of a pair evaluate: stages, meshes, the units a dst shard needs, the
    sender a destination takes, and its inverse. Built once per (src, dst, model, hosts)."""

    def __init__(self, src: ParallelLayout, dst: ParallelLayout, model: ModelSpec,
                 hosts: Optional[Sequence[str]]) -> None:
        if hosts is not None:
            top = max(max(src.ranks), max(dst.ranks))
            if len(hosts) <= top:
                raise ConfigError(f"hosts names {len(hosts)} ranks but the layouts use ranks up to {top}")
        if dst.isp:
            raise ConfigError(f"destination layout ({dst.describe()}): an ISP (isp: true) layout is a source only")
        if src.isp and any(t.is_expert for t in model.tensors):
            raise ConfigError(f"source layout ({src.describe()}): routed experts from an ISP layout are not "
                              f"supported (model {model.name!r} has them)")
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
        check_computable(src, dst, model)

    # ---- what a dst shard needs
    def needs(self, spec: TensorSpec, dst_tp: int, dst_ep: int) -> Iterator[Need]:
        expert = spec.is_expert
        src_tp_size, src_ep_size, _ = self.src.mesh_sizes(expert)
        dst_tp_size, dst_ep_size, _ = self.dst.mesh_sizes(expert)
        isp = self.src.isp and not expert and spec.tp_dim is not None
        if isp and spec.tp_dim != 0:   # ISP rows of dim 0 x the destination's pieces of its axis
            pieces = spec.pieces(dst_tp_size, dst_tp, self.dst.vocab_multiple)
            for r in range(src_tp_size):
                a, b = balanced_share(spec.shape[0], src_tp_size, r)
                for g0, g1, local in pieces if b > a else ():
                    yield Need(None, Unit(g0, g1, local, ((r, g0),)), 0, (a, b))
            return
        try:
            units = row_units(spec.blocks, spec.axis_len, spec.tp_dim is not None, spec.vocab,
                              self.src.vocab_multiple, self.dst.vocab_multiple, src_tp_size, dst_tp_size, dst_tp, isp)
        except ReshardError as exc:
            raise ReshardError(f"tensor {spec.name!r}: {exc}") from None
        if spec.experts is None:
            chunks: List[Tuple[Optional[Tuple[int, int, int, int]], int]] = [(None, 0)]
        elif spec.experts.index is not None:
            chunks = [(None, spec.experts.owner(src_ep_size, spec.experts.index))]
        else:
            first, stop = spec.experts.owned(dst_ep_size, dst_ep)
            chunks = [((a, b, a - first, a - own), ep) for ep, a, b, own in ep_overlaps(spec, first, stop, src_ep_size)]
        for experts, src_ep in chunks:
            for unit in units:
                yield Need(experts, unit, src_ep)

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

    def holds(self, rank: int, spec: TensorSpec, need: Need) -> Optional[int]:
        """Where ``rank`` holds ``need`` in its source shard (the row offset), or None."""
        coords = self.coords(True, rank, spec.is_expert)
        if coords is None or coords[3] not in self.stages(True, spec) or coords[1] != need.src_ep:
            return None
        return dict(need.unit.holders).get(coords[0])

    # ---- transfers
    def transfer(self, spec: TensorSpec, sender: int, receiver: int, need: Need, src_local: int) -> Transfer:
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
        if need.rows is not None:   # an ISP source holds these rows of dim 0; the destination all of them
            a, b = need.rows
            glob[0], at_src[0], at_dst[0] = (a, b), (0, b - a), (a, b)
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
        for ep, *_ in ep_overlaps(spec, first, stop, dst_ep_size):
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


def check_computable(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec) -> None:
    """ReshardError naming the tensor, its head counts, the TP size and the side, for a layout
    whose shards cannot compute (checked before anything else is planned)."""
    seen = set()
    for spec in model.tensors:
        for side, layout in (("source", src), ("destination", dst)):
            if layout.isp:
                continue   # plain row pieces: no heads to split
            tp_size = layout.mesh_sizes(spec.is_expert)[0]
            key = (spec.blocks, tp_size)
            if key in seen:
                continue
            seen.add(key)
            problem = spec.tp_problem(tp_size)
            if problem is not None:
                raise ReshardError(f"{side} layout ({layout.describe()}): {problem}")
