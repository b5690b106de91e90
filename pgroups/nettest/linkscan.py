"""The link scan (pure): which pairs to test in each round, and which host, link or rank is at fault.

Groups hide where the slowness sits (a group that holds the slow host compares only with other
groups that hold it too). The link scan measures *links*, the way cluster health scanners do:

- **intra-host rounds** pair the ranks of each host with each other (a ring: every rank meets
  two neighbours; all hosts at once);
- **inter-host rounds** pair whole hosts: rounds of disjoint host pairs run at the same time,
  each pair rail by rail (the j-th rank of one host with the j-th rank of the other), with
  send/recv both ways. The first rounds follow the round-robin (circle) schedule, so each host
  meets up to ``base_rounds`` partners (every partner when there are four hosts or fewer);
  later rounds are *adaptive*: a suspect is re-paired with hosts already proven healthy, and a
  link whose two ends are both healthy elsewhere is measured once more, together.

**Judging a measurement.** Every measurement is judged against the *healthy links of its own
class* (inter-host links among themselves, rails among themselves, intra-host pairs among
themselves; never mixed): the reference is the median of the measurements within
the factor of the best one (noise only ever slows a link, so the best ones are healthy
even when most links touch a slow host), and a measurement is slow when it is worse than that
reference by the rule of :func:`.diagnosis.deviation` (bandwidth at the large size or
time at the small one), or below the optional absolute floor. The factor is
``link_slow_factor`` (1.3: NCCL's threshold) for inter-host bandwidths, ``slow_factor`` (2)
for latencies and intra-host pairs, which follow the CPU's load (:class:`.diagnosis.Thresholds`).
A round with control pairs is judged against their median (same moment, same load) with the
class's spread (:func:`.judging.centred_on`). An intra-host pair is judged
against the same local pair on the other hosts (:func:`.judging.normalize_local_pairs`, with
three hosts or more), so a topology whose socket-crossing pairs are slower on every host is
healthy.

**Naming.** A node (a host, or a rank) is *proven healthy* once one of its measurements was
not slow. A node none of whose measurements is fine and that was slow with three distinct
proven-healthy partners (two when only two others exist) is named (``host``: slow with every partner; ``rank``: slow
with every partner inside its host, or on every rail). A link whose two ends are both proven
healthy and that was slow every time it was measured is named as the
*link* (three times: a suspect link is re-tested twice, so two transient hiccups in a row
do not make a false alarm). With only two hosts (or two ranks on a host) a slow link cannot be blamed on one end:
it is named as the link, and the report says so; with two hosts only the absolute floor
(``--min-busbw``) can call that one link slow, as there is no second link to compare with. A host all of whose
intra-host pairs are slow is named as slow inside. A rank whose data arrives wrong at two
partners or more is named as corrupting. Nothing else is named: a slow measurement nothing
explains (it was fine when measured again) is a transient note.

Cost: every function here is O(measurements · log) per round; the whole scan of 1024 hosts x
8 ranks runs in well under a second (``bench/bench_nettest.py --scale``).
"""
from __future__ import annotations

import functools
import statistics
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

import attrs

from .diagnosis import Thresholds
from .judging import Reference, judge_all, normalize_local_pairs
from .verdict import Culprit, settle, split_line

INTER, INTRA = "inter-host", "intra-host"
DEFAULT_BASE_ROUNDS = 3      # round-robin rounds before the adaptive ones (each host meets 3 partners)
CONTROL_PAIRS = 2            # at least this many control pairs in an adaptive round (when there are idle healthy nodes)
MAX_ADAPTIVE_ROUNDS = 8      # per class: adaptive rounds stop here even if something is unresolved
MIN_PARTNERS_TO_NAME = 3     # distinct proven-healthy partners a node must be slow with (fewer
                             # when its component has fewer other nodes, but at least two)
MIN_SLOW_TO_NAME_LINK = 3    # times a link must be slow (and never fine) to be named: twice re-tested

