"""What every rank runs: warm-up, the size sweep, device-synchronized timing, data verification,
per-operation timeouts, and the follow-up tests that rank 0 plans.

Two planes:

- the **data plane** is the collectives under test, on the groups under test (NCCL device
  groups on GPUs, gloo on CPU). Every operation is issued with ``async_op=True`` and waited
  with ``--timeout``: a peer that never enters makes ``wait`` fail instead of hanging;
- the **control plane** is the rendezvous store of the default group (no collective at all):
  ranks post their figures and where they are, wait for each other between steps, and raise
  the *abort* flag when a group hangs — every other rank sees it within a second and stops.
  A rank that stops making progress while idle (no heartbeat for ``--timeout``) is named too.

Steps, the same on every rank: one *sweep* per wave of disjoint groups; rank 0 then diagnoses
and publishes a *re-test* plan (flagged groups and some healthy peers, each measured alone,
round-robin) and a *pair* plan (candidates paired with references, see :mod:`.diagnosis`);
everyone executes the plans; rank 0 publishes the exit code every rank returns.
"""
from __future__ import annotations

import datetime
import json
import os
import queue
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch
import torch.distributed as dist

from ..comm.raw import all_gather_single, reduce_scatter_single
from ..config import load_config
from ..context import ParallelContext
from ..backend import is_timeout
from ..errors import ConfigError, GroupTimeoutError, LaunchError, ModeNotInitializedError
from ..hosts import local_hostname
from ..launch import from_environment
from . import diagnosis, metrics, startup
from .diagnosis import Measurement, Rule
from .faults import FAULT_ENV, ActiveFaults, parse_faults
from .linkscan import Culprit, LinkScan, PairSample
from .startup import StartupBoard
from .groups import HOST_KINDS, GroupUnderTest, build_catalog, duplicate_kinds, group_of_rank, plan_waves

STORE_PREFIX = "pgroups-nettest/"
BEAT_INTERVAL_S = 1.0
POLL_MAX_S = 0.05
CHECK_INTERVAL_S = 0.5
FOLLOWUP_MIN_ITERS = 20
FOLLOWUP_SMALL_BYTES = 1024 * 1024
RETEST_REPEATS = 3
PAIR_MAX_BYTES = 8 * 1024 * 1024  # pair tests stop here: enough to compare pairs, and quick
PATTERN_PERIOD = 61   # element values cycle through -30..30 (exact in float32 sums)
OFFSET_PERIOD = 64    # per-source offset, so chunks from different ranks differ
CORRUPT_DELTA = 1000.0
ALIVE_WINDOW_S = 2.5   # after an abort: how long the rank that raised it watches who still answers
LEAVE_WAIT_S = 2.0     # ... and how long the store's host waits for the other hosts' ranks to leave
NCCL_TIMEOUT_MARGIN_S = 60.0  # NCCL groups time out this much after the tool's own deadline
CLOSE_WAIT_S = 2.0
STORE_CALL_TIMEOUT_S = 8.0  # a store call that takes longer: the store is gone
GONE_POLL_S = 0.2           # how often a waiting store call looks whether another found the store gone
WAIT_SLICE_S = 1.0          # gloo: an operation is waited in slices of this, to see an abort or a gone store
RANK_CULPRITS = ("rank", "corrupting", "rank-link", "rail")  # culprits that name ranks, not hosts


class NettestTimeoutError(GroupTimeoutError):
    """A group under test (or a rank between steps) did not answer within ``--timeout``.

    ``report`` is the JSON-able hang report (group id, ranks, hosts, what, who never entered).
    """

    def __init__(self, message: str, report: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.report = report or {}


@attrs.frozen
class NettestOptions:
    """Everything a rank needs to run the test (picklable, the same on every rank)."""

    config: Any
    modes: Tuple[str, ...] = ("nettest",)
    host_groups: bool = True
    collectives: Tuple[str, ...] = ("all_reduce",)
    min_bytes: int = metrics.DEFAULT_MIN_BYTES
    max_bytes: int = metrics.DEFAULT_MAX_BYTES
    step_factor: int = 2
    iters: int = 5
    warmup: int = 1
    timeout_s: float = 60.0
    rule: Rule = Rule()
    followup: bool = True
    progress: bool = True
    json_path: Optional[str] = None

    @property
    def sizes(self) -> List[int]:
        return metrics.size_sweep(self.min_bytes, self.max_bytes, self.step_factor)

    def to_json(self) -> Dict[str, Any]:
        return {"modes": list(self.modes), "host_groups": self.host_groups,
                "collectives": list(self.collectives), "min_bytes": self.min_bytes,
                "max_bytes": self.max_bytes, "step_factor": self.step_factor, "iters": self.iters,
                "warmup": self.warmup, "timeout_s": self.timeout_s, "followup": self.followup}


# ---- control plane ----------------------------------------------------------------------------
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
        self._calls: "queue.Queue[Tuple[Callable[[], Any], Dict[str, Any], threading.Event]]" = queue.Queue()
        threading.Thread(target=self._serve, name="pgroups-nettest-store", daemon=True).start()

    def _serve(self) -> None:
        while True:
            call, box, done = self._calls.get()
            try:
                box["value"] = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            done.set()

    def check_gone(self) -> None:
        """Raise StoreGoneError if some call found the store gone."""
        if self.health.gone.is_set():
            raise _store_gone(self.health.cause)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._store, name)

        def guarded(*args: Any) -> Any:
            self.check_gone()
            box: Dict[str, Any] = {}
            done = threading.Event()
            self._calls.put((lambda: method(*args), box, done))
            deadline = time.monotonic() + self._timeout_s
            while not done.wait(min(GONE_POLL_S, max(0.0, deadline - time.monotonic()))):
                self.check_gone()
                if time.monotonic() >= deadline:
                    self.health.mark_gone(f"no answer for {self._timeout_s:g}s")
                    self.check_gone()
            error = box.get("error")
            if isinstance(error, (RuntimeError, dist.DistError, ConnectionError)):
                self.health.mark_gone(_first_words(str(error)) or type(error).__name__)
                self.check_gone()
            if error is not None:
                raise error
            return box.get("value")
        return guarded


def _store_gone(cause: str) -> "StoreGoneError":
    message = f"the rendezvous store at {store_address()} is gone ({cause})"
    return StoreGoneError(message, {"message": message, "kind": "store-gone", "store": store_address()})


