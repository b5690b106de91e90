"""Run a :class:`~pgroups.reshard.planner.Plan` on torch.distributed.

Transport: point-to-point (``dist.batch_isend_irecv``) on the context's *global* group. Point to
point needs no extra process group, so layouts on any subset of ranks (disjoint, overlapping)
work without creating groups on only some ranks; broadcasts over cached groups were measured
against it (bench/bench_reshard.py) and bring nothing: after the planner spreads senders over
replicas, nearly every message has exactly one receiver.

**Plan agreement.** Before any byte moves, the ranks of the group all-gather an 8-byte digest of
the plan and of the options both ends of a message must share (``bucket_bytes``, ``dst_dtypes``,
``verify``): a mismatch raises ReshardError on every rank, naming the first rank that disagrees
with the majority, and nothing is sent or written. A rank whose own tensors fail the checks
contributes a refusal, so its peers fail at once instead of timing out. The agreement is a
collective over the group: every rank of it runs the plan (ranks outside the plan with empty
mappings).

**Wire format** (:mod:`.wire`, pure: both ends derive it from the plan alone). Per step each rank
sends to at most one peer and receives from at most one; the bytes a pair exchanges in a step form
one message of pieces in the *destination* dtype, cut into chunks of at most ``bucket_bytes``
(small pieces packed together, large contiguous ones sent straight from the source tensor).

**Pipeline.** Packing — copy, cast, quantize — goes through a ring of send buffers: while chunk
k is on the wire, chunk k+1 is packed into the other buffer (double buffering; at the end of a
step, the next step's first chunks are packed while the last ones fly). The rank always waits on
its oldest operation (receives before sends of the same chunk index), so no rank waits on a peer
that waits on it. Two receive modes:

- ``atomic=True`` (default): every received byte lands in a staging buffer; destination tensors
  are written only after every step (and, with ``verify=True``, every checksum) succeeded on this
  rank: a failure — a dead peer, a timeout (``timeout_s`` without progress), a checksum mismatch —
  raises naming the step and the peer ranks and leaves the destination untouched. Staging holds
  all the bytes the rank receives.
- ``atomic=False`` (streaming): receives go to a ring of bucket buffers; each chunk is unpacked
  into the destination while the next ones are on the wire, within ``max_staging_bytes``. On a
  failure the destination may be partly written (the error says so).

After a failed run the buffers that posted receives may still target are dropped (kept alive
with those operations, never reused): a retry allocates fresh ones, so a late message from the
failed attempt cannot scribble on it. (gloo also closes the connection of a timed-out operation:
retry on a fresh group — set ``Resharder.group`` — or after re-initialising; NCCL's watchdog
aborts the communicator unless told otherwise.)

Every rank of the group must run the same plan with the same options (:func:`execute_plan` once,
or :class:`Resharder` for repeated syncs: plan layout, buffers and communicators are reused, and
the second and later runs allocate nothing).
"""
from __future__ import annotations

import datetime
import time
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch
import torch.distributed as dist

from ..comm.raw import all_gather_single
from ..backend import is_timeout
from ..errors import GroupTimeoutError, ReshardError
from ..modes import ParallelMode
from . import convert
from .layout import ParallelLayout, local_shapes
from .wire import (ALIGN, REFUSED, Chunk, Message, Piece, Shapes, agreement_digest, box_shape, first_disagreement,
                   messages, slices)
from .planner import Box, Plan, PlanShare, plan_share
from .spec import ModelSpec

DEFAULT_BUCKET_BYTES = 64 << 20
#: buffers per ring (send, and receive when streaming) when ``max_staging_bytes`` is not given
DEFAULT_RING = 2
#: weights of the position-sensitive checksum cycle with this period (a prime)
_CHECKSUM_PERIOD = 65521
_CHECKSUM_CHUNK = 1 << 22

Progress = Callable[[int], None]
__all__ = ["DEFAULT_BUCKET_BYTES", "ReshardError", "ReshardStats", "Resharder", "execute_plan", "reshard"]


@attrs.frozen
class ReshardStats:
    """What one rank did: network bytes received/sent (payload on the wire, in the destination
    dtype, fp8 scales included), bytes copied locally (source dtype), wall time, and the staging
    this rank's Resharder holds (bytes, and how many buffers it has allocated so far)."""

    rank: int
    bytes_received: int
    bytes_sent: int
    bytes_copied: int
    seconds: float
    steps: int
    messages: int            # point-to-point operations this rank posted (chunks sent + received)
    verified_messages: int
    staging_bytes: int = 0
    buffer_allocations: int = 0

    @property
    def gbps(self) -> float:
        """Effective receive throughput, GB/s (1e9 bytes)."""
        return self.bytes_received / self.seconds / 1e9 if self.seconds > 0 else 0.0


