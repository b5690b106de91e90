"""Which groups the network test measures, and which of them run at the same time (pure).

Test groups come from two places:

- the process groups of parallel modes (``nettest`` by default, ``--modes tensor,data`` or
  ``all``), as the initializers lay them out;
- the hosts the ranks report: *intra-node* groups (the ranks of one host) and *inter-node*
  groups (one rank per host: the j-th rank of every host, a "rail").

Groups of one size-1 member measure nothing and are left out; a kind whose groups repeat
another kind's exactly is measured once (the first kind named). Groups run in *waves*: the
groups of one kind that share no rank run concurrently, kinds run one after another, so
that every group is compared with its peers under the same load.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import attrs

from ..ranks import ranks_by_host

INTRA_NODE = "intra-node"
INTER_NODE = "inter-node"
HOST_KINDS = (INTRA_NODE, INTER_NODE)


@attrs.frozen
class GroupUnderTest:
    """One group the tool measures: ``id`` like ``"nettest#1"``, its kind, sorted ranks, hosts."""

    id: str
    kind: str
    ranks: Tuple[int, ...]
    hosts: Tuple[str, ...]  # the distinct hosts of its ranks, in rank order

    @property
    def size(self) -> int:
        return len(self.ranks)

    def to_json(self) -> Dict[str, object]:
        return {"id": self.id, "kind": self.kind, "ranks": list(self.ranks), "hosts": list(self.hosts)}


def host_rank_groups(hostnames: Sequence[str]) -> Dict[str, List[List[int]]]:
    """``{"intra-node": [...], "inter-node": [...]}`` for the hosts the ranks reported.

    Intra-node: each host's ranks. Inter-node: for j = 0, 1, …, the j-th rank of every host
    that has one. Every rank is in one group of each kind (a group may have one member).
    """
    by_host = ranks_by_host(list(hostnames))
    intra = [sorted(ranks) for ranks in by_host.values()]
    depth = max((len(r) for r in intra), default=0)
    inter = [sorted(ranks[j] for ranks in intra if j < len(ranks)) for j in range(depth)]
    return {INTRA_NODE: intra, INTER_NODE: inter}


def build_catalog(mode_groups: Mapping[str, Sequence[Sequence[int]]], hostnames: Sequence[str],
                  host_groups: bool = True) -> List[GroupUnderTest]:
    """The test groups, in run order: modes in the order given, then intra-, then inter-node.

    ``mode_groups`` maps a mode (or any kind name) to all of its groups. Groups of size 1 are
    dropped; a kind whose groups equal an earlier kind's (as a set) is dropped too.
    """
    kinds: Dict[str, Sequence[Sequence[int]]] = dict(mode_groups)
    if host_groups:
        kinds.update(host_rank_groups(hostnames))
    catalog: List[GroupUnderTest] = []
    seen: List[frozenset] = []
    for kind, groups in kinds.items():
        kept = [tuple(sorted(g)) for g in groups if len(g) > 1]
        layout = frozenset(kept)
        if not kept or layout in seen:
            continue
        seen.append(layout)
        for index, ranks in enumerate(kept):
            hosts = tuple(dict.fromkeys(hostnames[r] for r in ranks)) if hostnames else ()
            catalog.append(GroupUnderTest(f"{kind}#{index}", kind, ranks, hosts))
    return catalog


def duplicate_kinds(mode_groups: Mapping[str, Sequence[Sequence[int]]]) -> Dict[str, str]:
    """``{kind: earlier kind with the same groups}`` — what build_catalog leaves out, for the report."""
    first: Dict[frozenset, str] = {}
    duplicates: Dict[str, str] = {}
    for kind, groups in mode_groups.items():
        layout = frozenset(tuple(sorted(g)) for g in groups if len(g) > 1)
        if layout and layout in first:
            duplicates[kind] = first[layout]
        elif layout:
            first[layout] = kind
    return duplicates


def plan_waves(catalog: Sequence[GroupUnderTest]) -> List[List[GroupUnderTest]]:
    """Split the catalog into waves: each wave holds groups of one kind that share no rank.

    First fit, in catalog order; every rank is in at most one group of a wave, so each rank
    knows its task in a wave without asking anyone.
    """
    waves: List[List[GroupUnderTest]] = []
    by_kind: Dict[str, List[GroupUnderTest]] = {}
    for group in catalog:
        by_kind.setdefault(group.kind, []).append(group)
    for groups in by_kind.values():
        kind_waves: List[Tuple[List[GroupUnderTest], set]] = []
        for group in groups:
            for wave, used in kind_waves:
                if used.isdisjoint(group.ranks):
                    wave.append(group)
                    used.update(group.ranks)
                    break
            else:
                kind_waves.append(([group], set(group.ranks)))
        waves.extend(wave for wave, _ in kind_waves)
    return waves


def group_of_rank(wave: Sequence[GroupUnderTest], rank: int) -> Optional[GroupUnderTest]:
    """The group of ``wave`` that holds ``rank`` (None if the rank is idle in this wave)."""
    return next((g for g in wave if rank in g.ranks), None)
