"""The values a reshard plan is made of: :class:`Transfer` (bytes of one tensor from one rank to
another, with the region in the full tensor and in both local shards), :class:`ZeroFill`
(vocabulary padding a destination zero-fills), :class:`ReceiverReport` (what a destination rank
needs, holds and receives), one rank's :class:`PlanShare` and the whole :class:`Plan`, with their
JSON-ready summaries. Pure: no processes."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs

from ...errors import ReshardError
from ..layout import ParallelLayout
from ..spec import ModelSpec
from .digest import plan_digest
from .report import dtype_counts, expert_report, owned_experts, vocab_report, wire_bytes

Box = Tuple[Tuple[int, int], ...]   # per dim (start, stop)

@attrs.frozen
class Transfer:
    """Bytes of one tensor going from global rank ``src`` to ``dst`` (``src == dst``: a local copy).

    ``global_box`` is the region of the full tensor; ``src_box`` / ``dst_box`` are the same
    region in the source / destination rank's local shard. They cover the full extent of every
    dim but ``axis`` (the TP split dim, or 0 for a replicated tensor), for a grouped expert
    weight its expert dim, and from an ISP source (rows of dim 0 on each rank) dim 0; a 0-d tensor has empty boxes. ``step`` is the transfer step (-1 for
    local copies).
    """

    tensor: str
    src: int
    dst: int
    axis: int
    global_box: Box
    src_box: Box
    dst_box: Box
    nbytes: int
    step: int

    @property
    def is_local(self) -> bool:
        return self.src == self.dst

    @property
    def rows(self) -> int:
        """Length along ``axis``."""
        if not self.global_box:
            return 1
        start, stop = self.global_box[self.axis]
        return stop - start


@attrs.frozen
class ZeroFill:
    """Rows of a destination shard no source holds — vocabulary padding — that the executor
    zero-fills on rank ``dst`` (``dst_box`` in its local shard); never sent."""

    tensor: str
    dst: int
    axis: int
    dst_box: Box
    nbytes: int


@attrs.frozen
class ReceiverReport:
    """What one destination rank needs, holds and receives (bytes)."""

    rank: int
    needed_bytes: int          # the rank's whole destination shard
    held_bytes: int            # of which it already holds in the source layout
    received_bytes: int        # over the network, per the plan
    local_copy_bytes: int
    senders: Tuple[int, ...]

    @property
    def lower_bound_bytes(self) -> int:
        return self.needed_bytes - self.held_bytes

    @property
    def ratio(self) -> float:
        """received / lower bound (1.0 when both are 0)."""
        if self.lower_bound_bytes == 0:
            return 1.0 if self.received_bytes == 0 else float("inf")
        return self.received_bytes / self.lower_bound_bytes


def _transfers_of(transfers: Sequence[Transfer], rank: int) -> Tuple[List[Transfer], List[Transfer], List[Transfer]]:
    sends = [t for t in transfers if t.src == rank and not t.is_local]
    recvs = [t for t in transfers if t.dst == rank and not t.is_local]
    copies = [t for t in transfers if t.is_local and t.dst == rank]
    return sends, recvs, copies


@attrs.frozen
class PlanShare:
    """One rank's part of a plan: what it sends, receives and copies locally (each in plan
    order), from :func:`plan_share` or :meth:`Plan.share`. The executor runs a share exactly as
    it runs the whole plan; ``digest()`` is the whole plan's (identical on every rank)."""

    rank: int
    src: ParallelLayout
    dst: ParallelLayout
    model: ModelSpec
    sends: Tuple[Transfer, ...]
    recvs: Tuple[Transfer, ...]
    copies: Tuple[Transfer, ...]
    report: Optional[ReceiverReport]          # None when the rank is not in the dst layout
    hosts: Optional[Tuple[str, ...]] = None
    fills: Tuple[ZeroFill, ...] = ()

    @property
    def transfers(self) -> Tuple[Transfer, ...]:
        return self.copies + self.sends + self.recvs

    @property
    def num_steps(self) -> int:
        """One more than the largest step this rank takes part in (0 without network transfers)."""
        return max((t.step for t in self.sends + self.recvs), default=-1) + 1

    @property
    def steps(self) -> List[int]:
        """The steps this rank takes part in, in order (one per peer pair)."""
        return sorted({t.step for t in self.sends + self.recvs})

    @property
    def sent_bytes(self) -> int:
        return sum(t.nbytes for t in self.sends)

    @property
    def received_bytes(self) -> int:
        return sum(t.nbytes for t in self.recvs)

    def transfers_of(self, rank: int) -> Tuple[List[Transfer], List[Transfer], List[Transfer]]:
        """``(sends, receives, local copies)`` of ``rank`` (only this share's rank)."""
        if rank != self.rank:
            raise ReshardError(f"this plan share is rank {self.rank}'s; rank {rank} asked for its transfers — "
                               "each rank computes its own share with plan_share(..., rank)")
        return list(self.sends), list(self.recvs), list(self.copies)

    def summary(self, dst_dtypes: Optional[Mapping[str, Any]] = None, fp8_scales: str = "row") -> Dict[str, Any]:
        """A JSON-ready summary of this rank's share (``dst_dtypes``, ``fp8_scales``: see :meth:`Plan.summary`)."""
        r = self.report
        return {
            "rank": self.rank, "plan_hash": f"{self.digest() & (2 ** 64 - 1):016x}",
            "src": self.src.describe(), "dst": self.dst.describe(),
            "experts": {"src": list(owned_experts(self.src, self.model, self.rank) or ()),
                        "dst": list(owned_experts(self.dst, self.model, self.rank) or ())},
            "vocab_padding": vocab_report(self.src, self.dst, self.model),
            "dst_dtypes": dtype_counts(self.model.tensors, dst_dtypes),
            "fp8_scales": fp8_scales,
            "wire_received_bytes": sum(wire_bytes(self.model, self.recvs, dst_dtypes, fp8_scales).values()),
            "wire_sent_bytes": sum(wire_bytes(self.model, self.sends, dst_dtypes, fp8_scales).values()),
            "sends": len(self.sends), "sent_bytes": self.sent_bytes,
            "receives": len(self.recvs), "received_bytes": self.received_bytes,
            "local_copies": len(self.copies), "local_copy_bytes": sum(t.nbytes for t in self.copies),
            "zero_filled_bytes": sum(f.nbytes for f in self.fills),
            "needed_bytes": r.needed_bytes if r else 0, "lower_bound_bytes": r.lower_bound_bytes if r else 0,
            "ratio": r.ratio if r else 1.0, "steps": self.steps,
            "send_peers": sorted({t.dst for t in self.sends}), "receive_peers": sorted({t.src for t in self.recvs}),
        }

    def fills_of(self, rank: int) -> List[ZeroFill]:
        """The padding regions ``rank`` zero-fills (only this share's rank)."""
        self.transfers_of(rank)
        return list(self.fills)

    def digest(self) -> int:
        """The plan's 64-bit hash (a signed int64), identical on every rank: :func:`plan_digest`."""
        return plan_digest(self.src, self.dst, self.model, self.hosts)


