"""Plans from the rule: one rank's :func:`plan_share`, and the whole :func:`plan_reshard` (the union
of every rank's share, built in O(total transfers)). Pure: no processes."""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator, List, Optional, Sequence, Tuple

from ..layout import ParallelLayout
from ..spec import ModelSpec
from .rule import SenderRule
from .types import Plan, PlanShare, ReceiverReport, Transfer, ZeroFill


def plan_share(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec, rank: int,
               hosts: Optional[Sequence[str]] = None) -> PlanShare:
    """``rank``'s part of the plan moving ``model`` from ``src`` to ``dst``: what it sends,
    receives and copies, in O(its transfers + tensors × the shards it overlaps); equal to
    ``plan_reshard(...).share(rank)``. Raises as :func:`plan_reshard`."""
    rule = SenderRule(src, dst, model, hosts)
    recvs, copies, needed, fills = rule.receive(rank) if rank in dst else ([], [], 0, [])
    sends = rule.send(rank) if rank in src else []
    recvs.sort(key=rule.sort_key)
    sends.sort(key=rule.sort_key)
    copies.sort(key=lambda t: (rule.order[t.tensor], t.global_box))
    report = _report(rank, needed, recvs, copies) if rank in dst else None
    return PlanShare(rank, src, dst, model, tuple(sends), tuple(recvs), tuple(copies), report,
                     tuple(hosts) if hosts is not None else None, tuple(fills))


def plan_reshard(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec,
                 hosts: Optional[Sequence[str]] = None) -> Plan:
    """Plan moving every tensor of ``model`` from layout ``src`` to layout ``dst`` (the union of
    every rank's :func:`plan_share`), in O(total transfers): each destination's regions and
    senders are worked out once per tensor kind, then emitted for every tensor of that kind.

    ``hosts[r]`` is global rank r's host name (from the launch: ``gpc.get_hostnames()``);
    None means unknown (no same-host preference). Raises ConfigError if a layout's stage policy
    does not fit the model, or ``hosts`` does not cover every rank of both layouts; ReshardError
    if a layout's shards cannot compute (a TP size above a tensor's query heads).
    """
    with _gc_paused():
        return _whole_plan(SenderRule(src, dst, model, hosts), hosts)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a plan's millions of acyclic objects are built: every
    collection would walk all of them again (half the time of a whole plan at world 1024)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _whole_plan(rule: "SenderRule", hosts: Optional[Sequence[str]]) -> Plan:
    """Every destination's receives (each rank's regions shared per tensor kind), in plan order."""
    src, dst, model = rule.src, rule.dst, rule.model
    copies: List[Transfer] = []
    reports = []
    fills: List[ZeroFill] = []
    # A receiver's network transfers come in runs of one sender each (the pair's step is fixed);
    # ordering the runs by (step, src, dst) orders the whole plan without sorting every transfer.
    runs: List[Tuple[Tuple[int, int, int], List[Transfer]]] = []
    sender_bytes = {r: 0 for r in sorted(src.ranks)}
    for rank in sorted(dst.ranks):
        by_sender, mine, needed, padding = rule.receive_by_sender(rank)
        fills += padding
        copies += mine
        received = 0
        for sender, run in by_sender.items():
            nbytes = sum(t.nbytes for t in run)
            sender_bytes[sender] += nbytes
            received += nbytes
            runs.append(((run[0].step, sender, rank), run))
        copied = sum(t.nbytes for t in mine)
        reports.append(ReceiverReport(rank, needed, copied, received, copied, tuple(sorted(by_sender))))
    runs.sort(key=lambda run: run[0])
    network = [t for _, run in runs for t in run]
    return Plan(src, dst, model, tuple(copies) + tuple(network), max((key[0] for key, _ in runs), default=-1) + 1,
                tuple(reports), sender_bytes, tuple(hosts) if hosts is not None else None, tuple(fills))


def _report(rank: int, needed: int, recvs: Sequence[Transfer], copies: Sequence[Transfer]) -> ReceiverReport:
    copied = sum(t.nbytes for t in copies)
    return ReceiverReport(rank, needed, copied, sum(t.nbytes for t in recvs), copied,
                          tuple(sorted({t.src for t in recvs})))
