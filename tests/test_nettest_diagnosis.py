"""nettest diagnosis (pure): test groups and waves, the robust rule, re-tests, pair plans,
naming the ranks and hosts at fault, and the fault-injection hook's parser."""
from __future__ import annotations

import itertools

import math

import pytest

from pgroups.nettest import diagnosis as dx
from pgroups.testing.nettest_faults import ActiveFaults, Fault, parse_faults
from pgroups.nettest.groups import (INTER_NODE, INTRA_NODE, GroupUnderTest, build_catalog, duplicate_kinds,
                                    group_of_rank, host_rank_groups, plan_waves)

HOSTS_2x4 = ["a"] * 4 + ["b"] * 4


# ---- test groups ----------------------------------------------------------------------------
def test_host_groups_are_each_hosts_ranks_and_one_rank_per_host():
    groups = host_rank_groups(HOSTS_2x4)
    assert groups[INTRA_NODE] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups[INTER_NODE] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_host_groups_follow_reported_hosts_not_rank_arithmetic():
    names = ["x", "y", "x", "y", "z"]
    groups = host_rank_groups(names)
    assert groups[INTRA_NODE] == [[0, 2], [1, 3], [4]]
    assert groups[INTER_NODE] == [[0, 1, 4], [2, 3]]


def test_catalog_names_groups_drops_singletons_and_duplicate_layouts():
    modes = {"nettest": [[0, 1, 2, 3], [4, 5, 6, 7]], "tensor": [[0, 1], [2, 3], [4, 5], [6, 7]],
             "model": [[0, 1, 2, 3], [4, 5, 6, 7]], "zero1": [[i] for i in range(8)]}
    catalog = build_catalog(modes, HOSTS_2x4)
    kinds = [g.kind for g in catalog]
    assert "model" not in kinds and "zero1" not in kinds
    assert INTRA_NODE not in kinds  # same as the nettest blocks here
    assert [g.id for g in catalog if g.kind == INTER_NODE] == [f"{INTER_NODE}#{i}" for i in range(4)]
    assert catalog[0] == GroupUnderTest("nettest#0", "nettest", (0, 1, 2, 3), ("a",))
    assert next(g for g in catalog if g.id == "inter-node#3").hosts == ("a", "b")
    assert duplicate_kinds(modes) == {"model": "nettest"}


def test_catalog_without_host_groups():
    catalog = build_catalog({"nettest": [[0, 1], [2, 3]]}, ["h"] * 4, host_groups=False)
    assert [g.kind for g in catalog] == ["nettest", "nettest"]


def test_waves_hold_disjoint_groups_of_one_kind():
    catalog = build_catalog({"nettest": [[0, 1, 2, 3], [4, 5, 6, 7]], "data": [[0, 4], [1, 5], [2, 6], [3, 7]],
                             "global": [list(range(8))]}, HOSTS_2x4, host_groups=False)
    waves = plan_waves(catalog)
    assert [[g.id for g in w] for w in waves] == [["nettest#0", "nettest#1"],
                                                  ["data#0", "data#1", "data#2", "data#3"], ["global#0"]]
    for wave in waves:
        assert len({g.kind for g in wave}) == 1
        for g, h in itertools.combinations(wave, 2):
            assert not set(g.ranks) & set(h.ranks)
    assert group_of_rank(waves[1], 6).id == "data#2"


def test_overlapping_groups_of_one_kind_go_to_separate_waves():
    catalog = [GroupUnderTest("k#0", "k", (0, 1), ()), GroupUnderTest("k#1", "k", (1, 2), ()), GroupUnderTest("k#2", "k", (3, 4), ())]
    assert [[g.id for g in w] for w in plan_waves(catalog)] == [["k#0", "k#2"], ["k#1"]]
    assert group_of_rank(plan_waves(catalog)[1], 0) is None


# ---- the robust rule --------------------------------------------------------------------------
RULE = dx.Thresholds()


def test_rule_flags_a_clear_outlier_and_reports_how_far():
    dev = dx.worse_than_peers(1.0, [10.0, 11.0, 9.0, 10.5], higher_is_better=True, rule=RULE)
    middle = math.sqrt(10.0 * 10.5)  # even count: the median in log space is the geometric mean of the middle two
    assert dev is not None and dev.reference == pytest.approx(middle) and dev.ratio == pytest.approx(middle)


