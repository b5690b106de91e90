"""Diagnosis (pure): which groups are slow or wrong, and which ranks and hosts are at fault.

The rule, chosen so that a healthy run on a noisy machine raises no alarm:

1. **Compare like with like.** Groups are compared only with groups of the same kind and size
   (``nettest`` blocks with each other, one host's ranks with another host's …), measured in
   the same wave, per collective: bus bandwidth at the largest size and time (latency) at the
   smallest.
2. **Robust and relative, in ratio space.** A group is *flagged* when its figure is worse
   than the median of the *other* groups of its class (leave-one-out, so an outlier never
   drags its own reference) by a factor ``slow_factor`` (default 2: half the bandwidth, or
   twice the latency) **and** by ``mad_k`` (default 4) robust standard deviations of the
   others' *logarithms* (1.4826 x MAD of log values): noise on bandwidths and times is
   multiplicative, so the margin is a factor too, however widely a loaded machine scatters
   the healthy figures. One noisy figure is not enough to move a median, and a 2x margin is
   far beyond the jitter of a healthy link. With fewer than three peers there is no spread to
   measure, so the factor doubles (4x by default); a class with one group is never compared.
3. **Absolute floors.** ``--min-busbw`` flags any group whose bus bandwidth at the largest
   size is below the floor, whatever its peers do (the only way to catch a uniformly slow
   fabric, or a single group).
4. **Repeated.** Every slow flag is *re-tested*: the flagged groups and up to four healthy
   peers of their class are measured again at the flagged collective and size, each group
   *alone* (the others wait), round-robin, three times (small messages: at least 20
   operations a time), and judged by the same rule on each group's *best* operation — noise
   (a descheduled process, a busy neighbour) only ever adds time, a bad link or rank slows
   every operation. A group is slow only if flagged again; a healthy group that was unlucky
   once is reported as a transient note, not as a fault.
5. **Below group granularity**: the link scan (:mod:`.linkscan`) measures host pairs rail by
   rail and the ranks of each host with each other, and names the host, link or rank.

Wrong data is never noise: any wrong element flags a group at once (no re-test needed).
"""
from __future__ import annotations

import bisect
import math
import statistics
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import attrs

from . import metrics
from .groups import GroupUnderTest
from ..units import format_bytes

MAD_SCALE = 1.4826  # MAD x this estimates the standard deviation of normal data
MIN_PEERS_FOR_SPREAD = 3  # below this, a MAD means nothing: the factor doubles instead
TINY = 1e-30  # non-positive figures are clamped to this before taking logarithms


@attrs.frozen
class Thresholds:
    """The thresholds of the diagnosis (see the module docstring). ``slow_factor`` judges the
    sweep's groups, and the link scan's latencies and intra-host pairs; ``link_slow_factor``
    the link scan's inter-host bandwidths (host links, rails, speed classes): 1.3 flags a link
    more than 30 % slower than its class's healthy reference, the threshold of NCCL's own
    network diagnostic. The link scan can afford it where the sweep cannot: a pair is measured
    one direction at a time on its best operation (healthy links of one class agree within a
    few percent, docs/nettest.md), a flag is re-tested against control pairs measured at the
    same moment, and the ``mad_k`` guard still holds where a loaded machine scatters the
    figures. Latencies (small messages) and intra-host pairs (on CPU ranks: memory copies)
    follow the CPU's load, 1.3x to 2.3x on this 2-core machine at load 9: they keep
    ``slow_factor``."""

    slow_factor: float = 2.0
    mad_k: float = 4.0
    min_busbw_gbps: Optional[float] = None
    link_slow_factor: float = 1.3

    def __attrs_post_init__(self) -> None:
        if not self.slow_factor > 1.0:
            raise ValueError(f"--slow-factor must be above 1, got {self.slow_factor}")
        if not self.link_slow_factor > 1.0:
            raise ValueError(f"--link-slow-factor must be above 1, got {self.link_slow_factor}")
        if self.mad_k < 0:
            raise ValueError(f"--mad-k must not be negative, got {self.mad_k}")
        if self.min_busbw_gbps is not None and self.min_busbw_gbps < 0:
            raise ValueError(f"--min-busbw must not be negative, got {self.min_busbw_gbps}")

    def to_json(self) -> Dict[str, object]:
        return {"slow_factor": self.slow_factor, "mad_k": self.mad_k, "min_busbw_gbps": self.min_busbw_gbps,
                "link_slow_factor": self.link_slow_factor}

    def bandwidth_rule(self) -> "Thresholds":
        """The rule for the link scan's bandwidths: ``link_slow_factor`` as the factor."""
        return attrs.evolve(self, slow_factor=self.link_slow_factor)

    def without_link_factor(self) -> "Thresholds":
        """The same rule with the link scan's bandwidths judged by ``slow_factor`` too."""
        return attrs.evolve(self, link_slow_factor=self.slow_factor)


