"""The data plane of ``pgroups nettest``: verification data, issuing the collectives under test,
and :class:`Bench`, the one place that issues and waits (device-synchronized timing, --timeout,
abort checks between polls).
"""
from __future__ import annotations

import contextlib
import datetime
import math
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import attrs
import torch
import torch.distributed as dist

from ..comm.raw import all_gather_single, reduce_scatter_single
from . import metrics
from .control import CHECK_INTERVAL_S, CallThread, NettestTimeoutError, first_words

FOLLOWUP_MIN_ITERS = 20
FOLLOWUP_SMALL_BYTES = 1024 * 1024
PATTERN_PERIOD = 61   # element values cycle through -30..30 (exact in float32 sums)
OFFSET_PERIOD = 64    # per-source offset, so chunks from different ranks differ
CORRUPT_DELTA = 1000.0


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
    """An operation on a group under test timed out or failed: the cause's text, and ``phase``
    ``"issue"`` (it failed when issued) or ``"wait"`` (while it was waited for)."""

    def __init__(self, message: str, phase: str = "wait") -> None:
        super().__init__(message)
        self.phase = phase


@contextlib.contextmanager
def failures_named(phase: str) -> Iterator[None]:
    """Inside: torch.distributed's failures become GroupFailure(first line of the cause,
    ``phase``) — raised when an operation is issued (gloo's ``batch_isend_irecv`` raises at
    once on a connection a dead peer closed) or while it is waited for; an abort or a gone
    store (NettestTimeoutError) passes through as it is."""
    try:
        yield
    except NettestTimeoutError:
        raise
    except (RuntimeError, dist.DistError, TimeoutError) as exc:
        raise GroupFailure(first_words(str(exc)) or type(exc).__name__, phase) from exc


