"""Emulated nettest ranks without threads: each rank's control-plane traffic as a generator
that one ``selectors`` loop drives, many ranks per process, over raw store connections
(:mod:`_store_wire`). For ``bench_nettest_control.py --light``.

Why: every real :class:`pgroups.nettest.control.Coordinator` runs 4 threads (its main thread,
two call threads, the watcher). 2,048 of them in one 2-core sandbox are 8,192 threads, and
there the threads' own switching — not the store — made calls wait 10–35 s (measured: a call
waited up to 35 s before its call thread started it), so every rank declared the store gone.
A light rank makes the same store calls in the same order and at the same paced intervals as
the Coordinator methods the benchmark drives, from no thread of its own, so the store serves
the traffic of N ranks while the machine runs a handful of threads. Where the model is faithful
is checked by the benchmark: at a world that real threads can run, the calls per rank of light
and real ranks are shown side by side.

A light rank's call that takes longer than the tool's deadline (STORE_CALL_TIMEOUT_S) is what a
real rank would have reported as "store gone": it is counted as such.

The model mirrors, call for call: ``Coordinator.__init__`` (the run counter), the watcher
(``start_liveness``), ``beat``, ``exchange`` and ``_wait`` (polls and heartbeat reads),
``fetch``, ``conclude_abort``, ``leave_after_abort``, ``close_after_abort``, and the
benchmark's own host aggregation step. It must be changed with them.
"""
from __future__ import annotations

import heapq
import itertools
import json
import selectors
import struct
import time
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence

import _store_wire as wire
from pgroups.nettest.control import ALIVE_WINDOW_S, LEAVE_WAIT_S, STORE_CALL_TIMEOUT_S, STORE_PREFIX
from pgroups.nettest.pacing import Pacing


class Call:
    """A task's request on one of its rank's connections; the task resumes with the reply."""

    def __init__(self, conn: "Connection", request: wire.Request) -> None:
        self.conn, self.request = conn, request


class Sleep:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


Task = Generator[Any, Any, None]


class Connection:
    """One store connection: one request in flight at a time (as TCPStore's client), replies
    parsed from ``buffer``."""

    def __init__(self, sock: Any, owner: "LightRank") -> None:
        self.sock, self.owner = sock, owner
        self.buffer = bytearray()
        self.waiting: Optional[tuple] = None   # (request, task, sent_at)


class LightRank:
    """One emulated rank's state and counts."""

    def __init__(self, rank: int, world: int, pacing: Pacing, main: Any, liveness: Any) -> None:
        self.rank, self.world, self.pacing = rank, world, pacing
        self.main, self.liveness = Connection(main, self), Connection(liveness, self)
        self.prefix = ""
        self.aborted = False
        self.watching = True
        self.steps: List[str] = []
        self.calls = 0
        self.calls_before_abort = 0
        self.late: List[float] = []     # latencies over the deadline: "store gone" on a real rank

    def key(self, key: str) -> str:
        """The full key of ``key`` under the run's PrefixStore (PrefixStore joins with '/')."""
        return f"{self.prefix}/{key}"


