"""A discrete-event simulation of a reshard schedule on a :class:`.network.Network` (pure: no
processes, no torch.distributed).

Input: every rank's rounds (:func:`.schedule.rank_rounds`: the executor's own messages and rounds)
and the executor's posting rule, run as the executor runs it — each rank cuts its rounds into
batches with :func:`.wire.batches` (``atomic``; ``caps``: the send / receive bytes a batch may
buffer, as ``max_staging_bytes`` sets them; ``per_step``: as with a progress callback), keeps
``regions`` buffer regions (1 or 2), posts a batch (one
group: every operation of its rounds, receive before send within a round) while
:func:`.wire.may_post` allows, and waits on its *oldest* batch, then frees its region and posts
again.

Backend semantics (``semantics``):

- ``"gloo"``: every posted operation is independent; a message starts once both of its ends are
  posted;
- ``"nccl"``: a rank's batches run in order on one stream — a batch (one ``batch_isend_irecv``,
  one NCCL group, coalesced into one work) starts only after the rank's previous batch
  completed; inside a started group the operations with different peers move concurrently
  (NCCL's grouped point-to-point, as in its all-to-all); a message starts once both ends'
  batches have started; the CPU sees the batch's work complete when all of it is done.

Connections: the messages from one rank to another move one at a time, in the order they became
ready (NCCL's operations with one peer run in order on that peer's connection; gloo's on one
socket pair).

Bandwidth: a message, ``latency_s`` after it starts, moves its bytes through the ports of its path
(:meth:`.network.Network.ports`); every port divides its capacity equally among the messages
moving through it and a message moves at the smallest of its ports' shares (capacity one message
cannot use is not handed to the others: never faster than max-min fairness). So no port ever
carries more than its capacity, and the makespan is at least the :func:`.network.lower_bound`.

Output (:class:`SimResult`): the makespan (when the last rank's last operation completed), each
rank's finish time, the lower bound, and each port's bytes — NIC utilisation is a port's bytes
over its capacity times the makespan.

Not modelled: packing / unpacking / local copies (compute), the plan agreement, the checksum's
arithmetic; a message whose bytes the receiver reads before its receive is posted.
"""
from __future__ import annotations

import collections
import heapq
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs

from ..wire import Batch, Round, batches, may_post
from .network import NIC_PORTS, Bound, Network, Port, lower_bound
from .schedule import message_list, round_bytes

SEMANTICS = ("nccl", "gloo")


@attrs.frozen
class SimResult:
    """What a simulation gives; times in seconds."""

    makespan_s: float
    finish_s: Mapping[int, float]
    bound: Bound
    network: Network
    messages: int
    semantics: str

    @property
    def lower_bound_s(self) -> float:
        return self.bound.seconds

    @property
    def ratio(self) -> float:
        """makespan / lower bound (1.0 when both are 0)."""
        low = self.bound.seconds
        return 1.0 if low == 0 and self.makespan_s == 0 else self.makespan_s / low if low else float("inf")

    def utilisation(self, port: Port) -> float:
        """Bytes ``port`` carried / (its capacity x the makespan): 1.0 means busy all the time."""
        if self.makespan_s == 0:
            return 0.0
        return self.bound.port_bytes.get(port, 0) / (self.network.capacity(port) * self.makespan_s)

    def nic_utilisation(self) -> Dict[Port, float]:
        """:meth:`utilisation` of every NIC port that carried bytes."""
        return {p: self.utilisation(p) for p in self.bound.port_bytes if p[0] in NIC_PORTS}

    @property
    def host_bound_s(self) -> float:
        """The busiest host's NIC bytes (out or in) / (its NICs x ``nic_bw``): the bound of any
        schedule moving the same bytes between the same hosts, however a host spreads them over
        its NICs (never above the NIC bound)."""
        per_host = self.host_nic_bytes().values()
        busiest = max((max(b) for b in per_host), default=0)
        return busiest / (self.network.nics_per_host * self.network.nic_bw)

    def host_nic_bytes(self) -> Dict[int, Tuple[int, int]]:
        """``{host: (bytes out through its NICs, bytes in)}`` for every host whose NICs carried bytes."""
        out: Dict[int, List[int]] = {}
        for port, nbytes in self.bound.port_bytes.items():
            if port[0] in NIC_PORTS:
                out.setdefault(port[1], [0, 0])[port[0] == "nic_in"] += nbytes
        return {h: (v[0], v[1]) for h, v in out.items()}