def test_rule_needs_both_the_factor_and_the_spread():
    # 4x worse than the median, but peers are all over the place: within 4 robust sigmas -> not flagged
    assert dx.worse_than_peers(1.0, [1.2, 2.2, 6.0, 9.0], True, RULE) is None
    # far beyond the spread but only 1.5x worse -> not flagged
    assert dx.worse_than_peers(10.0, [15.0, 15.0, 15.0], True, RULE) is None
    # latency: lower is better
    assert dx.worse_than_peers(30.0, [10.0, 10.0, 11.0], False, RULE) is not None
    assert dx.worse_than_peers(5.0, [10.0, 10.0, 11.0], False, RULE) is None


def test_with_fewer_than_three_peers_the_factor_doubles():
    assert dx.worse_than_peers(3.0, [1.0], False, RULE) is None       # 3x: not enough without a spread
    assert dx.worse_than_peers(4.5, [1.0, 1.1], False, RULE) is not None
    assert dx.worse_than_peers(3.0, [1.0, 1.0, 1.0], False, RULE) is not None  # spread known: 2x suffices


def test_rule_with_no_peers_flags_nothing():
    assert dx.worse_than_peers(0.001, [], True, RULE) is None


def test_outliers_leave_one_out_so_an_outlier_does_not_drag_its_own_reference():
    values = {"g0": 10.0, "g1": 1.0}  # two groups: the mean would hide nothing, the median is exact
    assert set(dx.outliers(values, True, RULE)) == {"g1"}
    assert dx.outliers({"g0": 10.0, "g1": 9.0, "g2": 10.5, "g3": 9.7}, True, RULE) == {}


def test_rule_thresholds_are_validated():
    with pytest.raises(ValueError, match="--slow-factor must be above 1"):
        dx.Thresholds(slow_factor=1.0)
    with pytest.raises(ValueError, match="--mad-k must not be negative"):
        dx.Thresholds(mad_k=-1)


# ---- group findings ----------------------------------------------------------------------------
def _m(gid, collective, size, time_s, n=4, wrong=0, wrong_from=(), robust=None):
    return dx.Measurement(gid, collective, size, n, size // 4, time_s, wrong=wrong,
                          wrong_from=tuple(wrong_from), robust_time_s=robust)


def _catalog(n_groups=4, size=4):
    return [GroupUnderTest(f"nettest#{i}", "nettest", tuple(range(i * size, (i + 1) * size)), (f"h{i}",))
            for i in range(n_groups)]


def _sweep(times_small, times_large, small=8, large=1 << 20):
    ms = []
    for i, (ts, tl) in enumerate(zip(times_small, times_large)):
        ms += [_m(f"nettest#{i}", "all_reduce", small, ts), _m(f"nettest#{i}", "all_reduce", large, tl)]
    return ms


def test_find_slow_flags_low_busbw_at_the_largest_size():
    findings = dx.find_slow(_catalog(), _sweep([1e-4] * 4, [1e-3, 1e-3, 5e-3, 1.1e-3]), RULE)
    assert [(f.group_id, f.metric, f.size_bytes) for f in findings] == [("nettest#2", "busbw", 1 << 20)]
    assert "5.0x below the median" in findings[0].detail


def test_find_slow_flags_high_latency_at_the_smallest_size():
    findings = dx.find_slow(_catalog(), _sweep([1e-4, 9e-4, 1e-4, 1.2e-4], [1e-3] * 4), RULE)
    assert [(f.group_id, f.metric, f.size_bytes) for f in findings] == [("nettest#1", "latency", 8)]


def test_healthy_jitter_is_not_flagged():
    findings = dx.find_slow(_catalog(), _sweep([1e-4, 1.3e-4, 0.9e-4, 1.6e-4], [1e-3, 1.4e-3, 1.1e-3, 0.8e-3]), RULE)
    assert findings == []


def test_groups_of_different_size_or_kind_are_not_compared():
    catalog = [GroupUnderTest("nettest#0", "nettest", (0, 1, 2, 3), ()), GroupUnderTest("nettest#1", "nettest", (4, 5), ()),
               GroupUnderTest("data#0", "data", (6, 7, 8, 9), ())]
    sweep = [_m("nettest#0", "all_reduce", 8, 1e-4), _m("nettest#0", "all_reduce", 1 << 20, 1e-3),
             _m("nettest#1", "all_reduce", 8, 1e-2, n=2), _m("nettest#1", "all_reduce", 1 << 20, 1, n=2),
             _m("data#0", "all_reduce", 8, 1e-2), _m("data#0", "all_reduce", 1 << 20, 1)]
    assert dx.find_slow(catalog, sweep, RULE) == []


