"""One execution of a Resharder's plan on this rank: post batches, wait, recycle regions."""
from __future__ import annotations

import collections
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from ...deadlines import is_timeout, wait_within
from ...errors import GroupTimeoutError, ReshardError
from .. import convert
from ..wire import Batch, Chunk, aligned, may_post, needs_recv_buffer
from .checksum import _Checksums
from .packing import _Packing

StepCallback = Callable[[int], None]


class _Run(_Packing, _Checksums):
    """One execution of a Resharder's plan on this rank (the pipeline; see the module docstring)."""

    def __init__(self, owner: Any, src: Mapping[str, torch.Tensor], dst: Mapping[str, torch.Tensor],
                 group: Any, device: torch.device, progress: Optional[StepCallback]) -> None:
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
            offset += aligned(owner.recv_messages[step].size)
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
        """Wait for ``work`` at most the resharder's timeout (:func:`pgroups.deadlines.wait_within`:
        on NCCL it ends before the communicator's watchdog); errors name the step and peers."""
        try:
            wait_within(work, self.owner.timeout, lambda exc: str(self._error(exc, chunk, kind)), self.group)
        except GroupTimeoutError:
            raise
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
