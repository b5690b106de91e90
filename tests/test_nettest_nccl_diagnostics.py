"""NCCL's own diagnostics in the nettest (pgroups.nettest.nccl_diagnostics), the parts that run
without a GPU: when they run, how their report lines are kept from standard output without
taking anything from the user, and how those lines become findings that make the verdict
UNHEALTHY. The GPU path (a real NCCL >= 2.31 communicator printing its report) is in
tests/gpu/test_one_gpu_nettest.py and has not run here (no GPU)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pgroups.nettest import nccl_diagnostics as nd
from pgroups.nettest import preflight, verdict
from pgroups.nettest.report import format_summary


@pytest.mark.parametrize("enabled, nccl, version, env, runs, says", [
    (True, True, (2, 31, 0), {}, True, ""),
    (True, True, (2, 40, 3), {}, True, ""),
    (True, True, (3, 0, 0), {}, True, ""),
    (False, True, (2, 31, 0), {}, False, "--no-nccl-diagnostics"),
    (True, False, (2, 31, 0), {}, False, "gloo"),
    (True, True, (2, 27, 3), {}, False, "NCCL 2.27.3 has no built-in diagnostics"),
    (True, True, (2, 30, 9), {}, False, "2.31 or newer"),
    (True, True, None, {}, False, "unknown"),
    (True, True, (2, 31, 0), {"NCCL_RUN_DIAGNOSTICS": "0"}, False, "NCCL_RUN_DIAGNOSTICS=0"),
])
def test_they_run_only_when_asked_on_nccl_2_31_or_newer_and_not_turned_off(enabled, nccl, version, env, runs, says):
    decision = nd.decide(enabled, nccl, version, env)
    assert decision.run is runs
    assert says in decision.reason


def test_prepare_turns_them_on_without_overriding_the_user():
    environ: dict = {}
    nd.prepare(nd.Decision(True), environ)
    assert environ == {"NCCL_RUN_DIAGNOSTICS": "1"}
    environ = {"NCCL_RUN_DIAGNOSTICS": "2"}
    nd.prepare(nd.Decision(True), environ)
    assert environ == {"NCCL_RUN_DIAGNOSTICS": "2"}
    environ = {}
    nd.prepare(nd.Decision(False, "off"), environ)
    assert environ == {}


@pytest.mark.parametrize("given, expected", [
    ((2, 31, 1), (2, 31, 1)), ("2.27.3", (2, 27, 3)), (23101, (2, 31, 1)), (2708, (2, 7, 8)),
    ("-", None), ("", None)])
def test_versions_in_every_form_torch_reports_them(given, expected):
    assert nd.parse_version(given) == expected


TEE_CHILD = textwrap.dedent("""
    import os, sys, ctypes
    from pgroups.nettest.nccl_diagnostics import StdoutTee
    print("before", flush=True)
    tee = StdoutTee().start()
    print("python line")
    sys.stdout.flush()
    os.write(1, b"NCCL DIAG P2P check: 8 edges, 0 failed\\n")
    libc = ctypes.CDLL(None)
    libc.printf(b"NCCL DIAG NET check: edge 3->5 FAILED (4.1 GB/s, expected 40)\\n")
    libc.fflush(None)
    os.write(1, b"x" * 200000 + b"\\n")          # more than a pipe holds: the copy must keep up
    os.write(1, b"NCCL DIAG last line without newline")
    kept = tee.stop()
    print("after")
    print("KEPT", repr(kept))
""")


def test_the_tee_keeps_the_diag_lines_and_the_user_still_sees_every_byte():
    out = subprocess.run([sys.executable, "-c", TEE_CHILD], capture_output=True, timeout=60,
                         env={**os.environ, "PYTHONUNBUFFERED": "0"})
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    for seen in ("before", "python line", "NCCL DIAG P2P check", "edge 3->5 FAILED", "after",
                 "NCCL DIAG last line without newline"):
        assert seen in text
    assert "x" * 200000 in text
    kept = eval(text.split("KEPT ", 1)[1])
    assert kept == ["NCCL DIAG P2P check: 8 edges, 0 failed",
                    "NCCL DIAG NET check: edge 3->5 FAILED (4.1 GB/s, expected 40)",
                    "NCCL DIAG last line without newline"]


def test_a_tee_never_started_stops_with_nothing():
    assert nd.StdoutTee().stop() == []


HOSTS = ["n0", "n0", "n1", "n1"]


def test_failed_checks_are_findings_naming_rank_and_host_and_passes_are_not():
    records = [
        {"ran": True, "reason": "", "lines": ["NCCL DIAG P2P: all 1 edges passed"]},
        {"ran": True, "reason": "", "lines": ["NCCL DIAG P2P: all 1 edges passed"]},
        {"ran": True, "reason": "", "lines": ["NCCL DIAG NET: edge to rank 1 failed: 2.0 GB/s"]},
        None,
    ]
    findings, part = nd.judge(records, HOSTS)
    assert [(f.kind, f.ranks, f.hosts) for f in findings] == [("nccl-diagnostics", (2,), ())]
    assert "rank 2 (host n1)" in findings[0].reason and "edge to rank 1 failed" in findings[0].reason
    body = part["nccl_diagnostics"]
    assert body["ran_on"] == [0, 1, 2]
    assert body["not_run"] == [{"reason": "this rank sent no record", "ranks": [3]}]
    assert body["reports"]["2"] == ["NCCL DIAG NET: edge to rank 1 failed: 2.0 GB/s"]


def test_words_of_failure_are_matched_as_words():
    lines = ["NCCL DIAG config MISMATCH on NCCL_IB_HCA", "NCCL DIAG peer unreachable",
             "NCCL DIAG timed out waiting for peer", "NCCL DIAG errors: 3", "NCCL DIAG 0 failures",
             "NCCL DIAG failover path selected", "NCCL DIAG terrorist", "NCCL DIAG passed"]
    findings, _ = nd.judge([{"ran": True, "lines": lines}], ["h"])
    assert [f.reason.split(": ", 1)[1] for f in findings] == lines[:4]


def test_a_finding_makes_the_verdict_unhealthy_and_names_the_rank_for_the_scheduler():
    records = [{"ran": True, "lines": []}, {"ran": True, "lines": ["NCCL DIAG NET: check FAILED"]},
               {"ran": False, "reason": "NCCL 2.27.3 has no built-in diagnostics", "lines": []},
               {"ran": True, "lines": []}]
    findings, part = nd.judge(records, HOSTS)
    summary = verdict.summarize([], [], [], {}, HOSTS, (), [f.reason for f in findings])
    assert summary["summary"]["healthy"] is False and summary["exit_code"] == 1
    hosts, ranks = preflight.abnormal([], findings, verdict.RANK_CULPRITS)
    assert hosts == [] and [r["rank"] for r in ranks] == [1]
    text = format_summary({**summary, **part})
    assert "NCCL DIAGNOSTICS: NCCL diagnostics on rank 1 (host n0): NCCL DIAG NET: check FAILED" in text
    assert "not run on ranks [2]" in text and "2.27.3" in text
    healthy, _ = nd.judge([{"ran": True, "lines": ["NCCL DIAG all checks passed"]}] * 4, HOSTS)
    assert healthy == []
