"""The link scan (pure): schedules, and naming the slow host, link or rank on a synthetic network.

The synthetic network (pgroups.testing.nettest_network) gives every host, host pair and rank a
bandwidth factor, with lognormal noise and rare transient hiccups. Faults are injected at
random per seed and the expected culprits are derived from the injection alone: a slow host
is named as the host (as the link when there are only two hosts), a slow link as the link, a
slow rank as the rank — and nothing else is named. Injected faults are kept identifiable (no
two faults on one host; at most a quarter of the hosts slow, so healthy links remain to
compare with). Links between hosts are injected on links the round-robin part of the
schedule measures (at most four hosts: every link; more: each host's first three partners),
because a link nobody measures cannot be seen by any scan of fewer rounds than hosts.
"""
from __future__ import annotations

import math
import random
import re
from typing import List, Set, Tuple

import pytest

from pgroups.nettest.diagnosis import Thresholds
from pgroups.nettest.linkscan import (INTER, INTRA, LinkScan, circle_round, ring_rounds, round_robin_length,
                                      run_scan)
from pgroups.testing.nettest_network import SyntheticNetwork, host_names, ranks_of

RANKS_PER_HOST = 8
SEEDS = 200
# Seeds per host count where 200 would cost minutes: a seed draws the faults (how many: 0-4
# above 8 hosts, their kinds, factors and places) the same way at 64 and at 1,024 hosts, so the
# 200 seeds at 64 hosts cover those combinations; 1,024 hosts add scale only (the round-robin
# length, the rounds bound, no false culprit among 523,776 host pairs). That needs each kind of
# fault set once at that scale, so the seeds are chosen by what they inject at 1,024 hosts:
# 2 nothing, 15 one slow host (the four-round bound), 7 two slow hosts, 0 three slow links,
# 1 a slow rank, 6 hosts + a rank + a link. A 1,024-host seed costs about 1.6 CPU-s: the first
# 20 seeds cost 32 s and showed no kind these six lack.
SEEDS_AT = {1024: (2, 15, 7, 0, 1, 6)}
# With two hosts there is no second link to compare with: only the absolute floor can call
# the one link slow (healthy: 0.7 GB/s with 15% noise; faults: 5x-50x slower).
# The synthetic network's noise is lognormal with sigma 15 % (a loaded machine, and the two
# directions of a pair timed as one operation): a link factor must stand beyond it, and 1.3 is
# 1.75 sigma, so the scan is judged here with the factor 2 for links too. The 1.3 default is
# proved at the noise of the one-direction measurement (tests/test_nettest_sensitivity.py).
NOISY_RULE = Thresholds(link_slow_factor=2.0)
TWO_HOST_RULE = Thresholds(min_busbw_gbps=0.25, link_slow_factor=2.0)

Expected = Set[Tuple[str, Tuple[str, ...], Tuple[int, ...]]]


