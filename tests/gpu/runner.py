"""The GPU subset's runner (``tests/gpu/run.sh``) and its one skip rule.

``run.sh [--only one|multi|all] [--budget-s S] [--junit PATH] [-- PYTEST_ARGS...]`` runs
``pytest tests/gpu`` under a wall-clock budget (default 480 s) and prints a Markdown table — test,
result, seconds — that a README can quote, then one line of totals. Exit status: 0 when nothing
failed, 1 when a test failed or errored, 2 for bad arguments (one line, no traceback), 3 when the
budget ran out (the table then lists what finished).

Everything but :func:`main` is pure (no torch, no processes): ``tests/test_gpu_runner.py`` tests
it on a machine without a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import List, Optional, Sequence

import attrs

#: the most GPUs a multi-GPU test uses (one rank per GPU; 8 is one host)
MAX_GPUS = 8
#: the default wall-clock budget of one run of the subset
DEFAULT_BUDGET_S = 480.0
#: marker expressions for ``--only``
SELECTIONS = {"one": "not multi_gpu", "multi": "multi_gpu", "all": None}
USAGE = "run.sh [--only one|multi|all] [--budget-s SECONDS] [--junit PATH] [-- PYTEST_ARGS...]"


class UsageError(ValueError):
    """Bad arguments to run.sh: the message is the one line printed (exit 2)."""


def skip_reason(needed: int, visible: int, nccl: bool, cuda_build: bool, torch_version: str,
                cuda_visible_devices: Optional[str]) -> str:
    """Why a test that needs ``needed`` GPUs (one rank each) cannot run here, or ``""`` if it can.

    ``visible``: CUDA devices this process sees; ``nccl``: torch.distributed has NCCL;
    ``cuda_build``: torch was built with CUDA. The reason names what the test needs and what
    was found, e.g. ``needs 2-8 CUDA GPUs and NCCL (one rank per GPU); this machine has 1 visible``.
    """
    if needed < 1:
        raise ValueError(f"a GPU test needs at least 1 GPU, got {needed}")
    if visible >= needed and nccl:
        return ""
    wanted = "1 CUDA GPU" if needed == 1 else f"{needed}-{MAX_GPUS} CUDA GPUs"
    found = [f"this machine has {visible} visible"]
    if cuda_visible_devices is not None:
        found.append(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}")
    if not cuda_build:
        found.append(f"torch {torch_version} is a CPU-only build")
    elif not nccl:
        found.append(f"torch {torch_version} has no NCCL")
    return f"needs {wanted} and NCCL (one rank per GPU); " + ", ".join(found)


@attrs.frozen
class Options:
    """What run.sh was asked to do."""

    only: str = "all"
    budget_s: float = DEFAULT_BUDGET_S
    junit: Optional[str] = None
    pytest_args: Sequence[str] = ()


def parse_args(argv: Sequence[str]) -> Options:
    """run.sh's arguments as Options. Raises UsageError naming the bad argument and what is allowed."""
    only, budget, junit, rest = "all", DEFAULT_BUDGET_S, None, list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            return Options(only, budget, junit, tuple(rest))
        name, has_value, value = arg.partition("=")
        if name not in ("--only", "--budget-s", "--junit"):
            raise UsageError(f"unknown argument {arg!r}; usage: {USAGE}")
        if not has_value:
            if not rest:
                raise UsageError(f"{name} needs a value; usage: {USAGE}")
            value = rest.pop(0)
        if name == "--only":
            if value not in SELECTIONS:
                raise UsageError(f"--only {value!r}: expected one of {', '.join(SELECTIONS)}")
            only = value
        elif name == "--budget-s":
            try:
                budget = float(value)
            except ValueError:
                raise UsageError(f"--budget-s {value!r}: expected a number of seconds > 0") from None
            if not budget > 0 or budget == float("inf"):
                raise UsageError(f"--budget-s {value!r}: expected a number of seconds > 0")
        else:
            if not value:
                raise UsageError("--junit needs a file path")
            junit = value
    return Options(only, budget, junit, ())