class _Op:
    """One posted operation of a rank: half of a message; ``batch``: the index of its batch."""

    __slots__ = ("rank", "batch", "round", "key", "is_send", "done")

    def __init__(self, rank: int, batch: int, round_index: int, key: Tuple[int, ...], is_send: bool) -> None:
        self.rank, self.batch, self.round, self.key, self.is_send, self.done = \
            rank, batch, round_index, key, is_send, False


class _Flow:
    """A message moving: its ports, bytes left, current rate."""

    __slots__ = ("ports", "left", "rate", "since", "version", "ops")

    def __init__(self, ports: Tuple[int, ...], nbytes: int, ops: Tuple[_Op, _Op]) -> None:
        self.ports, self.left, self.rate, self.since, self.version, self.ops = ports, float(nbytes), 0.0, 0.0, 0, ops


class _Rank:
    __slots__ = ("rounds", "batches", "next", "flight", "free_regions", "stream", "left", "ops", "finish")

    def __init__(self, rounds: Sequence[Round], batches_: Sequence[Batch], regions: int) -> None:
        self.rounds, self.batches, self.next, self.stream, self.finish = rounds, batches_, 0, 0, 0.0
        self.flight: Deque[int] = collections.deque()   # posted batches, oldest first
        self.free_regions = 1 if len(batches_) == 1 else regions
        self.left: Dict[int, int] = {}         # batch index → operations not yet done (posted batches)
        self.ops: Dict[int, List[_Op]] = {}    # batch index → its operations (posted, not done)


def simulate(schedule: Mapping[int, Sequence[Round]], network: Network, semantics: str = "nccl", *,
             atomic: bool = True, caps: Optional[Tuple[int, int]] = None, regions: int = 2,
             per_step: bool = False) -> SimResult:
    """Run ``schedule`` (``{rank: rounds}``, from :func:`.schedule.rank_rounds`) on ``network``
    with the executor's posting rule; see the module docstring. Raises ValueError for unknown
    ``semantics`` or when the schedule cannot finish (a rank waits forever: the rounds of its
    peers do not match)."""
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    cut = {r: batches(rounds, atomic, caps, per_step) for r, rounds in schedule.items()}
    return _Simulation(schedule, cut, network, semantics == "nccl", regions).run()