# ---- figures --------------------------------------------------------------------------------
@attrs.frozen
class Measurement:
    """One collective at one size on one group (or pair), aggregated over its ranks.

    ``time_s`` is the mean over ranks of each rank's mean time per operation (nccl-tests'
    default ``-a 1``); with several repetitions, the best (smallest) repetition: the figure of
    the tables. ``robust_time_s`` is the mean over ranks of each rank's *best* single
    operation (on CPU, where operations are timed one by one; on GPUs its best batch): what the
    re-test and the pair tests judge. Noise (a descheduled process, a busy neighbour) only ever
    adds time, while a slow link or rank slows every operation, the best one included.
    ``wrong`` is
    the number of wrong elements over all ranks (nccl-tests' ``#wrong``); ``wrong_from`` maps
    a source rank to the wrong elements that came from it, where a collective lets us tell.
    """

    group_id: str
    collective: str
    size_bytes: int
    group_size: int
    count: int
    time_s: float
    rank_times: Tuple[Tuple[int, float], ...] = ()
    wrong: int = 0
    wrong_from: Tuple[Tuple[int, int], ...] = ()
    repeats: int = 1
    robust_time_s: Optional[float] = None

    @property
    def algbw(self) -> float:
        return metrics.algbw(self.size_bytes, self.time_s)

    @property
    def busbw(self) -> float:
        return metrics.busbw(self.collective, self.group_size, self.size_bytes, self.time_s)

    @property
    def judged_time_s(self) -> float:
        """The time the follow-ups judge: the robust one when known."""
        return self.robust_time_s if self.robust_time_s is not None else self.time_s

    @property
    def judged_busbw(self) -> float:
        return metrics.busbw(self.collective, self.group_size, self.size_bytes, self.judged_time_s)

    def to_json(self) -> Dict[str, object]:
        return {"group": self.group_id, "collective": self.collective, "size_bytes": self.size_bytes,
                "count": self.count, "time_us": self.time_s * 1e6, "algbw_gbps": self.algbw,
                "busbw_gbps": self.busbw, "wrong": self.wrong, "repeats": self.repeats,
                "robust_time_us": self.judged_time_s * 1e6, "robust_busbw_gbps": self.judged_busbw,
                "time_us_by_rank": {str(r): t * 1e6 for r, t in self.rank_times},
                "wrong_from": {str(r): n for r, n in self.wrong_from}}


