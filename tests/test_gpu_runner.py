"""tests/gpu/run.sh without a GPU: its arguments, the pytest command it builds, the summary table
it prints from pytest's JUnit report, its exit status, and the GPU tests' skip reasons."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpu.runner import (DEFAULT_BUDGET_S, Options, Row, UsageError, exit_code, format_summary, parse_args,
                        pytest_command, rows_from_junit, skip_reason)

RUNNER = Path(__file__).resolve().parent / "gpu" / "runner.py"

# A report as pytest 8 writes it (hand-written: one passed, one failed, one error, one skipped).
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="4" time="61.2">
<testcase classname="gpu.test_one_gpu_core" name="test_init_binds[auto]" time="12.345"/>
<testcase classname="gpu.test_one_gpu_core" name="test_margin" time="8.05">
  <failure message="AssertionError: waited 70.1 s&#10;second line">trace</failure></testcase>
<testcase classname="gpu.test_one_gpu_nettest" name="test_events" time="0.5">
  <error message="failed on setup with &quot;RuntimeError: x | y&quot;">trace</error></testcase>
<testcase classname="gpu.test_gpu_core" name="test_hung_peer" time="0.001">
  <skipped type="pytest.skip" message="needs 2-8 CUDA GPUs and NCCL (one rank per GPU); this machine has 1 visible">skip</skipped></testcase>
</testsuite></testsuites>"""


def test_defaults_and_every_argument_form():
    assert parse_args([]) == Options("all", DEFAULT_BUDGET_S, None, ())
    assert parse_args(["--only", "one", "--budget-s=90", "--junit", "r.xml", "--", "-x", "-k", "margin"]) == \
        Options("one", 90.0, "r.xml", ("-x", "-k", "margin"))
    assert parse_args(["--only=multi"]).only == "multi"


@pytest.mark.parametrize("argv, words", [
    (["--only", "two"], ["--only 'two'", "one, multi, all"]),
    (["--budget-s", "0"], ["--budget-s '0'", "> 0"]),
    (["--budget-s", "soon"], ["--budget-s 'soon'", "> 0"]),
    (["--budget-s", "nan"], ["--budget-s 'nan'"]),
    (["--junit"], ["--junit needs a value"]),
    (["-x"], ["unknown argument '-x'", "usage: run.sh"]),
])
def test_bad_arguments_name_what_was_wrong_and_what_is_allowed(argv, words):
    with pytest.raises(UsageError) as caught:
        parse_args(argv)
    assert all(w in str(caught.value) for w in words) and "\n" not in str(caught.value)


def test_bad_arguments_exit_2_with_one_line_and_no_traceback():
    done = subprocess.run([sys.executable, str(RUNNER), "--only", "two"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["run.sh: error: --only 'two': expected one of one, multi, all"]


def test_pytest_command_selects_by_marker_and_passes_extra_arguments():
    base = ["py", "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider", "--junitxml=j.xml"]
    assert pytest_command(Options(), "py", "tests/gpu", "j.xml") == base
    assert pytest_command(Options(only="one", pytest_args=("-x",)), "py", "tests/gpu", "j.xml") == \
        base + ["-m", "not multi_gpu", "-x"]
    assert pytest_command(Options(only="multi"), "py", "tests/gpu", "j.xml")[-2:] == ["-m", "multi_gpu"]


def test_rows_come_from_the_junit_report_in_its_order():
    assert rows_from_junit(JUNIT) == [
        Row("test_one_gpu_core.py::test_init_binds[auto]", "passed", 12.345),
        Row("test_one_gpu_core.py::test_margin", "failed", 8.05, "AssertionError: waited 70.1 s"),
        Row("test_one_gpu_nettest.py::test_events", "error", 0.5, 'failed on setup with "RuntimeError: x | y"'),
        Row("test_gpu_core.py::test_hung_peer", "skipped", 0.001,
            "needs 2-8 CUDA GPUs and NCCL (one rank per GPU); this machine has 1 visible"),
    ]


def test_summary_is_a_markdown_table_with_totals():
    text = format_summary(rows_from_junit(JUNIT), "torch 2.13.0, 1 x NVIDIA H100", 61.24, 480, timed_out=False)
    lines = text.splitlines()
    assert lines[:3] == ["| test | result | seconds |", "|---|---|---|",
                         "| `test_one_gpu_core.py::test_init_binds[auto]` | passed | 12.3 |"]
    assert lines[4] == "| `test_one_gpu_nettest.py::test_events` | error: failed on setup with \"RuntimeError: x / y\" | 0.5 |"
    assert all(line.count("|") == 4 for line in lines[:6])  # a '|' in a message cannot break the table
    assert lines[-1] == "torch 2.13.0, 1 x NVIDIA H100: 1 passed, 1 failed, 1 errored, 1 skipped in 61.2 s (budget 480 s)"


def test_a_run_past_its_budget_says_the_table_is_partial_and_exits_3():
    rows = rows_from_junit(JUNIT)[:1]
    assert format_summary(rows, "gpu", 480.2, 480, timed_out=True).endswith(
        "in 480.2 s (budget 480 s); BUDGET RAN OUT after 480 s: tests not listed did not finish")
    assert exit_code(rows, timed_out=True) == 3


def test_exit_status_is_1_for_a_failure_or_an_error_else_0():
    rows = rows_from_junit(JUNIT)
    assert exit_code(rows, False) == 1
    assert exit_code([r for r in rows if r.result != "failed"], False) == 1
    assert exit_code([r for r in rows if r.result in ("passed", "skipped")], False) == 0


@pytest.mark.parametrize("needed, visible, nccl, cuda_build, devices, expected", [
    (1, 1, True, True, None, ""),
    (2, 8, True, True, "0,1,2,3,4,5,6,7", ""),
    (2, 1, True, True, None, "needs 2-8 CUDA GPUs and NCCL (one rank per GPU); this machine has 1 visible"),
    (1, 0, False, False, None,
     "needs 1 CUDA GPU and NCCL (one rank per GPU); this machine has 0 visible, torch 2.13.0+cpu is a CPU-only build"),
    (1, 0, True, True, "",
     "needs 1 CUDA GPU and NCCL (one rank per GPU); this machine has 0 visible, CUDA_VISIBLE_DEVICES=''"),
    (1, 2, False, True, None,
     "needs 1 CUDA GPU and NCCL (one rank per GPU); this machine has 2 visible, torch 2.13.0+cpu has no NCCL"),
])
def test_skip_reasons_name_what_is_needed_and_what_was_found(needed, visible, nccl, cuda_build, devices, expected):
    assert skip_reason(needed, visible, nccl, cuda_build, "2.13.0+cpu", devices) == expected


def test_the_gpu_folder_is_collected_and_every_test_skips_with_its_reason_here():
    """Without a GPU: nothing in tests/gpu errors at collection; every test is skipped, with the
    reason for its own GPU count."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the GPU folder runs instead of skipping")
    done = subprocess.run([sys.executable, "-m", "pytest", str(RUNNER.parent), "-q", "-rs", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=300, cwd=RUNNER.parent.parent.parent)
    assert done.returncode == 0, done.stdout[-2000:]
    reasons = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert reasons and all("needs 1 CUDA GPU and NCCL" in r or "needs 2-8 CUDA GPUs and NCCL" in r for r in reasons)
    assert any("needs 1 CUDA GPU" in r for r in reasons) and any("needs 2-8 CUDA GPUs" in r for r in reasons)
    assert " passed" not in done.stdout and " error" not in done.stdout and " failed" not in done.stdout