Node = object  # a host name (inter-host class) or a rank (rails, intra-host class)
SCALED = " (figures scaled to the same local pair's best on any host)"


# ---- what is measured ------------------------------------------------------------------------
class PairSample(NamedTuple):
    """One rank pair measured in one round: send/recv both ways.

    ``busbw_gbps`` at the large size (its best operation), ``latency_us`` at the small one,
    ``wrong_at_a`` / ``wrong_at_b``: wrong elements that rank a / b received from the other.
    """

    round: int
    kind: str          # INTER (a rail of a host pair) | INTRA (two ranks of one host)
    a: int
    b: int
    busbw_gbps: float
    latency_us: float
    wrong_at_a: int = 0
    wrong_at_b: int = 0

    def to_json(self) -> Dict[str, object]:
        return self._asdict()


@attrs.frozen
class ScanRound:
    """One round: the kind, the rank pairs that run at the same time, and (inter-host) which
    host pairs they make up and why each was chosen."""

    index: int
    kind: str
    rank_pairs: Tuple[Tuple[int, int], ...]
    host_pairs: Tuple[Tuple[str, str], ...] = ()
    why: Tuple[str, ...] = ()

    def to_json(self) -> Dict[str, object]:
        return {"index": self.index, "kind": self.kind, "rank_pairs": [list(p) for p in self.rank_pairs],
                "host_pairs": [list(p) for p in self.host_pairs], "why": list(self.why)}


class Edge(NamedTuple):
    """One measurement of one link between two nodes (hosts, or ranks), judged; ``a < b``
    (make them with :func:`edge`)."""

    round: int
    a: Node
    b: Node
    busbw_gbps: float
    latency_us: float
    slow: bool = False
    why: str = ""

    @property
    def key(self) -> Tuple[Node, Node]:
        return (self.a, self.b)

    def partner(self, node: Node) -> Node:
        return self.b if self.a == node else self.a