class Coordinator:
    """Barriers, figure exchange, plans, heartbeats and the abort flag, through the store.

    Keys live under ``pgroups-nettest/run<N>/`` (N counts the runs on this store, so a second
    run never reads the first one's keys) and are deleted when the run ends (:meth:`close`);
    only the run counter stays.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float,
                 hostnames: Sequence[str]) -> None:
        call_timeout = STORE_CALL_TIMEOUT_S
        root = _GuardedStore(dist.PrefixStore(STORE_PREFIX, store), call_timeout)
        self.run_id = (int(root.add("runs", 1)) - 1) // world_size
        self.store = _GuardedStore(dist.PrefixStore(f"{STORE_PREFIX}run{self.run_id}/", store), call_timeout,
                                   root.health)
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s
        self.stall_s = timeout_s + 2 * BEAT_INTERVAL_S + 1.0
        self.hostnames = list(hostnames)
        self._last_beat = 0.0
        self._steps: List[str] = []
        self._plans: List[str] = []

    @classmethod
    def from_default_group(cls, timeout_s: float, hostnames: Sequence[str]) -> "Coordinator":
        store = dist.distributed_c10d._get_default_store()
        return cls(store, dist.get_rank(), dist.get_world_size(), timeout_s, hostnames)

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
        """Heartbeat (at most once a second; cheap to call often) and abort check. Rank 0 calls
        it while it thinks, so that the waiting ranks do not take its silence for a hang."""
        now = time.monotonic()
        if now - self._last_beat >= BEAT_INTERVAL_S:
            self._last_beat = now
            self.store.add("beat", 1)
            self.check_abort()

    def check_abort(self) -> None:
        if self.store.check(["abort"]):
            report = json.loads(self.store.get("abort").decode())
            raise NettestTimeoutError(report.get("message", "another rank aborted the test"), report)

    def abort(self, report: Dict[str, Any]) -> bool:
        """Raise the abort flag with ``report``; True if this rank was the first to raise it."""
        payload = json.dumps(report)
        current = self.store.compare_set("abort", "", payload)
        return (current.decode() if isinstance(current, bytes) else current) == payload

    def exchange(self, step: str, payload: Any) -> Optional[List[Any]]:
        """Post ``payload`` for ``step`` and wait for every rank; rank 0 gets every payload."""
        self._steps.append(step)
        self.store.set(f"{step}/data/{self.rank}", json.dumps(payload))
        self.store.add(f"{step}/arrived", 1)
        self._wait(lambda: int(self.store.add(f"{step}/arrived", 0)) >= self.world_size,
                   lambda: f"{step}/arrived", step,
                   lambda: [r for r in range(self.world_size) if not self.store.check([f"{step}/data/{r}"])])
        if self.rank != 0:
            return None
        keys = [f"{step}/data/{r}" for r in range(self.world_size)]
        values = self.store.multi_get(keys)
        return [json.loads(v.decode() if isinstance(v, bytes) else v) for v in values]

    def publish(self, key: str, value: Any) -> None:
        self._plans.append(key)
        self.store.set(f"plan/{key}", json.dumps(value))

    def fetch(self, key: str) -> Any:
        self._wait(lambda: self.store.check([f"plan/{key}"]), None, f"the plan {key!r} from rank 0", lambda: [0])
        return json.loads(self.store.get(f"plan/{key}").decode())

    def close(self) -> None:
        """The run is over on every rank: each deletes its own keys, rank 0 the shared ones
        once everyone has left (bounded wait)."""
        self.stop_liveness()
        for step in self._steps:
            self.store.delete_key(f"{step}/data/{self.rank}")
        for key in (f"pos/{self.rank}", f"alive/{self.rank}"):
            self.store.delete_key(key)
        self.store.add("left", 1)
        if self.rank != 0:
            return
        deadline = time.monotonic() + self.stall_s
        while int(self.store.add("left", 0)) < self.world_size and time.monotonic() < deadline:
            time.sleep(0.01)
        for key in ([f"{s}/arrived" for s in self._steps] + [f"plan/{k}" for k in self._plans]
                    + ["beat", "abort", "left"]):
            self.store.delete_key(key)

    # -- the end of an aborted run ----------------------------------------------------------
    def start_liveness(self) -> None:
        """A daemon thread that counts ``alive/<rank>`` up every second, whatever the main
        thread does (waiting inside an operation, thinking): after an abort, the ranks whose
        counter stopped are the ones that stopped answering."""
        self._alive_stop = threading.Event()

        def beat_forever() -> None:
            while not self._alive_stop.is_set():
                try:
                    self.store.add(f"alive/{self.rank}", 1)
                except StoreGoneError:
                    return
                self._alive_stop.wait(BEAT_INTERVAL_S)

        threading.Thread(target=beat_forever, name="pgroups-nettest-alive", daemon=True).start()

    def stop_liveness(self) -> None:
        stop = getattr(self, "_alive_stop", None)
        if stop is not None:
            stop.set()

    def silent_ranks(self, window_s: float) -> List[int]:
        """The ranks whose liveness counter did not move during ``window_s`` seconds."""
        keys = [f"alive/{r}" for r in range(self.world_size)]
        first = [int(self.store.add(k, 0)) for k in keys]
        time.sleep(window_s)
        return [r for r, k in enumerate(keys) if int(self.store.add(k, 0)) == first[r]]

    def conclude_abort(self, report: Dict[str, Any]) -> Dict[str, Any]:
        """Every surviving rank calls this after an abort. The rank that raised the flag asks
        who still answers (liveness counters over ALIVE_WINDOW_S) and publishes the final
        report naming the ranks that do not — dead, or their host gone — so a rank that
        vanished inside an operation is named, not the whole group; the others wait for that
        report. Returns the final report (the abort report if none came)."""
        if report.get("detected_by") == self.rank:
            silent = self.silent_ranks(ALIVE_WINDOW_S)
            final = dict(report, missing=silent, missing_hosts=sorted({self.host(r) for r in silent}))
            if silent:
                final["message"] = (f"{report.get('message', 'aborted')}; no answer from "
                                    f"{_ranks_and_hosts(silent, self.hostnames)}")
            self.store.set("final", json.dumps(final))
            return final
        deadline = time.monotonic() + ALIVE_WINDOW_S + 3.0
        while time.monotonic() < deadline:
            if self.store.check(["final"]):
                return json.loads(self.store.get("final").decode())
            time.sleep(0.05)
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

    def _wait(self, done: Callable[[], bool], counter: Optional[Callable[[], str]], what: str,
              missing: Callable[[], List[int]]) -> None:
        """Poll ``done`` (backing off to a poll interval that grows with the world, so the
        store is not flooded); every CHECK_INTERVAL_S look at the abort flag and for a stall."""
        poll_max = min(0.5, POLL_MAX_S * max(1.0, self.world_size / 64))
        delay, last_marker, last_change, last_check = 0.001, None, time.monotonic(), 0.0
        while not done():
            now = time.monotonic()
            if now - last_check >= CHECK_INTERVAL_S:
                last_check = now
                self.check_abort()
                marker = (int(self.store.add("beat", 0)), int(self.store.add(counter(), 0)) if counter else 0)
                if marker != last_marker:
                    last_marker, last_change = marker, now
                elif now - last_change > self.stall_s:
                    self._stalled(what, missing())
            time.sleep(delay)
            delay = min(delay * 2, poll_max)

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


def _first_words(text: str, limit: int = 160) -> str:
    """The first line of an error, cut to ``limit`` characters (torch's are long)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _short_ranks(ranks: Sequence[int]) -> str:
    ranks = sorted(ranks)
    return "[" + ", ".join(map(str, ranks[:16])) + (f", … ({len(ranks)} ranks)" if len(ranks) > 16 else "") + "]"


def _ranks_and_hosts(ranks: Sequence[int], hostnames: Sequence[str]) -> str:
    """``ranks [3, 4] (hosts hostB)``, shortened for long lists."""
    hosts = sorted({hostnames[r] if r < len(hostnames) else "?" for r in ranks})
    return f"ranks {_short_ranks(ranks)} (hosts {', '.join(hosts[:8])}{' …' if len(hosts) > 8 else ''})"


# ---- data plane -----------------------------------------------------------------------------
def periodic(start: int, count: int, scale: float, offset: float, device: torch.device) -> torch.Tensor:
    """Elements ``start .. start+count-1`` of ``scale * ((i mod 61) - 30) + offset``.

    Built by tiling one period (memory speed: verification data for 64 MiB costs milliseconds).
    """
    one_period = (torch.arange(PATTERN_PERIOD, device=device, dtype=torch.float32)
                  - (PATTERN_PERIOD // 2)) * scale + offset
    first = start % PATTERN_PERIOD
    tiles = (first + count + PATTERN_PERIOD - 1) // PATTERN_PERIOD
    return one_period.repeat(tiles)[first:first + count]


def pattern(start: int, count: int, offset: float, device: torch.device) -> torch.Tensor:
    """Verification data: element i holds ``(i mod 61) - 30 + offset`` (exact small integers)."""
    return periodic(start, count, 1.0, offset, device)


def source_offset(local_rank: int) -> float:
    return float(local_rank % OFFSET_PERIOD)


@attrs.frozen
class Buffers:
    """One measurement's tensors: what is sent, where it lands, what it must equal, and who sent
    each of ``chunks`` equal parts of the output (None: a reduction, not attributable)."""

    send: torch.Tensor
    recv: torch.Tensor
    expected: torch.Tensor
    timed: torch.Tensor             # all_reduce is timed on its own zero buffer (in-place growth)
    sources: Optional[List[int]]    # global rank behind each output chunk
    recv_is_source: bool = False    # broadcast root: its recv buffer holds the data it sends


def make_buffers(collective: str, shape: metrics.MessageShape, ranks: Sequence[int], me: int,
                 device: torch.device, corrupt: bool) -> Buffers:
    """Buffers with verification data for ``collective`` over ``ranks`` on rank ``me``."""
    n, i = len(ranks), ranks.index(me)
    off = source_offset(i)
    total_off = float(sum(source_offset(j) for j in range(n)))
    cin, cout = shape.in_count, shape.out_count
    sources: Optional[List[int]] = None
    if collective == "all_reduce":
        send = pattern(0, cin, off, device)
        expected = periodic(0, cin, float(n), total_off, device)
    elif collective == "all_gather":
        send = pattern(i * cin, cin, off, device)
        expected = torch.cat([pattern(j * cin, cin, source_offset(j), device) for j in range(n)])
        sources = list(ranks)
    elif collective == "reduce_scatter":
        send = pattern(0, cin, off, device)
        expected = periodic(i * cout, cout, float(n), total_off, device)
    elif collective == "broadcast":
        send = pattern(0, cin, source_offset(0), device)
        expected = send.clone()
        sources = [ranks[0]]
    elif collective == "all_to_all":
        send = pattern(0, cin, off, device)
        chunk_in = cin // n
        expected = torch.cat([pattern(i * chunk_in, chunk_in, source_offset(j), device) for j in range(n)])
        sources = list(ranks)
    elif collective == "sendrecv":
        prev = (i - 1) % n
        send = pattern(0, cin, off, device)
        expected = pattern(0, cout, source_offset(prev), device)
        sources = [ranks[prev]]
    else:
        raise ValueError(f"unknown collective {collective!r}")
    if corrupt and (collective != "broadcast" or i == 0):
        corrupt_tensor(send)
    if collective == "all_reduce":  # in place: timed on zeros, verified on ``send`` itself
        return Buffers(send, send, expected, torch.zeros(cin, device=device, dtype=torch.float32), None)
    if collective == "broadcast" and i == 0:
        return Buffers(send, send, expected, send, sources, recv_is_source=True)
    recv = torch.empty(cout, device=device, dtype=torch.float32)
    return Buffers(send, recv, expected, send, sources)


def count_wrong(result: torch.Tensor, expected: torch.Tensor,
                sources: Optional[Sequence[int]]) -> Tuple[int, Dict[int, int]]:
    """nccl-tests' ``#wrong``: elements of ``result`` that differ from ``expected`` (NaN — never
    written — counts as wrong), and ``{source rank: wrong elements}`` when the output is made of
    one equal chunk per source in ``sources``."""
    bad = result != expected
    wrong = int(bad.sum())
    wrong_from: Dict[int, int] = {}
    if wrong and sources:
        per_chunk = bad.view(len(sources), -1).sum(dim=1).tolist()
        wrong_from = {int(src): int(n) for src, n in zip(sources, per_chunk) if n}
    return wrong, wrong_from


def corrupt_tensor(tensor: torch.Tensor) -> None:
    """The injected corruption: about eight elements (at least one) are off by CORRUPT_DELTA."""
    flat = tensor.view(-1)
    flat[::max(1, flat.numel() // 8)] += CORRUPT_DELTA


def launch(collective: str, group: Any, ranks: Sequence[int], me: int, send: torch.Tensor,
           recv: torch.Tensor) -> List[Any]:
    """Issue one asynchronous operation; return its Work handles."""
    if collective == "all_reduce":
        return [dist.all_reduce(send, group=group, async_op=True)]
    if collective == "all_gather":
        return [all_gather_single(recv, send, group=group, async_op=True)]
    if collective == "reduce_scatter":
        return [reduce_scatter_single(recv, send, group=group, async_op=True)]
    if collective == "broadcast":  # in place on ``recv`` (the root's holds its data)
        return [dist.broadcast(recv, src=ranks[0], group=group, async_op=True)]
    if collective == "all_to_all":
        return [dist.all_to_all_single(recv, send, group=group, async_op=True)]
    if collective == "sendrecv":
        i, n = ranks.index(me), len(ranks)
        ops = [dist.P2POp(dist.isend, send, ranks[(i + 1) % n], group),
               dist.P2POp(dist.irecv, recv, ranks[(i - 1) % n], group)]
        return list(dist.batch_isend_irecv(ops))
    raise ValueError(f"unknown collective {collective!r}")


class GroupFailure(Exception):
    """An operation on a group under test timed out or failed (carries the cause's text)."""


class Bench:
    """Times and verifies operations on this rank (one instance per run)."""

    def __init__(self, device: torch.device, coordinator: Coordinator, faults: ActiveFaults,
                 timeout_s: float, warmup: int, iters: int) -> None:
        self.device = device
        self.coordinator = coordinator
        self.faults = faults
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.warmup, self.iters = warmup, iters

    def wait_all(self, works: Sequence[Any]) -> None:
        """Wait for ``works``, --timeout in all; GroupFailure (with the cause) if one fails or
        the deadline passes. On gloo the wait is sliced (WAIT_SLICE_S): between slices the
        abort flag and the store's health are looked at, so a rank stuck with a dead peer
        leaves as soon as another rank raised the alarm or the store is found gone (a
        NettestTimeoutError / StoreGoneError), not only at its own deadline. A finished
        operation returns from its slice at once: the slicing costs nothing to the timing.
        NCCL's ``wait(timeout)`` has other semantics (it may abort the communicator): one
        wait there."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        try:
            for work in works:
                if self.device.type == "cuda":
                    work.wait(self.timeout)
                    continue
                while True:
                    left = deadline - time.monotonic()
                    try:
                        work.wait(datetime.timedelta(seconds=max(0.001, min(WAIT_SLICE_S, left))))
                        break
                    except (RuntimeError, dist.DistError):
                        if work.is_completed() or left <= WAIT_SLICE_S:
                            raise
                    self.coordinator.check_abort()
        except (RuntimeError, dist.DistError) as exc:
            raise GroupFailure(_first_words(str(exc)) or type(exc).__name__) from exc

    def _timed(self, issue: Callable[[], List[Any]], iters: int, crosses_hosts: bool) -> List[float]:
        """Time ``iters`` back-to-back operations (device-synchronized); seconds per operation.

        On GPUs the operations are queued back to back between two CUDA events (as nccl-tests
        does) and the result is one value, the mean. NCCL runs them on its own stream, which
        waits for the current one (so the start event comes first); ``work.wait()`` without a
        timeout makes the current stream wait for that work, so the end event, recorded after
        it, completes only when the last transfer has — the time of the transfers, not of
        their launch. The CPU then waits with --timeout (a hang raises). On CPU each operation
        is waited and timed on its own: the result has one value per operation (their mean is
        the table's figure, the best of them the follow-ups' robust one).
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            works: List[Any] = []
            for _ in range(iters):
                self.faults.inside_timed_region(crosses_hosts)
                works = issue()  # NCCL's stream is in order: the last one completes after the others
            for work in works:
                work.wait()      # the current stream waits for NCCL's (no CPU block)
            end.record(stream)
            self.wait_all(works)
            end.synchronize()
            return [start.elapsed_time(end) / 1e3 / iters]
        durations = []
        for _ in range(iters):
            begin = time.perf_counter()
            self.faults.inside_timed_region(crosses_hosts)
            self.wait_all(issue())
            durations.append(time.perf_counter() - begin)
            self.coordinator.beat()
        return durations

    def _verify(self, buffers: Buffers, issue: Callable[[], List[Any]]) -> Tuple[int, Dict[int, int]]:
        """One more operation on fresh data; count the elements that differ from the expected."""
        if not buffers.recv_is_source and buffers.recv is not buffers.send:
            buffers.recv.fill_(float("nan"))
        self.wait_all(issue())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return count_wrong(buffers.recv, buffers.expected, buffers.sources)

    def _crosses_hosts(self, ranks: Sequence[int]) -> bool:
        return len({self.coordinator.host(r) for r in ranks}) > 1

    def iters_for(self, size_bytes: int, followup: bool) -> int:
        """Timed operations per repetition: ``iters``; follow-ups of small messages (cheap, and
        the noisiest) take at least FOLLOWUP_MIN_ITERS, so their best operation is a sure floor."""
        if followup and size_bytes <= FOLLOWUP_SMALL_BYTES:
            return max(self.iters, FOLLOWUP_MIN_ITERS)
        return self.iters

    def measure(self, collective: str, group: Any, ranks: Sequence[int], me: int,
                shape: metrics.MessageShape, repeats: int = 1, followup: bool = False) -> Dict[str, Any]:
        """Warm up, time ``repeats`` x iterations, verify once; return this rank's record."""
        buffers = make_buffers(collective, shape, ranks, me, self.device, self.faults.corrupt)
        timed_recv = buffers.timed if collective == "all_reduce" else buffers.recv

        def timed_op() -> List[Any]:
            return launch(collective, group, ranks, me, buffers.timed, timed_recv)

        def verify_op() -> List[Any]:
            return launch(collective, group, ranks, me, buffers.send, buffers.recv)

        for _ in range(self.warmup):
            self.wait_all(timed_op())
        iters = self.iters_for(shape.size_bytes, followup)
        crosses = self._crosses_hosts(ranks)
        times, op_best = _repeat(lambda issue: self._timed(issue, iters, crosses), timed_op, repeats)
        wrong, wrong_from = self._verify(buffers, verify_op)
        self.coordinator.beat()
        return {"rank": me, "collective": collective, "size": shape.size_bytes, "count": shape.in_count,
                "times": times, "op_best": op_best, "wrong": wrong, "wrong_from": {str(k): v for k, v in wrong_from.items()}}

    def measure_pair(self, partner: int, me: int, size_bytes: int, repeats: int) -> Dict[str, Any]:
        """Bidirectional send/recv with ``partner`` on the world group; data from it is verified."""
        shape = metrics.message_shape("sendrecv", size_bytes, 2)
        low, high = sorted((me, partner))
        send = pattern(0, shape.in_count, float(me == high), self.device)
        if self.faults.corrupt:
            corrupt_tensor(send)
        expected = pattern(0, shape.in_count, float(partner == high), self.device)
        recv = torch.empty(shape.in_count, device=self.device, dtype=torch.float32)
        world = dist.group.WORLD

        def issue() -> List[Any]:
            ops = [dist.P2POp(dist.isend, send, partner, world), dist.P2POp(dist.irecv, recv, partner, world)]
            return list(dist.batch_isend_irecv(ops))

        for _ in range(self.warmup):
            self.wait_all(issue())
        iters = self.iters_for(shape.size_bytes, followup=True)
        crosses = self._crosses_hosts((me, partner))
        times, op_best = _repeat(lambda issue_: self._timed(issue_, iters, crosses), issue, repeats)
        recv.fill_(float("nan"))
        self.wait_all(issue())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wrong = int((recv != expected).sum())
        self.coordinator.beat()
        return {"rank": me, "collective": "sendrecv", "size": shape.size_bytes, "count": shape.in_count,
                "times": times, "op_best": op_best, "wrong": wrong, "wrong_from": {str(partner): wrong} if wrong else {}}


# ---- one rank's whole run ---------------------------------------------------------------------
def select_modes(requested: Sequence[str], built: Sequence[str]) -> List[str]:
    """``("all",)`` → every built mode; else the requested ones, which must be built (ConfigError)."""
    if list(requested) == ["all"]:
        return list(built)
    unknown = [m for m in requested if m not in built]
    if unknown:
        raise ConfigError(f"--modes: unknown mode {unknown[0]!r}; built modes: "
                          f"{', '.join(built)} (or 'all')")
    return list(dict.fromkeys(requested))


class RankRun:
    """One rank's run: builds the groups, executes the steps, and (rank 0) the diagnosis."""

    def __init__(self, ctx: ParallelContext, options: NettestOptions, progress: Any) -> None:
        self.ctx, self.options, self.progress = ctx, options, progress
        self.rank = ctx.get_global_rank()
        self.world_size = dist.get_world_size()
        self.hostnames = ctx.get_hostnames()
        self.coordinator = Coordinator.from_default_group(options.timeout_s, self.hostnames)
        self.coordinator.start_liveness()
        self.faults = ActiveFaults.for_rank(parse_faults(os.environ.get(FAULT_ENV)), self.rank,
                                            self.hostnames[self.rank])
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if ctx.backend.device_backend == "nccl" else torch.device("cpu"))
        self.bench = Bench(self.device, self.coordinator, self.faults, options.timeout_s,
                           options.warmup, options.iters)
        self.catalog: List[GroupUnderTest] = []
        self.handles: Dict[str, Any] = {}
        self.report: Dict[str, Any] = {}
        self._findings: List[diagnosis.Finding] = []
        self._confirmed: List[diagnosis.Finding] = []
        self._culprits: List[Culprit] = []
        self.exit_code = 0
        self.started = time.perf_counter()

    # -- groups ---------------------------------------------------------------------------
    def build_groups(self) -> None:
        modes = select_modes(self.options.modes, self.ctx.modes)
        mode_groups = {m: self.ctx.get_rank_groups(m) for m in modes}
        self.catalog = build_catalog(mode_groups, self.hostnames, self.options.host_groups)
        kinds = list(dict.fromkeys(g.kind for g in self.catalog))
        for kind in kinds:  # the same order on every rank: creation is collective
            groups = [g for g in self.catalog if g.kind == kind]
            mine = next((g for g in groups if self.rank in g.ranks), None)
            if kind in HOST_KINDS:
                handle = self.ctx.backend.build_for_rank_lists(f"nettest-{kind}", [list(g.ranks) for g in groups])
            else:
                try:
                    handle = self.ctx.get_group(kind)
                except ModeNotInitializedError:
                    handle = None
            if mine is not None:
                self.handles[mine.id] = handle
        self.report.update({
            "world_size": self.world_size, "backend": self.ctx.backend.device_backend,
            "device": str(self.device.type), "hostnames": self.hostnames,
            "skipped_kinds": duplicate_kinds({**mode_groups}),
            "groups": [g.to_json() for g in self.catalog]})

    # -- steps ----------------------------------------------------------------------------
    def run(self) -> Optional[Dict[str, Any]]:
        self.coordinator.position("building the groups under test")
        try:
            self.build_groups()
        except GroupTimeoutError as exc:   # a peer died while the groups were being built
            if isinstance(exc, NettestTimeoutError):
                raise
            self._alarm({"message": f"building the groups under test: {exc}", "kind": "timeout",
                         "step": "build-groups", "detected_by": self.rank, "cause": _first_words(str(exc))})
        self.faults.stay_away()
        waves = plan_waves(self.catalog)
        sweep: List[Measurement] = []
        for index, wave in enumerate(waves):
            records = self._sweep_wave(index, len(waves), wave)
            collected = self.coordinator.exchange(f"sweep{index}", records)
            if self.rank == 0:
                sweep.extend(self._aggregate(collected, {g.id: g for g in wave}))
        plan = self._decide_retest(sweep) if self.rank == 0 else None
        retest_plan = self._share("retest", plan)
        retest = self._run_retest(retest_plan)
        if self.rank == 0:
            self._confirm(retest_plan, retest)
        self._run_link_scan()
        report = self._finish() if self.rank == 0 else None
        verdict = self._share("verdict", {"exit_code": report["exit_code"]} if report else None)
        self.exit_code = int(verdict["exit_code"])
        self.coordinator.close()
        return report

    def _share(self, key: str, plan: Optional[Any]) -> Any:
        if self.rank == 0:
            self.coordinator.publish(key, plan)
            return plan
        return self.coordinator.fetch(key)

    def _sweep_wave(self, index: int, waves: int, wave: Sequence[GroupUnderTest]) -> List[Dict[str, Any]]:
        group = group_of_rank(wave, self.rank)
        self.coordinator.position(f"sweep {index + 1}/{waves} (idle)")
        if group is None:
            return []
        records = []
        for collective in self.options.collectives:
            shapes = metrics.shapes_for_sweep(collective, self.options.sizes, group.size)
            for step, shape in enumerate(shapes):
                where = f"sweep {index + 1}/{waves} {group.id} {collective} {metrics.format_size(shape.size_bytes)}"
                self.progress.update(f"{where} [{step + 1}/{len(shapes)}]")
                records.append(self._measure(group, collective, shape, where, repeats=1))
        return records

    def _measure(self, group: GroupUnderTest, collective: str, shape: metrics.MessageShape, where: str,
                 repeats: int, followup: bool = False) -> Dict[str, Any]:
        self.coordinator.position(where)
        try:
            record = self.bench.measure(collective, self.handles[group.id], list(group.ranks), self.rank,
                                        shape, repeats, followup)
        except GroupFailure as exc:
            self._hang(group.id, list(group.ranks), where, collective, shape.size_bytes, exc)
        record["group"] = group.id
        return record

    def _hang(self, group_id: str, ranks: List[int], where: str, collective: str, size_bytes: int,
              failure: GroupFailure) -> None:
        positions = self.coordinator.positions([r for r in ranks if r != self.rank])
        absent = {r: p for r, p in positions.items() if p != where}
        hosts = list(dict.fromkeys(self.hostnames[r] for r in ranks))
        cause = str(failure)
        timed_out = is_timeout(failure.__cause__ or failure)
        what = (f"{collective} of {metrics.format_size(size_bytes)} did not complete within "
                f"{self.options.timeout_s:g}s" if timed_out else f"{collective} of "
                f"{metrics.format_size(size_bytes)} failed ({cause})")
        culprits = "; ".join(f"rank {r} (host {self.hostnames[r]}) never entered it (last at: {p})"
                             for r, p in sorted(absent.items()))
        message = f"group {group_id} (ranks {ranks}, hosts {hosts}): {what}" + (f"; {culprits}" if culprits else "")
        report = {"message": message, "kind": "timeout" if timed_out else "failure", "group": group_id,
                  "ranks": ranks, "hosts": hosts, "collective": collective, "size_bytes": size_bytes,
                  "timeout_s": self.options.timeout_s, "detected_by": self.rank,
                  "never_entered": [{"rank": r, "host": self.hostnames[r], "last_at": p}
                                    for r, p in sorted(absent.items())],
                  "cause": cause}
        self._alarm(report)

    def _alarm(self, report: Dict[str, Any]) -> None:
        """Raise the abort flag with ``report`` and raise the first report raised (every rank
        tells one story)."""
        self.coordinator.abort(report)
        self.coordinator.check_abort()
        raise NettestTimeoutError(report["message"], report)

    def _aggregate(self, collected: Sequence[Sequence[Dict[str, Any]]],
                   groups: Mapping[str, Any]) -> List[Measurement]:
        by_key: Dict[Tuple[str, str, int], List[Dict[str, Any]]] = {}
        for records in collected:
            for record in records:
                by_key.setdefault((record["group"], record["collective"], record["size"]), []).append(record)
        return [diagnosis.aggregate(gid, _size_of(groups[gid]), recs) for (gid, _c, _s), recs in sorted(
            by_key.items(), key=lambda kv: (kv[0][0], metrics.COLLECTIVES.index(kv[0][1]), kv[0][2]))]

    # -- rank 0's decisions -----------------------------------------------------------------
    def _decide_retest(self, sweep: List[Measurement]) -> Dict[str, Any]:
        rule = self.options.rule
        slow = diagnosis.find_slow(self.catalog, sweep, rule, tick=self.coordinator.beat)
        wrong = diagnosis.find_wrong(self.catalog, sweep)
        self.report["measurements"] = [m.to_json() for m in sweep]
        self.report["findings"] = [f.to_json() for f in slow + wrong]
        self._findings = slow + wrong
        tasks = diagnosis.plan_retest(slow, self.catalog) if self.options.followup else []
        return {"tasks": [t.to_json() for t in tasks]}

    def _run_retest(self, plan: Dict[str, Any]) -> List[Measurement]:
        """Each task's group alone (the others wait at a barrier), round-robin, RETEST_REPEATS
        times: every figure is the best of measurements spread over the whole re-test."""
        by_id = {g.id: g for g in self.catalog}
        tasks = [diagnosis.RetestTask(t["group"], tuple(tuple(i) for i in t["items"])) for t in plan["tasks"]]
        mine: Dict[Tuple[str, str, int], Dict[str, Any]] = {}
        for repeat in range(RETEST_REPEATS if tasks else 0):
            for index, task in enumerate(tasks):
                group = by_id[task.group_id]
                self.coordinator.position(f"re-test {repeat + 1}/{RETEST_REPEATS} {group.id} (idle)")
                if self.rank in group.ranks:
                    for collective, size in task.items:
                        shape = _shape_for(collective, size, group.size)
                        where = (f"re-test {repeat + 1}/{RETEST_REPEATS} {group.id} {collective} "
                                 f"{metrics.format_size(shape.size_bytes)}")
                        self.progress.update(where)
                        _merge_record(mine, self._measure(group, collective, shape, where, repeats=1,
                                                          followup=True))
                self.coordinator.exchange(f"retest{repeat}.{index}", None)
        collected = self.coordinator.exchange("retest", list(mine.values())) if tasks else None
        if self.rank != 0 or not tasks:
            return []
        return self._aggregate(collected, by_id)

    def _confirm(self, retest_plan: Dict[str, Any], retest: List[Measurement]) -> None:
        """Rank 0: split the sweep's findings into confirmed and transient by the re-test."""
        findings = self._findings
        if retest_plan["tasks"]:
            confirmed, transient = diagnosis.confirm(findings, self.catalog, retest, self.options.rule)
        else:  # nothing slow to re-test (or --no-followup: sweep findings stand as they are)
            confirmed, transient = list(findings), []
        self.report["retest"] = {"tasks": retest_plan["tasks"], "repeats": RETEST_REPEATS,
                                 "measurements": [m.to_json() for m in retest]}
        self.report["confirmed"] = [f.to_json() for f in confirmed]
        self.report["transient"] = [f.to_json() for f in transient]
        self._confirmed = confirmed

    def _run_link_scan(self) -> None:
        """The link scan (:mod:`.linkscan`): rank 0 plans each round from the results so far;
        every rank in a pair exchanges a small and a large message both ways with its partner
        on the world group (no new groups); rank 0 records the figures."""
        if not self.options.followup:
            return
        scan = (LinkScan(self.hostnames, self.options.rule, tick=self.coordinator.beat)
                if self.rank == 0 else None)
        sizes = {"small": _pair_size(min(self.options.sizes)),
                 "large": _pair_size(min(max(self.options.sizes), PAIR_MAX_BYTES))}
        index, started = 0, time.perf_counter()
        while True:
            planned = scan.next_round() if scan is not None else None
            plan = self._share(f"scan{index}", planned.to_json() if planned is not None else None)
            if plan is None:
                break
            if index == 0 and self.device.type == "cuda":
                self._touch_world_group()
            records = self._scan_round(index, plan, sizes)
            collected = self.coordinator.exchange(f"scan{index}", records)
            if scan is not None:
                scan.record(_scan_samples(index, plan["kind"], plan["rank_pairs"], collected))
            index += 1
        if scan is not None:
            self.report["links"] = dict(scan.to_json(), elapsed_s=time.perf_counter() - started)
            self._culprits = scan.culprits()

    def _scan_round(self, index: int, plan: Dict[str, Any], sizes: Mapping[str, int]) -> List[Dict[str, Any]]:
        pair = next((p for p in plan["rank_pairs"] if self.rank in p), None)
        label = f"link scan round {index + 1} ({plan['kind']})"
        self.coordinator.position(f"{label} (idle)")
        if pair is None:
            return []
        a, b = pair
        partner = b if a == self.rank else a
        records = []
        for which, size in sizes.items():
            where = f"{label} ranks {a}-{b} {metrics.format_size(size)}"
            self.progress.update(where)
            self.coordinator.position(where)
            try:
                record = self.bench.measure_pair(partner, self.rank, size, repeats=1)
            except GroupFailure as exc:
                self._hang(f"pair {a}-{b}", [a, b], where, "sendrecv", size, exc)
            records.append({**record, "pair": [a, b], "label": which})
        return records

    def _touch_world_group(self) -> None:
        """One all-reduce on the world device group, by every rank, before the pair rounds: an
        NCCL communicator must be complete before only two of its ranks talk over it."""
        where = "link scan: world group warm-up"
        self.coordinator.position(where)
        try:
            self.bench.wait_all([dist.all_reduce(torch.zeros(1, device=self.device), async_op=True)])
        except GroupFailure as exc:
            self._hang("global", list(range(self.world_size)), where, "all_reduce", 4, exc)

    def _finish(self) -> Dict[str, Any]:
        confirmed = self._confirmed
        verdicts: Dict[str, List[str]] = {}
        for f in confirmed:
            label = "wrong" if f.metric == "wrong" else "slow"
            verdicts.setdefault(f.group_id, [])
            if label not in verdicts[f.group_id]:
                verdicts[f.group_id].append(label)
        slow = sorted(g for g, v in verdicts.items() if "slow" in v)
        wrong = sorted(g for g, v in verdicts.items() if "wrong" in v)
        culprits = self._culprits
        suspects = [{"rank": r, "host": self.hostnames[r], "reason": c.reason}
                    for c in culprits if c.kind in RANK_CULPRITS for r in c.ranks]
        healthy = not verdicts and not culprits
        self.report.update({
            "options": self.options.to_json(), "rule": self.options.rule.to_json(),
            "verdicts": {g.id: ",".join(verdicts.get(g.id, ["ok"])) for g in self.catalog},
            "culprits": [c.to_json() for c in culprits],
            "suspects": suspects,
            "summary": {"groups_tested": len(self.catalog), "slow": slow, "wrong": wrong,
                        "transient": sorted({f["group_id"] for f in self.report.get("transient", [])}),
                        "slow_hosts": sorted({c.hosts[0] for c in culprits if c.kind in ("host", "host-inside")}),
                        "slow_links": sorted([list(c.hosts) for c in culprits if c.kind == "link"]),
                        "suspect_ranks": sorted({s["rank"] for s in suspects}),
                        "suspect_hosts": sorted({h for c in culprits for h in c.hosts}),
                        "healthy": healthy},
            "status": "healthy" if healthy else "unhealthy",
            "exit_code": 0 if healthy else 1,
            "elapsed_s": time.perf_counter() - self.started})
        return self.report


def _scan_samples(index: int, kind: str, rank_pairs: Sequence[Sequence[int]],
                  collected: Sequence[Sequence[Dict[str, Any]]]) -> List[PairSample]:
    """Rank 0: one PairSample per pair of a scan round from both ranks' records (the best
    operation of each, averaged over the two ranks, as every follow-up judges)."""
    by_pair: Dict[Tuple[int, int], Dict[str, List[Dict[str, Any]]]] = {}
    for rank_records in collected:
        for record in rank_records:
            by_pair.setdefault(tuple(record["pair"]), {}).setdefault(record["label"], []).append(record)
    samples = []
    for a, b in rank_pairs:
        found = by_pair.get((a, b), {})
        if len(found.get("small", [])) != 2 or len(found.get("large", [])) != 2:
            continue
        small = diagnosis.aggregate(f"{a}-{b}", 2, found["small"])
        large = diagnosis.aggregate(f"{a}-{b}", 2, found["large"])
        wrong_at = {rank: sum(r["wrong"] for label in found.values() for r in label if r["rank"] == rank)
                    for rank in (a, b)}
        samples.append(PairSample(index, kind, a, b, large.judged_busbw, small.judged_time_s * 1e6,
                                  wrong_at[a], wrong_at[b]))
    return samples


def _repeat(timed: Callable[[Callable[[], List[Any]]], List[float]], issue: Callable[[], List[Any]],
            repeats: int) -> Tuple[List[float], float]:
    """Run ``timed`` ``repeats`` times: (mean seconds per operation of each repetition, the
    best single timed operation — on GPUs, where a repetition is one batch, the best batch)."""
    runs = [timed(issue) for _ in range(repeats)]
    return [sum(run) / len(run) for run in runs], min(d for run in runs for d in run)


def _merge_record(records: Dict[Tuple[str, str, int], Dict[str, Any]], record: Dict[str, Any]) -> None:
    """Fold one more repetition of (group, collective, size) into this rank's record of it."""
    key = (record["group"], record["collective"], record["size"])
    if key not in records:
        records[key] = dict(record, wrong_from=dict(record["wrong_from"]))
        return
    merged = records[key]
    merged["times"] = merged["times"] + record["times"]
    merged["op_best"] = min(merged["op_best"], record["op_best"])
    merged["wrong"] += record["wrong"]
    for source, count in record["wrong_from"].items():
        merged["wrong_from"][source] = merged["wrong_from"].get(source, 0) + count


def _size_of(group: Any) -> int:
    return group.size


def _shape_for(collective: str, size_bytes: int, group_size: int) -> metrics.MessageShape:
    return metrics.message_shape(collective, size_bytes, group_size)


def _pair_size(requested: int) -> int:
    return metrics.message_shape("sendrecv", requested, 2).size_bytes


class NullProgress:
    """The progress display of ranks other than 0: says nothing."""

    def update(self, text: str) -> None:
        pass

    def done(self) -> None:
        pass


@attrs.frozen
class RankResult:
    """What one rank's run ends with: the exit code every rank agrees on, and rank 0's report."""

    rank: int
    exit_code: int
    report: Optional[Dict[str, Any]] = None


def run_rank(options: NettestOptions, progress: Any = None) -> RankResult:
    """Initialize this rank from the environment (torchrun, SLURM, or our local launcher), run
    the test and return its RankResult (the report on rank 0 only).

    ``progress`` (used on rank 0 only) has ``update(text)`` and ``done()``. Raises
    NettestTimeoutError when a group hangs or a rank dies: every surviving rank first answers
    the abort, the rank that raised it names the ranks that did not answer, the report (what
    was measured, and the hang) is written to ``options.json_path`` by rank 0 — or by the rank
    that raised the abort when rank 0 is gone, or by the lowest rank of each host when the
    store is gone — and the ranks on the store's host leave last. When the default group does
    not form within ``--timeout`` (ranks that never came or died during the start-up), the
    NettestTimeoutError names them (:mod:`.startup`). ConfigError / LaunchError for bad input. The context is destroyed in every case; on NCCL the communicators are
    aborted first after a hang (destroying one with a hung operation would wait for it).
    """
    config = load_config(options.config)
    # gloo: the groups' own timeout is --timeout too, so a hung operation fails by itself at
    # about the moment our wait gives up and no thread is left blocked at exit. NCCL: later
    # than our deadline, so that the tool, not NCCL's watchdog, reports the hang.
    nccl = config.backend == "nccl" or (config.backend == "auto" and torch.cuda.is_available())
    group_timeout = options.timeout_s + (NCCL_TIMEOUT_MARGIN_S if nccl else 0.0)
    config = attrs.evolve(config, timeout_s=group_timeout)
    board = _startup_board(options) if not dist.is_initialized() else None
    faults = parse_faults(os.environ.get(FAULT_ENV))
    ActiveFaults.for_rank(faults, _env_rank(), local_hostname()).never_start()
    if board is not None:
        board.start()
    ctx = ParallelContext()
    run: Optional[RankRun] = None
    hung = False
    shown, progress = progress, NullProgress()
    try:
        try:
            ctx.init_from_config(config)
            if ctx.get_global_rank() == 0 and shown is not None:
                progress = shown
            run = RankRun(ctx, options, progress)
        except (LaunchError, GroupTimeoutError, RuntimeError) as exc:
            if board is None or isinstance(exc, NettestTimeoutError):
                raise
            raise _failed_startup(board, options, exc) from None
        if board is not None:
            board.stop()
        report = run.run()
        if board is not None:
            board.forget()
        return RankResult(run.rank, run.exit_code, report)
    except NettestTimeoutError as exc:
        hung = True
        if run is None:
            raise
        raise _conclude(run, exc) from None
    finally:
        progress.done()
        _close_context(ctx, hung)


def _finish_before_terminate() -> None:
    """From here the rank only reports (every step bounded): a launcher that stops a host's
    other ranks when one exits (torchrun sends SIGTERM) must not cut a rank off before its one
    line and the report — it exits 3 moments later by itself (torchrun's SIGKILL follows
    after 30 s anyway)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _env_rank() -> int:
    text = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or ""
    return int(text) if text.isdigit() else -1


def _startup_board(options: NettestOptions) -> Optional[StartupBoard]:
    try:
        launch = from_environment()
    except LaunchError:
        return None   # the context's own start-up says what is missing
    return StartupBoard.from_environment(launch, local_hostname(), options.timeout_s)


def _failed_startup(board: StartupBoard, options: NettestOptions, exc: BaseException) -> BaseException:
    """The default group (or the first exchange) did not form: name who never arrived, write
    the report (the lowest rank present writes it), and return the error to raise —
    NettestTimeoutError if ranks are missing, StoreGoneError if the store cannot be read, the
    original error if everyone is there (something else failed)."""
    from .report import write_json

    _finish_before_terminate()
    missing = board.find_missing()
    if missing is None:   # the store is gone: each host's first local rank writes what it knows
        error = _store_gone(f"unreachable after the start-up failed: {_first_words(str(exc))}")
        writer = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0"
        report = error.report
    elif not missing.ranks:
        return exc
    else:
        message = startup.describe(missing, options.timeout_s)
        report = {"message": message, "kind": "start-up", "missing": missing.ranks,
                  "never_arrived": list(missing.never_arrived), "stopped_answering": list(missing.went_silent),
                  "missing_hosts": missing.known_hosts, "cause": _first_words(str(exc))}
        present = [r for r in range(board.world_size) if r not in set(missing.ranks)]
        writer = bool(present) and board.rank == present[0]
        error = NettestTimeoutError(message, report)
    if options.json_path and writer:
        write_json({"status": "timeout", "exit_code": 3, "world_size": board.world_size, "timeout": report,
                    "options": options.to_json()}, options.json_path)
    return error


def _conclude(run: RankRun, exc: NettestTimeoutError) -> NettestTimeoutError:
    """After an abort: answer, learn the final story, write the report, leave in order."""
    from .report import write_json

    _finish_before_terminate()
    coordinator, report = run.coordinator, exc.report
    store_gone = isinstance(exc, StoreGoneError)
    if not store_gone:
        try:
            report = coordinator.conclude_abort(report)
        except StoreGoneError as gone:
            store_gone, report = True, dict(report, message=f"{report.get('message', exc)}; {gone}")
    coordinator.stop_liveness()
    missing = set(report.get("missing", []))
    if store_gone:
        same_host = [r for r, h in enumerate(run.hostnames) if h == run.hostnames[run.rank]]
        writer = run.rank == min(same_host)
        store_host = run.hostnames[0]
        with_it = [r for r, h in enumerate(run.hostnames) if h == store_host]
        report = dict(report, missing=with_it, missing_hosts=[store_host],
                      message=f"{report.get('message', exc)}: probably with {store_host} "
                              f"(ranks {_short_ranks(with_it)}), where it runs")
    else:
        writer = run.rank == 0 or (0 in missing and report.get("detected_by") == run.rank)
    if writer and run.options.json_path:
        run.report.update({"status": "timeout", "timeout": report, "exit_code": 3,
                           "options": run.options.to_json(), "elapsed_s": time.perf_counter() - run.started})
        write_json(run.report, run.options.json_path)
    if not store_gone:
        try:
            coordinator.leave_after_abort(report)
        except StoreGoneError:
            pass
    error_type = StoreGoneError if store_gone else NettestTimeoutError
    return error_type(report.get("message", str(exc)), report)


def _close_context(ctx: ParallelContext, hung: bool) -> None:
    """Destroy the context; after a hang, abort NCCL communicators first, and do not wait
    longer than CLOSE_WAIT_S for a destroy that a hung operation may block."""
    if hung and dist.is_initialized() and ctx.backend is not None and ctx.backend.device_backend == "nccl":
        try:
            dist.distributed_c10d._abort_process_group()
        except (RuntimeError, ValueError, AttributeError):
            pass
    if not hung:
        ctx.destroy()
        return
    closer = threading.Thread(target=_destroy_quietly, args=(ctx,), daemon=True)
    closer.start()
    closer.join(CLOSE_WAIT_S)


def _destroy_quietly(ctx: ParallelContext) -> None:
    try:
        ctx.destroy()
    except Exception:  # noqa: BLE001 - tearing down after a hang: nothing left to report
        pass
