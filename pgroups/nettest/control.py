"""The control plane of ``pgroups nettest``: the rendezvous store of the default group (no
collective at all). Ranks post their figures and where they are, wait for each other between
steps, and raise the *abort* flag when a group hangs — every other rank's watcher thread sees it
within :attr:`Pacing.watch_s` and the rank stops. A rank that stops making progress while idle
(no heartbeat for ``--timeout``) is named too. Every store call is bounded
(:class:`_GuardedStore`): a store whose host vanished is reported as gone, never waited for.
Every periodic call (abort checks, polls, heartbeats) is paced by the world size
(:class:`Pacing`): the store answers a bounded number of them per second at any scale.
"""
from __future__ import annotations

import gc
import json
import math
import os
import queue
import threading
import time
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch.distributed as dist

from ..errors import GroupTimeoutError
from ..torch_private import default_store
from .pacing import Pacing

STORE_PREFIX = "pgroups-nettest/"
CHECK_INTERVAL_S = 0.5      # how often a data-plane wait looks at the abort flag (a local Event: no store call)
ALIVE_WINDOW_S = 2.5   # after an abort: how long (beyond one watch interval) the rank that raised it waits for answers
LEAVE_WAIT_S = 2.0     # ... and how long the store's host waits for the other hosts' ranks to leave
STORE_CALL_TIMEOUT_S = 8.0  # a store call that takes longer: the store is gone
SLICE_BYTES = 4 * 1024 * 1024     # rank 0 reads the ranks' figures in multi_get calls of about this size
STORE_MIN_RATE = 1024 * 1024      # bytes/s a slow but alive store still serves: a slice's deadline grows by size/rate
GONE_POLL_S = 0.2           # how often a waiting store call looks whether another found the store gone


