"""The Resharder: a plan bound to this rank, its options, buffers and budget, the plan
agreement, and one run; :func:`execute_plan` and :func:`reshard`."""
from __future__ import annotations

import datetime
import math
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import attrs
import torch
import torch.distributed as dist

from ...backend import tensor_device
from ...comm.raw import all_gather_single
from ...deadlines import NCCL_WATCHDOG_MARGIN_S
from ...errors import ReshardError
from .. import convert
from ..layout import ParallelLayout, local_shapes
from ..planner import Plan, PlanShare, plan_share
from ..spec import ModelSpec
from ..wire import (BATCHES_IN_FLIGHT, DEFAULT_BUCKET_BYTES, REFUSED, Batch, Shapes, agreement_digest, aligned,
                    batches, box_shape, first_disagreement, messages, round_needs, rounds, first_scale_cut,
                    slice_align, slices)
from .agreement import agree
from .buffers import _Buffers
from .transfer import StepCallback, _Run


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
            from ... import gpc as context
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.plan, self.context, self.group, self.verify = plan, context, group, verify
        self.keep_buffers, self.atomic, self.bucket_bytes = keep_buffers, atomic, bucket_bytes
        self.rank = context.get_global_rank()
        groups_timeout_s = context.config.timeout_s if context.config is not None else None
        if timeout_s is None:
            timeout_s = groups_timeout_s if groups_timeout_s is not None else 1800.0
        elif groups_timeout_s is not None and timeout_s > groups_timeout_s and _on_nccl(context):
            raise ValueError(f"timeout_s={timeout_s:g} is longer than the groups' timeout_s={groups_timeout_s:g}: "
                             f"on NCCL their watchdog fires {NCCL_WATCHDOG_MARGIN_S:g} s after that and tears the "
                             "process down first; raise the config's timeout_s or pass at most it")
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
        self._budget_problem = self._check_budget(max_staging_bytes) or first_scale_cut(
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
            progress: Optional[StepCallback] = None) -> ReshardStats:
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
            agree(group, self._buffers, device or self._default_device(), self.digest, self.rank, self.timeout,
                  refuse=problem is not None)
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
        return tensor_device("nccl" if _on_nccl(self.context) else "gloo")

    def _global_group(self, device: torch.device) -> Any:
        """The global group for tensors on ``device``, from the context's handle
        (``context.group("global")``): its device group for CUDA tensors, its CPU group otherwise."""
        handle = self.context.group("global")
        if device.type == "cuda":
            return handle.group
        if handle.cpu_group is None:
            raise ReshardError(f"rank {self.rank}: CPU tensors under NCCL need the CPU twin of the global group "
                               f"({handle.label}); build it with cpu_groups: eager")
        return handle.cpu_group



def execute_plan(plan: "Plan | PlanShare", src_tensors: Mapping[str, torch.Tensor], dst_tensors: Mapping[str, torch.Tensor],
                 *, progress: Optional[StepCallback] = None, **options: Any) -> ReshardStats:
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
        from ... import gpc as context
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


def _on_nccl(context: Any) -> bool:
    """Whether ``context``'s device groups are NCCL."""
    backend = getattr(context, "backend", None)
    return backend is not None and backend.device_backend == "nccl"


def _synchronize(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