@attrs.frozen
class Plan:
    """A whole reshard; see the module docstring. ``transfers`` are the local copies, then the
    network transfers sorted by (step, src, dst, tensor order, position): both ends of a pair see
    them in one order."""

    src: ParallelLayout
    dst: ParallelLayout
    model: ModelSpec
    transfers: Tuple[Transfer, ...]
    num_steps: int
    receivers: Tuple[ReceiverReport, ...]
    sender_bytes: Mapping[int, int]   # every source rank → bytes it sends over the network
    hosts: Optional[Tuple[str, ...]] = None
    fills: Tuple[ZeroFill, ...] = ()

    @property
    def ranks(self) -> List[int]:
        """Every global rank taking part (source or destination), sorted."""
        return sorted(set(self.src.ranks) | set(self.dst.ranks))

    @property
    def received_bytes(self) -> int:
        return sum(r.received_bytes for r in self.receivers)

    @property
    def lower_bound_bytes(self) -> int:
        return sum(r.lower_bound_bytes for r in self.receivers)

    @property
    def ratio(self) -> float:
        low = self.lower_bound_bytes
        return 1.0 if low == 0 and self.received_bytes == 0 else self.received_bytes / low if low else float("inf")

    @property
    def max_ratio(self) -> float:
        return max((r.ratio for r in self.receivers), default=1.0)

    @property
    def sender_load_max(self) -> int:
        return max(self.sender_bytes.values(), default=0)

    @property
    def sender_load_mean(self) -> float:
        return sum(self.sender_bytes.values()) / len(self.sender_bytes) if self.sender_bytes else 0.0

    @property
    def pair_count(self) -> int:
        """Distinct (sender, receiver) pairs that exchange bytes over the network."""
        return len({(t.src, t.dst) for t in self.transfers if not t.is_local})

    @property
    def max_rank_steps(self) -> int:
        """The most steps any rank takes part in (its number of peer pairs)."""
        steps: Dict[int, set] = {}
        for t in self.transfers:
            if not t.is_local:
                steps.setdefault(t.src, set()).add(t.step)
                steps.setdefault(t.dst, set()).add(t.step)
        return max((len(s) for s in steps.values()), default=0)

    def transfers_of(self, rank: int) -> Tuple[List[Transfer], List[Transfer], List[Transfer]]:
        """``(sends, receives, local copies)`` of global ``rank``, in plan order."""
        return _transfers_of(self.transfers, rank)

    def fills_of(self, rank: int) -> List[ZeroFill]:
        """The padding regions ``rank`` zero-fills."""
        return [f for f in self.fills if f.dst == rank]

    def share(self, rank: int) -> PlanShare:
        """``rank``'s part of this plan (equal to ``plan_share(src, dst, model, rank, hosts)``)."""
        sends, recvs, copies = self.transfers_of(rank)
        report = next((r for r in self.receivers if r.rank == rank), None)
        return PlanShare(rank, self.src, self.dst, self.model, tuple(sends), tuple(recvs), tuple(copies), report,
                         self.hosts, tuple(self.fills_of(rank)))

    def digest(self) -> int:
        """The plan's 64-bit hash (a signed int64): :func:`plan_digest` of its inputs."""
        return plan_digest(self.src, self.dst, self.model, self.hosts)

    def summary(self, dst_dtypes: Optional[Mapping[str, Any]] = None, fp8_scales: str = "row") -> Dict[str, Any]:
        """A JSON-ready summary (no per-transfer list). ``dst_dtypes`` (``{tensor: dtype}``, as the
        executor takes them) adds the bytes each receiver gets on the wire in those dtypes, fp8 scales
        in format ``fp8_scales`` (``"row"`` or ``"block"``: see :mod:`pgroups.reshard.convert`)."""
        wire = wire_bytes(self.model, [t for t in self.transfers if not t.is_local], dst_dtypes, fp8_scales)
        return {
            "model": {"name": self.model.name, "tensors": len(self.model.tensors), "bytes": self.model.nbytes,
                      "expert_tensors": sum(1 for t in self.model.tensors if t.is_expert),
                      "dtypes": dtype_counts(self.model.tensors)},
            "src": self.src.describe(), "dst": self.dst.describe(),
            "plan_hash": f"{self.digest() & (2 ** 64 - 1):016x}",
            "experts": expert_report(self.src, self.dst, self.model),
            "vocab_padding": vocab_report(self.src, self.dst, self.model),
            "dst_dtypes": dtype_counts(self.model.tensors, dst_dtypes), "fp8_scales": fp8_scales,
            "received_bytes": self.received_bytes, "lower_bound_bytes": self.lower_bound_bytes,
            "wire_received_bytes": sum(wire.values()),
            "ratio": self.ratio, "max_rank_ratio": self.max_ratio,
            "local_copy_bytes": sum(r.local_copy_bytes for r in self.receivers),
            "zero_filled_bytes": sum(f.nbytes for f in self.fills),
            "steps": self.max_rank_steps, "pairs": self.pair_count,
            "sender_load": {"max": self.sender_load_max, "mean": self.sender_load_mean,
                            "max_over_mean": (self.sender_load_max / self.sender_load_mean
                                              if self.sender_load_mean else 1.0)},
            "receivers": [{"rank": r.rank, "needed": r.needed_bytes, "held": r.held_bytes,
                           "received": r.received_bytes, "lower_bound": r.lower_bound_bytes,
                           "ratio": r.ratio, "local_copy": r.local_copy_bytes, "senders": list(r.senders),
                           "wire_received": wire.get(r.rank, 0),
                           "experts": list(owned_experts(self.dst, self.model, r.rank) or ())}
                          for r in self.receivers],
        }