def aggregate(group_id: str, group_size: int, records: Sequence[Mapping[str, object]]) -> Measurement:
    """Combine the per-rank records of one (group, collective, size) into a Measurement.

    Each record: ``rank``, ``collective``, ``size``, ``count``, ``times`` (seconds per
    operation, one per repetition), optionally ``op_best`` (the best single operation),
    ``wrong``, ``wrong_from`` (``{source rank: elements}``).
    Raises ValueError for an empty list or records that disagree on collective or size.
    """
    if not records:
        raise ValueError(f"no records for group {group_id}")
    first = records[0]
    if any(r["collective"] != first["collective"] or r["size"] != first["size"] for r in records):
        raise ValueError(f"records of group {group_id} mix collectives or sizes")
    repeats = min(len(r["times"]) for r in records)
    per_repeat = [statistics.fmean(float(r["times"][i]) for r in records) for i in range(repeats)]
    bests = [r.get("op_best") for r in records]
    robust = statistics.fmean(float(b) for b in bests) if all(b is not None for b in bests) else None
    wrong_from: Dict[int, int] = {}
    for record in records:
        for source, count in dict(record.get("wrong_from") or {}).items():
            wrong_from[int(source)] = wrong_from.get(int(source), 0) + int(count)
    return Measurement(
        group_id=group_id, collective=str(first["collective"]), size_bytes=int(first["size"]),
        group_size=group_size, count=int(first["count"]), time_s=min(per_repeat),
        rank_times=tuple(sorted((int(r["rank"]), min(map(float, r["times"]))) for r in records)),
        wrong=sum(int(r["wrong"]) for r in records), wrong_from=tuple(sorted(wrong_from.items())),
        repeats=repeats, robust_time_s=robust)


# ---- the robust rule ----------------------------------------------------------------------
@attrs.frozen
class Deviation:
    """How far a value is from the reference of its peers, in the direction that is worse."""

    value: float
    reference: float
    log_spread: float  # 1.4826 x MAD of the peers' natural logarithms
    ratio: float       # how many times worse (>= 1 means worse)


@attrs.frozen
class PeerStats:
    """The reference a value is judged against, in ratio (log) space: ``median`` is the peers'
    median (for an even count, the geometric mean of the two middle values), ``log_spread``
    1.4826 x the MAD of the peers' natural logarithms (a relative spread: 0.1 means the peers
    scatter by about 10 %), ``count`` how many peers. Computed once, so judging many values
    against the same peers costs O(1) each."""

    median: float
    log_spread: float
    count: int

    @classmethod
    def of(cls, peers: Sequence[float]) -> "PeerStats":
        if not peers:
            return cls(0.0, 0.0, 0)
        logs = [_log(p) for p in peers]
        centre = statistics.median(logs)
        return cls(math.exp(centre), MAD_SCALE * statistics.median(abs(x - centre) for x in logs), len(peers))


def _log(value: float) -> float:
    """The natural log, with non-positive values (a zero bandwidth) clamped to a tiny one."""
    return math.log(max(value, TINY))


def deviation(value: float, peers: PeerStats, higher_is_better: bool, rule: Thresholds) -> Optional[Deviation]:
    """The Deviation if ``value`` is worse than the peers described by ``peers`` by the rule.

    Judged in ratio space: worse means ``ratio`` (how many times worse than the peers' median)
    at least ``slow_factor`` **and** ``log(ratio)`` beyond ``mad_k`` robust standard deviations
    of the peers' logarithms. Bandwidths and times are positive and their noise is
    multiplicative (a loaded machine makes every healthy figure 1.5x or 3x worse, never
    "0.7 GB/s worse"), so a relative spread describes them: however widely healthy peers
    scatter, the margin is a factor, never a distance larger than the median itself (which,
    with an absolute MAD, made every bandwidth unflaggable on a loaded machine). With fewer
    than MIN_PEERS_FOR_SPREAD peers there is no spread to measure, so the factor doubles
    instead of the spread test. No peers → None.
    """
    if not peers.count or not peers.median > 0:
        return None
    spread_known = peers.count >= MIN_PEERS_FOR_SPREAD
    factor = rule.slow_factor if spread_known else 2 * rule.slow_factor
    if higher_is_better:
        ratio = peers.median / value if value > 0 else float("inf")
    else:
        ratio = value / peers.median
    if not ratio >= factor:
        return None
    if spread_known and not math.log(ratio) > rule.mad_k * peers.log_spread:
        return None
    return Deviation(value, peers.median, peers.log_spread, ratio)