class Bench:
    """Times and verifies operations on this rank (one instance per run; :meth:`close` it).

    :meth:`run` is the one place that issues and waits: both happen inside the failure
    handling, so a peer found dead when an operation is issued ends like one found dead while
    it is waited for (GroupFailure)."""

    def __init__(self, device: torch.device, coordinator: Any, faults: Any,
                 timeout_s: float, warmup: int, iters: int) -> None:
        self.device = device
        self.coordinator = coordinator
        self.faults = faults
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.warmup, self.iters = warmup, iters
        self._waiter: Optional[CallThread] = None

    def close(self) -> None:
        """Stop and join the waiter thread (one left behind a hung operation is not waited for)."""
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None

    def run(self, issue: Callable[[], List[Any]]) -> List[Any]:
        """Issue one operation and wait for it (see :meth:`wait`); GroupFailure if either fails
        (its ``phase`` says which)."""
        with failures_named("issue"):
            works = issue()
        with failures_named("wait"):
            self.wait(works)
        return works

    def wait(self, works: Sequence[Any]) -> None:
        """Wait for ``works``; only --timeout ends them. On gloo ``work.wait()`` runs on a waiter
        thread (a :class:`.control.CallThread`) while this one polls it every CHECK_INTERVAL_S
        and looks at the abort flag and the store's health in between: a rank stuck with a dead
        peer leaves as soon as another rank raised the alarm or the store is found gone
        (NettestTimeoutError / StoreGoneError), and a finished operation wakes this thread at
        once (about 0.1 ms per operation). Not ``work.wait(slice)`` in a loop: on gloo an
        expired ``wait(timeout)`` aborts the operation itself, so a slow but healthy transfer
        was killed; not polling ``is_completed()``: gloo's send/recv works report completion
        only once waited for. The thread's wait has no deadline of its own (the groups' timeout,
        --timeout, ends a hung operation there); at this deadline the waiter is left to it
        (a new one serves the next wait). Raises TimeoutError at the deadline, or what the
        operation raised. NCCL's ``wait(timeout)`` has other semantics (it makes the stream
        wait; the watchdog enforces the timeout): one wait there."""
        if self.device.type == "cuda":
            for work in works:
                work.wait(self.timeout)
            return
        if not works:
            return
        if self._waiter is None:
            self._waiter = CallThread("pgroups-nettest-wait")
        timeout_s = self.timeout.total_seconds()
        deadline = time.monotonic() + timeout_s
        pending = self._waiter.submit(lambda: [work.wait() for work in works])
        while not pending.done.wait(max(0.0, min(CHECK_INTERVAL_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                self._abandon_waiter()
                raise TimeoutError(f"timed out: the operation did not complete within --timeout {timeout_s:g}s")
            try:
                self.coordinator.check_abort()
            except NettestTimeoutError:
                self._abandon_waiter()
                raise
        if pending.error is not None:
            raise pending.error

    def _abandon_waiter(self) -> None:
        """Leave the waiter thread to the operation it is blocked in; the next wait takes a new one."""
        if self._waiter is not None:
            self._waiter.stuck = True
            self._waiter.close()
            self._waiter = None

    def _timed(self, issue: Callable[[], List[Any]], iters: int, crosses_hosts: bool,
               size_bytes: int) -> List[float]:
        """Time ``iters`` back-to-back operations (device-synchronized); seconds per operation.

        On GPUs the operations are queued back to back between two CUDA events (as nccl-tests
        does) and the result is one value, the mean. NCCL runs them on its own stream, which
        waits for the current one (so the start event comes first); ``work.wait()`` without a
        timeout makes the current stream wait for that work, so the end event, recorded after
        it, completes only when the last transfer has — the time of the transfers, not of
        their launch. The CPU then waits with --timeout (a hang raises). On CPU each operation
        is issued, waited and timed on its own (:meth:`run`): the result has one value per
        operation (their mean is the table's figure, the best of them the follow-ups' robust
        one). GroupFailure if an operation fails when issued or waited for.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            works: List[Any] = []
            with failures_named("issue"):
                for _ in range(iters):
                    self.faults.inside_timed_region(crosses_hosts, size_bytes)
                    works = issue()  # NCCL's stream is in order: the last one completes after the others
            with failures_named("wait"):
                for work in works:
                    work.wait()      # the current stream waits for NCCL's (no CPU block)
                end.record(stream)
                self.wait(works)
                end.synchronize()
            return [start.elapsed_time(end) / 1e3 / iters]
        durations = []
        for _ in range(iters):
            begin = time.perf_counter()
            self.faults.inside_timed_region(crosses_hosts, size_bytes)
            self.run(issue)
            durations.append(time.perf_counter() - begin)
            self.coordinator.beat()
        return durations

    def _verify(self, buffers: Buffers, issue: Callable[[], List[Any]]) -> Tuple[int, Dict[int, int]]:
        """One more operation on fresh data; count the elements that differ from the expected."""
        if not buffers.recv_is_source and buffers.recv is not buffers.send:
            buffers.recv.fill_(float("nan"))
        self.run(issue)
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
            self.run(timed_op)
        iters = self.iters_for(shape.size_bytes, followup)
        crosses = self._crosses_hosts(ranks)
        times, op_best = _repeat(lambda issue: self._timed(issue, iters, crosses, shape.size_bytes), timed_op, repeats)
        wrong, wrong_from = self._verify(buffers, verify_op)
        self.coordinator.beat()
        return {"rank": me, "collective": collective, "size": shape.size_bytes, "count": shape.in_count,
                "times": times, "op_best": op_best, "wrong": wrong, "wrong_from": {str(k): v for k, v in wrong_from.items()}}

    def measure_pair(self, partner: int, me: int, size_bytes: int, repeats: int) -> Dict[str, Any]:
        """Send/recv with ``partner`` on the world group, **one direction at a time**; the data
        that arrives from it is verified. Returns this rank's record; both ranks of the pair
        return the same figures: those of the *slower direction* (a link slow one way is slow).

        Each iteration sends ``size_bytes`` from the lower rank to the higher one, then back;
        the sender times its direction from issuing the message to the receiver's 4-byte
        acknowledgement (sent once the whole message has arrived), so a direction's time is
        its transfer plus one small-message latency. Why not both directions at once (one
        ``batch_isend_irecv`` timed as one operation): on a link shaped to the same rate both
        ways, that operation ran at half or at full rate from one time to the next (gloo's two
        directions on one pair did not overlap when the ranks issued back to back, and did in
        part when they met at different moments; a plain TCP stream both ways on one socket
        swings too, as each side's acknowledgements queue behind its own data in the shaper),
        so healthy links scattered by 2x; one direction at a time they agree within a few
        percent (docs/nettest.md). ``times``: per repetition, the mean per iteration of the
        slower direction; ``op_best``: the slower direction's best operation (noise only adds
        time). The times of each direction are exchanged at the end (one small send/recv)."""
        shape = metrics.message_shape("sendrecv", size_bytes, 2)
        low, high = sorted((me, partner))
        send = pattern(0, shape.in_count, float(me == high), self.device)
        if self.faults.corrupt:
            corrupt_tensor(send)
        expected = pattern(0, shape.in_count, float(partner == high), self.device)
        recv = torch.empty(shape.in_count, device=self.device, dtype=torch.float32)
        ack_out = torch.zeros(1, device=self.device, dtype=torch.float32)
        ack_in = torch.empty(1, device=self.device, dtype=torch.float32)
        crosses = self._crosses_hosts((me, partner))

        def send_timed(timed: bool) -> float:
            begin = time.perf_counter()
            if timed:   # the injected faults act on timed operations only, as in _timed
                self.faults.inside_timed_region(crosses, shape.size_bytes)
            self.run(lambda: p2p([(dist.isend, send, partner), (dist.irecv, ack_in, partner)]))
            self._synchronize()
            return time.perf_counter() - begin

        def receive() -> None:
            recv.fill_(float("nan"))
            self.run(lambda: p2p([(dist.irecv, recv, partner)]))
            self.run(lambda: p2p([(dist.isend, ack_out, partner)]))

        def iteration(timed: bool = True) -> float:
            if me == low:
                mine = send_timed(timed)
                receive()
            else:
                receive()
                mine = send_timed(timed)
            self.coordinator.beat()
            return mine

        warm = [iteration(timed=False) for _ in range(self.warmup)]
        iters = self.iters_for(shape.size_bytes, followup=True)
        if warm:   # both ranks derive the same count from both directions' last warm-up time
            iters = pair_iterations(iters, max(warm[-1], *self._swap_times(partner, warm[-1:])))
        own = [[iteration() for _ in range(iters)] for _ in range(repeats)]
        self._synchronize()
        wrong = int((recv != expected).sum())
        theirs = self._swap_times(partner, [t for run in own for t in run])
        slower = [max(a, b) for a, b in zip([t for run in own for t in run], theirs)]
        runs = [slower[k * iters:(k + 1) * iters] for k in range(repeats)]
        self.coordinator.beat()
        return {"rank": me, "collective": "sendrecv", "size": shape.size_bytes, "count": shape.in_count,
                "times": [sum(run) / len(run) for run in runs],
                "op_best": max(min(t for run in own for t in run), min(theirs)),
                "wrong": wrong, "wrong_from": {str(partner): wrong} if wrong else {}}

    def _swap_times(self, partner: int, mine: Sequence[float]) -> List[float]:
        """Send this rank's per-operation times to ``partner``; return the partner's."""
        out = torch.tensor(list(mine), dtype=torch.float64, device=self.device)
        into = torch.empty_like(out)
        self.run(lambda: p2p([(dist.isend, out, partner), (dist.irecv, into, partner)]))
        self._synchronize()
        return [float(t) for t in into.cpu().tolist()]

    def _synchronize(self) -> None:
        """On GPUs, wait until the device has finished (CPU-timed pair operations)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


PAIR_BUDGET_S = 0.5     # timed transfers per direction of one pair measurement, about
PAIR_MIN_ITERS = 3      # but never fewer timed iterations than this


def pair_iterations(iters: int, warm_s: float) -> int:
    """Timed iterations of a pair measurement: ``iters``, cut so that one direction's timed
    transfers take about PAIR_BUDGET_S at the warm-up's pace (``warm_s`` per transfer), never
    below PAIR_MIN_ITERS. One direction at a time, healthy transfers agree within a few percent
    (the best of three is the link's rate), while a link slow enough that one transfer takes
    seconds costs three of them, not twenty.

    >>> pair_iterations(20, 0.084), pair_iterations(20, 2.1), pair_iterations(5, 0.001)
    (6, 3, 5)
    """
    return max(min(PAIR_MIN_ITERS, iters), min(iters, math.ceil(PAIR_BUDGET_S / max(warm_s, 1e-9))))


def p2p(ops: Sequence[Tuple[Callable[..., Any], torch.Tensor, int]]) -> List[Any]:
    """Issue point-to-point operations ``(dist.isend | dist.irecv, tensor, peer)`` on the world
    group as one batch (NCCL needs its point-to-point calls batched); their Work handles."""
    world = dist.group.WORLD
    return list(dist.batch_isend_irecv([dist.P2POp(op, tensor, peer, world) for op, tensor, peer in ops]))


def _repeat(timed: Callable[[Callable[[], List[Any]]], List[float]], issue: Callable[[], List[Any]],
            repeats: int) -> Tuple[List[float], float]:
    """Run ``timed`` ``repeats`` times: (mean seconds per operation of each repetition, the
    best single timed operation — on GPUs, where a repetition is one batch, the best batch)."""
    runs = [timed(issue) for _ in range(repeats)]
    return [sum(run) / len(run) for run in runs], min(d for run in runs for d in run)