class NettestTimeoutError(GroupTimeoutError):
    """A group under test (or a rank between steps) did not answer within ``--timeout``.

    ``report`` is the JSON-able hang report (group id, ranks, hosts, what, who never entered).
    """

    def __init__(self, message: str, report: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.report = report or {}



class StoreGoneError(NettestTimeoutError):
    """The rendezvous store stopped answering: its host (or the process that held it) is gone."""


def store_address() -> str:
    """``HOST:PORT`` of the rendezvous store, as the launcher gave it (``?`` if unknown)."""
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


class _StoreHealth:
    """Shared by every guarded view of one store: set once a call finds the store gone, after
    which every call (on any thread) fails at once instead of waiting its own deadline."""

    def __init__(self) -> None:
        self.gone = threading.Event()
        self.cause = ""

    def mark_gone(self, cause: str) -> None:
        if not self.gone.is_set():
            self.cause = cause
            self.gone.set()


class Pending:
    """One call submitted to a :class:`CallThread`: ``done`` is set when it returned;
    ``value`` what it returned, ``error`` what it raised."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.done = threading.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None


class CallThread:
    """A daemon thread that runs submitted calls in order, so that the caller can wait for one
    on an Event — with a deadline, and looking at other things in between — instead of being
    blocked inside it. A caller that gives up on a call that never returns sets ``stuck``: the
    thread is left to it; :meth:`close` ends and joins (bounded) a thread that is not stuck."""

    def __init__(self, name: str) -> None:
        self._calls: "queue.SimpleQueue[Optional[Pending]]" = queue.SimpleQueue()
        self.stuck = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            pending = self._calls.get()
            if pending is None:
                return
            try:
                pending.value = pending.call()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                pending.error = exc
            pending.done.set()

    def submit(self, call: Callable[[], Any]) -> Pending:
        pending = Pending(call)
        self._calls.put(pending)
        return pending

    def close(self, join_s: float = 1.0) -> None:
        self._calls.put(None)
        if not self.stuck:
            self._thread.join(join_s)


class _GuardedStore:
    """The run's store. Every call runs on one daemon thread and is given STORE_CALL_TIMEOUT_S:
    a store whose host vanished silently never answers (no reset, the TCP call would block for
    minutes), so a call that does not return in time — or that fails — raises StoreGoneError
    (one line, never a traceback) and marks the store gone for every other call (``health``,
    shared by the views of one store): the liveness thread, which calls it every second, finds
    out within STORE_CALL_TIMEOUT_S of the store's death whatever the main thread is doing. A
    call left hanging keeps the thread; later calls fail at once, which is right: the store is
    gone."""

    def __init__(self, store: dist.Store, call_timeout_s: float, health: Optional[_StoreHealth] = None) -> None:
        self._store = store
        self._timeout_s = call_timeout_s
        self.health = health or _StoreHealth()
        self._thread = CallThread("pgroups-nettest-store")
        self.calls = 0

    def check_gone(self) -> None:
        """Raise StoreGoneError if some call found the store gone."""
        if self.health.gone.is_set():
            raise store_gone(self.health.cause)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def guarded(*args: Any) -> Any:
            return self.call(name, *args)
        return guarded

    def call(self, name: str, *args: Any, timeout_s: Optional[float] = None) -> Any:
        """The store's method ``name`` on ``args``, given ``timeout_s`` (default: the store's
        call timeout) before the store is declared gone."""
        method = getattr(self._store, name)
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        self.check_gone()
        self.calls += 1
        pending = self._thread.submit(lambda: method(*args))
        deadline = time.monotonic() + timeout_s
        while not pending.done.wait(min(GONE_POLL_S, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                self._thread.stuck = True
                self.health.mark_gone(f"no answer for {timeout_s:g}s")
            self.check_gone()
        error = pending.error
        if isinstance(error, (RuntimeError, dist.DistError, ConnectionError)):
            self.health.mark_gone(first_words(str(error)) or type(error).__name__)
            self.check_gone()
        if error is not None:
            raise error
        return pending.value

    def close(self, join_s: float = 1.0) -> None:
        """End the call thread and join it (bounded); a thread left inside a call that never
        returned (the store is gone) is not waited for."""
        self._thread.close(join_s)


def store_gone(cause: str) -> "StoreGoneError":
    message = f"the rendezvous store at {store_address()} is gone ({cause})"
    return StoreGoneError(message, {"message": message, "kind": "store-gone", "store": store_address()})


class Coordinator:
    """Barriers, figure exchange, plans, heartbeats and the abort flag, through the store.

    Keys live under ``pgroups-nettest/run<N>/``, where N counts this rank's runs on this store
    (a counter per rank: one shared counter divided by the world size gave a rank the previous
    run's N as soon as one rank of an earlier run never counted itself), so a second run never
    reads the first one's keys. They are deleted when the run ends (:meth:`close`), after an
    abort (:meth:`close_after_abort`) and on any other exit (:meth:`shutdown` deletes this
    rank's own); only the run counters stay. :meth:`shutdown` joins the threads (call it on
    every exit path).

    Two store connections per rank whatever the world size: ``store`` for the steps and
    ``liveness`` (``liveness_store``: a second client of the same server, each with its own
    call thread) for the watcher thread (:meth:`start_liveness`), so that a long call of the
    main thread (rank 0 reading every rank's figures) never delays the answer to an abort into
    a false "stopped answering". Without ``liveness_store`` (a store that is not a TCPStore)
    both share one connection.

    Periodic calls follow :class:`.pacing.Pacing` (``pacing``): the watcher's abort check
    every ``watch_s``, a waiting rank's poll every ``poll_s``, a heartbeat every ``beat_s``,
    each interval ``max(floor, world_size / its share of STORE_CALLS_PER_S)``: the whole
    world makes at most 8,000 periodic calls per second at any size. The main thread never
    calls the store to learn of an abort (:meth:`check_abort` reads what the watcher found).
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float,
                 hostnames: Sequence[str], liveness_store: Optional[dist.Store] = None) -> None:
        call_timeout = STORE_CALL_TIMEOUT_S
        root = _GuardedStore(dist.PrefixStore(STORE_PREFIX, store), call_timeout)
        try:
            self.run_id = int(root.add(f"runs/{rank}", 1)) - 1
        finally:
            root.close()
        prefix = f"{STORE_PREFIX}run{self.run_id}/"
        self.store = _GuardedStore(dist.PrefixStore(prefix, store), call_timeout, root.health)
        self.store.calls = root.calls
        self.liveness = (_GuardedStore(dist.PrefixStore(prefix, liveness_store), call_timeout, root.health)
                         if liveness_store is not None else self.store)
        self._alive_thread: Optional[threading.Thread] = None
        self._alive_stop = threading.Event()
        self.rank, self.world_size = rank, world_size
        self.pacing = Pacing(world_size)
        self.timeout_s = timeout_s
        self.stall_s = timeout_s + 2 * self.pacing.beat_s + 1.0
        self._aborted = threading.Event()   # set once this rank knows the abort report ...
        self._abort_report: Dict[str, Any] = {}
        self._answer_lock = threading.Lock()
        self._answered = False               # ... and answered it (``answered``: who is alive)
        self._last_abort_look = time.monotonic()
        self.hostnames = list(hostnames)
        self._last_beat = 0.0
        self._steps: List[str] = []
        self._plans: List[str] = []
        self._own_deleted = False
        self.collect_s = 0.0   # rank 0: seconds spent reading the ranks' figures ...
        self.decode_s = 0.0    # ... of which decoding them
        self.collect_cpu_s = 0.0   # ... and this process's CPU seconds meanwhile

    @classmethod
    def from_default_group(cls, timeout_s: float, hostnames: Sequence[str]) -> "Coordinator":
        store = default_store()
        return cls(store, dist.get_rank(), dist.get_world_size(), timeout_s, hostnames,
                   liveness_store=second_client(store))

    @property
    def calls(self) -> int:
        """Store calls this rank made so far (both connections)."""
        return self.store.calls + (self.liveness.calls if self.liveness is not self.store else 0)

    def host(self, rank: int) -> str:
        return self.hostnames[rank] if rank < len(self.hostnames) else "?"

    # where each rank is, for hang reports
    def position(self, where: str) -> None:
        self.store.set(f"pos/{self.rank}", where)

    def positions(self, ranks: Sequence[int]) -> Dict[int, str]:
        found = {}
        for rank in ranks:
            key = f"pos/{rank}"
            found[rank] = self.store.get(key).decode() if self.store.check([key]) else "start-up"
        return found

    def beat(self) -> None:
        """Heartbeat (one store call at most every ``pacing.beat_s``; cheap to call often) and
        abort check. Rank 0 calls it while it thinks, so that the waiting ranks do not take its
        silence for a hang."""
        now = time.monotonic()
        if now - self._last_beat >= self.pacing.beat_s:
            self._last_beat = now
            self.store.add("beat", 1)
        self.check_abort()

    def check_abort(self) -> None:
        """Raise NettestTimeoutError (the first abort report) if the run was aborted, or
        StoreGoneError if a call found the store gone. No store call while the watcher runs
        (it looks every ``pacing.watch_s``); without it, one call at most every ``watch_s``."""
        self.store.check_gone()
        if (not self._aborted.is_set() and self._alive_thread is None
                and time.monotonic() - self._last_abort_look >= self.pacing.watch_s):
            self._last_abort_look = time.monotonic()
            self._look_for_abort(self.store)
        if self._aborted.is_set():
            report = self._abort_report
            raise NettestTimeoutError(report.get("message", "another rank aborted the test"), report)

    def _look_for_abort(self, store: "_GuardedStore") -> bool:
        """One look at the abort flag through ``store``; True (and the report learnt, the
        abort answered) if it is raised."""
        if self._aborted.is_set():
            return True
        if not store.check(["abort"]):
            return False
        self._learn_abort(store.get("abort"), store)
        return True

    def _learn_abort(self, payload: Any, store: "_GuardedStore") -> None:
        """Keep the abort report and answer it once: this rank's number is appended to
        ``answered`` (one key: the rank that raised the abort reads who is alive in one call)."""
        text = payload.decode() if isinstance(payload, bytes) else payload
        with self._answer_lock:
            if self._answered:
                return
            self._abort_report = json.loads(text)
            self._aborted.set()
            self._answered = True
        store.append("answered", f"{self.rank},")

    def abort(self, report: Dict[str, Any]) -> bool:
        """Raise the abort flag with ``report``; True if this rank was the first to raise it.
        Either way this rank now knows the first report (:meth:`check_abort` raises it)."""
        payload = json.dumps(report)
        current = self.store.compare_set("abort", "", payload)
        current = current.decode() if isinstance(current, bytes) else current
        self._learn_abort(current, self.store)
        return current == payload

    def exchange(self, step: str, payload: Any) -> Optional[List[Any]]:
        """Post ``payload`` for ``step`` and wait for every rank; rank 0 gets every payload.

        Four store calls per rank whatever the world size (set, two adds, then the wait's
        polls). The payload travels as zlib-compressed JSON; rank 0 reads them in
        :func:`slices` of about SLICE_BYTES, each call given STORE_CALL_TIMEOUT_S plus its
        size at STORE_MIN_RATE (never one call for the whole world, whose size grows with
        it), and beats between slices."""
        self._steps.append(step)
        blob = encode_payload(payload)
        self.store.set(f"{step}/data/{self.rank}", blob)
        self.store.add(f"{step}/bytes", len(blob))
        self.store.add(f"{step}/arrived", 1)
        self._wait(lambda: _arrived(int(self.store.add(f"{step}/arrived", 0)), self.world_size), step,
                   lambda: [r for r in range(self.world_size) if not self.store.check([f"{step}/data/{r}"])])
        if self.rank != 0:
            return None
        started, cpu = time.perf_counter(), time.process_time()
        total = int(self.store.add(f"{step}/bytes", 0))
        values: List[Any] = []
        for first, last in slices(self.world_size, total, SLICE_BYTES):
            expected = total * (last - first) / self.world_size
            blobs = self.store.call("multi_get", [f"{step}/data/{r}" for r in range(first, last)],
                                    timeout_s=STORE_CALL_TIMEOUT_S + expected / STORE_MIN_RATE)
            decoding = time.perf_counter()
            with gc_paused():
                values.extend(decode_payload(b) for b in blobs)
            self.decode_s += time.perf_counter() - decoding
            self.beat()
        self.collect_s += time.perf_counter() - started
        self.collect_cpu_s += time.process_time() - cpu
        return values

    def publish(self, key: str, value: Any) -> None:
        self._plans.append(key)
        self.store.set(f"plan/{key}", json.dumps(value))

    def fetch(self, key: str) -> Any:
        self._plans.append(key)   # any rank may be the one that deletes the shared keys
        self._wait(lambda: (self.store.check([f"plan/{key}"]), 0), f"the plan {key!r} from rank 0", lambda: [0])
        return json.loads(self.store.get(f"plan/{key}").decode())

    def close(self) -> None:
        """The run is over on every rank: each deletes its own keys, rank 0 the shared ones
        once everyone has left (bounded wait)."""
        self.stop_liveness()
        self._delete_own_keys()
        self.store.add("left", 1)
        if self.rank != 0:
            return
        deadline = time.monotonic() + self.stall_s
        delays = self.pacing.poll_delays()
        while int(self.store.add("left", 0)) < self.world_size and time.monotonic() < deadline:
            time.sleep(min(next(delays), 0.01))   # one rank polls: no pacing needed beyond 10 ms
        self._delete_shared_keys()

    def close_after_abort(self, final: Dict[str, Any]) -> None:
        """After an aborted run (once :meth:`leave_after_abort` returned): each rank deletes its
        own keys and counts itself in ``aborted-done``; the surviving rank that completes the
        count — the last to get here, when no rank reads a shared key any more — deletes the
        shared ones (the abort flag, the final report, the counters). Never earlier: a rank that
        has not yet seen the flag would otherwise time out on its own and tell another story,
        and a rank still in :meth:`leave_after_abort` would recreate the counter it polls. A
        rank alive but absent (it never answered the abort) leaves them in place."""
        self.stop_liveness()
        self._delete_own_keys()
        survivors = self.world_size - len(set(final.get("missing", [])))
        if int(self.store.add("aborted-done", 1)) == survivors:
            self._delete_shared_keys()

    def _delete_own_keys(self) -> None:
        if self._own_deleted:
            return
        self._own_deleted = True
        for step in self._steps:
            self.store.delete_key(f"{step}/data/{self.rank}")
        self.store.delete_key(f"pos/{self.rank}")

    def _delete_shared_keys(self) -> None:
        for key in ([f"{s}/{c}" for s in self._steps for c in ("arrived", "bytes")] + [f"plan/{k}" for k in self._plans]
                    + ["beat", "abort", "answered", "left", "final", "aborted-left", "aborted-done"]):
            self.store.delete_key(key)

    def shutdown(self) -> None:
        """Stop and join this coordinator's threads (liveness, store calls; bounded), after
        deleting this rank's own keys if neither close path did (an exit by an unexpected
        error). The shared keys stay then: other ranks may still be reading them."""
        self.stop_liveness()
        if self._alive_thread is not None:
            self._alive_thread.join(STORE_CALL_TIMEOUT_S + 1.0)
        if not self.store.health.gone.is_set():
            try:
                self._delete_own_keys()
            except StoreGoneError:
                pass
        self.store.close()
        if self.liveness is not self.store:
            self.liveness.close()

    # -- the end of an aborted run ----------------------------------------------------------
    def start_liveness(self) -> None:
        """The watcher: a daemon thread that looks at the abort flag every ``pacing.watch_s``
        on the liveness connection, whatever the main thread does (waiting inside an
        operation, thinking), and answers it (:meth:`_learn_abort`) — after an abort, the
        ranks that never answered are the ones that stopped answering. The main thread learns
        of the abort from it without a store call of its own."""
        self._alive_stop.clear()

        def watch() -> None:
            while not self._alive_stop.wait(self.pacing.watch_s):
                try:
                    if self._look_for_abort(self.liveness):
                        return
                except StoreGoneError:
                    return

        self._alive_thread = threading.Thread(target=watch, name="pgroups-nettest-watch", daemon=True)
        self._alive_thread.start()

    def stop_liveness(self) -> None:
        self._alive_stop.set()

    def answered(self) -> List[int]:
        """The ranks that answered the abort so far (one call)."""
        if not self.liveness.check(["answered"]):
            return []
        text = self.liveness.get("answered").decode()
        return sorted({int(r) for r in text.split(",") if r})

    def silent_ranks(self, window_s: float) -> List[int]:
        """The ranks that did not answer the abort within ``window_s`` seconds (returns as
        soon as every rank has; one rank polls, every 50 ms)."""
        deadline = time.monotonic() + window_s
        while True:
            answered = set(self.answered())
            if len(answered) >= self.world_size or time.monotonic() >= deadline:
                return [r for r in range(self.world_size) if r not in answered]
            time.sleep(0.05)

    def conclude_abort(self, report: Dict[str, Any]) -> Dict[str, Any]:
        """Every surviving rank calls this after an abort. The rank that raised the flag asks
        who still answers (liveness counters over ALIVE_WINDOW_S) and publishes the final
        report naming the ranks that do not — dead, or their host gone — so a rank that
        vanished inside an operation is named, not the whole group; the others wait for that
        report. Returns the final report (the abort report if none came)."""
        window_s = ALIVE_WINDOW_S + self.pacing.watch_s   # every watcher looked at least once
        if report.get("detected_by") == self.rank:
            silent = self.silent_ranks(window_s)
            final = dict(report, missing=silent, missing_hosts=sorted({self.host(r) for r in silent}))
            if silent:
                final["message"] = (f"{report.get('message', 'aborted')}; no answer from "
                                    f"{ranks_and_hosts(silent, self.hostnames)}")
            self.store.set("final", json.dumps(final))
            return final
        deadline = time.monotonic() + window_s + 3.0
        delays = self.pacing.poll_delays()
        while time.monotonic() < deadline:
            if self.store.check(["final"]):
                return json.loads(self.store.get("final").decode())
            time.sleep(next(delays))
        return report

    def leave_after_abort(self, final: Dict[str, Any]) -> None:
        """Ranks on the store's host (rank 0's) leave last: when they exit, a launcher such as
        torchrun may stop the store with them. Bounded by LEAVE_WAIT_S."""
        self.store.add("aborted-left", 1)
        store_host = self.host(0)
        if self.host(self.rank) != store_host:
            return
        missing = set(final.get("missing", []))
        others = sum(1 for r in range(self.world_size) if self.host(r) != store_host and r not in missing)
        mine = sum(1 for r in range(self.world_size) if self.host(r) == store_host and r not in missing)
        deadline = time.monotonic() + LEAVE_WAIT_S
        while int(self.store.add("aborted-left", 0)) < others + mine and time.monotonic() < deadline:
            time.sleep(0.05)

    def _wait(self, poll: Callable[[], Tuple[bool, int]], what: str, missing: Callable[[], List[int]]) -> None:
        """Call ``poll`` — one store call that says (done?, a progress count such as how many
        ranks arrived) — until done: at once, then after the delays of
        :meth:`.pacing.Pacing.poll_delays` (every ``poll_s`` once a few fast polls are done).
        The abort flag is looked at between polls (no store call: the watcher's); every
        ``beat_s`` one call reads the heartbeat: no progress and no heartbeat for ``stall_s``
        is a stall. Per rank and second of waiting: at most 1 / poll_s + 1 / beat_s calls
        (after the first poll_s), which the pacing shrinks as the world grows."""
        delays = self.pacing.poll_delays()
        last_marker, last_change, last_check = None, time.monotonic(), 0.0
        while True:
            done, progress = poll()
            if done:
                return
            self.check_abort()
            now = time.monotonic()
            if now - last_check >= self.pacing.beat_s:
                last_check = now
                marker = (int(self.store.add("beat", 0)), progress)
                if marker != last_marker:
                    last_marker, last_change = marker, now
                elif now - last_change > self.stall_s:
                    self._stalled(what, missing())
            time.sleep(next(delays))

    def _stalled(self, what: str, missing: List[int]) -> None:
        where = self.positions(missing)
        shown = ", ".join(f"rank {r} (host {self.host(r)}, last at {where[r]})" for r in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        message = (f"no progress for {self.stall_s:.0f}s waiting for {what}: {shown}{more} "
                   f"did not arrive (hung or dead?)")
        report = {"message": message, "kind": "stall", "step": what, "ranks": missing,
                  "hosts": sorted({self.host(r) for r in missing}), "detected_by": self.rank}
        self.abort(report)
        self.check_abort()
        raise NettestTimeoutError(message, report)


def _arrived(count: int, world_size: int) -> Tuple[bool, int]:
    return count >= world_size, count


def encode_payload(payload: Any) -> bytes:
    """What a rank posts: compact JSON, zlib-compressed (the per-size records of ``-c all``
    shrink about fourfold: their keys repeat)."""
    return zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), 6)