def inject(net: SyntheticNetwork, hosts: int, seed: int) -> Tuple[Expected, List[str]]:
    """Random faults on ``net``; returns the culprits the scan must name, and the fault kinds."""
    rng = random.Random(seed)
    names = net.hostnames
    all_hosts = list(dict.fromkeys(names))
    k = rng.randint(0, 1 if hosts <= 3 else 2 if hosts <= 8 else 4)
    base = min(3, round_robin_length(hosts))
    measured = [(all_hosts[i], all_hosts[j]) for r in range(base) for i, j in circle_round(hosts, r)]
    used: Set[str] = set()
    expected: Expected = set()
    kinds: List[str] = []
    slow_hosts = 0
    for _ in range(k):
        kind = rng.choice(["host", "link", "rank"])
        factor = rng.uniform(1 / 50, 1 / 5)
        free = [h for h in all_hosts if h not in used]
        if kind == "host" and hosts >= 3 and slow_hosts < max(1, hosts // 4) and free:
            host = rng.choice(free)
            used.add(host)
            slow_hosts += 1
            net.host_factor[host] = factor
            expected.add(("host", (host,), tuple(ranks_of(names, host))))
        elif kind in ("host", "link"):  # with two hosts a slow host is a slow link
            links = [p for p in measured if p[0] not in used and p[1] not in used]
            if not links:
                continue
            a, b = rng.choice(links)
            used.update((a, b))
            if hosts == 2 and kind == "host":
                net.host_factor[a] = factor
            else:
                net.slow_link(a, b, factor)
            expected.add(("link", (a, b), ()))
        elif free:
            host = rng.choice(free)
            used.add(host)
            rank = rng.choice(ranks_of(names, host))
            net.rank_factor[rank] = factor
            expected.add(("rank", (host,), (rank,)))
        else:
            continue
        kinds.append(kind)
    return expected, kinds


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("hosts", [2, 3, 4, 8, 64, 1024])
def test_every_injected_fault_is_named_and_nothing_else(hosts):
    names = host_names(hosts, RANKS_PER_HOST)
    rule = TWO_HOST_RULE if hosts == 2 else NOISY_RULE
    failures = []
    for seed in SEEDS_AT.get(hosts, range(SEEDS)):
        net = SyntheticNetwork(names, seed=seed)
        expected, kinds = inject(net, hosts, seed)
        scan = run_scan(LinkScan(names, rule), net.measure)
        culprits = scan.culprits()
        named = {(c.kind, c.hosts, c.ranks) for c in culprits}
        if named != expected:
            failures.append((seed, sorted(expected), [c.reason for c in culprits]))
            continue
        base = min(3, round_robin_length(hosts))
        if kinds == ["host"]:      # one slow host among N: named within four pair rounds
            assert scan.inter_rounds() <= 4, (seed, scan.inter_rounds())
        if kinds:                  # k faults: O(log k) rounds beyond the round-robin and two re-tests
            assert scan.inter_rounds() <= base + 2 + math.ceil(math.log2(len(kinds) + 1)), (seed, kinds)
        if hosts == 2:
            assert all("cannot be blamed on one end" in c.reason for c in culprits if c.kind == "link")
    assert not failures, failures[:3]


def test_the_1024_host_seeds_inject_each_kind_of_fault_set():
    """SEEDS_AT's 1,024-host seeds are chosen by what they inject (see SEEDS_AT): nothing, one
    slow host, two slow hosts, slow links only, a slow rank, and all three kinds together."""
    names = host_names(1024, RANKS_PER_HOST)
    drawn = [sorted(inject(SyntheticNetwork(names, seed=seed), 1024, seed)[1]) for seed in SEEDS_AT[1024]]
    assert [] in drawn and ["host"] in drawn and ["host", "host"] in drawn and ["rank"] in drawn
    assert any(set(kinds) == {"link"} for kinds in drawn)
    assert any(set(kinds) == {"host", "link", "rank"} for kinds in drawn)


def test_one_slow_host_among_three_is_named_with_the_figures_behind_it():
    # Three hosts, one of them 64x slower across (0.011 vs 0.7 GB/s): that host alone is named.
    names = host_names(3, 2)
    net = SyntheticNetwork(names, seed=1, noise_sigma=0.05, transient_p=0.0)
    net.host_factor["node0002"] = 0.011 / 0.7
    scan = run_scan(LinkScan(names), net.measure)
    [culprit] = scan.culprits()
    assert (culprit.kind, culprit.hosts, culprit.ranks) == ("host", ("node0002",), (4, 5))
    found = re.match(r"node0002: slow with every partner \(([0-9.]+) GB/s vs median ([0-9.]+) GB/s on 1 other links",
                     culprit.reason)
    assert found, culprit.reason
    assert float(found[1]) == pytest.approx(0.011, rel=0.15) and float(found[2]) == pytest.approx(0.7, rel=0.15)
    assert scan.inter_rounds() == 3   # the three links, one round each
    matrix = scan.to_json()["matrix"]
    assert set(matrix["node0002"]) == {"node0000", "node0001"}
    assert matrix["node0002"]["node0000"]["slow"] == [True]
    assert matrix["node0000"]["node0001"]["slow"] == [False]


def test_a_link_slow_only_between_two_of_four_hosts_is_named_as_the_link():
    names = host_names(4, 2)
    net = SyntheticNetwork(names, seed=3, transient_p=0.0)
    net.slow_link("node0001", "node0003", 0.05)
    scan = run_scan(LinkScan(names), net.measure)
    [culprit] = scan.culprits()
    assert (culprit.kind, culprit.hosts) == ("link", ("node0001", "node0003"))
    assert "both hosts are fast with other partners" in culprit.reason
    retests = [r for r in scan.rounds if r.kind == INTER and any("re-test" in w for w in r.why)]
    assert [r.host_pairs for r in retests] == [(("node0001", "node0003"), ("node0000", "node0002"))] * 2
    assert [r.why[1] for r in retests] == ["control node0000 - node0002"] * 2   # measured beside it


def test_with_two_hosts_a_slow_link_is_not_blamed_on_one_end():
    names = host_names(2, 4)
    net = SyntheticNetwork(names, seed=0, transient_p=0.0)
    net.host_factor["node0001"] = 0.02
    assert run_scan(LinkScan(names), net.measure).culprits() == []  # nothing to compare with
    scan = run_scan(LinkScan(names, TWO_HOST_RULE), SyntheticNetwork(names, seed=0, host_factor={"node0001": 0.02},
                                                                      transient_p=0.0).measure)
    [culprit] = scan.culprits()
    assert culprit.kind == "link" and culprit.hosts == ("node0000", "node0001")
    assert "with two hosts only it cannot be blamed on one end" in culprit.reason


SOCKET_CROSSING = {(3, 4): 0.3, (0, 7): 0.3}   # local ring pairs between ranks 0-3 and 4-7


@pytest.mark.parametrize("hosts", [3, 4, 16])
def test_a_topology_slower_on_every_host_is_healthy(hosts):
    # PCIe hosts whose socket-crossing pairs run at 0.3x of the others, the same on every host:
    # each intra-host pair is judged against the same local pair on the other hosts (three
    # hosts or more: with two, a pair slow on both may be a slow rank on each)
    names = host_names(hosts, RANKS_PER_HOST)
    for seed in range(20):
        net = SyntheticNetwork(names, seed=seed, local_pair_factor=dict(SOCKET_CROSSING))
        scan = run_scan(LinkScan(names, NOISY_RULE), net.measure)
        assert scan.culprits() == [], (seed, [c.reason for c in scan.culprits()])


def test_with_a_uniform_topology_a_slow_rank_is_still_named_and_only_it():
    names = host_names(4, RANKS_PER_HOST)
    for seed in range(20):
        net = SyntheticNetwork(names, seed=seed, local_pair_factor=dict(SOCKET_CROSSING))
        net.rank_factor[8 + 4] = 0.1   # host 1's local rank 4, at one end of a crossing pair
        scan = run_scan(LinkScan(names, NOISY_RULE), net.measure)
        assert [(c.kind, c.ranks) for c in scan.culprits()] == [("rank", (12,))], \
            (seed, [c.reason for c in scan.culprits()])


def test_a_slow_rank_is_named_as_the_rank_not_its_host():
    names = host_names(4, 4)
    net = SyntheticNetwork(names, seed=5, transient_p=0.0)
    net.rank_factor[6] = 0.05
    scan = run_scan(LinkScan(names), net.measure)
    [culprit] = scan.culprits()
    assert (culprit.kind, culprit.hosts, culprit.ranks) == ("rank", ("node0001",), (6,))
    scores = scan.rank_scores()
    assert scores[6] < 0.2 and min(v for r, v in scores.items() if r != 6) > 0.5


def test_suspects_are_re_paired_with_proven_healthy_hosts():
    names = host_names(16, 2)
    net = SyntheticNetwork(names, seed=2, transient_p=0.0)
    slow = {"node0003", "node0004"}   # partners in the first round-robin round? then both need new partners
    for host in slow:
        net.host_factor[host] = 0.05
    scan = run_scan(LinkScan(names), net.measure)
    assert {c.hosts[0] for c in scan.culprits()} == slow
    healthy_after_base = set()
    for r in scan.rounds:
        if r.kind == INTER and any("re-pair" in w for w in r.why):
            for (a, b), why in zip(r.host_pairs, r.why):
                suspect, partner = (a, b) if a in slow else (b, a)
                assert partner not in slow, why
                healthy_after_base.add(partner)


def test_corrupting_rank_is_named_from_wrong_data_at_its_partners():
    names = host_names(3, 4)
    net = SyntheticNetwork(names, seed=0, transient_p=0.0)
    scan = LinkScan(names)
    while (r := scan.next_round()) is not None:
        samples = net.measure(r)
        scan.record([s._replace(wrong_at_b=8) if s.a == 5 else s._replace(wrong_at_a=8) if s.b == 5 else s
                     for s in samples])
    assert [(c.kind, c.ranks) for c in scan.culprits()] == [("corrupting", (5,))]


def test_rank_zero_heartbeat_is_called_while_it_thinks():
    names = host_names(8, 2)
    calls = []
    scan = run_scan(LinkScan(names, tick=lambda: calls.append(1)), SyntheticNetwork(names).measure)
    assert len(calls) >= len(scan.rounds) + 2   # every round planned, every class judged


# ---- schedules --------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [2, 3, 4, 5, 8, 9, 16])
def test_round_robin_meets_every_pair_once_in_disjoint_rounds(count):
    seen = []
    for index in range(round_robin_length(count)):
        pairs = circle_round(count, index)
        members = [x for p in pairs for x in p]
        assert len(members) == len(set(members))
        assert len(pairs) == count // 2
        seen.extend(pairs)
    assert sorted(seen) == [(a, b) for a in range(count) for b in range(a + 1, count)]


@pytest.mark.parametrize("count", [2, 3, 4, 7, 8])
def test_ring_rounds_give_every_rank_both_neighbours(count):
    rounds = ring_rounds(count)
    for pairs in rounds:
        members = [x for p in pairs for x in p]
        assert len(members) == len(set(members))
    edges = {p for pairs in rounds for p in pairs}
    assert edges == {tuple(sorted((i, (i + 1) % count))) for i in range(count)}
    assert len(rounds) == (1 if count == 2 else 2 + count % 2)


def test_intra_rounds_pair_ranks_of_the_same_host_only():
    names = host_names(3, 4)
    scan = LinkScan(names)
    while (r := scan.next_round()) is not None:
        scan.record(SyntheticNetwork(names).measure(r))
        for a, b in r.rank_pairs:
            assert (names[a] == names[b]) == (r.kind == INTRA)
