"""Run a :class:`~pgroups.reshard.planner.Plan` on torch.distributed.

Transport: batched point-to-point (``dist.batch_isend_irecv``) on the context's *global*
group. Point-to-point needs no extra process group, so layouts on any subset of ranks
(disjoint, overlapping) work without creating groups on only some ranks, which would change
how torch names the groups those ranks create later; broadcasts over cached groups were
measured against it (bench/bench_reshard.py) and bring nothing here: after the planner spreads
senders over replicas, nearly every message has exactly one receiver.

Per step each rank sends to at most one peer and receives from at most one (the planner's
colouring). The bytes a pair exchanges in a step form one stream: transfers in plan order, each
starting at a multiple of its element size; the stream is cut into chunks of at most ``bucket_bytes``:
runs of small transfers (under 1 MiB) are packed into one bucket (no per-tensor messages for
them), a larger transfer is sent straight from the source tensor (no packing copy when its
region is contiguous), in pieces of at most ``bucket_bytes``. All chunks of a step go in one ``batch_isend_irecv``
and are awaited together (waiting chunk by chunk made every pair move in lock-step with its
neighbours' pairs: measured 1.5-2x slower on gloo); the next step is packed while the current
one is on the wire.

Atomicity: received bytes land in staging buffers; destination tensors are written only after
every step (and, with ``verify=True``, every checksum) succeeded on this rank. A failure —
a dead peer, a timeout (``timeout_s`` per step), a checksum mismatch — raises naming the
step and the peer ranks and leaves this rank's destination tensors untouched.

Every rank of ``plan.ranks`` must run the same plan with the same ``bucket_bytes``
(:func:`execute_plan` once, or :class:`Resharder` for repeated syncs that keep their staging
buffers); other ranks need not call it.
"""
from __future__ import annotations

import datetime
import functools
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch
import torch.distributed as dist

from ..backend import is_timeout
from ..errors import GroupTimeoutError, ReshardError
from ..modes import ParallelMode
from .layout import ParallelLayout, local_shapes
from .planner import Box, Plan, Transfer, plan_reshard
from .spec import ModelSpec

DEFAULT_BUCKET_BYTES = 64 << 20
#: transfers smaller than this (or than half a bucket) are packed together; larger ones are sent
#: straight from the source tensor — packing them would only add a copy
PACK_BELOW_BYTES = 1 << 20
#: weights of the position-sensitive checksum cycle with this period (a prime)
_CHECKSUM_PERIOD = 65521
_CHECKSUM_CHUNK = 1 << 22

Progress = Callable[[int], None]


@attrs.frozen
class ReshardStats:
    """What one rank did: network bytes received/sent (payload), bytes copied locally, wall time."""

    rank: int
    bytes_received: int
    bytes_sent: int
    bytes_copied: int
    seconds: float
    steps: int
    messages: int            # point-to-point operations this rank posted (chunks sent + received)
    verified_messages: int

    @property
    def gbps(self) -> float:
        """Effective receive throughput, GB/s (1e9 bytes)."""
        return self.bytes_received / self.seconds / 1e9 if self.seconds > 0 else 0.0


# ---- message layout (pure) ------------------------------------------------------------------------
@attrs.frozen
class _Message:
    """The byte stream one pair exchanges in one step: ``(transfer, offset)`` parts, its size,
    and the ``(start, stop)`` chunks it moves in (one message each)."""

    step: int
    peer: int
    parts: Tuple[Tuple[Transfer, int], ...]
    size: int
    chunks: Tuple[Tuple[int, int], ...]