def worse_than_peers(value: float, peers: Sequence[float], higher_is_better: bool,
                     rule: Thresholds) -> Optional[Deviation]:
    """The Deviation if ``value`` is worse than ``peers`` by the rule (see :func:`deviation`)."""
    return deviation(value, PeerStats.of(peers), higher_is_better, rule)


def leave_one_out(values: Sequence[float]) -> List[PeerStats]:
    """For each value, the PeerStats of all the *other* values — in O(n log n), not O(n²).

    Removing one value from a sorted list moves the median to one of at most three places,
    so the absolute deviations are sorted once per place, and each value's own deviation is
    taken out of them by position.
    """
    n = len(values)
    if n < 2:
        return [PeerStats(0.0, 0.0, 0) for _ in values]
    values = [_log(v) for v in values]  # ratio space, as PeerStats.of
    order = sorted(range(n), key=lambda i: values[i])
    ranked = [values[i] for i in order]
    position = {index: pos for pos, index in enumerate(order)}
    deviations: Dict[float, List[float]] = {}
    out = []
    for i in range(n):
        median = _median_without(ranked, position[i])
        if median not in deviations:
            deviations[median] = sorted(abs(v - median) for v in ranked)
        spread = _median_without(deviations[median], bisect.bisect_left(deviations[median], abs(values[i] - median)))
        out.append(PeerStats(math.exp(median), MAD_SCALE * spread, n - 1))
    return out