def pytest_command(options: Options, python: str, folder: str, junit: str) -> List[str]:
    """The pytest command line for ``options``: the GPU folder, quiet, results to ``junit``."""
    command = [python, "-m", "pytest", folder, "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    selection = SELECTIONS[options.only]
    if selection is not None:
        command += ["-m", selection]
    return command + list(options.pytest_args)


@attrs.frozen
class Row:
    """One test's outcome: ``result`` is passed, failed, error or skipped; ``detail`` the skip
    reason or the first line of the failure."""

    test: str
    result: str
    seconds: float
    detail: str = ""


def rows_from_junit(xml_text: str) -> List[Row]:
    """One Row per ``<testcase>`` of a pytest JUnit XML report, in file order. The test is named
    ``file.py::name`` (pytest's classname minus the package path)."""
    rows = []
    for case in ElementTree.fromstring(xml_text).iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        test = f"{module}.py::{case.get('name', '?')}" if module else case.get("name", "?")
        result, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                result = {"failure": "failed"}.get(tag, tag)
                detail = _first_line(found.get("message") or found.text or "")
                break
        rows.append(Row(test, result, float(case.get("time", "0") or 0), detail))
    return rows


def _first_line(text: str) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line.removeprefix("Skipped: ")


def format_summary(rows: Sequence[Row], device: str, wall_s: float, budget_s: float, timed_out: bool) -> str:
    """The Markdown table (test | result | seconds) and a totals line naming ``device``, the wall
    time against the budget and, if it ran out, that the table is partial."""
    lines = ["| test | result | seconds |", "|---|---|---|"]
    for row in rows:
        result = f"{row.result}: {row.detail}" if row.detail else row.result
        lines.append(f"| `{row.test}` | {result.replace('|', '/')} | {row.seconds:.1f} |")
    words = {"passed": "passed", "failed": "failed", "error": "errored", "skipped": "skipped"}
    totals = ", ".join(f"{sum(r.result == kind for r in rows)} {word}" for kind, word in words.items())
    ending = f"; BUDGET RAN OUT after {budget_s:g} s: tests not listed did not finish" if timed_out else ""
    lines.append(f"\n{device}: {totals} in {wall_s:.1f} s (budget {budget_s:g} s){ending}")
    return "\n".join(lines)


def exit_code(rows: Sequence[Row], timed_out: bool) -> int:
    """3 if the budget ran out, 1 if a test failed or errored, else 0."""
    if timed_out:
        return 3
    return 1 if any(r.result in ("failed", "error") for r in rows) else 0


def describe_device() -> str:
    """``torch X, N x <GPU name>`` (or ``no CUDA GPU``) of this machine."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = torch.cuda.get_device_name(0) if count else "no CUDA GPU"
    return f"torch {torch.__version__}, {count} x {name}" if count else f"torch {torch.__version__}, {name}"


def main(argv: Sequence[str]) -> int:
    """Run the GPU subset as ``argv`` asks; print the summary; return the exit status."""
    try:
        options = parse_args(argv)
    except UsageError as exc:
        print(f"run.sh: error: {exc}", file=sys.stderr)
        return 2
    folder = os.path.dirname(os.path.abspath(__file__))
    junit = options.junit or os.path.join(tempfile.gettempdir(), f"pgroups-gpu-run-{os.getpid()}.xml")
    if os.path.exists(junit):
        os.remove(junit)
    command = pytest_command(options, sys.executable, folder, junit)
    start, timed_out = time.monotonic(), False
    proc = subprocess.Popen(command, cwd=os.path.dirname(os.path.dirname(folder)), start_new_session=True)
    try:
        proc.wait(timeout=options.budget_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, 9)   # pytest and the ranks it spawned: a session of their own
        proc.wait()
    wall_s = time.monotonic() - start
    rows = rows_from_junit(open(junit).read()) if os.path.exists(junit) else []
    print(format_summary(rows, describe_device(), wall_s, options.budget_s, timed_out))
    if not rows and not timed_out and proc.returncode not in (0, 5):
        return 1  # pytest itself failed before writing a report (collection error, bad option)
    return exit_code(rows, timed_out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