def _chunks(parts: Sequence[Tuple[Transfer, int]], size: int, bucket_bytes: int) -> Tuple[Tuple[int, int], ...]:
    """Cut a stream into chunks of at most ``bucket_bytes``: runs of small transfers (below
    ``PACK_BELOW_BYTES`` and half a bucket) share a chunk, packed by the sender; a larger transfer
    gets chunks of its own, sent straight from the source tensor. Pure: both ends compute the same."""
    chunks: List[Tuple[int, int]] = []
    run_start: Optional[int] = None
    pack_below = min(PACK_BELOW_BYTES, -(-bucket_bytes // 2))
    for transfer, offset in parts:
        end = offset + transfer.nbytes
        if transfer.nbytes >= pack_below:
            if run_start is not None:
                chunks.append((run_start, offset))
                run_start = None
            chunks.extend((lo, min(lo + bucket_bytes, end)) for lo in range(offset, end, bucket_bytes))
            continue
        if run_start is not None and end - run_start > bucket_bytes:
            chunks.append((run_start, offset))
            run_start = None
        if run_start is None:
            run_start = offset
    if run_start is not None:
        chunks.append((run_start, size))
    return tuple(chunks)


def _messages(transfers: Sequence[Transfer], peer_of: Callable[[Transfer], int],
              itemsize: Mapping[str, int], bucket_bytes: int) -> Dict[int, _Message]:
    """Group one rank's sends (or receives) by step: ``{step: _Message}``."""
    by_step: Dict[int, List[Transfer]] = {}
    for t in transfers:
        by_step.setdefault(t.step, []).append(t)
    messages = {}
    for step, items in by_step.items():
        peers = {peer_of(t) for t in items}
        if len(peers) != 1:
            raise ReshardError(f"plan step {step} gives one rank several peers {sorted(peers)}; "
                               "a plan must come from plan_reshard")
        offset, parts = 0, []
        for t in items:
            align = itemsize[t.tensor]
            offset = -(-offset // align) * align
            parts.append((t, offset))
            offset += t.nbytes
        messages[step] = _Message(step, peers.pop(), tuple(parts), offset, _chunks(parts, offset, bucket_bytes))
    return messages


# ---- tensor regions ---------------------------------------------------------------------------------
def _region(tensor: torch.Tensor, axis: int, box: Box) -> torch.Tensor:
    """The view of ``tensor`` covered by ``box`` (a 0-d tensor is its own region). Boxes differ
    from the full extent on ``axis`` and, for grouped expert weights, on the expert dim."""
    for dim, (start, stop) in enumerate(box):
        if stop - start != tensor.shape[dim]:
            tensor = tensor.narrow(dim, start, stop - start)
    return tensor


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of ``tensor`` (copied first if it is not contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _checksum(data: torch.Tensor, position: int) -> torch.Tensor:
    """``[sum of bytes, sum of byte * weight(position)]`` (int64, wrapping): cheap, position
    sensitive, identical on every device."""
    total = torch.zeros(2, dtype=torch.int64, device=data.device)
    for start in range(0, data.numel(), _CHECKSUM_CHUNK):
        chunk = data[start:start + _CHECKSUM_CHUNK].to(torch.int64)
        weights = (torch.arange(chunk.numel(), device=data.device, dtype=torch.int64)
                   + position + start) % _CHECKSUM_PERIOD + 1
        total[0] += chunk.sum()
        total[1] += (chunk * weights).sum()
    return total


# ---- the executor -------------------------------------------------------------------------------------
class Resharder:
    """``plan`` bound to this rank, ready to run many times (a weight sync every iteration): the
    message layout is computed once and the staging buffers are kept between runs.

    ``context`` (default ``pgroups.gpc``) gives the rank and the global group — its device
    group for CUDA tensors, its CPU group otherwise (under NCCL, CPU tensors need the CPU twin of
    the global group: build it at init with ``cpu_groups: eager``, since only the plan's ranks
    run this); ``group`` overrides (a group containing every rank of the plan, addressed by
    global rank). ``timeout_s`` bounds each step (default: the context's config ``timeout_s``).
    ``bucket_bytes`` is the largest single message (small tensors are packed up to it); every
    rank must use the same. ``verify`` adds a checksum per message. ``keep_buffers=False``
    frees the staging buffers after each run.

    Under NCCL the global device group must have run a collective before (torch requires every
    rank in a group's first ``batch_isend_irecv``); :func:`reshard` does it.
    """

    def __init__(self, plan: Plan, *, context: Any = None, group: Optional[dist.ProcessGroup] = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: Optional[float] = None,
                 verify: bool = False, keep_buffers: bool = True) -> None:
        if context is None:
            from .. import gpc as context
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.plan, self.context, self.group, self.verify = plan, context, group, verify
        self.keep_buffers = keep_buffers
        self.rank = context.get_global_rank()
        if timeout_s is None:
            timeout_s = context.config.timeout_s if context.config is not None else 1800.0
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.sends, self.recvs, self.copies = plan.transfers_of(self.rank)
        itemsize = {spec.name: spec.itemsize for spec in plan.model.tensors}
        self.axis = {spec.name: spec.axis for spec in plan.model.tensors}
        self.send_messages = _messages(self.sends, lambda t: t.dst, itemsize, bucket_bytes)
        self.recv_messages = _messages(self.recvs, lambda t: t.src, itemsize, bucket_bytes)
        self._staging: Dict[int, torch.Tensor] = {}

    def run(self, src_tensors: Mapping[str, torch.Tensor], dst_tensors: Mapping[str, torch.Tensor],
            progress: Optional[Progress] = None) -> ReshardStats:
        """Move this rank's part of the plan: send from ``src_tensors`` (this rank's source
        shards, by tensor name), receive into ``dst_tensors`` (its destination shards, written in
        place once everything arrived). ``progress(step)`` is called before each step this rank
        takes part in. Returns this rank's stats.

        Raises ReshardError (missing or mis-shaped tensors — before any communication —, a
        failed peer, a checksum mismatch) or GroupTimeoutError (a peer that does not answer in
        time), naming the step and ranks; in every failure the destination tensors are untouched.
        """
        plan, rank, timeout = self.plan, self.rank, self.timeout
        device = _check_tensors(plan, rank, src_tensors, dst_tensors)
        group = self.group
        if group is None and (self.sends or self.recvs):
            group = (self.context.get_group(ParallelMode.GLOBAL) if device.type == "cuda"
                     else self.context.get_cpu_group(ParallelMode.GLOBAL))
        _synchronize(device)
        started = time.perf_counter()
        messages = verified = 0
        try:
            steps = [s for s in range(plan.num_steps) if s in self.send_messages or s in self.recv_messages]
            upcoming = self._prepare(steps[0], src_tensors, group, device) if steps else None
            for index, step in enumerate(steps):
                ops, out, inc, packer = upcoming
                if progress is not None:
                    progress(step)
                following = steps[index + 1] if index + 1 < len(steps) else None
                upcoming = _run(ops, timeout, plan, step, rank, out, inc, while_in_flight=None if following is None
                                else functools.partial(self._prepare, following, src_tensors, group, device))
                messages += len(ops)
                if self.verify:
                    _exchange_checksums(plan, step, rank, out, inc, packer, self._staging.get(step), group,
                                        timeout, device)
                    verified += inc is not None
            _commit(self.copies, self.recv_messages, self._staging, src_tensors, dst_tensors, self.axis)
            _synchronize(device)
        finally:
            if not self.keep_buffers:
                self.release()
        seconds = time.perf_counter() - started
        return ReshardStats(rank, sum(t.nbytes for t in self.recvs), sum(t.nbytes for t in self.sends),
                            sum(t.nbytes for t in self.copies), seconds,
                            len(set(self.send_messages) | set(self.recv_messages)), messages, verified)

    def _prepare(self, step: int, src_tensors: Mapping[str, torch.Tensor], group: Optional[dist.ProcessGroup],
                 device: torch.device) -> Tuple[List[dist.P2POp], Optional[_Message], Optional[_Message],
                                                Optional["_Packer"]]:
        """The point-to-point operations of ``step`` (receives into staging, sends packed or direct)."""
        out, inc = self.send_messages.get(step), self.recv_messages.get(step)
        ops = []
        if inc is not None:
            buffer = self._staging_for(step, inc.size, device)
            ops += [dist.P2POp(dist.irecv, buffer[lo:hi], inc.peer, group) for lo, hi in inc.chunks]
        packer = _Packer(out, src_tensors, self.axis, device, self.verify) if out is not None else None
        if packer is not None:
            ops += [dist.P2POp(dist.isend, packer.chunk(k), out.peer, group) for k in range(len(out.chunks))]
        return ops, out, inc, packer

    def _staging_for(self, step: int, size: int, device: torch.device) -> torch.Tensor:
        buffer = self._staging.get(step)
        if buffer is None or buffer.device != device:
            buffer = self._staging[step] = torch.empty(size, dtype=torch.uint8, device=device)
        return buffer

    @property
    def staging_bytes(self) -> int:
        """Bytes of staging this rank holds (its network bytes received, plus alignment)."""
        return sum(m.size for m in self.recv_messages.values())

    def release(self) -> None:
        """Free the staging buffers (the next run allocates them again)."""
        self._staging.clear()


def execute_plan(plan: Plan, src_tensors: Mapping[str, torch.Tensor], dst_tensors: Mapping[str, torch.Tensor],
                 *, progress: Optional[Progress] = None, **options: Any) -> ReshardStats:
    """Run ``plan`` once on this rank (a :class:`Resharder` that frees its buffers afterwards);
    ``options`` are Resharder's (context, group, bucket_bytes, timeout_s, verify). Every rank of
    ``plan.ranks`` must call it with the same plan and bucket_bytes. See :meth:`Resharder.run`
    for the contract and the errors."""
    return Resharder(plan, keep_buffers=False, **options).run(src_tensors, dst_tensors, progress)


def reshard(src_layout: ParallelLayout, dst_layout: ParallelLayout, model: ModelSpec,
            src_tensors: Mapping[str, torch.Tensor], dst_tensors: Mapping[str, torch.Tensor], *,
            context: Any = None, hosts: Optional[Sequence[str]] = None, **options: Any) -> Tuple[Plan, ReshardStats]:
    """Plan (with the launch's hostnames) and execute in one call; returns ``(plan, stats)``.

    Collective over the whole world the first time (the hostnames are gathered): call it on
    every rank, with empty mappings on ranks in neither layout. To sync repeatedly, keep a
    :class:`Resharder` of the plan and call its ``run``. ``options`` go to :func:`execute_plan`.
    """
    if context is None:
        from .. import gpc as context
    if hosts is None:
        hosts = context.get_hostnames()
    if context.backend is not None and context.backend.device_backend == "nccl":
        # torch: a batch_isend_irecv that is the group's first collective must involve every rank
        ready = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(ready, group=context.get_group(ParallelMode.GLOBAL))
    plan = plan_reshard(src_layout, dst_layout, model, hosts)
    return plan, execute_plan(plan, src_tensors, dst_tensors, context=context, **options)


# ---- helpers -------------------------------------------------------------------------------------------
class _Packer:
    """Produces the send buffer of each chunk of one message (a view of the source tensor, or a
    packed bucket); with ``verify``, sums the checksum of every transfer it touches."""

    def __init__(self, message: _Message, tensors: Mapping[str, torch.Tensor], axis: Mapping[str, int],
                 device: torch.device, verify: bool) -> None:
        self.message, self.tensors, self.axis, self.device = message, tensors, axis, device
        self.verify = verify
        self.checksum = torch.zeros(2, dtype=torch.int64, device=device) if verify else None
        self._cached: Tuple[Optional[Transfer], Optional[torch.Tensor]] = (None, None)

    def _bytes_of(self, transfer: Transfer) -> torch.Tensor:
        if self._cached[0] is not transfer:
            region = _region(self.tensors[transfer.tensor], self.axis[transfer.tensor], transfer.src_box)
            data = _as_bytes(region)
            if self.verify:
                self.checksum += _checksum(data, 0)
            self._cached = (transfer, data)
        return self._cached[1]

    def chunk(self, index: int) -> torch.Tensor:
        lo, hi = self.message.chunks[index]
        inside = [(t, off) for t, off in self.message.parts if off < hi and off + t.nbytes > lo]
        if len(inside) == 1 and inside[0][1] <= lo and inside[0][1] + inside[0][0].nbytes >= hi:
            t, off = inside[0]
            return self._bytes_of(t)[lo - off:hi - off]   # one transfer covers the chunk: no copy
        buffer = torch.empty(hi - lo, dtype=torch.uint8, device=self.device)   # small transfers only
        for t, off in inside:
            a, b = max(lo, off), min(hi, off + t.nbytes)
            buffer[a - lo:b - lo].copy_(self._bytes_of(t)[a - off:b - off])
        return buffer


def _run(ops: List[dist.P2POp], timeout: datetime.timedelta, plan: Plan, step: int, rank: int,
         out: Optional[_Message], inc: Optional[_Message],
         while_in_flight: Optional[Callable[[], Any]] = None) -> Any:
    """Post one step's operations, call ``while_in_flight`` (the next step is packed meanwhile),
    wait for all of them within ``timeout`` and return what ``while_in_flight`` returned;
    failures become errors naming the step and the peers."""
    try:
        works = dist.batch_isend_irecv(ops)
        result = while_in_flight() if while_in_flight is not None else None
        deadline = time.monotonic() + timeout.total_seconds()
        for work in works:
            left = deadline - time.monotonic()
            if left <= 0 or not work.wait(datetime.timedelta(seconds=left)):
                raise TimeoutError(f"timed out after {timeout.total_seconds():g}s")
        return result
    except Exception as exc:  # torch raises RuntimeError / DistError subclasses
        peers = []
        if inc is not None:
            peers.append(f"receiving {inc.size} bytes from rank {inc.peer}")
        if out is not None:
            peers.append(f"sending {out.size} bytes to rank {out.peer}")
        where = (f"reshard step {step + 1}/{plan.num_steps} on rank {rank} ({' and '.join(peers)}) "
                 "over the global group")
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if is_timeout(exc):
            raise GroupTimeoutError(f"{where}: not done within {timeout.total_seconds():g}s — is the peer "
                                    f"alive and running the same plan? ({text})") from exc
        raise ReshardError(f"{where} failed: {text}; destination tensors untouched") from exc


def _exchange_checksums(plan: Plan, step: int, rank: int, out: Optional[_Message], inc: Optional[_Message],
                        packer: Optional[_Packer], staging: Optional[torch.Tensor], group: dist.ProcessGroup,
                        timeout: datetime.timedelta, device: torch.device) -> None:
    """Send the checksum of what this rank sent, receive and compare the one of what it got."""
    ops, theirs = [], None
    if inc is not None:
        theirs = torch.empty(2, dtype=torch.int64, device=device)
        ops.append(dist.P2POp(dist.irecv, theirs, inc.peer, group))
    if out is not None:
        ops.append(dist.P2POp(dist.isend, packer.checksum, out.peer, group))
    _run(ops, timeout, plan, step, rank, out, inc)
    if inc is not None:
        mine = torch.zeros(2, dtype=torch.int64, device=device)
        for t, off in inc.parts:
            mine += _checksum(staging[off:off + t.nbytes], 0)
        if not torch.equal(mine, theirs):
            names = sorted({t.tensor for t, _ in inc.parts})
            raise ReshardError(f"reshard step {step + 1}/{plan.num_steps} on rank {rank}: checksum mismatch on "
                               f"{inc.size} bytes from rank {inc.peer} (tensors {names[:4]}"
                               f"{' …' if len(names) > 4 else ''}); destination tensors untouched")


def _commit(copies: Sequence[Transfer], recv_messages: Mapping[int, _Message],
            staging: Mapping[int, torch.Tensor], src_tensors: Mapping[str, torch.Tensor],
            dst_tensors: Mapping[str, torch.Tensor], axis: Mapping[str, int]) -> None:
    """Write everything into the destination tensors (only called once all bytes arrived)."""
    for t in copies:
        _region(dst_tensors[t.tensor], axis[t.tensor], t.dst_box).copy_(
            _region(src_tensors[t.tensor], axis[t.tensor], t.src_box))
    for step, message in recv_messages.items():
        buffer = staging[step]
        for t, off in message.parts:
            target = _region(dst_tensors[t.tensor], axis[t.tensor], t.dst_box)
            target.copy_(buffer[off:off + t.nbytes].view(target.dtype).view(target.shape))


def _check_tensors(plan: Plan, rank: int, src_tensors: Mapping[str, torch.Tensor],
                   dst_tensors: Mapping[str, torch.Tensor]) -> torch.device:
    """Every shard this rank holds in each layout is given with the right shape and dtype, on one
    device (returned; CPU if the rank has none)."""
    devices = set()
    dtypes = {spec.name: spec.dtype for spec in plan.model.tensors}
    for side, layout, tensors in (("source", plan.src, src_tensors), ("destination", plan.dst, dst_tensors)):
        coords = layout.coordinates(rank)
        for name, shape in local_shapes(layout, plan.model, rank).items():
            tensor = tensors.get(name)
            where = (f"rank {rank}: {side} tensor {name!r} (tp {coords['tp']} of {layout.topology.tensor}, "
                     f"stage {coords['pp']})")
            if tensor is None:
                raise ReshardError(f"{where} is missing; this rank must pass every tensor of its stage "
                                   f"({len(local_shapes(layout, plan.model, rank))} tensors)")
            if tuple(tensor.shape) != shape or tensor.dtype != dtypes[name]:
                raise ReshardError(f"{where} has shape {tuple(tensor.shape)} {tensor.dtype}; the layout "
                                   f"gives {shape} {dtypes[name]}")
            devices.add(tensor.device)
    if len(devices) > 1:
        raise ReshardError(f"rank {rank}: shards are on several devices {sorted(map(str, devices))}; use one")
    return devices.pop() if devices else torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