# ---- tensor regions ---------------------------------------------------------------------------------
def _region(tensor: torch.Tensor, box: Box) -> torch.Tensor:
    """The view of ``tensor`` covered by ``box`` (a 0-d tensor is its own region)."""
    for dim, (start, stop) in enumerate(box):
        if stop - start != tensor.shape[dim]:
            tensor = tensor.narrow(dim, start, stop - start)
    return tensor


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous ``tensor`` (no copy)."""
    return tensor.reshape(-1).view(torch.uint8)


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


# ---- buffers ------------------------------------------------------------------------------------------
class _Buffers:
    """The staging a Resharder owns on one device: named uint8 buffers, allocated once and kept.
    ``allocations`` counts every buffer ever allocated (a repeated sync adds none)."""

    def __init__(self) -> None:
        self._buffers: Dict[str, torch.Tensor] = {}
        self.allocations = 0
        self.abandoned: List[Any] = []     # (works, buffers) a failed run left posted

    def get(self, key: str, nbytes: int, device: torch.device, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.device != device or buffer.numel() < nbytes or buffer.dtype != dtype:
            buffer = self._buffers[key] = torch.empty(max(nbytes, 1), dtype=dtype, device=device)
            self.allocations += 1
        return buffer

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def drop(self, works: Optional[Sequence[Any]] = None) -> None:
        """Forget every buffer: the next run allocates fresh ones. With ``works`` (after a failed
        run: the operations still posted) the buffers are kept alive with them, never reused, so a
        late message lands where nobody looks."""
        if works is not None:
            self.abandoned.append((list(works), dict(self._buffers)))
        self._buffers.clear()


# ---- the executor -------------------------------------------------------------------------------------
class Resharder:
    """``plan`` bound to this rank, ready to run many times (a weight sync every iteration): the
    message layout is computed once, the staging buffers are kept between runs (the second and
    later runs allocate nothing; ``buffer_allocations`` counts), and the communicators are the
    context's.

    ``context`` (default ``pgroups.gpc``) gives the rank and the global group — its device group
    for CUDA tensors, its CPU group otherwise (under NCCL, CPU tensors need the CPU twin of the
    global group: build it with ``cpu_groups: eager``); a rank with no tensors uses the device
    group when the context's backend is NCCL. ``group`` overrides (every rank of the plan in it,
    addressed by global rank; the plan agreement is collective over it). ``timeout_s`` bounds each
    wait (default: the context's config ``timeout_s``). Options every rank must share (checked by
    the agreement): ``bucket_bytes`` (largest message; small pieces are packed up to it),
    ``dst_dtypes`` (``{tensor name: destination dtype}``, converted at the sender; see
    :mod:`.convert` — an fp8 tensor also needs ``"<name>_scale"`` among the destination tensors,
    :meth:`destination_shards` makes them), ``verify`` (a checksum per message). Options each rank
    chooses: ``atomic`` (see the module docstring), ``max_staging_bytes`` (the bytes of buffers
    this rank may hold; default: 2 send buffers, 2 receive buffers when streaming, all received
    bytes when atomic), ``keep_buffers=False`` (free the buffers after each run).
    """

    def __init__(self, plan: Plan, *, context: Any = None, group: Optional[dist.ProcessGroup] = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: Optional[float] = None,
                 verify: bool = False, keep_buffers: bool = True, atomic: bool = True,
                 max_staging_bytes: Optional[int] = None,
                 dst_dtypes: Optional[Mapping[str, torch.dtype]] = None) -> None:
        if context is None:
            from .. import gpc as context
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.plan, self.context, self.group, self.verify = plan, context, group, verify
        self.keep_buffers, self.atomic, self.bucket_bytes = keep_buffers, atomic, bucket_bytes
        self.rank = context.get_global_rank()
        if timeout_s is None:
            timeout_s = context.config.timeout_s if context.config is not None else 1800.0
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.dst_dtypes = convert.resolve_dst_dtypes(plan.model, dst_dtypes)
        self._converted = {n: d for n, d in self.dst_dtypes.items() if d != plan.model[n].dtype}
        self.digest = agreement_digest(plan, bucket_bytes, self._converted, verify)
        self.sends, self.recvs, copies = plan.transfers_of(self.rank)
        self.fills = plan.fills_of(self.rank)   # vocabulary padding: zero-filled here, never sent
        shapes = Shapes(plan)
        self.send_messages = messages(self.sends, lambda t: t.dst, shapes, self.dst_dtypes, bucket_bytes)
        self.recv_messages = messages(self.recvs, lambda t: t.src, shapes, self.dst_dtypes, bucket_bytes)
        self.copies = [part for t in copies for part in slices(
            t, self.dst_dtypes[t.tensor], shapes.dtype(t.tensor).itemsize, bucket_bytes,
            self.dst_dtypes[t.tensor] == shapes.dtype(t.tensor))]
        self.steps = sorted(set(self.send_messages) | set(self.recv_messages))
        self._sizes = self._buffer_sizes()
        self.max_staging_bytes = max_staging_bytes
        self._budget_problem = self._check_budget(max_staging_bytes)
        self._buffers = _Buffers()

    # ---- sizes and budget -----------------------------------------------------------------------
    def _buffer_sizes(self) -> Dict[str, int]:
        """Bytes of each kind of buffer this rank needs: the largest packed send chunk, the
        largest receive chunk, all received bytes (atomic staging), fp8 scratch elements."""
        packed = [c.nbytes for m in self.send_messages.values() for c in m.chunks if not c.direct]
        received = [c.nbytes for m in self.recv_messages.values() for c in m.chunks]
        scratch = [convert.scratch_elements(box_shape(p.transfer.src_box), self.dst_dtypes[p.transfer.tensor])
                   for m in self.send_messages.values() for p in m.pieces]
        scratch += [convert.scratch_elements(box_shape(t.src_box), self.dst_dtypes[t.tensor]) for t in self.copies]
        scaled = [p.transfer for m in self.send_messages.values() for p in m.pieces] + list(self.copies)
        scales = [math.prod(convert.scale_shape(box_shape(t.src_box), convert.scale_dims(self.plan.model[t.tensor])))
                  for t in scaled if convert.is_scaled(self.dst_dtypes[t.tensor])]
        staging = sum(-(-m.size // ALIGN) * ALIGN for m in self.recv_messages.values())
        return {"send": max(packed, default=0), "recv": max(received, default=0), "staging": staging,
                "scratch": max(scratch, default=0), "scales": max(scales, default=0)}

    def _check_budget(self, budget: Optional[int]) -> Optional[str]:
        """Ring depths within ``budget`` (None: the defaults), or why it is too small."""
        sizes = self._sizes
        scratch = sizes["scratch"] * 4 + sizes["scales"] * 5    # float32 values; float32 amin, bool mask
        self.send_ring = self.recv_ring = DEFAULT_RING
        fixed = scratch + (sizes["staging"] if self.atomic else 0)
        if budget is None:
            return None
        per_ring = sizes["send"] + (0 if self.atomic else sizes["recv"])
        if per_ring == 0:
            return None if fixed <= budget else self._too_small(budget, fixed)
        depth = (budget - fixed) // per_ring
        if depth < 1:
            return self._too_small(budget, fixed + per_ring)
        self.send_ring = self.recv_ring = int(min(depth, 4))
        return None

    def _too_small(self, budget: int, needed: int) -> str:
        what = ("atomic mode stages all received bytes" if self.atomic else "streaming needs one send and one "
                "receive buffer") + (" plus fp8 scratch" if self._sizes["scratch"] else "")
        return (f"rank {self.rank}: max_staging_bytes={budget} is too small: {what} = {needed} bytes "
                f"(bucket_bytes {self.bucket_bytes}); raise it"
                + (", or pass atomic=False" if self.atomic else ", or lower bucket_bytes"))

    @property
    def staging_bytes(self) -> int:
        """Bytes of buffers this rank holds now."""
        return self._buffers.nbytes

    @property
    def buffer_allocations(self) -> int:
        """Buffers allocated so far by this Resharder (a repeated sync adds none)."""
        return self._buffers.allocations

    def release(self) -> None:
        """Free the staging buffers (the next run allocates them again)."""
        self._buffers.drop()

    def destination_shards(self, device: Any = "cpu") -> Dict[str, torch.Tensor]:
        """Fresh (uninitialised) destination tensors of this rank, in the destination dtypes,
        with the fp8 scale tensors (``"<name>_scale"``)."""
        shards = {}
        for name, shape in local_shapes(self.plan.dst, self.plan.model, self.rank).items():
            dtype = self.dst_dtypes[name]
            shards[name] = torch.empty(shape, dtype=dtype, device=device)
            if convert.is_scaled(dtype):
                shards[convert.scale_name(name)] = torch.empty(
                    convert.scale_shape(shape, convert.scale_dims(self.plan.model[name])), dtype=convert.SCALE_DTYPE,
                    device=device)
        return shards

    # ---- one run -------------------------------------------------------------------------------------
    def run(self, src_tensors: Mapping[str, torch.Tensor], dst_tensors: Mapping[str, torch.Tensor],
            progress: Optional[Progress] = None) -> ReshardStats:
        """Move this rank's part of the plan: send from ``src_tensors`` (this rank's source
        shards, by tensor name), receive into ``dst_tensors`` (its destination shards, in the
        destination dtypes). ``progress(step)`` is called before each step this rank takes part in.
        Returns this rank's stats.

        Raises ReshardError (wrong tensors or budget — this rank —, a plan mismatch — every rank —,
        both before any byte moves; a failed peer; a checksum mismatch) or GroupTimeoutError (a
        peer that does not answer within ``timeout_s``), naming the step and ranks; with
        ``atomic`` (the default) the destination tensors are untouched on every failure.
        """
        problem, device = None, None
        try:
            device = _check_tensors(self.plan, self.rank, src_tensors, dst_tensors, self.dst_dtypes,
                                    self._default_device())
            problem = self._budget_problem
        except ReshardError as exc:
            problem = exc
        group = self.group
        try:
            if group is None:
                group = self._global_group(device or self._default_device())
            self._agree(group, device or self._default_device(), refuse=problem is not None)
        except Exception:
            if problem is None:
                raise   # else: telling the peers failed too; this rank's own error is the one to raise
        if problem is not None:
            raise problem if isinstance(problem, ReshardError) else ReshardError(problem)
        _synchronize(device)
        started = time.perf_counter()
        run = _Run(self, src_tensors, dst_tensors, group, device, progress)
        try:
            run.execute()
            _synchronize(device)
        except BaseException:
            self._buffers.drop(run.in_flight_works())
            raise
        finally:
            if not self.keep_buffers:
                self._buffers.drop()
        seconds = time.perf_counter() - started
        return ReshardStats(self.rank, sum(m.wire_bytes for m in self.recv_messages.values()),
                            sum(m.wire_bytes for m in self.send_messages.values()),
                            sum(t.nbytes for t in self.copies), seconds, len(self.steps), run.posted,
                            run.verified, self.staging_bytes, self.buffer_allocations)

    def _default_device(self) -> torch.device:
        backend = getattr(self.context, "backend", None)
        if backend is not None and backend.device_backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _global_group(self, device: torch.device) -> Any:
        if device.type == "cuda":
            return self.context.get_group(ParallelMode.GLOBAL)
        return self.context.get_cpu_group(ParallelMode.GLOBAL)

    def _agree(self, group: Any, device: torch.device, refuse: bool) -> None:
        """All-gather the 8-byte digest over ``group``; ReshardError naming the first rank that
        disagrees (or refused). Under NCCL it is also the group's first collective, which a
        later batch_isend_irecv needs."""
        size = dist.get_world_size(group)
        mine = self._buffers.get("agree.mine", 1, device, torch.int64)[:1]
        gathered = self._buffers.get("agree.all", size, device, torch.int64)[:size]
        mine.fill_(REFUSED if refuse else self.digest)
        try:
            work = all_gather_single(gathered, mine, group=group, async_op=True)
            if not work.wait(self.timeout):
                raise TimeoutError(f"timed out after {self.timeout.total_seconds():g}s")
        except Exception as exc:
            where = f"reshard plan agreement on rank {self.rank} over the global group ({size} ranks)"
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if is_timeout(exc):
                raise GroupTimeoutError(f"{where}: not done within {self.timeout.total_seconds():g}s — does every "
                                        f"rank of the group run the reshard? ({text})") from exc
            raise ReshardError(f"{where} failed: {text}") from exc
        if refuse:
            return
        digests = gathered.tolist()
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
        problem = first_disagreement(digests, ranks)
        if problem is not None:
            raise ReshardError(f"reshard plan agreement on rank {self.rank}: {problem}; nothing was sent or written")


class _Run:
    """One execution of a Resharder's plan on this rank (the pipeline; see the module docstring)."""

    def __init__(self, owner: Resharder, src: Mapping[str, torch.Tensor], dst: Mapping[str, torch.Tensor],
                 group: Any, device: torch.device, progress: Optional[Progress]) -> None:
        self.owner, self.src, self.dst, self.group, self.device = owner, src, dst, group, device
        self.progress = progress
        self.scale_dims = {spec.name: convert.scale_dims(spec) for spec in owner.plan.model.tensors}
        buffers, sizes = owner._buffers, owner._sizes
        self.send_slots = [buffers.get(f"send{i}", sizes["send"], device) for i in range(owner.send_ring)] \
            if sizes["send"] else []
        if owner.atomic:
            self.staging = buffers.get("staging", sizes["staging"], device) if sizes["staging"] else None
            self.recv_slots: List[torch.Tensor] = []
        else:
            self.staging = None
            self.recv_slots = [buffers.get(f"recv{i}", sizes["recv"], device) for i in range(owner.recv_ring)] \
                if sizes["recv"] else []
        self.quantizer = None
        if sizes["scratch"]:
            n, scales = sizes["scratch"], sizes["scales"]
            self.quantizer = convert.Quantizer(buffers.get("scratch", n, device, torch.float32),
                                               buffers.get("scratch.amin", scales, device, torch.float32),
                                               buffers.get("scratch.mask", scales, device, torch.bool))
        self.staging_at: Dict[int, int] = {}
        offset = 0
        for step in sorted(owner.recv_messages):
            self.staging_at[step] = offset
            offset += -(-owner.recv_messages[step].size // ALIGN) * ALIGN
        self.posted = self.verified = 0
        # operations in flight: (key, kind, chunk, work, slot)
        self._flight: List[Tuple[Tuple[int, int, int], str, Chunk, Any, int]] = []
        self._send_slot_busy: set = set()
        self._recv_slot_busy: set = set()
        self._checksums: Dict[Tuple[str, int], torch.Tensor] = {}
        self._prepacked: Dict[Tuple[int, int], torch.Tensor] = {}

    def in_flight_works(self) -> List[Any]:
        return [item[3] for item in self._flight]

    # ---- the loop --------------------------------------------------------------------------------
    def execute(self) -> None:
        """Every step in order; within a step, *rounds*: round i posts receive chunk i and send
        chunk i together (one ``batch_isend_irecv``: on NCCL one group, so two ranks that send to
        each other's senders cannot block each other's streams), as soon as their ring buffers are
        free; the rank waits on its oldest operation. Every rank posts rounds in (step, i) order
        and waits in that order, so every wait depends only on earlier rounds: no deadlock."""
        owner = self.owner
        copies_left = not owner.atomic     # streaming: local copies while the first chunks fly
        for step in owner.steps:
            if self.progress is not None:
                self.progress(step)
            out, inc = owner.send_messages.get(step), owner.recv_messages.get(step)
            recvs = inc.chunks if inc is not None else ()
            sends = out.chunks if out is not None else ()
            rounds, posted = max(len(recvs), len(sends)), 0
            while posted < rounds or self._flight:
                while posted < rounds and self._can_post(recvs, sends, posted):
                    self._post_round(recvs[posted] if posted < len(recvs) else None,
                                     sends[posted] if posted < len(sends) else None)
                    posted += 1
                if copies_left:
                    self._local_copies()
                    copies_left = False
                if posted == rounds:
                    self._prepack(owner.steps, step)
                self._flight.sort(key=lambda item: item[0])
                _, kind, chunk, work, slot = self._flight[0]
                self._wait(work, chunk, kind)
                self._flight.pop(0)
                if kind == "recv":
                    self._received(chunk, slot)
                    self._recv_slot_busy.discard(slot)
                else:
                    self._send_slot_busy.discard(slot)
            if owner.verify:
                self._exchange_checksums(step, out, inc)
        if owner.atomic or copies_left:
            self._local_copies()
        if owner.atomic:
            self._commit()

    def _can_post(self, recvs: Sequence[Chunk], sends: Sequence[Chunk], i: int) -> bool:
        recv_ok = i >= len(recvs) or self.owner.atomic or (i % len(self.recv_slots)) not in self._recv_slot_busy
        send_ok = i >= len(sends) or sends[i].direct or self._send_slot_free(i)
        return recv_ok and send_ok

    def _post_round(self, recv: Optional[Chunk], send: Optional[Chunk]) -> None:
        ops, items = [], []
        if recv is not None:
            slot = -1 if self.owner.atomic else recv.index % len(self.recv_slots)
            ops.append(dist.P2POp(dist.irecv, self._recv_target(recv, slot), recv.peer, self.group))
            items.append(("recv", recv, slot))
            if slot >= 0:
                self._recv_slot_busy.add(slot)
        if send is not None:
            slot = -1 if send.direct else self._slot(send)
            ops.append(dist.P2POp(dist.isend, self._send_source(send), send.peer, self.group))
            items.append(("send", send, slot))
            if slot >= 0:
                self._send_slot_busy.add(slot)
        try:
            works = dist.batch_isend_irecv(ops)
        except Exception as exc:
            raise self._error(exc, items[0][1], items[0][0]) from exc
        self.posted += len(ops)
        if len(works) != len(items):   # NCCL coalesces a batch into one work (torch's batch_isend_irecv)
            works = [works[-1]] * len(items)
        for (kind, chunk, slot), work in zip(items, works):
            # receives first within a round: a rank never waits on a send whose receiver waits on it
            self._flight.append(((chunk.step, chunk.index, 0 if kind == "recv" else 1), kind, chunk, work, slot))

    def _slot(self, chunk: Chunk) -> int:
        return chunk.index % len(self.send_slots)

    def _send_slot_free(self, index: int) -> bool:
        return (index % max(1, len(self.send_slots))) not in self._send_slot_busy

    def _prepack(self, steps: Sequence[int], step: int) -> None:
        """The current step has posted all its sends: pack the next step's first packed chunks
        into the free send buffers while the current ones are on the wire."""
        later = [s for s in steps if s > step and s in self.owner.send_messages]
        if not later:
            return
        for chunk in self.owner.send_messages[later[0]].chunks[:len(self.send_slots)]:
            key = (chunk.step, chunk.index)
            if not chunk.direct and key not in self._prepacked and self._send_slot_free(chunk.index):
                self._prepacked[key] = self._pack(chunk)

    def _wait(self, work: Any, chunk: Chunk, kind: str) -> None:
        try:
            if not work.wait(self.owner.timeout):
                raise TimeoutError(f"timed out after {self.owner.timeout.total_seconds():g}s")
        except Exception as exc:
            raise self._error(exc, chunk, kind) from exc

    def _error(self, exc: BaseException, chunk: Chunk, kind: str) -> Exception:
        owner, step = self.owner, chunk.step
        peers = []
        inc, out = owner.recv_messages.get(step), owner.send_messages.get(step)
        if inc is not None:
            peers.append(f"receiving {inc.wire_bytes} bytes from rank {inc.peer}")
        if out is not None:
            peers.append(f"sending {out.wire_bytes} bytes to rank {out.peer}")
        where = (f"reshard step {step + 1}/{owner.plan.num_steps} on rank {owner.rank} ({' and '.join(peers)}) "
                 "over the global group")
        untouched = ("destination tensors untouched" if owner.atomic
                     else "destination tensors may be partly written (atomic=False)")
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if is_timeout(exc):
            return GroupTimeoutError(f"{where}: not done within {owner.timeout.total_seconds():g}s — is the peer "
                                     f"alive and running the same plan? ({text}); {untouched}")
        return ReshardError(f"{where} failed: {text}; {untouched}")

    # ---- sending ----------------------------------------------------------------------------------
    def _send_source(self, chunk: Chunk) -> torch.Tensor:
        """The bytes of ``chunk`` to post: a view of the source tensor, or packed into a ring
        buffer (possibly already, while the previous step was on the wire)."""
        if chunk.direct:
            piece = chunk.pieces[0]
            data = _flat_bytes(_region(self.src[piece.transfer.tensor], piece.transfer.src_box))
            data = data[chunk.lo - piece.offset:chunk.hi - piece.offset]
            if self.owner.verify:
                self._sum(("out", chunk.step), data, chunk.lo)
            return data
        packed = self._prepacked.pop((chunk.step, chunk.index), None)
        return packed if packed is not None else self._pack(chunk)

    def _pack(self, chunk: Chunk) -> torch.Tensor:
        data = self.send_slots[self._slot(chunk)][:chunk.nbytes]
        for piece in chunk.pieces:
            self._encode(piece, data[piece.offset - chunk.lo:piece.end - chunk.lo])
        if self.owner.verify:
            self._sum(("out", chunk.step), data, chunk.lo)
        return data

    def _sum(self, key: Tuple[str, int], data: torch.Tensor, position: int) -> None:
        if key not in self._checksums:
            self._checksums[key] = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._checksums[key] += _checksum(data, position)

    def _encode(self, piece: Piece, out: torch.Tensor) -> None:
        """Write ``piece`` in its wire form (destination dtype, then fp8 scales) into ``out``."""
        t = piece.transfer
        region = _region(self.src[t.tensor], t.src_box)
        dtype = self.owner.dst_dtypes[t.tensor]
        values = out[:piece.payload].view(dtype).view(region.shape)
        if convert.is_scaled(dtype):
            scales = out[-(-piece.payload // 4) * 4:piece.nbytes]
            dims = self.scale_dims[t.tensor]
            keep = convert.scale_shape(region.shape, dims)
            self.quantizer.quantize(region, dims, values, scales.view(convert.SCALE_DTYPE).view(keep))
        else:
            values.copy_(region)

    # ---- receiving --------------------------------------------------------------------------------
    def _recv_target(self, chunk: Chunk, slot: int) -> torch.Tensor:
        if slot < 0:
            start = self.staging_at[chunk.step] + chunk.lo
            return self.staging[start:start + chunk.nbytes]
        return self.recv_slots[slot][:chunk.nbytes]

    def _received(self, chunk: Chunk, slot: int) -> None:
        """A chunk arrived: checksum it (verify); streaming: unpack it into the destination."""
        data = self._recv_target(chunk, slot)
        if self.owner.verify:
            self._sum(("in", chunk.step), data, chunk.lo)
        if slot >= 0:
            self._unpack(chunk, data)

    def _unpack(self, chunk: Chunk, data: torch.Tensor) -> None:
        """Write the bytes ``[chunk.lo, chunk.hi)`` of a message (``data``) into the destination."""
        for piece in chunk.pieces:
            t = piece.transfer
            target = _region(self.dst[t.tensor], t.dst_box)
            if piece.offset <= chunk.lo and chunk.hi <= piece.end and piece.direct and (
                    chunk.lo != piece.offset or chunk.hi != piece.end):
                _flat_bytes(target)[chunk.lo - piece.offset:chunk.hi - piece.offset].copy_(data)
                continue
            self._decode(piece, data[piece.offset - chunk.lo:piece.end - chunk.lo], target)

    def _decode(self, piece: Piece, wire: torch.Tensor, target: torch.Tensor) -> None:
        t = piece.transfer
        target.copy_(wire[:piece.payload].view(target.dtype).view(target.shape))
        if convert.is_scaled(target.dtype):
            start = -(-piece.payload // 4) * 4
            scale = _region(self.dst[convert.scale_name(t.tensor)], _scale_box(t.dst_box, self.scale_dims[t.tensor]))
            scale.copy_(wire[start:piece.nbytes].view(convert.SCALE_DTYPE).view(scale.shape))

    def _commit(self) -> None:
        """Atomic mode: write every staged message into the destination (all bytes arrived)."""
        for step, message in self.owner.recv_messages.items():
            base = self.staging_at[step]
            for piece in message.pieces:
                wire = self.staging[base + piece.offset:base + piece.end]
                self._decode(piece, wire, _region(self.dst[piece.transfer.tensor], piece.transfer.dst_box))

    def _local_copies(self) -> None:
        for fill in self.owner.fills:
            target = _region(self.dst[fill.tensor], fill.dst_box)
            target.zero_()
            if convert.is_scaled(target.dtype):
                dims = self.scale_dims[fill.tensor]
                _region(self.dst[convert.scale_name(fill.tensor)], _scale_box(fill.dst_box, dims)).fill_(1)
        for t in self.owner.copies:
            target = _region(self.dst[t.tensor], t.dst_box)
            source = _region(self.src[t.tensor], t.src_box)
            if convert.is_scaled(target.dtype):
                dims = self.scale_dims[t.tensor]
                scale = _region(self.dst[convert.scale_name(t.tensor)], _scale_box(t.dst_box, dims))
                self.quantizer.quantize(source, dims, target, scale)
            else:
                target.copy_(source)

    # ---- checksums --------------------------------------------------------------------------------
    def _exchange_checksums(self, step: int, out: Optional[Message], inc: Optional[Message]) -> None:
        """Send the checksum of what this rank sent in ``step``; compare the one of what it got."""
        ops, theirs = [], None
        if inc is not None:
            theirs = torch.empty(2, dtype=torch.int64, device=self.device)
            ops.append(dist.P2POp(dist.irecv, theirs, inc.peer, self.group))
        if out is not None:
            ops.append(dist.P2POp(dist.isend, self._checksums[("out", step)], out.peer, self.group))
        chunk = (inc or out).chunks[0]
        try:
            works = dist.batch_isend_irecv(ops)
        except Exception as exc:
            raise self._error(exc, chunk, "checksum") from exc
        for work in works:
            self._wait(work, chunk, "checksum")
        if inc is None:
            return
        self.verified += 1
        if not torch.equal(self._checksums[("in", step)], theirs):
            names = sorted({p.transfer.tensor for p in inc.pieces})
            owner = self.owner
            raise ReshardError(f"reshard step {step + 1}/{owner.plan.num_steps} on rank {owner.rank}: checksum "
                               f"mismatch on {inc.wire_bytes} bytes from rank {inc.peer} (tensors {names[:4]}"
                               f"{' …' if len(names) > 4 else ''}); "
                               + ("destination tensors untouched" if owner.atomic else
                                  "destination tensors may be partly written (atomic=False)"))


def _scale_box(box: Box, dims: Sequence[int]) -> Box:
    """The box of a region's scales in the scale tensor (1 on every dim but ``dims``)."""
    return tuple(span if dim in dims else (0, 1) for dim, span in enumerate(box))


def execute_plan(plan: "Plan | PlanShare", src_tensors: Mapping[str, torch.Tensor], dst_tensors: Mapping[str, torch.Tensor],
                 *, progress: Optional[Progress] = None, **options: Any) -> ReshardStats:
    """Run ``plan`` once on this rank (a :class:`Resharder` that frees its buffers afterwards);
    ``options`` are Resharder's. Every rank of the group must call it with the same plan and
    shared options. See :meth:`Resharder.run` for the contract and the errors."""
    return Resharder(plan, keep_buffers=False, **options).run(src_tensors, dst_tensors, progress)


def reshard(src_layout: ParallelLayout, dst_layout: ParallelLayout, model: ModelSpec,
            src_tensors: Mapping[str, torch.Tensor], dst_tensors: Mapping[str, torch.Tensor], *,
            context: Any = None, hosts: Optional[Sequence[str]] = None,
            **options: Any) -> Tuple[PlanShare, ReshardStats]:
    """Plan this rank's share (with the launch's hostnames) and execute it in one call; returns
    ``(share, stats)``.

    Each rank computes only its own :class:`PlanShare` (O(its transfers), not the whole world's
    plan); the ranks agree on the plan's digest before any byte moves. Collective over the whole
    world (the hostnames are gathered, the plan agreed on): call it on every rank, with empty
    mappings on ranks in neither layout. To sync repeatedly, keep a :class:`Resharder` of the share
    and call its ``run``. ``options`` go to :func:`execute_plan`.
    """
    if context is None:
        from .. import gpc as context
    if hosts is None:
        hosts = context.get_hostnames()
    share = plan_share(src_layout, dst_layout, model, context.get_global_rank(), hosts)
    return share, execute_plan(share, src_tensors, dst_tensors, context=context, **options)


# ---- helpers -------------------------------------------------------------------------------------------
def _check_tensors(plan: Plan, rank: int, src_tensors: Mapping[str, torch.Tensor],
                   dst_tensors: Mapping[str, torch.Tensor], dst_dtypes: Mapping[str, torch.dtype],
                   default: torch.device) -> torch.device:
    """Every shard this rank holds in each layout is given with the right shape and dtype (the
    destination's in its destination dtype, with its fp8 scale), on one device (returned;
    ``default`` if the rank has none)."""
    devices = set()
    model = plan.model
    for side, layout, tensors in (("source", plan.src, src_tensors), ("destination", plan.dst, dst_tensors)):
        coords = layout.coordinates(rank)
        expected = local_shapes(layout, model, rank)
        for name, shape in expected.items():
            dtype = dst_dtypes[name] if side == "destination" else model[name].dtype
            wanted = [(name, shape, dtype)]
            if side == "destination" and convert.is_scaled(dtype):
                wanted.append((convert.scale_name(name), convert.scale_shape(shape, convert.scale_dims(model[name])),
                               convert.SCALE_DTYPE))
            for key, want_shape, want_dtype in wanted:
                tensor = tensors.get(key)
                where = (f"rank {rank}: {side} tensor {key!r} (tp {coords['tp']} of {layout.topology.tensor}, "
                         f"stage {coords['pp']})")
                if tensor is None:
                    raise ReshardError(f"{where} is missing; this rank must pass every tensor of its stage "
                                       f"({len(expected)} tensors" + (", with the fp8 scales" if key != name else "")
                                       + ")")
                if tuple(tensor.shape) != tuple(want_shape) or tensor.dtype != want_dtype:
                    raise ReshardError(f"{where} has shape {tuple(tensor.shape)} {tensor.dtype}; the layout "
                                       f"gives {tuple(want_shape)} {want_dtype}")
                if not tensor.is_contiguous():
                    raise ReshardError(f"{where} is not contiguous; pass contiguous shards")
                devices.add(tensor.device)
    if len(devices) > 1:
        raise ReshardError(f"rank {rank}: shards are on several devices {sorted(map(str, devices))}; use one")
    return devices.pop() if devices else default


def _synchronize(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