class Loop:
    """Drives tasks (generators yielding :class:`Call` / :class:`Sleep`) over many connections."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.timers: List[tuple] = []
        self.order = itertools.count()
        self.running = 0

    def register(self, rank: LightRank) -> None:
        for conn in (rank.main, rank.liveness):
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def spawn(self, task: Task) -> None:
        self.running += 1
        self._step(task, None)

    def _step(self, task: Task, value: Any) -> None:
        try:
            command = task.send(value)
        except StopIteration:
            self.running -= 1
            return
        if isinstance(command, Sleep):
            heapq.heappush(self.timers, (time.monotonic() + command.seconds, next(self.order), task))
            return
        conn = command.conn
        assert conn.waiting is None, "one request in flight per connection"
        conn.owner.calls += 1
        conn.sock.sendall(command.request.data)
        if command.request.parse(b"", 0) is not None:   # no reply (SET, APPEND): resume at once
            heapq.heappush(self.timers, (time.monotonic(), next(self.order), task))
            return
        conn.waiting = (command.request, task, time.monotonic())

    def run(self) -> None:
        """Until every task has returned."""
        while self.running:
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, task = heapq.heappop(self.timers)
                self._step(task, None)
            timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else 0.5
            for key, _ in self.selector.select(min(timeout, 0.5)):
                conn: Connection = key.data
                chunk = conn.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError(f"rank {conn.owner.rank}: the store closed a connection")
                conn.buffer += chunk
                while conn.waiting is not None:
                    request, task, sent = conn.waiting
                    parsed = request.parse(bytes(conn.buffer), 0)
                    if parsed is None:
                        break
                    value, used = parsed
                    del conn.buffer[:used]
                    conn.waiting = None
                    latency = time.monotonic() - sent
                    if latency > STORE_CALL_TIMEOUT_S:
                        conn.owner.late.append(latency)
                    self._step(task, value)


def pack(blobs: List[bytes]) -> bytes:
    """Blobs as one value (a host's payloads in the host aggregation step): each prefixed
    with its length (4 bytes, big-endian)."""
    return b"".join(struct.pack(">I", len(b)) + b for b in blobs)


def unpack(value: bytes) -> List[bytes]:
    """The blobs of a :func:`pack` value."""
    blobs, at = [], 0
    while at < len(value):
        (size,) = struct.unpack_from(">I", value, at)
        blobs.append(value[at + 4:at + 4 + size])
        at += 4 + size
    return blobs


class Script:
    """The steps of ``bench_nettest_control.rank_main`` for one light rank (see its docstring):
    measure, the sweep exchange, host aggregation, wait for rank 0's plan, the scan exchange,
    the aborted run's end."""

    def __init__(self, r: LightRank, hosts_ranks: int, measure_s: float, sweep_blob: bytes, small_blob: bytes,
                 loop_s: float, none_blob: bytes) -> None:
        self.r, self.hosts_ranks, self.measure_s = r, hosts_ranks, measure_s
        self.sweep_blob, self.small_blob, self.none_blob, self.loop_s = sweep_blob, small_blob, none_blob, loop_s
        self.last_beat = 0.0

    def host(self, rank: int) -> int:
        return rank // self.hosts_ranks

    def start(self) -> Task:
        """``Coordinator.__init__``: this rank's run counter, under the root prefix."""
        r = self.r
        run = yield Call(r.main, wire.Request.add(f"{STORE_PREFIX}/runs/{r.rank}", 1))
        r.prefix = f"{STORE_PREFIX}run{int(run) - 1}/"

    def watcher(self) -> Task:
        """``start_liveness``: every watch_s one check of the abort flag; when raised, read it
        and answer (append this rank to ``answered``)."""
        r = self.r
        while True:
            yield Sleep(r.pacing.watch_s)
            if not r.watching:
                return
            raised = yield Call(r.liveness, wire.Request.check([r.key("abort")]))
            if raised:
                yield Call(r.liveness, wire.Request.get(r.key("abort")))
                r.aborted = True
                yield Call(r.liveness, wire.Request.append(r.key("answered"), f"{r.rank},".encode()))
                return

    def beat(self) -> Task:
        if time.monotonic() - self.last_beat >= self.r.pacing.beat_s:
            self.last_beat = time.monotonic()
            yield Call(self.r.main, wire.Request.add(self.r.key("beat"), 1))

    def wait(self, poll: Callable[[], Task]) -> Task:
        """``Coordinator._wait``: poll at once, then after the pacing's delays; a heartbeat read
        every beat_s."""
        r = self.r
        delays = r.pacing.poll_delays()
        last_check = 0.0
        while True:
            done = yield from poll()
            if done:
                return
            if time.monotonic() - last_check >= r.pacing.beat_s:
                last_check = time.monotonic()
                yield Call(r.main, wire.Request.add(r.key("beat"), 0))
            yield Sleep(next(delays))

    def exchange(self, step: str, blob: bytes) -> Task:
        """``Coordinator.exchange`` on a rank other than 0: set, two adds, then wait."""
        r = self.r
        r.steps.append(step)
        yield Call(r.main, wire.Request.set(r.key(f"{step}/data/{r.rank}"), blob))
        yield Call(r.main, wire.Request.add(r.key(f"{step}/bytes"), len(blob)))
        yield Call(r.main, wire.Request.add(r.key(f"{step}/arrived"), 1))

        def poll() -> Task:
            arrived = yield Call(r.main, wire.Request.add(r.key(f"{step}/arrived"), 0))
            return int(arrived) >= r.world
        yield from self.wait(poll)

    def aggregate(self, step: str) -> Task:
        """The benchmark's host aggregation (``aggregate_by_host``) on a rank other than 0."""
        r = self.r
        yield from self.exchange(f"{step}-agg-start", self.none_blob)
        if r.rank % self.hosts_ranks == 0:
            mine = [r.key(f"{step}/data/{k}") for k in range(r.rank, min(r.world, r.rank + self.hosts_ranks))]
            values = yield Call(r.main, wire.Request.multi_get(mine))
            blob = pack(values)
            yield Call(r.main, wire.Request.set(r.key(f"agg/{r.rank}"), blob))
            yield Call(r.main, wire.Request.add(r.key("agg/bytes"), len(blob)))
            yield Call(r.main, wire.Request.add(r.key("agg/arrived"), 1))
        yield from self.exchange(f"{step}-agg-end", self.none_blob)

    def fetch(self, key: str) -> Task:
        """``Coordinator.fetch``: wait for rank 0's plan, then read it."""
        r = self.r

        def poll() -> Task:
            ready = yield Call(r.main, wire.Request.check([r.key(f"plan/{key}")]))
            return bool(ready)
        yield from self.wait(poll)
        yield Call(r.main, wire.Request.get(r.key(f"plan/{key}")))

    def end_aborted_run(self) -> Task:
        """``end_aborted_run``: learn of the abort from the watcher (no call), then
        ``conclude_abort`` (poll for rank 0's final report), ``leave_after_abort`` and
        ``close_after_abort``."""
        r = self.r
        while not r.aborted:
            yield Sleep(self.loop_s)
        r.calls_before_abort = r.calls
        window_s = ALIVE_WINDOW_S + r.pacing.watch_s
        deadline = time.monotonic() + window_s + 3.0
        delays = r.pacing.poll_delays()
        missing: List[int] = []
        while time.monotonic() < deadline:
            if (yield Call(r.main, wire.Request.check([r.key("final")]))):
                final = json.loads((yield Call(r.main, wire.Request.get(r.key("final")))).decode())
                missing = final.get("missing", [])
                break
            yield Sleep(next(delays))
        yield Call(r.main, wire.Request.add(r.key("aborted-left"), 1))
        if self.host(r.rank) == self.host(0):
            others = sum(1 for k in range(r.world) if self.host(k) != self.host(0) and k not in missing)
            mine = sum(1 for k in range(r.world) if self.host(k) == self.host(0) and k not in missing)
            until = time.monotonic() + LEAVE_WAIT_S
            while (yield Call(r.main, wire.Request.add(r.key("aborted-left"), 0))) < others + mine and time.monotonic() < until:
                yield Sleep(0.05)
        r.watching = False
        for step in r.steps:
            yield Call(r.main, wire.Request.delete_key(r.key(f"{step}/data/{r.rank}")))
        yield Call(r.main, wire.Request.delete_key(r.key(f"pos/{r.rank}")))
        done = yield Call(r.main, wire.Request.add(r.key("aborted-done"), 1))
        if int(done) == r.world - len(set(missing)):
            shared = ([f"{s}/{c}" for s in r.steps for c in ("arrived", "bytes")] + ["plan/retest"]
                      + ["beat", "abort", "answered", "left", "final", "aborted-left", "aborted-done"])
            for key in shared:
                yield Call(r.main, wire.Request.delete_key(r.key(key)))

    def run(self) -> Task:
        """The whole script after the start barrier."""
        until = time.monotonic() + self.measure_s
        while time.monotonic() < until:                       # 1. measuring
            yield from self.beat()
            yield Sleep(self.loop_s)
        yield from self.exchange("sweep0", self.sweep_blob)    # 2. the sweep exchange
        yield from self.aggregate("sweep0")                    # 3. host aggregation
        yield from self.fetch("retest")                        # 4. rank 0's plan
        yield from self.exchange("scan0", self.small_blob)     # 5. the scan exchange
        yield from self.end_aborted_run()                      # 6. the abort


def result(r: LightRank) -> Dict[str, Any]:
    """One light rank's figures in the shape of a real rank's ``out``."""
    out: Dict[str, Any] = {"connections": 2, "calls": r.calls, "calls_before_abort": r.calls_before_abort}
    if r.late:
        out["error"] = (f"rank {r.rank} (light): {len(r.late)} store call(s) took {max(r.late):.1f} s, over the "
                        f"{STORE_CALL_TIMEOUT_S:g} s deadline: a real rank would have found the store gone")
    return out