class _Simulation:
    def __init__(self, schedule: Mapping[int, Sequence[Round]], cut: Mapping[int, Sequence[Batch]],
                 network: Network, in_order: bool, regions: int) -> None:
        self.network, self.in_order = network, in_order
        self.ranks = {r: _Rank(rounds, cut[r], regions) for r, rounds in schedule.items()}
        self.schedule = schedule
        self.now = 0.0
        self.events: List[Tuple[float, int, int, Any, int]] = []   # (time, seq, kind, flow, version)
        self.seq = 0
        self.pending: Dict[Tuple[int, ...], _Op] = {}    # an op ready on one end, waiting for the other
        # (sender, receiver) → messages waiting for the pair's one connection (present: it is busy)
        self.connections: Dict[Tuple[int, int], Deque[Tuple[_Op, _Op]]] = {}
        self.port_ids: Dict[Port, int] = {}
        self.capacity: List[float] = []
        self.on_port: List[Dict[_Flow, None]] = []   # insertion-ordered: deterministic ties
        self.path_ids: Dict[Tuple[int, int], Tuple[int, ...]] = {}
        self.flows = 0

    # ---- the event loop
    def run(self) -> SimResult:
        for rank in self.ranks:
            self._advance(rank)
        events = self.events
        while events:
            when, _, kind, flow, version = heapq.heappop(events)
            if kind == 1 and version != flow.version:
                continue   # a stale finish time: the flow's rate changed since
            self.now = when
            if kind == 0:
                self._activate(flow)
            else:
                self._finish(flow)
        stuck = [r for r, st in self.ranks.items() if st.next < len(st.batches) or st.flight]
        if stuck:
            st = self.ranks[stuck[0]]
            raise ValueError(f"schedule cannot finish: rank {stuck[0]} waits at batch {st.next} of {len(st.batches)} "
                             f"({len(stuck)} ranks stuck): the ranks' rounds do not match")
        finish = {r: st.finish for r, st in self.ranks.items()}
        bound = lower_bound(self.network, message_list(self.schedule))
        return SimResult(max(finish.values(), default=0.0), finish, bound, self.network, self.flows,
                         "nccl" if self.in_order else "gloo")

    def _push(self, when: float, kind: int, flow: _Flow, version: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, flow, version))

    # ---- ranks: the executor's loop
    def _advance(self, rank: int) -> None:
        """Post while ``may_post`` allows; pop the oldest batch once all of it is done; repeat."""
        st = self.ranks[rank]
        while True:
            while st.next < len(st.batches) and may_post(st.batches[st.next], len(st.flight), st.free_regions):
                self._post(rank, st, st.next)
                st.next += 1
            if st.flight and not st.left.get(st.flight[0]):
                index = st.flight.popleft()
                st.left.pop(index, None)
                st.free_regions += st.batches[index].needs_region
                continue
            break
        if st.next == len(st.batches) and not st.flight:
            st.finish = self.now

    def _post(self, rank: int, st: _Rank, index: int) -> None:
        batch = st.batches[index]
        st.free_regions -= batch.needs_region
        ops = []
        for i in range(batch.start, batch.stop):
            current = st.rounds[i]
            if current.recv is not None:
                ops.append(_Op(rank, index, i, (current.recv.peer, rank, current.step, current.index, current.checksum),
                               False))
            if current.send is not None:
                ops.append(_Op(rank, index, i, (rank, current.send.peer, current.step, current.index, current.checksum),
                               True))
        st.flight.append(index)
        st.left[index] = len(ops)
        if self.in_order:
            st.ops[index] = ops
        if not self.in_order or index == st.stream:
            for op in ops:
                self._ready(op)

    def _ready(self, op: _Op) -> None:
        """``op`` may move (posted; under NCCL, its batch started): start its message if the other
        end may too."""
        other = self.pending.pop(op.key, None)
        if other is None:
            self.pending[op.key] = op
            return
        send, recv = (op, other) if op.is_send else (other, op)
        queue = self.connections.get((send.rank, recv.rank))
        if queue is not None:      # the pair's connection is busy: after the messages before it
            queue.append((send, recv))
            return
        self.connections[(send.rank, recv.rank)] = collections.deque()
        self._start(send, recv)

    def _start(self, send: _Op, recv: _Op) -> None:
        nbytes = round_bytes(self.ranks[send.rank].rounds[send.round])[1]
        flow = _Flow(self._path(send.rank, recv.rank), nbytes, (send, recv))
        self.flows += 1
        if self.network.latency_s > 0:
            self._push(self.now + self.network.latency_s, 0, flow)
        else:
            self._activate(flow)

    def _complete(self, op: _Op) -> None:
        op.done = True
        st = self.ranks[op.rank]
        st.left[op.batch] -= 1
        if st.left[op.batch] or not self.in_order:
            return
        del st.ops[op.batch]      # the batch's one work completed: the next batch on the stream starts
        st.stream = op.batch + 1
        for later in st.ops.get(st.stream, ()):
            self._ready(later)

    # ---- bandwidth
    def _path(self, src: int, dst: int) -> Tuple[int, ...]:
        key = (src, dst)
        found = self.path_ids.get(key)
        if found is None:
            ids = []
            for port in self.network.ports(src, dst):
                index = self.port_ids.get(port)
                if index is None:
                    index = self.port_ids[port] = len(self.capacity)
                    self.capacity.append(self.network.capacity(port))
                    self.on_port.append({})
                ids.append(index)
            found = self.path_ids[key] = tuple(ids)
        return found

    def _activate(self, flow: _Flow) -> None:
        flow.since = self.now
        for port in flow.ports:
            self.on_port[port][flow] = None
        self._rerate(flow.ports)

    def _finish(self, flow: _Flow) -> None:
        for port in flow.ports:
            del self.on_port[port][flow]
        self._rerate(flow.ports)
        send, recv = flow.ops
        queue = self.connections[(send.rank, recv.rank)]
        if queue:
            self._start(*queue.popleft())
        else:
            del self.connections[(send.rank, recv.rank)]
        self._complete(send)
        self._complete(recv)
        self._advance(send.rank)
        if recv.rank != send.rank:
            self._advance(recv.rank)

    def _rerate(self, ports: Tuple[int, ...]) -> None:
        """New equal shares on ``ports``: every flow through them moves at its smallest share."""
        touched: Dict[_Flow, None] = {}
        for port in ports:
            touched.update(self.on_port[port])
        now, capacity, on_port = self.now, self.capacity, self.on_port
        for flow in touched:
            rate = min(capacity[p] / len(on_port[p]) for p in flow.ports)
            if rate == flow.rate:
                continue
            flow.left = max(0.0, flow.left - flow.rate * (now - flow.since))
            flow.since, flow.rate = now, rate
            flow.version += 1
            self._push(now + flow.left / rate, 1, flow, flow.version)
