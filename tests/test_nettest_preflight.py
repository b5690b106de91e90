"""The pre-flight report: configuration drift, compute against network, silent data corruption,
the abnormal lists and the Prometheus file — pure judgements against references built here,
then one process world with three faults at once (a drifted variable on one simulated host, a
slow matmul on another, a corrupted checksum on one rank)."""
from __future__ import annotations

import json
import random
import re
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgroups import cli
from pgroups.hosts import local_hostname
from pgroups.nettest.hooks import FAULT_ENV
from pgroups.nettest.preflight import abnormal, compute_findings, drift_findings
from pgroups.nettest.report import prometheus_text

BASE = {"torch": "2.13.0", "nccl": "2.27.3", "cuda": "12.8", "driver": "570.86", "gpu_model": "H100",
        "gpu_count": 8, "nics": ["ib0", "ib1"], "env": {"NCCL_IB_HCA": "mlx5_0", "GLOO_SOCKET_IFNAME": "eth0"}}


def cluster(hosts, per_host):
    return [f"h{r // per_host}" for r in range(hosts * per_host)]


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 12), st.integers(1, 4), st.integers(0, 2**31), st.booleans())
def test_the_odd_host_out_is_named_once_with_the_fact_and_both_values(hosts, per_host, seed, env_fact):
    rng = random.Random(seed)
    hostnames = cluster(hosts, per_host)
    odd = f"h{rng.randrange(hosts)}"
    facts = [json.loads(json.dumps(BASE)) for _ in hostnames]
    for rank, host in enumerate(hostnames):
        if host == odd:
            if env_fact:
                facts[rank]["env"]["NCCL_IB_HCA"] = "mlx5_1"
            else:
                facts[rank]["driver"] = "550.54"
    findings = drift_findings(facts, hostnames)
    assert [(f.kind, f.hosts, f.ranks) for f in findings] == [("drift", (odd,), ())]
    name, new, old = ("env NCCL_IB_HCA", "mlx5_1", "mlx5_0") if env_fact else ("driver", "550.54", "570.86")
    assert findings[0].reason == (f"configuration drift: host {odd} has {name} = {new!r}, "
                                  f"the {hosts - 1} other hosts {old!r}")


def test_no_drift_no_finding_and_an_even_split_blames_nobody():
    hostnames = cluster(4, 2)
    assert drift_findings([BASE] * 8, hostnames) == []
    split = [dict(BASE, cuda="12.4" if h in ("h1", "h3") else "12.8") for h in hostnames]
    [finding] = drift_findings(split, hostnames)
    assert finding.hosts == () and finding.ranks == ()
    assert finding.reason == "configuration drift with no majority: cuda is '12.8' on hosts h0, h2; '12.4' on hosts h1, h3"


def test_a_variable_set_on_one_rank_of_a_host_names_that_rank():
    hostnames = cluster(3, 4)
    facts = [json.loads(json.dumps(BASE)) for _ in hostnames]
    facts[6]["env"]["NCCL_DEBUG"] = "INFO"
    [finding] = drift_findings(facts, hostnames)
    assert (finding.hosts, finding.ranks) == ((), (6,))
    assert "inside host h1: env NCCL_DEBUG is 'INFO' on ranks [6], '(unset)' on its other ranks" in finding.reason


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 16), st.integers(1, 8), st.integers(0, 2**31))
def test_compute_names_the_slow_host_or_rank_and_the_corrupt_rank(hosts, per_host, seed):
    rng = random.Random(seed)
    hostnames = cluster(hosts, per_host)
    seconds = [rng.uniform(0.010, 0.012) for _ in hostnames]     # healthy: within 20% of each other
    sums = [-4785.0] * len(hostnames)
    assert compute_findings(seconds, sums, hostnames) == []
    slow_host = f"h{rng.randrange(hosts)}"
    bad_rank = rng.randrange(len(hostnames))
    slowed = [s * 3 if hostnames[r] == slow_host else s for r, s in enumerate(seconds)]
    sums[bad_rank] += 3.0
    found = {(f.kind, f.hosts, f.ranks) for f in compute_findings(slowed, sums, hostnames)}
    median = statistics.median(slowed)
    slow = {r for r, s in enumerate(slowed) if s > 1.5 * median}
    expected = {("corruption", (), (bad_rank,))} if len(hostnames) > 2 else {("corruption", (), ())}
    for host in sorted(set(hostnames)):
        mine = tuple(r for r, h in enumerate(hostnames) if h == host and r in slow)
        whole = mine and len(mine) == hostnames.count(host)
        if mine:
            expected.add(("compute-slow", (host,), ()) if whole else ("compute-slow", (), mine))
    assert found == expected


def test_one_slow_rank_of_a_host_is_named_as_a_rank_with_its_host():
    hostnames = cluster(2, 4)
    seconds = [0.01] * 8
    seconds[5] = 0.05
    [finding] = compute_findings(seconds, [1.0] * 8, hostnames)
    assert (finding.kind, finding.hosts, finding.ranks) == ("compute-slow", (), (5,))
    assert finding.reason == "compute-slow rank 5 (host h1): matmul 5.0x the median over ranks"


