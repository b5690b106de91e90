"""Judging link measurements (pure): the healthy reference of a class and whether one
measurement is slow against it; intra-host pairs scaled to the same local pair on the other
hosts. Used by the link scan (:mod:`.linkscan`)."""
from __future__ import annotations

from typing import Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import attrs

from .diagnosis import PeerStats, Thresholds, deviation

Node = object  # a host name (inter-host class) or a rank (rails, intra-host class)
Edge = object  # linkscan.Edge: round, a, b, busbw_gbps, latency_us, slow, why (a NamedTuple)


@attrs.frozen
class Reference:
    """The healthy figures of one class: busbw and latency of the healthy-looking measurements."""

    busbw: PeerStats
    latency: PeerStats

    @property
    def busbw_median(self) -> float:
        return self.busbw.median

    @property
    def latency_median(self) -> float:
        return self.latency.median


def reference_of(busbw: Sequence[float], latency: Sequence[float], rule: Thresholds) -> Reference:
    """The healthy cluster of a class: the bandwidths within ``link_slow_factor`` of the best
    one, the latencies within ``slow_factor`` of the best one."""
    best_bw = max(busbw, default=0.0)
    best_lat = min(latency, default=0.0)
    return Reference(PeerStats.of([v for v in busbw if v * rule.link_slow_factor > best_bw]),
                     PeerStats.of([v for v in latency if v < best_lat * rule.slow_factor]))


def centred_on(controls: Reference, reference: Reference) -> Reference:
    """A round's reference: the median of its control pairs (measured at the same moment, so
    under the same load) with the spread and count of the class's healthy measurements (two
    control pairs have no spread of their own, and judged alone they would double the factor:
    a 0.7x link re-tested against them would never be slow again)."""
    return Reference(attrs.evolve(reference.busbw, median=controls.busbw.median),
                     attrs.evolve(reference.latency, median=controls.latency.median))


def judge(busbw: float, latency_us: float, reference: Reference, rule: Thresholds,
          latency: bool = True) -> Optional[str]:
    """Why a measurement is slow against ``reference`` (None if it is not): its bandwidth by
    ``link_slow_factor``, its latency by ``slow_factor`` (and ``mad_k`` for both); ``latency``
    False judges the bandwidth alone."""
    reasons = []
    dev = deviation(busbw, reference.busbw, True, rule.bandwidth_rule())
    if dev is not None:
        reasons.append(f"{busbw:.3g} GB/s vs median {dev.reference:.3g} GB/s of {reference.busbw.count} healthy links")
    dev = deviation(latency_us, reference.latency, False, rule) if latency else None
    if dev is not None:
        reasons.append(f"{latency_us:.0f} us vs median {dev.reference:.0f} us of {reference.latency.count} healthy links")
    if rule.min_busbw_gbps is not None and busbw < rule.min_busbw_gbps:
        reasons.append(f"{busbw:.3g} GB/s below --min-busbw {rule.min_busbw_gbps:g} GB/s")
    return "; ".join(reasons) or None


def judge_all(raw: Sequence[Edge], rule: Thresholds, controls: Mapping[int, Sequence[Tuple[Node, Node]]] = {},
              latency: bool = True) -> Tuple[List[Edge], Reference]:
    """Judge every measurement of one class against the class's healthy reference — or, in a
    round that ran *control* pairs (proven-healthy nodes measured beside the suspects, at the
    same time and so under the same load), against those controls, unless the controls
    themselves are slower than the class by ``link_slow_factor`` (their link is faulty). Returns
    the judged measurements and the class-wide reference (for the report)."""
    reference = reference_of([e.busbw_gbps for e in raw], [e.latency_us for e in raw], rule)
    in_round: Dict[int, List[Edge]] = {}
    for e in raw:
        if (e.a, e.b) in controls.get(e.round, ()):
            in_round.setdefault(e.round, []).append(e)
    per_round = {rnd: centred_on(reference_of([e.busbw_gbps for e in es], [e.latency_us for e in es], rule), reference)
                 for rnd, es in in_round.items()}
    # controls slower than the class by the factor ran over a faulty link themselves (both
    # ends proven healthy elsewhere): they are no reference, the class's healthy figures are
    per_round = {rnd: ref for rnd, ref in per_round.items()
                 if ref.busbw_median * rule.link_slow_factor >= reference.busbw_median}
    judged = []
    for e in raw:
        why = judge(e.busbw_gbps, e.latency_us, per_round.get(e.round, reference), rule, latency)
        judged.append(e._replace(slow=True, why=why) if why else e)
    return judged, reference


MIN_HOSTS_FOR_PROFILE = 3   # a local pair's best figure counts when measured on this many hosts


def normalize_local_pairs(raw: Sequence[Edge], local_pair: Callable[[Edge], Hashable],
                          host_of: Callable[[Edge], Hashable]) -> List[Edge]:
    """Intra-host measurements scaled so that each *local pair* (the same two local ranks on
    every host) is judged against itself on the other hosts, not against the best pair of
    any host: a topology in which some pairs are slower on every host (PCIe machines whose
    socket-crossing pairs run at 0.3x) is healthy, one host's pair slower than the same pair
    elsewhere is not. Each measurement of a local pair measured on two hosts or more is
    multiplied by (best busbw of the class / best busbw of its local pair), and its latency
    by (best latency of the class / best latency of its local pair) — the best, as noise only
    ever slows. Only local pairs measured on MIN_HOSTS_FOR_PROFILE hosts or more are scaled
    (the ring pairs every host measures, with three hosts or more): a pair measured on two
    hosts only (any pair of a two-host job, or an adaptive re-pair of suspects) may be slow on
    both by a fault on each — a slow rank at one end on one host, at the other end on the
    other — as much as by the topology, so it is judged as it is."""
    if not raw:
        return []
    best_bw = max(e.busbw_gbps for e in raw)
    best_lat = min(e.latency_us for e in raw)
    pair_bw: Dict[Hashable, float] = {}
    pair_lat: Dict[Hashable, float] = {}
    hosts: Dict[Hashable, set] = {}
    for e in raw:
        key = local_pair(e)
        pair_bw[key] = max(pair_bw.get(key, 0.0), e.busbw_gbps)
        pair_lat[key] = min(pair_lat.get(key, float("inf")), e.latency_us)
        hosts.setdefault(key, set()).add(host_of(e))
    out = []
    for e in raw:
        key = local_pair(e)
        seen_on = len(hosts[key])
        if seen_on < MIN_HOSTS_FOR_PROFILE or not pair_bw[key] > 0 or not pair_lat[key] > 0:
            out.append(e)
            continue
        out.append(e._replace(busbw_gbps=e.busbw_gbps * best_bw / pair_bw[key],
                              latency_us=e.latency_us * best_lat / pair_lat[key]))
    return out