# ---- schedules ------------------------------------------------------------------------------
def circle_round(count: int, index: int) -> List[Tuple[int, int]]:
    """Round ``index`` of the round-robin (circle method) over ``count`` items: disjoint pairs of
    positions; over all rounds (count - 1 if even, count if odd) every pair meets once."""
    if count < 2:
        return []
    slots = count + (count % 2)             # odd: one "bye" slot, whoever meets it sits out
    rounds = slots - 1
    index %= rounds
    ring = [0] + [1 + (i + index) % rounds for i in range(rounds)]
    pairs = []
    for i in range(slots // 2):
        a, b = ring[i], ring[slots - 1 - i]
        if a < count and b < count:
            pairs.append((min(a, b), max(a, b)))
    return pairs


def round_robin_length(count: int) -> int:
    return 0 if count < 2 else count - 1 + count % 2


@functools.lru_cache(maxsize=64)
def ring_rounds(count: int) -> Tuple[Tuple[Tuple[int, int], ...], ...]:
    """The ring edges (i, i+1 mod count) over ``count`` positions, in rounds of disjoint pairs:
    every position meets both neighbours (one round for two positions, three for an odd ring)."""
    if count < 2:
        return ()
    if count == 2:
        return (((0, 1),),)
    edges = [(i, (i + 1) % count) for i in range(count)]
    rounds: List[List[Tuple[int, int]]] = []
    busy: List[Set[int]] = []
    for a, b in edges:
        for pairs, used in zip(rounds, busy):
            if a not in used and b not in used:
                pairs.append((min(a, b), max(a, b)))
                used.update((a, b))
                break
        else:
            rounds.append([(min(a, b), max(a, b))])
            busy.append({a, b})
    return tuple(tuple(r) for r in rounds)


# ---- naming (one class of nodes) ---------------------------------------------------------------
@attrs.frozen
class NodeFindings:
    """What the measurements of one class say about its nodes and links."""

    healthy: frozenset                     # nodes with a measurement that was not slow
    named_nodes: Dict[Node, List[Edge]]    # node -> its (slow) measurements
    named_links: Dict[Tuple[Node, Node], List[Edge]]
    need_partner: List[Node]               # suspects that need another proven-healthy partner
    need_retest: List[Tuple[Node, Node]]   # links to measure once more, together
    unexplained: List[Edge]                # slow measurements nothing explains (transient)


def find_culprits(edges: Sequence[Edge], component_size: Callable[[Node], int]) -> NodeFindings:
    """Name nodes and links from judged measurements (see the module docstring for the rule).

    ``component_size(node)``: how many nodes could ever be paired with ``node``'s side (all
    hosts, or the ranks of its host); in a component of two, nothing is blamed on one end.
    """
    by_node: Dict[Node, List[Edge]] = {}
    by_link: Dict[Tuple[Node, Node], List[Edge]] = {}
    for e in edges:
        by_node.setdefault(e.a, []).append(e)
        by_node.setdefault(e.b, []).append(e)
        by_link.setdefault((e.a, e.b), []).append(e)
    healthy = frozenset(n for n, es in by_node.items() if any(not e.slow for e in es))
    named_nodes: Dict[Node, List[Edge]] = {}
    need_partner: List[Node] = []
    for node, es in by_node.items():
        if node in healthy:
            continue
        if component_size(node) <= 2:
            continue  # two nodes: the link is named below, never one end
        proven = {e.partner(node) for e in es if e.partner(node) in healthy}
        if len(proven) >= min(MIN_PARTNERS_TO_NAME, component_size(node) - 1):
            named_nodes[node] = es
        else:
            need_partner.append(node)
    named_links: Dict[Tuple[Node, Node], List[Edge]] = {}
    need_retest: List[Tuple[Node, Node]] = []
    for key, es in by_link.items():
        if not all(e.slow for e in es):
            continue
        a, b = key
        pair_only = component_size(a) <= 2
        if not pair_only and not (a in healthy and b in healthy):
            continue
        if len(es) >= MIN_SLOW_TO_NAME_LINK:
            named_links[key] = es
        else:
            need_retest.append(key)
    unexplained = [e for e in edges if e.slow and e.a not in named_nodes and e.b not in named_nodes
                   and e.key not in named_links and e.key not in need_retest
                   and e.a not in need_partner and e.b not in need_partner]
    return NodeFindings(healthy, named_nodes, named_links, sorted(need_partner),
                        sorted(need_retest), unexplained)


def edge(round_: int, a: Node, b: Node, busbw_gbps: float, latency_us: float) -> Edge:
    """An unjudged Edge with its ends in order."""
    return Edge(round_, a, b, busbw_gbps, latency_us) if a <= b else Edge(round_, b, a, busbw_gbps, latency_us)


def _edge_key(a: Node, b: Node) -> Tuple[Node, Node]:
    """Nodes of one class are all host names or all ranks: they sort among themselves."""
    return (a, b) if a <= b else (b, a)


def upper_median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def lower_median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


# ---- the scan -------------------------------------------------------------------------------
class LinkScan:
    """The scheduler and its diagnosis, driven by rank 0 (deterministic; no torch.distributed).

    Use: ``while (r := scan.next_round()) is not None: scan.record(measure(r))``, then
    ``scan.culprits()`` / ``scan.to_json()``. ``hostnames`` gives every rank's host.
    ``tick`` is called now and then during the decisions (rank 0's heartbeat).
    """

    def __init__(self, hostnames: Sequence[str], rule: Thresholds = Thresholds(), base_rounds: int = DEFAULT_BASE_ROUNDS,
                 max_adaptive_rounds: int = MAX_ADAPTIVE_ROUNDS, intra: bool = True,
                 tick: Callable[[], None] = lambda: None) -> None:
        self.hostnames = list(hostnames)
        self.rule = rule
        self.tick = tick
        self.hosts: List[str] = list(dict.fromkeys(self.hostnames))
        self.ranks_of: Dict[str, List[int]] = {h: [] for h in self.hosts}
        self._local: Dict[int, int] = {}   # rank -> its position among its host's ranks
        for rank, host in enumerate(self.hostnames):
            self._local[rank] = len(self.ranks_of[host])
            self.ranks_of[host].append(rank)
        self.samples: List[PairSample] = []
        self.rounds: List[ScanRound] = []
        self.inter_base = min(max(base_rounds, 1), round_robin_length(len(self.hosts)))
        self.intra_base = max((len(ring_rounds(len(r))) for r in self.ranks_of.values()), default=0) if intra else 0
        self.max_adaptive = max_adaptive_rounds
        self._adaptive = {INTER: 0, INTRA: 0}
        self._phase = 0
        self._met: Dict[str, Set[str]] = {h: set() for h in self.hosts}
        self._cursor = 0
        self._cache: Dict[str, Dict[str, object]] = {}
        self._control_pairs: Dict[int, List[Tuple[object, object]]] = {}   # round -> control node pairs

    # -- schedule -------------------------------------------------------------------------
    def next_round(self) -> Optional[ScanRound]:
        """The next round to run, or None when the scan is over."""
        self.tick()
        index = len(self.rounds)
        produced: Optional[ScanRound] = None
        while produced is None and self._phase < 4:
            if self._phase == 0:      # intra-host ring rounds
                done = sum(1 for r in self.rounds if r.kind == INTRA)
                produced = self._intra_base_round(index, done) if done < self.intra_base else None
            elif self._phase == 1:    # inter-host round-robin rounds
                done = sum(1 for r in self.rounds if r.kind == INTER)
                produced = self._inter_base_round(index, done) if done < self.inter_base else None
            elif self._phase == 2:    # adaptive inter-host rounds
                produced = self._adaptive_round(index, INTER)
            else:                     # adaptive intra-host rounds
                produced = self._adaptive_round(index, INTRA)
            if produced is None:
                self._phase += 1
        if produced is not None:
            self.rounds.append(produced)
            for a, b in produced.host_pairs:
                self._met[a].add(b)
                self._met[b].add(a)
        return produced

    def _intra_base_round(self, index: int, which: int) -> Optional[ScanRound]:
        pairs = []
        for host in self.hosts:
            ranks = self.ranks_of[host]
            rounds = ring_rounds(len(ranks))
            if which < len(rounds):
                pairs.extend((ranks[i], ranks[j]) for i, j in rounds[which])
        return ScanRound(index, INTRA, tuple(pairs), (), ("ring",)) if pairs else None

    def _inter_base_round(self, index: int, which: int) -> Optional[ScanRound]:
        host_pairs = [(self.hosts[i], self.hosts[j]) for i, j in circle_round(len(self.hosts), which)]
        return self._inter_round(index, host_pairs, ["round-robin"] * len(host_pairs))

    def _inter_round(self, index: int, host_pairs: Sequence[Tuple[str, str]], why: Sequence[str]) -> Optional[ScanRound]:
        if not host_pairs:
            return None
        rails = []
        for a, b in host_pairs:
            rails.extend(zip(self.ranks_of[a], self.ranks_of[b]))
        return ScanRound(index, INTER, tuple(rails), tuple(host_pairs), tuple(why))

    def _adaptive_round(self, index: int, kind: str) -> Optional[ScanRound]:
        if self._adaptive[kind] >= self.max_adaptive:
            return None
        findings = self.findings()
        busy: Set[object] = set()
        pairs: List[Tuple[object, object]] = []
        why: List[str] = []
        state: NodeFindings = findings["hosts" if kind == INTER else "intra"]
        for a, b in state.need_retest:
            if a not in busy and b not in busy:
                busy.update((a, b))
                pairs.append((a, b))
                why.append(f"re-test {a} - {b}: slow together, each fine elsewhere")
        healthy = sorted(state.healthy)
        for suspect in state.need_partner:
            if suspect in busy:
                continue
            partner = self._free_partner(suspect, healthy, busy, kind)
            if partner is None:  # no proven-healthy partner left: any node it has not met
                partner = self._free_partner(suspect, self._component(suspect, kind), busy, kind)
            if partner is not None:
                busy.update((suspect, partner))
                pairs.append((suspect, partner))
                why.append(f"re-pair suspect {suspect} with {partner}")
        if not pairs:
            return None
        controls = self._controls(healthy, busy, kind, max(CONTROL_PAIRS, len(pairs)))
        self._control_pairs[index] = [_edge_key(a, b) for a, b in controls]
        pairs.extend(controls)
        why.extend(f"control {a} - {b}" for a, b in controls)
        self._adaptive[kind] += 1
        if kind == INTER:
            return self._inter_round(index, pairs, why)
        return ScanRound(index, INTRA, tuple((int(a), int(b)) for a, b in pairs), (), tuple(why))

    def _controls(self, healthy: Sequence[object], busy: Set[object], kind: str, wanted: int) -> List[Tuple[object, object]]:
        """Up to ``wanted`` pairs of idle proven-healthy nodes (of one host, for intra-host
        rounds), measured beside the suspects: the round's own reference."""
        free: Dict[object, List[object]] = {}
        for node in healthy:
            if node not in busy:
                free.setdefault(None if kind == INTER else self.hostnames[int(node)], []).append(node)
        controls = []
        for nodes in free.values():
            while len(nodes) >= 2 and len(controls) < wanted:
                a, b = nodes.pop(0), nodes.pop(0)
                busy.update((a, b))
                controls.append((a, b))
        return controls

    def _component(self, node: object, kind: str) -> List[object]:
        return list(self.hosts) if kind == INTER else list(self.ranks_of[self.hostnames[int(node)]])

    def _met_by(self, node: object, kind: str) -> Set[object]:
        if kind == INTER:
            return self._met[node]
        return {s.b if s.a == node else s.a for s in self.samples if s.kind == INTRA and node in (s.a, s.b)}

    def _free_partner(self, node: object, pool: Sequence[object], busy: Set[object], kind: str) -> Optional[object]:
        """The next node of ``pool`` (rotating, so partners spread) that is free, in ``node``'s
        component and not met yet."""
        if not pool:
            return None
        met = self._met_by(node, kind)
        host = None if kind == INTER else self.hostnames[int(node)]
        start = self._cursor % len(pool)
        for step in range(len(pool)):
            other = pool[(start + step) % len(pool)]
            if other == node or other in busy or other in met:
                continue
            if host is not None and self.hostnames[int(other)] != host:
                continue
            self._cursor = start + step + 1
            return other
        return None

    # -- results --------------------------------------------------------------------------
    def record(self, samples: Iterable[PairSample]) -> None:
        """Add the measurements of the last round."""
        added = list(samples)
        self.samples.extend(added)
        for kind in {s.kind for s in added}:
            self._cache.pop(kind, None)

    def findings(self) -> Dict[str, object]:
        """Judged measurements and what they name, per class (each class is judged again only
        when it has new measurements)."""
        if INTER not in self._cache:
            self._cache[INTER] = self._inter_findings([s for s in self.samples if s.kind == INTER])
            self.tick()
        if INTRA not in self._cache:
            ranks_on = {h: len(r) for h, r in self.ranks_of.items()}
            raw = [edge(s.round, s.a, s.b, s.busbw_gbps, s.latency_us) for s in self.samples if s.kind == INTRA]
            scaled = normalize_local_pairs(raw, lambda e: (self._local[e.a], self._local[e.b]),
                                           lambda e: self.hostnames[e.a])
            # bandwidth alone: a small message's round trip between two ranks of one host is
            # process scheduling more than the interconnect (healthy local pairs of one idle
            # machine swung 2.3-2.6x, and the README's default run named rank 0 once in 3)
            judged, ref = judge_all(scaled, self.rule.without_link_factor(), self._control_pairs, latency=False)
            edges = [r._replace(slow=j.slow, why=j.why + (SCALED if j.why and x != r else ""))
                     for r, x, j in zip(raw, scaled, judged)]   # raw figures, judged scaled
            self._cache[INTRA] = {"intra_edges": edges, "intra_reference": ref,
                                  "intra": find_culprits(edges, lambda r: ranks_on[self.hostnames[r]])}
            self.tick()
        return {**self._cache[INTER], **self._cache[INTRA]}

    def _inter_findings(self, inter: Sequence[PairSample]) -> Dict[str, object]:
        """Host links judged among themselves; then the rails of the links that were not slow,
        judged among themselves (a rail's slowness is then its ranks', not its hosts')."""
        links, link_ref = judge_all(self._host_links(inter), self.rule, self._control_pairs)
        slow_links = {(e.round, e.key) for e in links if e.slow}
        rails_raw = [edge(s.round, s.a, s.b, s.busbw_gbps, s.latency_us) for s in inter
                     if (s.round, _edge_key(self.hostnames[s.a], self.hostnames[s.b])) not in slow_links]
        control_rails = {rnd: [_edge_key(a, b) for ha, hb in pairs for a, b in zip(self.ranks_of[ha], self.ranks_of[hb])]
                         for rnd, pairs in self._control_pairs.items() if self.rounds[rnd].kind == INTER}
        rails, rail_ref = judge_all(rails_raw, self.rule, control_rails)
        host_count = len(self.hosts)
        return {"links": links, "link_reference": link_ref, "rails": rails, "rail_reference": rail_ref,
                "hosts": find_culprits(links, lambda _h: host_count),
                "rails_found": find_culprits(rails, lambda _r: host_count)}

    def _host_links(self, inter: Sequence[PairSample]) -> List[Edge]:
        """One Edge per (round, host pair): the upper median of its rails' busbw and the lower
        median of their latency (one slow rank does not make its host's link slow)."""
        by: Dict[Tuple[int, Tuple[str, str]], List[PairSample]] = {}
        for s in inter:
            by.setdefault((s.round, _edge_key(self.hostnames[s.a], self.hostnames[s.b])), []).append(s)
        return [Edge(rnd, a, b, upper_median([s.busbw_gbps for s in ss]), lower_median([s.latency_us for s in ss]))
                for (rnd, (a, b)), ss in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1]))]

    def culprits(self) -> List[Culprit]:
        """Everything the scan names, hosts first, then links, ranks, corrupting ranks."""
        f = self.findings()
        hosts: NodeFindings = f["hosts"]
        rails: NodeFindings = f["rails_found"]
        intra: NodeFindings = f["intra"]
        link_ref: Reference = f["link_reference"]
        out: List[Culprit] = []
        two_hosts = len(self.hosts) == 2
        settled = settle(f["links"], hosts, self.hosts, self.rule.link_slow_factor, self.rule.min_busbw_gbps)
        if settled.split:
            out.append(Culprit("split", tuple(h for nodes, _ in settled.split for h in nodes), (),
                               split_line(settled.split, len(self.hosts), self.rule.min_busbw_gbps)))
        # a split: the host-level reference is not proven, so no host or link is blamed
        named_hosts = {} if settled.split else {**hosts.named_nodes, **settled.named_nodes}
        named_links = {} if settled.split else hosts.named_links
        for host, es in sorted(named_hosts.items()):
            partners = sorted({e.partner(host) for e in es})
            value = statistics.median(e.busbw_gbps for e in es)
            out.append(Culprit("host", (host,), tuple(self.ranks_of[host]),
                               f"{host}: slow with every partner ({value:.3g} GB/s vs median "
                               f"{link_ref.busbw_median:.3g} GB/s on {link_ref.busbw.count} other links; "
                               f"partners {', '.join(partners)})"))
        for (a, b), es in sorted(settled.unresolved_links.items()):
            value = statistics.median(e.busbw_gbps for e in es)
            out.append(Culprit("unresolved", (a, b), (), f"link {a} <-> {b}: slow every time measured ({value:.3g} "
                               f"GB/s in {len(es)} tests vs median {link_ref.busbw_median:.3g} GB/s); the scan "
                               f"ran out of rounds to tell whether {a}, {b} or the link is at fault"))
        for (a, b), es in sorted(named_links.items()):
            value = statistics.median(e.busbw_gbps for e in es)
            tail = ("; with two hosts only it cannot be blamed on one end" if two_hosts else
                    "; both hosts are fast with other partners")
            out.append(Culprit("link", (a, b), (), f"link {a} <-> {b}: slow only together ({value:.3g} GB/s in "
                               f"{len(es)} tests vs median {link_ref.busbw_median:.3g} GB/s on "
                               f"{link_ref.busbw.count} healthy links){tail}"))
        named_ranks: Set[int] = set()
        for rank, es in sorted(intra.named_nodes.items()):
            named_ranks.add(int(rank))
            out.append(self._rank_culprit(int(rank), es, "with every partner inside its host", f["intra_reference"]))
        for rank, es in sorted(rails.named_nodes.items()):
            if int(rank) not in named_ranks:
                named_ranks.add(int(rank))
                out.append(self._rank_culprit(int(rank), es, "on its rail to every partner host", f["rail_reference"]))
        inside = self._slow_inside(f["intra_edges"], named_ranks, intra)
        out.extend(inside)
        inside_hosts = {c.hosts[0] for c in inside}
        for (a, b), es in sorted(intra.named_links.items()):
            host = self.hostnames[int(a)]
            # a host named slow with every partner is drained whole: a pair inside it that
            # measured slow (its ranks lag behind the host's slow operations) is not a second fault
            if host in inside_hosts or host in named_hosts:
                continue
            tail = ("with two ranks on the host it cannot be blamed on one" if len(self.ranks_of[host]) <= 2
                    else "both ranks are fast with other partners")
            out.append(Culprit("rank-link", (host,), (int(a), int(b)),
                               f"ranks {a} and {b} on {host}: slow only together ({es[0].why}); {tail}"))
        for (a, b), es in sorted(rails.named_links.items()):
            if not ({int(a), int(b)} & named_ranks):
                out.append(Culprit("rail", (self.hostnames[a], self.hostnames[b]), (int(a), int(b)),
                                   f"rail rank {a} ({self.hostnames[a]}) <-> rank {b} ({self.hostnames[b]}): slow "
                                   f"only together ({es[0].why}) while both hosts' other rails are fast"))
        out.extend(self._corrupting())
        return out

    def _rank_culprit(self, rank: int, es: Sequence[Edge], where: str, ref: Reference) -> Culprit:
        host = self.hostnames[rank]
        partners = sorted({int(e.partner(rank)) for e in es})
        value = statistics.median(e.busbw_gbps for e in es)
        latency = statistics.median(e.latency_us for e in es)
        return Culprit("rank", (host,), (rank,),
                       f"rank {rank} on {host}: slow {where} ({value:.3g} GB/s, {latency:.0f} us vs median "
                       f"{ref.busbw_median:.3g} GB/s, {ref.latency_median:.0f} us; partners {partners})")

    def _slow_inside(self, edges: Sequence[Edge], named_ranks: Set[int], intra: NodeFindings) -> List[Culprit]:
        """Hosts with two or more intra-host pairs, every one slow, and no rank to blame."""
        by_host: Dict[str, List[Edge]] = {}
        for e in edges:
            by_host.setdefault(self.hostnames[int(e.a)], []).append(e)
        out = []
        for host, es in by_host.items():
            pairs = {e.key for e in es}
            if len(pairs) >= 2 and all(e.slow for e in es) and not (set(self.ranks_of[host]) & named_ranks):
                out.append(Culprit("host-inside", (host,), tuple(self.ranks_of[host]),
                                   f"{host}: slow inside (all {len(pairs)} intra-host pairs slow: {es[0].why})"))
        return out

    def _corrupting(self) -> List[Culprit]:
        """Ranks whose data arrived wrong at two partners or more."""
        partners: Dict[int, Set[int]] = {}
        for s in self.samples:
            if s.wrong_at_b:
                partners.setdefault(s.a, set()).add(s.b)
            if s.wrong_at_a:
                partners.setdefault(s.b, set()).add(s.a)
        return [Culprit("corrupting", (self.hostnames[r],), (r,),
                        f"rank {r} on {self.hostnames[r]}: data it sent arrived wrong at {len(p)} partners {sorted(p)}")
                for r, p in sorted(partners.items()) if len(p) >= 2]

    def rank_scores(self) -> Dict[int, float]:
        """Per rank: the median over its measurements of busbw / its class's healthy median
        (1 is healthy; 0.02 is fifty times slower)."""
        f = self.findings()
        refs = {INTER: f["rail_reference"].busbw_median, INTRA: f["intra_reference"].busbw_median}
        ratios: Dict[int, List[float]] = {}
        for s in self.samples:
            ref = refs[s.kind] or f["link_reference"].busbw_median
            if ref > 0:
                for rank in (s.a, s.b):
                    ratios.setdefault(rank, []).append(s.busbw_gbps / ref)
        return {r: statistics.median(v) for r, v in sorted(ratios.items())}

    def inter_rounds(self) -> int:
        return sum(1 for r in self.rounds if r.kind == INTER)

    def to_json(self) -> Dict[str, object]:
        """The host x host matrix (one entry per measured link: busbw, latency, round, slow),
        the rounds, the per-rank scores, what was named and the transient notes."""
        f = self.findings()
        matrix: Dict[str, Dict[str, Dict[str, object]]] = {}
        for e in f["links"]:
            for x, y in ((e.a, e.b), (e.b, e.a)):
                cell = matrix.setdefault(str(x), {}).setdefault(str(y), {"busbw_gbps": [], "latency_us": [],
                                                                         "rounds": [], "slow": []})
                cell["busbw_gbps"].append(e.busbw_gbps)
                cell["latency_us"].append(e.latency_us)
                cell["rounds"].append(e.round)
                cell["slow"].append(e.slow)
        notes = [f"round {e.round}: {e.a} - {e.b} slow once ({e.why}), fine when measured again"
                 for key in ("hosts", "rails_found", "intra") for e in f[key].unexplained]
        return {"hosts": self.hosts, "rounds": [r.to_json() for r in self.rounds],
                "inter_rounds": self.inter_rounds(), "intra_rounds": len(self.rounds) - self.inter_rounds(),
                "matrix": matrix,
                "reference": {k: {"busbw_gbps": f[k].busbw_median, "latency_us": f[k].latency_median,
                                  "healthy": f[k].busbw.count}
                              for k in ("link_reference", "rail_reference", "intra_reference")},
                "rank_scores": {str(r): v for r, v in self.rank_scores().items()},
                "samples": [s.to_json() for s in self.samples],
                "culprits": [c.to_json() for c in self.culprits()], "transient": notes}


def run_scan(scan: LinkScan, measure: Callable[[ScanRound], Sequence[PairSample]]) -> LinkScan:
    """Drive ``scan`` to the end with ``measure`` (one round's samples); returns it."""
    while True:
        round_ = scan.next_round()
        if round_ is None:
            return scan
        scan.record(measure(round_))


def named(culprits: Sequence[Culprit]) -> Mapping[str, List[Culprit]]:
    by_kind: Dict[str, List[Culprit]] = {}
    for c in culprits:
        by_kind.setdefault(c.kind, []).append(c)
    return by_kind
