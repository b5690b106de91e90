"""The last word of the link scan (pure): speed classes, what is still unexplained when the
rounds run out, and the rule that the summary is HEALTHY only when nothing is flagged.

**Speed classes.** A host's *speed* is its best inter-host link (noise and faults only ever
slow a link, so no link of a host is faster than the host). Sorted by speed, hosts form a new
class wherever two neighbours differ by more than ``link_slow_factor`` (log-busbw clusters). The
reference for the other classes is the *fastest* class, never the median — many slow hosts
cannot outvote it — but only when its health is *proven*: it meets ``--min-busbw`` (when
given), or it holds three hosts or more, or a majority of the hosts. A fast class of two hosts
among four or more rests on the one link between them, which may be a shortcut (two hosts
under one switch) as much as the healthy rate: then the scan blames nobody and says so in one
line, "hosts split into two speed classes: {A, C} at 0.76 GB/s, {B, D} at 0.013 GB/s", exit 1.

**Settling.** When the adaptive rounds end, a suspect that is slow with every proven-healthy
partner it met, and met all proven-healthy hosts there are (fewer than the three the scan asks
for), is named; a link slow every time it was measured that nothing named explains is named as
*unresolved*. So every link slow every time it was measured is explained by a culprit.

**Healthy iff nothing flagged** (:func:`healthy`): no culprit, no group verdict other than ok,
and no link of the host matrix slow every time it was measured.
"""
from __future__ import annotations

import statistics
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import attrs

MIN_PROVEN_CLASS = 3   # hosts fast with each other that prove their rate healthy without a floor
RANK_CULPRITS = ("rank", "corrupting", "rank-link", "rail")  # culprits that name ranks, not hosts


@attrs.frozen
class Culprit:
    """What the scan names: ``kind`` host | link | rank | rank-link (two ranks of one host) |
    rail (two ranks of two hosts) | host-inside | corrupting | split (hosts in speed classes,
    none proven healthy) | unresolved (slow every time measured, the rounds ran out); the
    pre-flight's findings have the same shape (:mod:`.preflight`: drift | compute-slow |
    corruption)."""

    kind: str
    hosts: Tuple[str, ...]
    ranks: Tuple[int, ...]
    reason: str

    def to_json(self) -> Dict[str, object]:
        return {"kind": self.kind, "hosts": list(self.hosts), "ranks": list(self.ranks), "reason": self.reason}


# ---- speed classes --------------------------------------------------------------------------
def host_speeds(links: Iterable[object]) -> Dict[object, float]:
    """Each node's best busbw over the measured links (objects with ``a``, ``b``, ``busbw_gbps``)."""
    best: Dict[object, float] = {}
    for e in links:
        for node in (e.a, e.b):
            best[node] = max(best.get(node, 0.0), e.busbw_gbps)
    return best


def speed_classes(speeds: Mapping[object, float], factor: float) -> List[Tuple[Tuple[object, ...], float]]:
    """Nodes grouped by speed, fastest class first, each with its median speed: sorted by speed,
    a class ends where the next node is more than ``factor`` times slower than the previous one.

    >>> speed_classes({"A": 0.76, "B": 0.013, "C": 0.74, "D": 0.012}, 2.0)
    [(('A', 'C'), 0.75), (('B', 'D'), 0.0125)]
    """
    ordered = sorted(speeds, key=lambda n: (-speeds[n], str(n)))
    classes: List[List[object]] = []
    for node in ordered:
        if classes and speeds[classes[-1][-1]] <= speeds[node] * factor:
            classes[-1].append(node)
        else:
            classes.append([node])
    return [(tuple(sorted(c, key=str)), statistics.median([speeds[n] for n in c])) for c in classes]


def fast_class_proven(fast: Sequence[object], speed: float, node_count: int, floor: Optional[float]) -> bool:
    """Whether the fastest class's rate is the healthy one (see the module docstring)."""
    if floor is not None:
        return speed >= floor
    return len(fast) >= MIN_PROVEN_CLASS or 2 * len(fast) > node_count


def split_line(classes: Sequence[Tuple[Tuple[object, ...], float]], node_count: int,
               floor: Optional[float], limit: int = 8) -> str:
    """``hosts split into two speed classes: {A, C} at 0.76 GB/s, {B, D} at 0.013 GB/s; …``,
    and why the fastest is not proven healthy."""
    words = {2: "two", 3: "three", 4: "four"}

    def members(nodes: Sequence[object]) -> str:
        shown = ", ".join(map(str, nodes[:limit]))
        return "{" + shown + (f", … ({len(nodes)} hosts)" if len(nodes) > limit else "") + "}"

    fast, speed = classes[0]
    why = (f"the fastest is below --min-busbw {floor:g} GB/s" if floor is not None else
           f"the fastest is {len(fast)} hosts of {node_count}, and no --min-busbw says which rate is healthy")
    return (f"hosts split into {words.get(len(classes), len(classes))} speed classes: "
            + ", ".join(f"{members(nodes)} at {rate:.3g} GB/s" for nodes, rate in classes)
            + f"; none is proven healthy ({why}), so no host is blamed")