def test_abnormal_lists_every_named_host_and_rank_once_with_its_reasons():
    culprits = [{"kind": "host", "hosts": ["h2"], "ranks": [], "reason": "slow host h2"},
                {"kind": "rank", "hosts": ["h1"], "ranks": [3], "reason": "slow rank 3"},
                {"kind": "split", "hosts": ["h0", "h1"], "ranks": [], "reason": "hosts split"}]
    hostnames = cluster(3, 2)
    seconds = [0.01, 0.01, 0.01, 0.01, 0.05, 0.05]
    sums = [1.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    hosts, ranks = abnormal(culprits, compute_findings(seconds, sums, hostnames), ("rank",))
    assert [(h["host"], len(h["reasons"])) for h in hosts] == [("h2", 2)]
    assert [(r["rank"], r["reasons"][0].split()[0]) for r in ranks] == [(1, "silent"), (3, "slow")]


def test_the_prometheus_file_has_one_gauge_per_link_and_host_and_the_timestamp():
    report = {"summary": {"healthy": False}, "hostnames": ["a", "a", "b", "c"],
              "links": {"matrix": {"a": {"b": {"busbw_gbps": [0.5, 0.7]}, "c": {"busbw_gbps": [0.9]}},
                                   "b": {"a": {"busbw_gbps": [0.6]}}}},
              "abnormal_hosts": [{"host": "b", "reasons": ["x"]}]}
    text = prometheus_text(report, 1700000000.25)
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) pgroups_nettest_\w+ .+", line)
            continue
        name, value = line.rsplit(" ", 1)
        assert re.fullmatch(r'pgroups_nettest_\w+(\{(\w+="[^"]*",?)+\})?', name), line
        samples[name] = float(value)
    assert samples == {"pgroups_nettest_last_run_timestamp_seconds": 1700000000.25, "pgroups_nettest_healthy": 0,
                       'pgroups_nettest_link_busbw_gbps{host_a="a",host_b="b"}': 0.7,
                       'pgroups_nettest_link_busbw_gbps{host_a="a",host_b="c"}': 0.9,
                       'pgroups_nettest_host_healthy{host="a"}': 1, 'pgroups_nettest_host_healthy{host="b"}': 0,
                       'pgroups_nettest_host_healthy{host="c"}': 1}


def sim_host(k: int) -> str:
    return f"{local_hostname()}-sim{k}"


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_drift_compute_slow_and_corruption_are_named_in_one_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, f"drift:host={sim_host(2)},var=NCCL_IB_HCA;"
                                  f"slow-matmul:host={sim_host(1)},sleep_ms=300;bad-checksum:rank=0")
    path, prom = tmp_path / "pre.json", tmp_path / "nettest.prom"
    code = cli.main(["nettest", "--nproc", "6", "--simulate-hosts", "3", "-e", "64K", "-n", "2", "--quiet",
                     "--no-tables", "--timeout", "60", "--max-time", "280", "--json", str(path),
                     "--prometheus", str(prom)])
    out, err = capsys.readouterr()
    report = json.loads(path.read_text())
    assert code == 1, (out, err)
    lines = [line for line in out.splitlines() if line.startswith("PRE-FLIGHT: ")]
    assert lines == [
        f"PRE-FLIGHT: configuration drift: host {sim_host(2)} has env NCCL_IB_HCA = 'drifted', "
        f"the 2 other hosts '(unset)'",
        f"PRE-FLIGHT: silent data corruption on rank 0 (host {sim_host(0)}): its matmul checksum "
        f"{report['preflight']['checksums'][0]!r} differs from {report['preflight']['checksums'][1]!r} on the other ranks",
        lines[2]]
    assert lines[2].startswith(f"PRE-FLIGHT: compute-slow host {sim_host(1)}: its matmul takes ")
    # compute-slow, not network-slow: the link scan names nobody
    assert report["culprits"] == []
    assert [h["host"] for h in report["abnormal_hosts"]] == [sim_host(1), sim_host(2)]
    assert [r["rank"] for r in report["abnormal_ranks"]] == [0]
    assert report["summary"]["healthy"] is False
    text = prom.read_text()
    assert "pgroups_nettest_healthy 0" in text
    assert f'pgroups_nettest_host_healthy{{host="{sim_host(0)}"}} 1' in text
    assert f'pgroups_nettest_host_healthy{{host="{sim_host(1)}"}} 0' in text
    assert text.count("pgroups_nettest_link_busbw_gbps{") == 3


@pytest.mark.parametrize("flag", ["--json", "--plot", "--prometheus"])
def test_an_output_path_in_a_missing_folder_exits_2_before_anything_starts(flag, tmp_path, capsys):
    missing = tmp_path / "no-such-folder" / "out.file"
    code = cli.main(["nettest", "--nproc", "2", flag, str(missing)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and f"{flag} {missing}: the folder" in err and "does not exist" in err


def test_a_layout_that_does_not_fit_the_torchrun_world_exits_2_before_any_rank_meets(capsys, monkeypatch):
    # Under torchrun (RANK / WORLD_SIZE set): the layout is checked against WORLD_SIZE before
    # the rank runs at all (no rendezvous, no abort), one line, exit 2.
    import pgroups.nettest.cli as nettest_cli

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("the rank started although its layout cannot fit the world")

    monkeypatch.setattr(nettest_cli, "run_rank", must_not_run)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("MASTER_ADDR", "203.0.113.1")   # unreachable: any attempt to meet would hang
    monkeypatch.setenv("MASTER_PORT", "9")
    code = cli.main(["nettest", "config_examples/golden16.yaml", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "world_size(6) is not divisible by tensor(2) * pipeline(2) = 4" in err