def _median_without(ranked: Sequence[float], skip: int) -> float:
    """The median of sorted ``ranked`` without its element at position ``skip``."""
    m = len(ranked) - 1

    def at(k: int) -> float:
        return ranked[k] if k < skip else ranked[k + 1]

    return at(m // 2) if m % 2 else (at(m // 2 - 1) + at(m // 2)) / 2


def outliers(values: Mapping[str, float], higher_is_better: bool, rule: Thresholds) -> Dict[str, Deviation]:
    """Leave-one-out: every key whose value is worse than the others' by the rule."""
    keys = list(values)
    stats = leave_one_out([values[k] for k in keys])
    found = {}
    for key, peers in zip(keys, stats):
        dev = deviation(values[key], peers, higher_is_better, rule)
        if dev is not None:
            found[key] = dev
    return found


# ---- group verdicts -------------------------------------------------------------------------
@attrs.frozen
class Finding:
    """Why a group is suspect: ``metric`` is busbw | latency | floor | wrong."""

    group_id: str
    kind: str
    collective: str
    metric: str
    size_bytes: int
    value: float
    reference: Optional[float] = None
    detail: str = ""

    def to_json(self) -> Dict[str, object]:
        return attrs.asdict(self)


MeasurementKey = Tuple[str, str, int]  # (group id, collective, size)


def index_measurements(measurements: Iterable[Measurement]) -> Dict[MeasurementKey, Measurement]:
    return {(m.group_id, m.collective, m.size_bytes): m for m in measurements}


def comparison_classes(catalog: Sequence[GroupUnderTest]) -> Dict[Tuple[str, int], List[GroupUnderTest]]:
    """Groups that may be compared: same kind and same size."""
    classes: Dict[Tuple[str, int], List[GroupUnderTest]] = {}
    for group in catalog:
        classes.setdefault((group.kind, group.size), []).append(group)
    return classes


def find_slow(catalog: Sequence[GroupUnderTest], measurements: Iterable[Measurement], rule: Thresholds,
              metrics_to_check: Sequence[str] = ("busbw", "latency", "floor"),
              tick: Callable[[], None] = lambda: None) -> List[Finding]:
    """Slow groups by the relative rule (busbw at the largest size, latency at the smallest
    size, per collective, within each comparison class) and by the absolute floor.

    O(measurements + groups · log groups); ``tick`` is called once per class (a heartbeat)."""
    table = index_measurements(measurements)
    sizes_of = _sizes_by_group(table)
    findings: List[Finding] = []
    for (kind, _size), groups in comparison_classes(catalog).items():
        tick()
        ids = [g.id for g in groups]
        for collective in _collectives_of(sizes_of, ids):
            sizes = _common_sizes(sizes_of, ids, collective)
            if not sizes:
                continue
            large, small = max(sizes), min(sizes)
            if "busbw" in metrics_to_check:
                busbw = {gid: table[(gid, collective, large)].busbw for gid in ids}
                for gid, dev in outliers(busbw, True, rule).items():
                    findings.append(Finding(gid, kind, collective, "busbw", large, dev.value, dev.reference,
                                            f"{collective} busbw {dev.value:.3g} GB/s at "
                                            f"{format_bytes(large)} is {dev.ratio:.1f}x below the "
                                            f"median {dev.reference:.3g} GB/s of the other {len(ids) - 1} "
                                            f"{kind} groups"))
            if "latency" in metrics_to_check:
                latency = {gid: table[(gid, collective, small)].time_s for gid in ids}
                for gid, dev in outliers(latency, False, rule).items():
                    findings.append(Finding(gid, kind, collective, "latency", small, dev.value, dev.reference,
                                            f"{collective} time {dev.value * 1e6:.0f} us at "
                                            f"{format_bytes(small)} is {dev.ratio:.1f}x the median "
                                            f"{dev.reference * 1e6:.0f} us of the other {len(ids) - 1} "
                                            f"{kind} groups"))
            if "floor" in metrics_to_check and rule.min_busbw_gbps is not None:
                for gid in ids:
                    value = table[(gid, collective, large)].busbw
                    if value < rule.min_busbw_gbps:
                        findings.append(Finding(gid, kind, collective, "floor", large, value, rule.min_busbw_gbps,
                                                f"{collective} busbw {value:.3g} GB/s at "
                                                f"{format_bytes(large)} is below --min-busbw "
                                                f"{rule.min_busbw_gbps:g} GB/s"))
    return findings


def find_wrong(catalog: Sequence[GroupUnderTest], measurements: Iterable[Measurement]) -> List[Finding]:
    """Groups where any element arrived wrong: one Finding per (group, collective)."""
    kinds = {g.id: g.kind for g in catalog}
    wrong: Dict[Tuple[str, str], List[Measurement]] = {}
    for m in measurements:
        if m.wrong:
            wrong.setdefault((m.group_id, m.collective), []).append(m)
    findings = []
    for (gid, collective), rows in wrong.items():
        total = sum(m.wrong for m in rows)
        sizes = ", ".join(format_bytes(m.size_bytes) for m in sorted(rows, key=lambda m: m.size_bytes)[:4])
        more = " …" if len(rows) > 4 else ""
        sources = _sources(rows)
        source_text = f"; wrong data came from rank(s) {sources}" if sources else ""
        findings.append(Finding(gid, kinds.get(gid, "?"), collective, "wrong", rows[0].size_bytes, float(total),
                                None, f"{collective}: {total} wrong elements at {len(rows)} sizes "
                                      f"({sizes}{more}){source_text}"))
    return findings


def _sources(rows: Sequence[Measurement]) -> List[int]:
    counts: Dict[int, int] = {}
    for m in rows:
        for source, n in m.wrong_from:
            counts[source] = counts.get(source, 0) + n
    return sorted(s for s, n in counts.items() if n)


def _sizes_by_group(table: Mapping[MeasurementKey, Measurement]) -> Dict[str, Dict[str, set]]:
    """``{group: {collective: sizes measured}}``, one pass over the table."""
    sizes: Dict[str, Dict[str, set]] = {}
    for gid, collective, size in table:
        sizes.setdefault(gid, {}).setdefault(collective, set()).add(size)
    return sizes


def _collectives_of(sizes_of: Mapping[str, Mapping[str, set]], ids: Sequence[str]) -> List[str]:
    found = {c for gid in ids for c in sizes_of.get(gid, {})}
    return [c for c in metrics.COLLECTIVES if c in found]


def _common_sizes(sizes_of: Mapping[str, Mapping[str, set]], ids: Sequence[str], collective: str) -> List[int]:
    per_group = [sizes_of.get(gid, {}).get(collective, set()) for gid in ids]
    return sorted(set.intersection(*per_group)) if per_group else []


RETEST_PEERS = 4  # healthy groups of a class re-tested beside its flagged ones, as reference


@attrs.frozen
class RetestTask:
    """Measure group ``group_id`` again at each ``(collective, size_bytes)`` of ``items``."""

    group_id: str
    items: Tuple[Tuple[str, int], ...]

    def to_json(self) -> Dict[str, object]:
        return {"group": self.group_id, "items": [list(i) for i in self.items]}


def plan_retest(findings: Sequence[Finding], catalog: Sequence[GroupUnderTest],
                peers: int = RETEST_PEERS) -> List[RetestTask]:
    """What to re-test to confirm the slow findings (wrong data needs no re-test).

    For each comparison class with a slow finding: its flagged groups and up to ``peers``
    unflagged groups of the class (the first ones, as reference), each at every flagged
    ``(collective, size)`` of the class. The executor runs the tasks one group at a time,
    round-robin, several times (see :mod:`.runner`): a group is re-tested *alone*, so
    neither its neighbours' traffic nor their placement on the machine can make it look slow.
    """
    by_id = {g.id: g for g in catalog}
    classes = comparison_classes(catalog)
    slow = [f for f in findings if f.metric != "wrong"]
    tasks: List[RetestTask] = []
    for key, groups in classes.items():
        mine = [f for f in slow if (by_id[f.group_id].kind, by_id[f.group_id].size) == key]
        if not mine:
            continue
        items = tuple(sorted({(f.collective, f.size_bytes) for f in mine},
                             key=lambda i: (metrics.COLLECTIVES.index(i[0]), i[1])))
        flagged = {f.group_id for f in mine}
        chosen = [g.id for g in groups if g.id in flagged] + [g.id for g in groups if g.id not in flagged][:peers]
        tasks.extend(RetestTask(gid, items) for gid in sorted(chosen, key=[g.id for g in groups].index))
    return tasks


def confirm(findings: Sequence[Finding], catalog: Sequence[GroupUnderTest], retest: Iterable[Measurement],
            rule: Thresholds) -> Tuple[List[Finding], List[Finding]]:
    """Split slow findings into (confirmed, transient) by the re-test figures.

    A finding is confirmed when the re-test flags the same group for the same collective,
    size and metric against the re-tested peers of its class (robust figures: the best
    operation). Wrong-data findings are always confirmed.
    """
    table = index_measurements(retest)
    confirmed, transient = [], []
    classes = comparison_classes(catalog)
    by_id = {g.id: g for g in catalog}
    for finding in findings:
        if finding.metric == "wrong":
            confirmed.append(finding)
            continue
        group = by_id[finding.group_id]
        ids = [g.id for g in classes[(group.kind, group.size)]]
        key = (finding.group_id, finding.collective, finding.size_bytes)
        if key not in table:
            transient.append(finding)
            continue
        value = _metric_value(table[key], finding.metric)
        if finding.metric == "floor":
            again = rule.min_busbw_gbps is not None and value < rule.min_busbw_gbps
        else:
            peers = [_metric_value(table[(gid, finding.collective, finding.size_bytes)], finding.metric)
                     for gid in ids if gid != finding.group_id
                     and (gid, finding.collective, finding.size_bytes) in table]
            again = worse_than_peers(value, peers, finding.metric != "latency", rule) is not None
        (confirmed if again else transient).append(finding)
    return confirmed, transient


def _metric_value(m: Measurement, metric: str) -> float:
    """What the re-test judges: the robust time (or the busbw made from it)."""
    return m.judged_time_s if metric == "latency" else m.judged_busbw
