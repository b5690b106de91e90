"""The verdict of the link scan over random fault sets on the synthetic network (pure, no processes).

The synthetic network (pgroups.testing.nettest_network: lognormal noise, rare transient hiccups) gets
faults drawn by hypothesis — k slow hosts for k up to half the hosts, slow links, slow ranks,
mixed — at 2 to 64 hosts x 8 ranks, and explicit mixed cases at 1024 hosts. What the scan must name is derived from the injection
alone, never from the scan's output:

- a slow host is named as the host; a slow link as the link; a slow rank as the rank; with two
  hosts, a slow host or link is the one link (only the --min-busbw floor can call it slow);
- when the healthy hosts are two among four (two slow hosts of four), the one
  fast link cannot prove its rate healthy without a floor: the verdict is the one-line split
  into speed classes, the healthy two first — and with ``--min-busbw`` the two slow hosts are
  named;
- nothing else is named, and the summary is HEALTHY iff nothing is flagged anywhere (no culprit,
  no host link slow every time it was measured): so never HEALTHY with a fault present.

Faults are kept identifiable: one fault per host; slow links join hosts that are not slow, and
every healthy host keeps a fast link to another healthy host among the pairs the round-robin
measures (else slow hosts and slow links together cover every link it was measured on, and it
looks exactly like a slow host: the scan does not explore further to tell them apart).
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Dict, List, Set, Tuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pgroups.nettest.diagnosis import Thresholds
from pgroups.nettest.linkscan import LinkScan, circle_round, round_robin_length, run_scan
from pgroups.testing.nettest_network import SyntheticNetwork, host_names, ranks_of
from pgroups.nettest.verdict import summarize

RANKS_PER_HOST = 8
# Hypothesis draws the combinations (how many slow hosts, links and ranks, where the seed puts
# them) at 2 to 64 hosts: the combinations do not depend on the host count, and 64 hosts already
# give a round-robin of 63 rounds, slow hosts up to 32 and slow links among 2,016 pairs. 1,024
# hosts add scale only, shown by the explicit mixed examples below (slow hosts + a slow link + slow
# ranks; slow hosts + a slow rank) and by test_k_slow_hosts_among_1024_are_named (k up to 512).
# Drawn uniformly, 1,024 took about 1 example in 8 at 1.5 to more than 90 CPU-seconds each (the link
# search over 523,776 pairs), for no combination that 64 hosts lack.
HOST_COUNTS = (2, 3, 4, 5, 8, 16, 64)
# The synthetic network's noise is lognormal with sigma 15 % (a loaded machine, and the two
# directions of a pair timed as one operation): a link factor must stand beyond it, and 1.3 is
# 1.75 sigma, so the scan is judged here with the factor 2 for links too. The 1.3 default is
# proved at the noise of the one-direction measurement (tests/test_nettest_sensitivity.py).
NOISY_RULE = Thresholds(link_slow_factor=2.0)
TWO_HOST_RULE = Thresholds(min_busbw_gbps=0.25, link_slow_factor=2.0)   # healthy 0.7 GB/s +-15 %; faults 5x-50x slower
FLOOR_RULE = Thresholds(min_busbw_gbps=0.25, link_slow_factor=2.0)
# Faults 6.5x to 50x slower: beyond the 4x a class with fewer than three healthy links needs
# (the factor doubles), times three sigmas of the 15 % noise. At 5x a slow host among three
# was sometimes named as a link (one healthy link as reference, one noisy measurement under 4x).
FACTORS = (1 / 50, 1 / 6.5)
Named = Set[Tuple[str, Tuple[str, ...], Tuple[int, ...]]]


class Faults:
    """One fault set: slow hosts (host -> factor), slow links ((a, b) -> factor), slow ranks."""

    def __init__(self, hosts: int, slow_hosts: Dict[str, float], slow_links: Dict[Tuple[str, str], float],
                 slow_ranks: Dict[int, float], seed: int) -> None:
        self.names = host_names(hosts, RANKS_PER_HOST)
        self.hosts = list(dict.fromkeys(self.names))
        self.slow_hosts, self.slow_links, self.slow_ranks, self.seed = slow_hosts, slow_links, slow_ranks, seed

    def __repr__(self) -> str:
        return (f"Faults(hosts={len(self.hosts)}, slow_hosts={self.slow_hosts}, slow_links={self.slow_links}, "
                f"slow_ranks={self.slow_ranks}, seed={self.seed})")

    @property
    def any(self) -> bool:
        return bool(self.slow_hosts or self.slow_links or self.slow_ranks)

    @property
    def healthy_hosts(self) -> List[str]:
        return [h for h in self.hosts if h not in self.slow_hosts]

    def split_expected(self, rule: Thresholds) -> bool:
        """Two healthy hosts among four or more, slow hosts beside them, no floor."""
        healthy = len(self.healthy_hosts)
        return (len(self.hosts) > 2 and bool(self.slow_hosts) and healthy < 3 and 2 * healthy <= len(self.hosts)
                and rule.min_busbw_gbps is None)

    def expected(self, rule: Thresholds) -> Named:
        if len(self.hosts) == 2 and (self.slow_hosts or self.slow_links):
            named: Named = {("link", tuple(self.hosts), ())}
        elif self.split_expected(rule):
            named = set()
        else:
            named = {("host", (h,), tuple(ranks_of(self.names, h))) for h in self.slow_hosts}
            named |= {("link", link, ()) for link in self.slow_links}
        named |= {("rank", (self.names[r],), (r,)) for r in self.slow_ranks}
        return named

    def network(self) -> SyntheticNetwork:
        net = SyntheticNetwork(self.names, seed=self.seed)
        net.host_factor.update(self.slow_hosts)
        for (a, b), factor in self.slow_links.items():
            net.slow_link(a, b, factor)
        net.rank_factor.update(self.slow_ranks)
        return net


@st.composite
def fault_sets(draw) -> Faults:
    """Hypothesis draws the size, the number of each kind of fault and a seed; the seed places
    them (cheap to draw and to shrink at 1024 hosts)."""
    hosts = draw(st.sampled_from(HOST_COUNTS))
    k = draw(st.integers(0, hosts // 2))
    links_wanted = draw(st.integers(0, 2))
    ranks_wanted = draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**16))
    return place_faults(hosts, k, links_wanted, ranks_wanted, seed)


def place_faults(hosts: int, k: int, links_wanted: int, ranks_wanted: int, seed: int) -> Faults:
    """k slow hosts, up to ``links_wanted`` slow links and ``ranks_wanted`` slow ranks, placed
    by ``seed`` (factors in FACTORS), kept identifiable (see the module docstring)."""
    rng = random.Random(seed)
    names = host_names(hosts, RANKS_PER_HOST)
    all_hosts = list(dict.fromkeys(names))
    slow_hosts = {h: rng.uniform(*FACTORS) for h in rng.sample(all_hosts, k)}
    used = set(slow_hosts)
    healthy = [h for h in all_hosts if h not in used]
    # links the round-robin part of the scan measures (a link nobody measures cannot be seen)
    base = min(3, round_robin_length(hosts))
    measured = [(all_hosts[i], all_hosts[j]) for r in range(base) for i, j in circle_round(hosts, r)]
    if hosts == 2:
        candidates = [] if slow_hosts else measured
    else:
        candidates = [p for p in measured if p[0] in healthy and p[1] in healthy]
    slow_links: Dict[Tuple[str, str], float] = {}
    copies = Counter(measured)
    for _ in range(links_wanted):
        fast = _fast_partners(measured, healthy, slow_links)
        every_healthy_host_has_one = all(fast[h] > 0 for h in healthy)
        free = [p for p in candidates if p[0] not in used and p[1] not in used
                and (hosts == 2 or (every_healthy_host_has_one
                                    and fast[p[0]] > copies[p] and fast[p[1]] > copies[p]))]
        if not free:
            break
        a, b = rng.choice(free)
        used.update((a, b))
        slow_links[(a, b)] = rng.uniform(*FACTORS)
    free_hosts = [h for h in all_hosts if h not in used]
    slow_ranks = {rng.choice(ranks_of(names, h)): rng.uniform(*FACTORS)
                  for h in rng.sample(free_hosts, min(ranks_wanted, len(free_hosts)))}
    return Faults(hosts, slow_hosts, slow_links, slow_ranks, seed)


def _fast_partners(measured: List[Tuple[str, str]], healthy: List[str],
                   slow_links: Dict[Tuple[str, str], float]) -> Counter:
    """For each healthy host, how many of the round-robin's measured pairs give it a fast link to
    another healthy host (pairs counted as often as they are measured).

    A slow link p keeps every healthy host a fast partner iff each host has one now and both
    ends of p keep one after p's measurements turn slow: more than ``copies[p]`` each (else the
    slow hosts and the slow links together cover every link the host was measured on, and it
    looks exactly like a slow host). Counting makes the placement linear in the pairs; checking
    every host against every pair per candidate cost 40 CPU-seconds for the 1,024-host examples,
    paid at import (collection) by every test process.
    """
    healthy_hosts = set(healthy)
    fast: Counter = Counter()
    for a, b in measured:
        if (a, b) not in slow_links and a in healthy_hosts and b in healthy_hosts:
            fast[a] += 1
            fast[b] += 1
    return fast


def flagged_anywhere(report: dict) -> List[str]:
    """Everything the report flags, re-derived from its JSON: culprits, groups not ok, and host
    links of the matrix that were slow every time they were measured."""
    found = [f"culprit {c['kind']} {c['hosts']}" for c in report["culprits"]]
    found += [f"group {g}" for g, v in report["verdicts"].items() if v != "ok"]
    for a, row in report["links"]["matrix"].items():
        for b, cell in row.items():
            if cell["slow"] and all(cell["slow"]):
                found.append(f"link {a}-{b}")
    return found


def scan_verdict(faults: Faults, rule: Thresholds) -> Tuple[LinkScan, dict]:
    scan = run_scan(LinkScan(faults.names, rule), faults.network().measure)
    links = scan.to_json()
    report = {"links": links, **summarize([], [], scan.culprits(), links["matrix"], faults.names)}
    return scan, report


def check(faults: Faults, rule: Thresholds) -> None:
    scan, report = scan_verdict(faults, rule)
    flags = flagged_anywhere(report)
    assert report["summary"]["healthy"] == (not flags), (faults, flags)
    if faults.any:
        assert not report["summary"]["healthy"], faults
    culprits = scan.culprits()
    named = {(c.kind, c.hosts, c.ranks) for c in culprits if c.kind != "split"}
    assert named == faults.expected(rule), (faults, [c.reason for c in culprits])
    splits = [c for c in culprits if c.kind == "split"]
    if faults.split_expected(rule):
        assert len(splits) == 1, (faults, [c.reason for c in culprits])
        fast = sorted(faults.healthy_hosts)
        assert list(splits[0].hosts[:len(fast)]) == fast and set(splits[0].hosts[len(fast):]) == set(faults.slow_hosts)
        assert splits[0].reason.startswith("hosts split into ")
    else:
        assert not splits, (faults, splits[0].reason)


def rule_for(faults: Faults) -> Thresholds:
    return TWO_HOST_RULE if len(faults.hosts) == 2 else NOISY_RULE


@pytest.mark.timeout(900)
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(fault_sets())
@example(Faults(4, {"node0001": 1 / 60, "node0003": 1 / 60}, {}, {}, 0))   # two slow hosts of four
@example(place_faults(1024, k=24, links_wanted=1, ranks_wanted=2, seed=0))   # hosts, a link, ranks at scale
@example(place_faults(1024, k=11, links_wanted=0, ranks_wanted=1, seed=4167))  # hosts and a rank at scale
def test_every_fault_is_named_nothing_else_and_healthy_iff_nothing_flagged(faults):
    check(faults, rule_for(faults))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("hosts", [3, 4, 5, 8, 16, 64])
def test_k_slow_hosts_are_named_for_every_k_up_to_half_the_hosts(hosts):
    for k in range(1, hosts // 2 + 1):
        for seed in range(3):
            check(_slow_hosts_only(hosts, k, seed), NOISY_RULE)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("k", [1, 2, 3, 16, 128, 511, 512])
def test_k_slow_hosts_among_1024_are_named(k):
    check(_slow_hosts_only(1024, k, seed=k), NOISY_RULE)


def test_two_slow_hosts_of_four_are_named_when_a_floor_proves_the_fast_pair_healthy():
    check(_slow_hosts_only(4, 2, seed=5), FLOOR_RULE)


def test_two_slow_hosts_of_four_without_a_floor_give_the_one_line_split():
    faults = Faults(4, {"node0001": 0.013 / 0.7, "node0003": 0.013 / 0.7}, {}, {}, 3)
    scan, report = scan_verdict(faults, NOISY_RULE)
    assert report["exit_code"] == 1 and not report["summary"]["healthy"]
    [split] = report["culprits"]
    assert split["kind"] == "split"
    text = split["reason"]
    assert text.startswith("hosts split into two speed classes: {node0000, node0002} at 0.")
    assert ", {node0001, node0003} at 0.01" in text and "none is proven healthy" in text


def _slow_hosts_only(hosts: int, k: int, seed: int) -> Faults:
    """k slow hosts spread over the cluster (every (hosts // k)-th, shifted by the seed)."""
    names = list(dict.fromkeys(host_names(hosts, RANKS_PER_HOST)))
    step = hosts // k
    chosen = [names[(i * step + seed) % hosts] for i in range(k)]
    factors = [FACTORS[0] + (FACTORS[1] - FACTORS[0]) * ((i * 7 + seed) % 10) / 9 for i in range(k)]
    return Faults(hosts, dict(zip(chosen, factors)), {}, {}, seed)
