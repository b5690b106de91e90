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

**Posting.** Each rank cuts its *rounds* (:func:`.wire.rounds`: chunk i of the message it
receives and of the one it sends in a step, in (step, i) order — the same order on every rank)
into *batches* (:func:`.wire.batches`) and posts each batch as one ``batch_isend_irecv`` — under
NCCL one group, whose operations with different peers move at once, as in NCCL's all-to-all. By
default a rank's whole sync is one batch: every peer's messages move together, so each NIC
stays busy until its own bytes are done (the simulated makespan of the RLHF-shaped pairs is the
NIC lower bound, ``pgroups.reshard.plan``). With ``max_staging_bytes`` a batch buffers only what
the budget allows and the next batch is packed while the previous one is on the wire (two
buffer regions); a progress callback cuts the batches at steps. Any cut is deadlock-free (the
globally first unfinished round has both of its ends' batches started). Copies only where
needed: a contiguous, unconverted transfer is sent straight from the source tensor; packing —
copy, cast, quantize — goes into a region's send buffer. Two receive modes:

- ``atomic=True`` (default): every received byte lands in a staging buffer; destination tensors
  are written only after every step (and, with ``verify=True``, every checksum) succeeded on this
  rank — one copy, staging to destination: a failure — a dead peer, a timeout (``timeout_s``
  without progress), a checksum mismatch — raises naming the step and the peer ranks and leaves
  the destination untouched. Staging holds all the bytes the rank receives.
- ``atomic=False`` (streaming): a contiguous, unconverted chunk is received straight into the
  destination tensor (no copy at all); the others go to a region's receive buffer and are
  unpacked once their batch completed, within ``max_staging_bytes``. On a failure the
  destination may be partly written (the error says so), and a receive still posted then may
  write it later: retry on a fresh group.

``ReshardStats.bytes_packed`` / ``bytes_unpacked`` count the wire bytes that went through a
buffer on each side.

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

import collections
import datetime
import math
import time
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch
import torch.distributed as dist

from ..comm.raw import all_gather_single
from ..deadlines import is_timeout
from ..errors import GroupTimeoutError, ReshardError
from ..modes import ParallelMode
from . import convert
from .convert import region as _region
from .convert import scale_box as _scale_box
from .layout import ParallelLayout, local_shapes
from .wire import (ALIGN, BATCHES_IN_FLIGHT, DEFAULT_BUCKET_BYTES, REFUSED, Batch, Chunk, Piece, Round, Shapes,
                   agreement_digest, aligned, batches, box_shape, first_disagreement, may_post, messages,
                   needs_recv_buffer, round_needs, rounds, scale_cut_problem, slice_align, slices)
from .planner import Box, Plan, PlanShare, plan_share
from .spec import ModelSpec

#: weights of the position-sensitive checksum cycle with this period (a prime)
_CHECKSUM_PERIOD = 65521
_CHECKSUM_CHUNK = 1 << 22

Progress = Callable[[int], None]
__all__ = ["DEFAULT_BUCKET_BYTES", "ReshardError", "ReshardStats", "Resharder", "execute_plan", "reshard"]


@attrs.frozen
class ReshardStats:
    """What one rank did: network bytes received/sent (payload on the wire, in the destination
    dtype, fp8 scales included), bytes copied locally (source dtype), wall time, the staging
    this rank's Resharder holds (bytes, and how many buffers it has allocated so far), and the
    wire bytes that went through a buffer on the way (packed before sending, unpacked after
    receiving): a contiguous, unconverted transfer is sent from the source tensor and, when
    streaming, received into the destination tensor, so it counts in neither."""

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
    bytes_packed: int = 0    # wire bytes this rank copied into send buffers (the rest went from its source)
    bytes_unpacked: int = 0  # wire bytes copied from receive buffers / staging (the rest landed in place)

    @property
    def gbps(self) -> float:
        """Effective receive throughput, GB/s (1e9 bytes)."""
        return self.bytes_received / self.seconds / 1e9 if self.seconds > 0 else 0.0


# ---- tensor regions ---------------------------------------------------------------------------------
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
    this rank may hold; default: no limit — every packed send chunk, and when streaming every
    buffered received chunk, in one region, plus all received bytes when atomic; a budget cuts
    the sync into batches), ``keep_buffers=False`` (free the buffers after each run).
    """

    def __init__(self, plan: Plan, *, context: Any = None, group: Optional[dist.ProcessGroup] = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: Optional[float] = None,
                 verify: bool = False, keep_buffers: bool = True, atomic: bool = True,
                 max_staging_bytes: Optional[int] = None,
                 dst_dtypes: Optional[Mapping[str, torch.dtype]] = None, fp8_scales: str = "row") -> None:
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
        self._converted = convert.converted_dtypes(plan.model, self.dst_dtypes)
        self.fp8_scales = convert.check_scale_format(fp8_scales)
        self.digest = agreement_digest(plan, bucket_bytes, self._converted, verify, fp8_scales)
        self.sends, self.recvs, copies = plan.transfers_of(self.rank)
        self.fills = plan.fills_of(self.rank)   # vocabulary padding: zero-filled here, never sent
        shapes = self._shapes = Shapes(plan, fp8_scales)
        self.scale_layouts = {spec.name: shapes.scale_dims(spec.name) for spec in plan.model.tensors}
        self.send_messages = messages(self.sends, lambda t: t.dst, shapes, self.dst_dtypes, bucket_bytes)
        self.recv_messages = messages(self.recvs, lambda t: t.src, shapes, self.dst_dtypes, bucket_bytes)
        self.copies = [part for t in copies for part in slices(
            t, self.dst_dtypes[t.tensor], shapes.dtype(t.tensor).itemsize, bucket_bytes,
            self.dst_dtypes[t.tensor] == shapes.dtype(t.tensor), slice_align(t, shapes, self.dst_dtypes))]
        self.steps = sorted(set(self.send_messages) | set(self.recv_messages))
        self.rounds = rounds(self.send_messages, self.recv_messages, verify)
        self._sizes = self._buffer_sizes()
        self.max_staging_bytes = max_staging_bytes
        self._budget_problem = self._check_budget(max_staging_bytes) or scale_cut_problem(
            list(self.sends) + list(self.recvs) + list(copies), shapes, self.dst_dtypes)
        self._buffers = _Buffers()
        self._batches: Dict[bool, Tuple[Batch, ...]] = {}

    # ---- sizes and budget -----------------------------------------------------------------------
    def _buffer_sizes(self) -> Dict[str, int]:
        """Bytes of each kind of buffer this rank needs: the most buffer region one round takes
        (:func:`.wire.round_needs`), all received bytes (atomic staging), fp8 scratch elements."""
        needs = [round_needs(r, self.atomic) for r in self.rounds]
        scratch = [convert.scratch_elements(box_shape(p.transfer.src_box), self.dst_dtypes[p.transfer.tensor])
                   for m in self.send_messages.values() for p in m.pieces]
        scratch += [convert.scratch_elements(box_shape(t.src_box), self.dst_dtypes[t.tensor]) for t in self.copies]
        scaled = [p.transfer for m in self.send_messages.values() for p in m.pieces] + list(self.copies)
        scales = [math.prod(convert.scale_shape(box_shape(t.src_box), self.scale_layouts[t.tensor]))
                  for t in scaled if convert.is_scaled(self.dst_dtypes[t.tensor])]
        staging = sum(aligned(m.size) for m in self.recv_messages.values())
        return {"send": max((n[0] for n in needs), default=0), "recv": max((n[1] for n in needs), default=0),
                "staging": staging, "scratch": max(scratch, default=0),
                "scales": max(scales, default=0)}

    def _check_budget(self, budget: Optional[int]) -> Optional[str]:
        """The caps of a batch's send and receive bytes within ``budget`` (``self.batch_caps``;
        None: no limit, the whole sync is one batch) and the buffer regions (``self.regions``:
        two, so that a batch is packed while the previous one flies, or one where the budget
        holds only one), or why the budget is too small: it must hold the fixed buffers
        (scratch, atomic staging) and a region of the largest packed send and received chunk."""
        sizes = self._sizes
        fixed = convert.scratch_bytes(sizes["scratch"], sizes["scales"]) + (sizes["staging"] if self.atomic else 0)
        per_region = sizes["send"] + sizes["recv"]
        self.batch_caps: Optional[Tuple[int, int]] = None
        self.regions = BATCHES_IN_FLIGHT
        if budget is None:
            return None
        if per_region == 0:
            return None if fixed <= budget else self._too_small(budget, fixed)
        for regions in (BATCHES_IN_FLIGHT, 1):
            scale = (budget - fixed) // regions // per_region
            if scale >= 1:
                self.regions, self.batch_caps = regions, (scale * sizes["send"], scale * sizes["recv"])
                return None
        return self._too_small(budget, fixed + per_region)

    def batches(self, per_step: bool = False) -> Tuple[Batch, ...]:
        """This rank's rounds cut into the batches it posts (:func:`.wire.batches` within
        ``max_staging_bytes``; ``per_step``: none spans two steps, as with a progress callback)."""
        found = self._batches.get(per_step)
        if found is None:
            found = self._batches[per_step] = batches(self.rounds, self.atomic, self.batch_caps, per_step)
        return found

    def _too_small(self, budget: int, needed: int) -> str:
        what = ("atomic mode stages all received bytes" if self.atomic else "streaming needs one send and one "
                "receive chunk in each of two buffer regions") + (" plus fp8 scratch" if self._sizes["scratch"] else "")
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
        with the fp8 scale tensors (``"<name>_scale"``, or ``"<name>_scale_inv"`` block-scaled)."""
        shards = {}
        for name, shape in local_shapes(self.plan.dst, self.plan.model, self.rank).items():
            dtype = self.dst_dtypes[name]
            shards[name] = torch.empty(shape, dtype=dtype, device=device)
            if convert.is_scaled(dtype):
                scales = self.scale_layouts[name]
                shards[convert.scale_name(name, scales)] = torch.empty(
                    convert.scale_shape(shape, scales), dtype=convert.SCALE_DTYPE,
                    device=device)
        return shards

    # ---- one run -------------------------------------------------------------------------------------
    def run(self, src_tensors: Mapping[str, torch.Tensor], dst_tensors: Mapping[str, torch.Tensor],
            progress: Optional[Progress] = None) -> ReshardStats:
        """Move this rank's part of the plan: send from ``src_tensors`` (this rank's source
        shards, by tensor name), receive into ``dst_tensors`` (its destination shards, in the
        destination dtypes). ``progress(step)`` is called before each step this rank takes part in,
        once every operation of its earlier steps completed (so with a progress callback the
        rank does not post ahead across steps). Returns this rank's stats.

        Raises ReshardError (wrong tensors or budget — this rank —, a plan mismatch — every rank —,
        both before any byte moves; a failed peer; a checksum mismatch) or GroupTimeoutError (a
        peer that does not answer within ``timeout_s``), naming the step and ranks; with
        ``atomic`` (the default) the destination tensors are untouched on every failure.
        """
        problem, device = None, None
        try:
            device = _check_tensors(self.plan, self.rank, src_tensors, dst_tensors, self.dst_dtypes,
                                    self._default_device(), self.scale_layouts)
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
                            run.verified, self.staging_bytes, self.buffer_allocations, run.packed, run.unpacked)

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
        self.scale_dims = owner.scale_layouts
        buffers, sizes = owner._buffers, owner._sizes
        self.batches = owner.batches(progress is not None)
        send = max((b.send_bytes for b in self.batches), default=0)
        recv = max((b.recv_bytes for b in self.batches), default=0)
        depth = 1 if len(self.batches) == 1 else owner.regions
        # region i: (send buffer, receive buffer)
        self.regions = [(buffers.get(f"region{i}.send", send, device), buffers.get(f"region{i}.recv", recv, device))
                        for i in range(depth if send or recv else 0)]
        self.staging = buffers.get("staging", sizes["staging"], device) if owner.atomic and sizes["staging"] else None
        self.quantizer = None
        if sizes["scratch"]:
            extrema = sizes["scales"] * convert.EXTREMA_ITEMSIZE // 2     # float32 elements
            self.quantizer = convert.Quantizer(buffers.get("scratch", sizes["scratch"], device, torch.float32),
                                               buffers.get("scratch.extrema", extrema, device, torch.float32),
                                               buffers.get("scratch.mask", sizes["scales"], device, torch.bool))
        self.staging_at: Dict[int, int] = {}
        offset = 0
        for step in sorted(owner.recv_messages):
            self.staging_at[step] = offset
            offset += -(-owner.recv_messages[step].size // ALIGN) * ALIGN
        self.posted = self.verified = self.packed = self.unpacked = 0
        # batches in flight, oldest first: (region index or -1, [(kind, chunk, work, data, buffered)])
        # in posting order — rounds in order, receive before send within a round: the order of the waits
        self._flight: Deque[Tuple[int, List[Tuple[str, Chunk, Any, torch.Tensor, bool]]]] = collections.deque()
        self._free_regions = list(range(len(self.regions)))
        self._checksums: Dict[Tuple[str, int], torch.Tensor] = {}

    def in_flight_works(self) -> List[Any]:
        return [op[2] for _, ops in self._flight for op in ops]

    # ---- the loop --------------------------------------------------------------------------------
    def execute(self) -> None:
        """Post batches (:meth:`Resharder.batches`: the rounds, in the one order every rank
        shares, posted as groups) while :func:`.wire.may_post` allows — the next batch is packed
        while the previous one is on the wire —, then wait on the oldest batch's operations in
        order and recycle its region. Streaming: local copies run while the first batch flies;
        atomic: after the last wait, then the staged bytes are committed."""
        owner = self.owner
        upcoming, announced = 0, None
        copies_left = True
        while upcoming < len(self.batches) or self._flight:
            while upcoming < len(self.batches) and may_post(self.batches[upcoming], len(self._flight),
                                                            len(self._free_regions)):
                batch = self.batches[upcoming]
                step = owner.rounds[batch.start].step
                if self.progress is not None and step != announced:
                    if self._flight:
                        break     # progress(step) comes after every earlier operation completed
                    self.progress(step)
                announced = step
                self._post(batch)
                upcoming += 1
            if copies_left and not owner.atomic:
                self._local_copies()
                copies_left = False
            if self._flight:
                region, ops = self._flight[0]
                while ops:
                    kind, chunk, work, data, buffered = ops[0]
                    self._wait(work, chunk, kind)
                    ops.pop(0)
                    self._completed(kind, chunk, data, buffered)
                self._flight.popleft()
                if region >= 0:
                    self._free_regions.append(region)
        if copies_left:
            self._local_copies()
        if owner.atomic:
            self._commit()

    def _post(self, batch: Batch) -> None:
        """Post ``batch`` as one ``batch_isend_irecv``: its packed send chunks packed into a free
        region's send buffer, its buffered receives into its receive buffer (the layout of
        :class:`.wire.Batch`)."""
        region = self._free_regions.pop(0) if batch.needs_region else -1
        send_at = recv_at = 0
        ops: List[Any] = []
        items: List[Tuple[str, Chunk, torch.Tensor, bool]] = []
        for current in self.owner.rounds[batch.start:batch.stop]:
            if current.checksum:
                self._post_checksums(current, ops, items)
                continue
            if current.recv is not None:
                buffered = needs_recv_buffer(current.recv, self.owner.atomic)
                target = self._recv_target(current.recv, self.regions[region][1][recv_at:] if buffered else None)
                recv_at = aligned(recv_at + current.recv.nbytes) if buffered else recv_at
                ops.append(dist.P2POp(dist.irecv, target, current.recv.peer, self.group))
                items.append(("recv", current.recv, target, buffered))
            if current.send is not None:
                packed = not current.send.direct
                source = self._send_source(current.send, self.regions[region][0][send_at:] if packed else None)
                send_at = aligned(send_at + current.send.nbytes) if packed else send_at
                ops.append(dist.P2POp(dist.isend, source, current.send.peer, self.group))
                items.append(("send", current.send, source, packed))
        try:
            works = dist.batch_isend_irecv(ops)
        except Exception as exc:
            if region >= 0:
                self._free_regions.append(region)
            raise self._error(exc, items[0][1], items[0][0]) from exc
        self.posted += len(ops)
        if len(works) != len(items):   # NCCL coalesces a batch into one work (torch's batch_isend_irecv)
            works = [works[-1]] * len(items)
        self._flight.append((region, [(kind, chunk, work, data, buffered)
                                      for (kind, chunk, data, buffered), work in zip(items, works)]))

    def _completed(self, kind: str, chunk: Chunk, data: torch.Tensor, buffered: bool) -> None:
        """An operation of the oldest batch finished: use what it received."""
        if kind == "recv":
            self._received(chunk, data, buffered)
        elif kind == "checksum.recv":
            self._check_sum(chunk.step)

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
    def _send_source(self, chunk: Chunk, buffer: Optional[torch.Tensor]) -> torch.Tensor:
        """The bytes of ``chunk`` to post: a view of the source tensor (direct: no copy), or
        packed into the start of ``buffer``."""
        if chunk.direct:
            piece = chunk.pieces[0]
            data = _flat_bytes(_region(self.src[piece.transfer.tensor], piece.transfer.src_box))
            data = data[chunk.lo - piece.offset:chunk.hi - piece.offset]
        else:
            assert buffer is not None
            data = buffer[:chunk.nbytes]
            for piece in chunk.pieces:
                self._encode(piece, data[piece.offset - chunk.lo:piece.end - chunk.lo])
                self.packed += piece.nbytes
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
    def _recv_target(self, chunk: Chunk, buffer: Optional[torch.Tensor]) -> torch.Tensor:
        """Where ``chunk`` lands: the atomic staging; streaming, the destination region itself
        (direct: no copy), else the start of ``buffer``."""
        if self.owner.atomic:
            start = self.staging_at[chunk.step] + chunk.lo
            return self.staging[start:start + chunk.nbytes]
        if buffer is None:
            piece = chunk.pieces[0]
            target = _flat_bytes(_region(self.dst[piece.transfer.tensor], piece.transfer.dst_box))
            return target[chunk.lo - piece.offset:chunk.hi - piece.offset]
        return buffer[:chunk.nbytes]

    def _received(self, chunk: Chunk, data: torch.Tensor, buffered: bool) -> None:
        """A chunk arrived in ``data``: checksum it (verify); from a buffer region: unpack it."""
        if self.owner.verify:
            self._sum(("in", chunk.step), data, chunk.lo)
        if buffered:
            for piece in chunk.pieces:   # a packed chunk holds whole pieces (wire.chunks_of)
                self._decode(piece, data[piece.offset - chunk.lo:piece.end - chunk.lo])

    def _decode(self, piece: Piece, wire: torch.Tensor) -> None:
        """Write one piece's wire bytes (values, then fp8 scales) into the destination."""
        t = piece.transfer
        target = _region(self.dst[t.tensor], t.dst_box)
        target.copy_(wire[:piece.payload].view(target.dtype).view(target.shape))
        if convert.is_scaled(target.dtype):
            start = -(-piece.payload // 4) * 4
            dims = self.scale_dims[t.tensor]
            scale = _region(self.dst[convert.scale_name(t.tensor, dims)], _scale_box(t.dst_box, dims))
            scale.copy_(wire[start:piece.nbytes].view(convert.SCALE_DTYPE).view(scale.shape))
        self.unpacked += piece.nbytes

    def _commit(self) -> None:
        """Atomic mode: write every staged message into the destination (all bytes arrived)."""
        for step, message in self.owner.recv_messages.items():
            base = self.staging_at[step]
            for piece in message.pieces:
                self._decode(piece, self.staging[base + piece.offset:base + piece.end])

    def _local_copies(self) -> None:
        for fill in self.owner.fills:
            target = _region(self.dst[fill.tensor], fill.dst_box)
            target.zero_()
            if convert.is_scaled(target.dtype):
                dims = self.scale_dims[fill.tensor]
                _region(self.dst[convert.scale_name(fill.tensor, dims)], _scale_box(fill.dst_box, dims)).fill_(1)
        for t in self.owner.copies:
            target = _region(self.dst[t.tensor], t.dst_box)
            source = _region(self.src[t.tensor], t.src_box)
            if convert.is_scaled(target.dtype):
                dims = self.scale_dims[t.tensor]
                scale = _region(self.dst[convert.scale_name(t.tensor, dims)], _scale_box(t.dst_box, dims))
                self.quantizer.quantize(source, dims, target, scale)
            else:
                target.copy_(source)

    # ---- checksums --------------------------------------------------------------------------------
    def _post_checksums(self, current: Round, ops: List[Any], items: List[Tuple[str, Chunk, torch.Tensor, bool]]) -> None:
        """The step's checksum exchange (posted after all its data): send the sum of what this
        rank sent; receive the peer's sum of what it sent (compared once it arrived)."""
        step = current.step
        if current.recv is not None:
            theirs = self._checksums[("theirs", step)] = torch.empty(2, dtype=torch.int64, device=self.device)
            ops.append(dist.P2POp(dist.irecv, theirs, current.recv.peer, self.group))
            items.append(("checksum.recv", current.recv, theirs, False))
        if current.send is not None:
            ours = self._checksums[("out", step)]
            ops.append(dist.P2POp(dist.isend, ours, current.send.peer, self.group))
            items.append(("checksum.send", current.send, ours, False))

    def _check_sum(self, step: int) -> None:
        """Every chunk of ``step``'s message arrived (waited in order) and so did the sender's sum."""
        self.verified += 1
        if torch.equal(self._checksums[("in", step)], self._checksums[("theirs", step)]):
            return
        inc, owner = self.owner.recv_messages[step], self.owner
        names = sorted({p.transfer.tensor for p in inc.pieces})
        raise ReshardError(f"reshard step {step + 1}/{owner.plan.num_steps} on rank {owner.rank}: checksum "
                           f"mismatch on {inc.wire_bytes} bytes from rank {inc.peer} (tensors {names[:4]}"
                           f"{' …' if len(names) > 4 else ''}); "
                           + ("destination tensors untouched" if owner.atomic else
                              "destination tensors may be partly written (atomic=False)"))


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
                   default: torch.device, scale_layouts: Mapping[str, convert.ScaleLayout]) -> torch.device:
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
                scales = scale_layouts[name]
                wanted.append((convert.scale_name(name, scales), convert.scale_shape(shape, scales), convert.SCALE_DTYPE))
            for key, want_shape, want_dtype in wanted:
                tensor = tensors.get(key)
                where = (f"rank {rank}: {side} tensor {key!r} (tp {coords['tp']} of {layout.topology.tensor}, "
                         f"stage {coords['pp']})")
                if tensor is None and key != name:
                    raise ReshardError(f"{where} is missing: {convert.format_mismatch(name, scale_layouts[name], tensors)}")
                if tensor is None:
                    raise ReshardError(f"{where} is missing; this rank must pass every tensor of its stage "
                                       f"({len(expected)} tensors)")
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
