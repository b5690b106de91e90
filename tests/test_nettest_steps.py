"""The pure parts of nettest's steps and failure path, without processes: records folded into
measurements, scan records paired into samples, repetitions merged, and what a hang says."""
from __future__ import annotations

import random
import statistics

from hypothesis import given, settings
from hypothesis import strategies as st

from pgroups.nettest import metrics
from pgroups.nettest.bench import GroupFailure
from pgroups.nettest.failure import hang_report
from pgroups.nettest.steps import aggregate_records, merge_record, scan_samples


def record(rank, group, collective, size, times, best=None, wrong=0, wrong_from=None):
    return {"rank": rank, "group": group, "collective": collective, "size": size, "count": size // 4,
            "times": list(times), "op_best": min(times) if best is None else best, "wrong": wrong,
            "wrong_from": dict(wrong_from or {})}


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31))
def test_aggregate_records_gives_one_measurement_per_group_collective_size_with_the_mean_over_ranks(seed):
    rng = random.Random(seed)
    groups = {f"g{i}": rng.randint(1, 4) for i in range(rng.randint(1, 3))}
    collectives = rng.sample(list(metrics.COLLECTIVES), rng.randint(1, 3))
    sizes = sorted(rng.sample([8, 64, 1024, 65536], rng.randint(1, 3)))
    per_rank = {}
    expected = {}
    rank = 0
    for gid, size_of in groups.items():
        for local in range(size_of):
            for collective in collectives:
                for size in sizes:
                    t = rng.uniform(1e-5, 1e-2)
                    per_rank.setdefault(rank, []).append(record(rank, gid, collective, size, [t]))
                    expected.setdefault((gid, collective, size), []).append(t)
            rank += 1
    collected = [per_rank.get(r, []) for r in range(rank)] + [None]   # a rank with nothing to say
    rng.shuffle(collected)
    got = aggregate_records(collected, groups)
    keys = [(m.group_id, m.collective, m.size_bytes) for m in got]
    assert keys == sorted(expected, key=lambda k: (k[0], metrics.COLLECTIVES.index(k[1]), k[2]))
    for m in got:
        times = expected[(m.group_id, m.collective, m.size_bytes)]
        assert m.group_size == groups[m.group_id]
        assert abs(m.time_s - statistics.fmean(times)) <= 1e-12 * max(times)


def test_merge_record_appends_times_and_combines_best_and_wrong_counts():
    mine = {}
    merge_record(mine, record(3, "g", "all_reduce", 64, [2.0], best=1.5, wrong=1, wrong_from={"4": 1}))
    merge_record(mine, record(3, "g", "all_reduce", 64, [1.0], best=0.9, wrong=2, wrong_from={"4": 1, "5": 1}))
    merge_record(mine, record(3, "g", "all_reduce", 128, [5.0]))
    merged = mine[("g", "all_reduce", 64)]
    assert merged["times"] == [2.0, 1.0] and merged["op_best"] == 0.9 and merged["wrong"] == 3
    assert merged["wrong_from"] == {"4": 2, "5": 1}
    assert mine[("g", "all_reduce", 128)]["times"] == [5.0]


def test_scan_samples_pair_both_ranks_records_and_leave_out_incomplete_pairs():
    def pair_records(rank, pair, seconds, wrong=0):
        return [dict(record(rank, "", "sendrecv", size, [seconds * size], wrong=wrong), pair=list(pair), label=label)
                for label, size in (("small", 1024), ("large", 1 << 20))]

    collected = [pair_records(0, (0, 1), 1e-9), pair_records(1, (0, 1), 3e-9, wrong=2),
                 pair_records(2, (2, 3), 1e-9)]   # rank 3 never reported
    samples = scan_samples(0, "inter", [(0, 1), (2, 3)], collected)
    assert [(s.a, s.b) for s in samples] == [(0, 1)]
    sample = samples[0]
    large_time = statistics.fmean([1e-9 * (1 << 20), 3e-9 * (1 << 20)])
    assert abs(sample.busbw_gbps - (1 << 20) / large_time / 1e9) < 1e-9   # send/recv of 2: busbw = algbw
    assert (sample.wrong_at_a, sample.wrong_at_b) == (0, 4)   # rank 1 received 2 wrong, twice (small, large)


def test_a_hang_names_the_group_and_each_peer_that_never_entered():
    failure = GroupFailure("Timed out waiting 30000ms for recv operation to complete")
    failure.__cause__ = TimeoutError("timed out")
    hosts = ["a", "a", "b", "b"]
    where = "sweep 1/1 nettest#0 all_reduce 1 MiB"
    report = hang_report("nettest#0", [0, 1, 2, 3], where, "all_reduce", 1 << 20, failure,
                         {1: where, 2: "sweep 1/1 (idle)", 3: where}, hosts, 30.0, 0)
    assert report["message"] == ("group nettest#0 (ranks [0, 1, 2, 3], hosts ['a', 'b']): all_reduce of 1 MiB "
                                 "did not complete within 30s; rank 2 (host b) never entered it "
                                 "(last at: sweep 1/1 (idle))")
    assert report["kind"] == "timeout" and report["never_entered"] == [
        {"rank": 2, "host": "b", "last_at": "sweep 1/1 (idle)"}]


def test_a_failure_at_issue_says_so_and_is_no_timeout():
    failure = GroupFailure("Connection closed by peer [10.0.0.2]:4242", phase="issue")
    report = hang_report("pair 0-3", [0, 3], "w", "sendrecv", 1024, failure, {3: "w"}, ["a", "a", "b", "b"], 30.0, 0)
    assert report["kind"] == "failure" and report["failed_at"] == "issue"
    assert "sendrecv of 1 KiB failed when issued (Connection closed by peer" in report["message"]
    assert report["never_entered"] == []
