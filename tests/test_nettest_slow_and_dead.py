"""``pgroups nettest`` with operations that take seconds, and with peers that are dead when an
operation is issued: real local gloo processes, the test-only fault hook (PGROUPS_NETTEST_FAULT).

- A link slowed to a *rate* (``slow:host=H,gbps=G``: every operation that leaves host H sleeps
  its bytes / G first) makes a 2 MiB operation take over two seconds. Waiting never destroys what
  it waits for (on gloo an expired ``wait(timeout)`` aborts the operation, so waits sliced into
  one-second pieces turned this into a timeout, exit 3): the operation completes, is measured,
  and the verdict names the slow host with its figure (exit 1).
- A peer that died before an operation is *issued* (gloo's ``batch_isend_irecv`` raises at once
  on the connection it closed) ends like one that dies while an operation is waited for: exit 3
  on every survivor, one line naming the missing ranks and their host, the report written —
  with ``--nproc`` and with a torchrun-style launch.
"""
from __future__ import annotations

import json
import time

import pytest

from pgroups import cli
from pgroups.hosts import local_hostname
from pgroups.nettest.hooks import FAULT_ENV
from pgroups.spawn import run_local

pytestmark = pytest.mark.multiprocess

MIB2 = 2 * 2**20
RATE_GBPS = 0.001          # 2 MiB at this rate: 2.1 s per operation that leaves the slow host


def sim_host(k: int) -> str:
    return f"{local_hostname()}-sim{k}"


def nettest(capsys, *args):
    code = cli.main(["nettest", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.timeout(240)
def test_an_operation_that_takes_seconds_completes_and_the_slow_host_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, f"slow:host={sim_host(2)},gbps={RATE_GBPS}")
    path = tmp_path / "slowlink.json"
    code, out, err = nettest(capsys, "--nproc", "6", "--simulate-hosts", "3", "-b", "2M", "-e", "2M",
                             "-n", "1", "-w", "0", "--timeout", "30", "--quiet", "--max-time", "220",
                             "--json", str(path))
    report = json.loads(path.read_text())
    assert code == 1, (out, err, report.get("timeout"))
    assert report["status"] == "unhealthy" and "timeout" not in report
    assert [(c["kind"], c["hosts"]) for c in report["culprits"]] == [("host", [sim_host(2)])]
    # The slow host's links were measured, at the emulated rate: each 2 MiB operation slept
    # 2 MiB / RATE first (a lower bound of its time), and took no more than twice that.
    slept_s = MIB2 / (RATE_GBPS * 1e9)
    matrix = report["links"]["matrix"]
    for other in (sim_host(0), sim_host(1)):
        for busbw in matrix[sim_host(2)][other]["busbw_gbps"]:
            assert MIB2 / (2 * slept_s) / 1e9 <= busbw <= 1.01 * MIB2 / slept_s / 1e9, (other, busbw)
    assert matrix[sim_host(0)][sim_host(1)]["slow"] == [False]
    # ...and so were the groups that cross into it: one operation of over two seconds each on
    # the rank that slept (its peers start their clocks when they issue, which may be after
    # it began sleeping: their times, and the mean, may be a little shorter)
    crossing = [m for m in report["measurements"] if m["group"].startswith("inter-node")]
    assert crossing and all(max(m["time_us_by_rank"].values()) >= slept_s * 1e6 for m in crossing)
    assert f"SLOW HOST: {sim_host(2)}" in out


DIE_AT_ISSUE = (f"die:host={sim_host(1)},after=2;"      # host 1's ranks exit inside their 3rd timed operation,
                f"slow:host={sim_host(0)},sleep_ms=1000")  # host 0's issue theirs a second later


@pytest.mark.timeout(180)
def test_a_peer_dead_when_an_operation_is_issued_gives_exit_3_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, DIE_AT_ISSUE)
    path = tmp_path / "dead.json"
    timeout_s = 5.0
    code, out, err = nettest(capsys, "--nproc", "4", "--simulate-hosts", "2", "-c", "sendrecv", "-e", "16K",
                             "-f", "4", "--timeout", str(timeout_s), "--quiet", "--max-time", "150",
                             "--json", str(path))
    assert code == 3, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("pgroups nettest: timeout: group nettest#0 ")
    assert "sendrecv of 8 B failed when issued" in lines[0]
    assert f"no answer from ranks [2, 3] (hosts {sim_host(1)})" in lines[0]
    report = json.loads(path.read_text())
    assert report["status"] == "timeout" and report["exit_code"] == 3
    assert report["timeout"]["failed_at"] == "issue"
    assert report["timeout"]["missing"] == [2, 3] and report["timeout"]["missing_hosts"] == [sim_host(1)]
    assert report["elapsed_s"] < timeout_s + 10


def as_torchrun_rank(argv):
    """A rank started torchrun-style (RANK, WORLD_SIZE, MASTER_* set by run_local): the CLI."""
    return cli.main(["nettest", *argv])


def torchrun_node_of(rank: int) -> dict:
    """What torchrun sets on two nodes of two ranks each (and the host each rank reports)."""
    return {"PGROUPS_HOSTNAME": sim_host(rank // 2), "GROUP_RANK": str(rank // 2), "LOCAL_RANK": str(rank % 2),
            "LOCAL_WORLD_SIZE": "2"}


@pytest.mark.timeout(180)
def test_torchrun_style_a_peer_dead_when_an_operation_is_issued_gives_exit_3_on_every_survivor(tmp_path):
    path = tmp_path / "dead.json"
    # long enough that no step before the injected death times out on a loaded machine (at 5 s,
    # load 12, rank 2 timed out before it reached its death: exit codes [3, 3, 3, -9])
    timeout_s = 10.0
    argv = ["-c", "sendrecv", "-e", "16K", "-f", "4", "--timeout", str(timeout_s), "--quiet", "--json", str(path)]
    started = time.monotonic()
    outcomes = run_local(4, as_torchrun_rank, (argv,), timeout_s=150, env={FAULT_ENV: DIE_AT_ISSUE},
                         env_per_rank=torchrun_node_of)
    wall = time.monotonic() - started
    assert [o.exitcode for o in outcomes] == [3, 3, 137, 137], [(o.exitcode, o.error) for o in outcomes]
    assert not any(o.timed_out for o in outcomes)
    report = json.loads(path.read_text())   # rank 0 wrote it before leaving
    assert report["status"] == "timeout" and report["exit_code"] == 3
    assert report["timeout"]["failed_at"] == "issue"
    assert report["timeout"]["missing"] == [2, 3] and report["timeout"]["missing_hosts"] == [sim_host(1)]
    assert report["elapsed_s"] < timeout_s + 10
    assert wall < 120