def decode_payload(blob: Any) -> Any:
    return json.loads(zlib.decompress(bytes(blob)).decode())


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block, on again after if it was on.
    Decoded JSON holds no reference cycles (reference counting frees it), yet every few
    thousand new objects the collector walks the young ones, and ever more often the whole
    growing heap: rank 0 keeping 2,048 decoded payloads spent 0.7–0.9 ms of CPU per payload
    with it on, 0.38 ms with it off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def slices(world_size: int, total_bytes: int, slice_bytes: int) -> List[tuple]:
    """``[(first, end), ...]``: consecutive rank ranges covering ``range(world_size)``, as
    many as ``total_bytes`` of payload takes in slices of ``slice_bytes`` (at least one), as
    even as can be. Pure."""
    count = max(1, min(world_size, math.ceil(total_bytes / max(1, slice_bytes))))
    bounds = [world_size * i // count for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(count)]


def second_client(store: dist.Store) -> Optional[dist.Store]:
    """A second client connection to the TCPStore under ``store``, with the same prefixes
    (``Store.clone``), for the liveness thread; None when there is no TCPStore under it or
    the clone fails (the caller then shares one connection)."""
    inner = store
    while isinstance(inner, dist.PrefixStore):
        inner = inner.underlying_store
    if not isinstance(inner, dist.TCPStore):
        return None
    try:
        return store.clone()
    except (RuntimeError, dist.DistError, OSError):
        return None


def first_words(text: str, limit: int = 160) -> str:
    """The first line of an error, cut to ``limit`` characters (torch's are long)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"


def short_ranks(ranks: Sequence[int]) -> str:
    ranks = sorted(ranks)
    return "[" + ", ".join(map(str, ranks[:16])) + (f", … ({len(ranks)} ranks)" if len(ranks) > 16 else "") + "]"


def ranks_and_hosts(ranks: Sequence[int], hostnames: Sequence[str]) -> str:
    """``ranks [3, 4] (hosts hostB)``, shortened for long lists."""
    hosts = sorted({hostnames[r] if r < len(hostnames) else "?" for r in ranks})
    return f"ranks {short_ranks(ranks)} (hosts {', '.join(hosts[:8])}{' …' if len(hosts) > 8 else ''})"