# ---- settling what the rounds left open ---------------------------------------------------------
@attrs.frozen
class Settled:
    """Nodes named at the end (node -> its slow measurements), links named as unresolved, and
    the speed classes when none is proven healthy (empty otherwise)."""

    named_nodes: Dict[object, List[object]]
    unresolved_links: Dict[Tuple[object, object], List[object]]
    split: Tuple[Tuple[Tuple[object, ...], float], ...] = ()


def settle(edges: Sequence[object], found: object, nodes: Sequence[object], factor: float,
           floor: Optional[float]) -> Settled:
    """What one class of links still names when the scan is over.

    ``edges``: the judged measurements (``a``, ``b``, ``busbw_gbps``, ``slow``, ``key``,
    ``partner(node)``); ``found``: the scan's NodeFindings for them; ``nodes``: every node of
    the class, any two of which may be paired (the hosts of the cluster). Returns the
    nodes named now (see the module docstring), the links slow every time they were measured
    that nothing explains, or — when the fastest speed class is not proven healthy — the split.
    """
    classes = speed_classes(host_speeds(edges), factor)
    if len(classes) >= 2 and not fast_class_proven(classes[0][0], classes[0][1], len(nodes), floor):
        return Settled({}, {}, tuple(classes))
    healthy: Set[object] = set(found.healthy)
    named = dict(found.named_nodes)
    for node in found.need_partner:
        mine = [e for e in edges if node in (e.a, e.b)]
        proven = {e.partner(node) for e in mine} & healthy
        if len(proven) >= 2 and proven >= healthy - {node}:
            named[node] = mine
    explained = set(named) | set(found.named_links)
    by_link: Dict[Tuple[object, object], List[object]] = {}
    for e in edges:
        by_link.setdefault(e.key, []).append(e)
    unresolved = {key: es for key, es in by_link.items()
                  if all(e.slow for e in es) and key not in found.named_links
                  and not (set(key) & explained)}
    return Settled({n: es for n, es in named.items() if n not in found.named_nodes}, unresolved)


# ---- the summary ----------------------------------------------------------------------------
def flagged_links(matrix: Mapping[str, Mapping[str, Mapping[str, object]]]) -> List[Tuple[str, str]]:
    """Host pairs of the report's link matrix that were slow every time they were measured."""
    return sorted({tuple(sorted((a, b))) for a, row in matrix.items() for b, cell in row.items()
                   if cell.get("slow") and all(cell["slow"])})


def summarize(group_ids: Sequence[str], confirmed: Sequence[Tuple[str, str]], culprits: Sequence[Culprit],
              matrix: Mapping[str, Mapping[str, Mapping[str, object]]], hostnames: Sequence[str],
              transient_groups: Iterable[str] = (),
              preflight: Sequence[str] = ()) -> Dict[str, object]:
    """The report's verdict part: ``verdicts`` per group, ``culprits``, ``suspects``,
    ``summary``, ``status``, ``exit_code`` — from the confirmed group findings (group id,
    metric), the link scan's culprits, its host matrix and the pre-flight findings' reasons
    (``preflight``). HEALTHY (exit 0) iff nothing is flagged: every group ok, no culprit, no
    link of the matrix slow every time it was measured, no pre-flight finding.
    """
    labels: Dict[str, List[str]] = {}
    for group_id, metric in confirmed:
        label = "wrong" if metric == "wrong" else "slow"
        labels.setdefault(group_id, [])
        if label not in labels[group_id]:
            labels[group_id].append(label)
    suspects = [{"rank": r, "host": hostnames[r], "reason": c.reason}
                for c in culprits if c.kind in RANK_CULPRITS for r in c.ranks]
    flagged = flagged_links(matrix)
    is_healthy = not labels and not culprits and not flagged and not preflight
    return {
        "verdicts": {g: ",".join(labels.get(g, ["ok"])) for g in group_ids},
        "culprits": [c.to_json() for c in culprits],
        "suspects": suspects,
        "summary": {"groups_tested": len(group_ids),
                    "slow": sorted(g for g, v in labels.items() if "slow" in v),
                    "wrong": sorted(g for g, v in labels.items() if "wrong" in v),
                    "transient": sorted(set(transient_groups)),
                    "slow_hosts": sorted({c.hosts[0] for c in culprits if c.kind in ("host", "host-inside")}),
                    "slow_links": sorted([list(c.hosts) for c in culprits if c.kind == "link"]),
                    "flagged_links": [list(k) for k in flagged],
                    "suspect_ranks": sorted({s["rank"] for s in suspects}),
                    "suspect_hosts": sorted({h for c in culprits for h in c.hosts}),
                    "preflight": list(preflight),
                    "healthy": is_healthy},
        "status": "healthy" if is_healthy else "unhealthy",
        "exit_code": 0 if is_healthy else 1}