def test_absolute_floor_flags_even_a_lone_group():
    catalog = _catalog(1)
    sweep = [_m("nettest#0", "all_reduce", 8, 1e-4), _m("nettest#0", "all_reduce", 10 ** 9, 10.0)]
    # busbw = 1e9 B / 10 s * 1.5 = 0.15 GB/s
    findings = dx.find_slow(catalog, sweep, dx.Thresholds(min_busbw_gbps=1.0))
    assert [(f.group_id, f.metric) for f in findings] == [("nettest#0", "floor")]
    assert dx.find_slow(catalog, sweep, dx.Thresholds(min_busbw_gbps=0.1)) == []


def test_find_wrong_reports_counts_and_sources():
    sweep = [_m("nettest#1", "all_gather", 64, 1e-4, wrong=6, wrong_from=[(5, 6)]),
             _m("nettest#1", "all_gather", 128, 1e-4, wrong=12, wrong_from=[(5, 12)]),
             _m("nettest#0", "all_gather", 64, 1e-4)]
    findings = dx.find_wrong(_catalog(2), sweep)
    assert len(findings) == 1 and findings[0].group_id == "nettest#1" and findings[0].value == 18
    assert "18 wrong elements at 2 sizes" in findings[0].detail and "rank(s) [5]" in findings[0].detail


def test_retest_plan_takes_flagged_groups_and_some_healthy_peers_of_their_class():
    findings = [dx.Finding("nettest#5", "nettest", "all_reduce", "busbw", 1 << 20, 0.1),
                dx.Finding("nettest#5", "nettest", "all_reduce", "latency", 8, 0.1),
                dx.Finding("nettest#3", "nettest", "all_reduce", "busbw", 1 << 20, 0.1),
                dx.Finding("nettest#1", "nettest", "all_gather", "wrong", 64, 6)]  # no re-test for wrong data
    tasks = dx.plan_retest(findings, _catalog(8), peers=2)
    items = (("all_reduce", 8), ("all_reduce", 1 << 20))
    assert tasks == [dx.RetestTask(gid, items) for gid in ("nettest#0", "nettest#1", "nettest#3", "nettest#5")]
    assert dx.plan_retest(findings[3:], _catalog(8)) == []


def test_confirm_keeps_repeated_findings_and_drops_transient_ones():
    catalog = _catalog()
    finding_2 = dx.Finding("nettest#2", "nettest", "all_reduce", "busbw", 1 << 20, 0.1)
    finding_1 = dx.Finding("nettest#1", "nettest", "all_reduce", "busbw", 1 << 20, 0.1)
    wrong = dx.Finding("nettest#0", "nettest", "all_reduce", "wrong", 8, 3)
    # re-test: best operations; group 2 still 5x slower, group 1 back to normal
    retest = [_m(f"nettest#{i}", "all_reduce", 1 << 20, 9e-3, robust=t) for i, t in
              enumerate([1e-3, 1.05e-3, 5e-3, 0.95e-3])]
    confirmed, transient = dx.confirm([finding_2, finding_1, wrong], catalog, retest, RULE)
    assert confirmed == [finding_2, wrong] and transient == [finding_1]


def test_aggregate_means_over_ranks_best_repetition_and_best_operation():
    records = [{"rank": 0, "collective": "all_reduce", "size": 64, "count": 16, "times": [3.0, 2.0],
                "op_best": 1.0, "wrong": 0, "wrong_from": {}},
               {"rank": 1, "collective": "all_reduce", "size": 64, "count": 16, "times": [5.0, 4.0],
                "op_best": 3.0, "wrong": 2, "wrong_from": {"1": 2}}]
    m = dx.aggregate("g", 2, records)
    assert m.time_s == 3.0 and m.robust_time_s == 2.0 and m.wrong == 2 and m.wrong_from == ((1, 2),)
    assert m.rank_times == ((0, 2.0), (1, 4.0))
    assert m.busbw == pytest.approx(64 / 3.0 / 1e9 * 1.0)
    with pytest.raises(ValueError, match="mix collectives or sizes"):
        dx.aggregate("g", 2, [records[0], {**records[1], "size": 128}])


# ---- fault injection hook ------------------------------------------------------------------
def test_fault_specs_parse():
    faults = parse_faults("slow:rank=3,sleep_ms=20; corrupt:host=node7;absent:rank=1")
    assert faults == (Fault("slow", 3, None, 20.0), Fault("corrupt", None, "node7"), Fault("absent", 1))
    assert parse_faults(None) == () and parse_faults("") == ()
    active = ActiveFaults.for_rank(faults, 3, "node7")
    assert active == ActiveFaults(sleep_s=0.02, host_sleep_s=0.0, corrupt=True, absent=False)
    assert ActiveFaults.for_rank(faults, 0, "node1") == ActiveFaults()
    assert ActiveFaults.for_rank(parse_faults("die:host=n2,after=3"), 5, "n2").die_after == 3
    assert ActiveFaults.for_rank(parse_faults("never-start:host=n2"), 5, "n2").never_starts


def test_a_slow_host_slows_only_traffic_that_leaves_it_and_a_slow_rank_everything(monkeypatch):
    slept = []
    monkeypatch.setattr("pgroups.testing.nettest_faults.time.sleep", slept.append)
    host = ActiveFaults.for_rank(parse_faults("slow:host=n2,sleep_ms=7"), 5, "n2")
    host.inside_timed_region(crosses_hosts=False)
    host.inside_timed_region(crosses_hosts=True)
    rank = ActiveFaults.for_rank(parse_faults("slow:rank=5,sleep_ms=3"), 5, "n2")
    rank.inside_timed_region(crosses_hosts=False)
    rank.inside_timed_region(crosses_hosts=True)
    assert slept == [0.007, 0.003, 0.003]


def test_a_fault_given_as_a_rate_sleeps_the_message_bytes_over_the_rate(monkeypatch):
    # the emulation of a shaped link: 2 MiB at 0.001 GB/s is 2.097152 s; small messages stay fast
    slept = []
    monkeypatch.setattr("pgroups.testing.nettest_faults.time.sleep", slept.append)
    host = ActiveFaults.for_rank(parse_faults("slow:host=n2,gbps=0.001"), 5, "n2")
    host.inside_timed_region(crosses_hosts=False, size_bytes=2 * 2**20)   # inside its host: not slowed
    host.inside_timed_region(crosses_hosts=True, size_bytes=2 * 2**20)
    host.inside_timed_region(crosses_hosts=True, size_bytes=8)
    rank = ActiveFaults.for_rank(parse_faults("slow:rank=5,gbps=0.5"), 5, "n2")
    rank.inside_timed_region(crosses_hosts=False, size_bytes=10**9)
    assert slept == pytest.approx([2 * 2**20 / 1e6, 8 / 1e6, 2.0])


@pytest.mark.parametrize("spec, message", [("melt:rank=1", "unknown fault 'melt'"),
                                           ("slow:rank=x", "rank and after must be integers"),
                                           ("slow:host=a,gbps=0", "gbps must be above 0"),
                                           ("slow:host=a,gbps=fast", "sleep_ms and gbps numbers"),
                                           ("slow:sleep_ms=5", "name exactly one of rank=R or host=H"),
                                           ("slow:rank=1,host=a", "name exactly one"),
                                           ("slow:rank=1,speed=2", "bad option 'speed=2'")])
def test_bad_fault_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_faults(spec)


def test_a_link_100x_slower_is_slow_even_when_healthy_links_spread_widely():
    # healthy bandwidths on a loaded machine (measured in an emulated-cluster run): spread so
    # widely that 4 robust sigmas of the values themselves exceed their median (an absolute
    # MAD could flag no bandwidth at all); in log space the spread is a factor
    healthy = [1.74, 1.94, 1.65, 0.98, 0.995, 1.10, 1.57]
    rule = dx.Thresholds()
    values = sorted(healthy)
    median = values[3]
    absolute_margin = rule.mad_k * 1.4826 * sorted(abs(v - median) for v in values)[3]
    assert absolute_margin > median   # the blind spot of the absolute rule
    logs = sorted(math.log(v) for v in healthy)
    log_margin = rule.mad_k * 1.4826 * sorted(abs(x - logs[3]) for x in logs)[3]
    assert dx.worse_than_peers(0.009, healthy, True, rule) is not None
    assert dx.worse_than_peers(median / math.exp(log_margin) * 0.99, healthy, True, rule) is not None
    assert dx.worse_than_peers(median / math.exp(log_margin) * 1.01, healthy, True, rule) is None
    assert dx.worse_than_peers(0.9, healthy, True, rule) is None   # within the healthy spread

