"""The core CLI's usage contract: bad input is one line and exit 2 before anything starts,
every argument has help text, ``--version``, progress lines on stderr that ``-q`` silences."""
from __future__ import annotations

import argparse
import importlib.metadata
import io
import math
import time

import pytest
import torch

import pgroups
import pgroups.spawn
from pgroups.cli import build_parser, main
from pgroups.progress import NullProgress, Progress, progress_for


def test_version_names_pgroups_and_the_installed_torch(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"pgroups {pgroups.__version__} (torch {torch.__version__})\n"
    assert pgroups.__version__ == importlib.metadata.version("pgroups")


def _arguments(parser: argparse.ArgumentParser, path=("pgroups",)):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _arguments(sub, path + (name,))
        elif not isinstance(action, argparse._HelpAction):
            yield " ".join(path), action


def test_every_argument_of_every_command_has_help_text():
    arguments = list(_arguments(build_parser()))
    commands = {command for command, _ in arguments}
    assert {"pgroups show", "pgroups validate", "pgroups run", "pgroups launch"} <= commands
    missing = [f"{command} {action.option_strings or action.dest}" for command, action in arguments
               if not (action.help or "").strip()]
    assert missing == []


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail the test if a command starts a process."""
    def refuse(*args, **kwargs):
        raise AssertionError("a process was started")
    monkeypatch.setattr(pgroups.spawn, "run_local", refuse)
    monkeypatch.setattr(pgroups.spawn, "launch_script", refuse)


@pytest.mark.parametrize("command", ["run", "nettest"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_timeout_that_is_not_a_positive_number_is_refused_alike_before_anything_starts(
        command, value, nothing_starts, capsys):
    """One rule (pgroups.cli.positive_seconds) for every command's --timeout."""
    assert main([command, "--nproc", "2", "--timeout", value]) == 2
    err = capsys.readouterr().err
    assert err == (f"pgroups {command}: error: --timeout must be positive, got {float(value):g} "
                   "(a finite number of seconds)\n")


def test_nettest_max_time_follows_the_same_rule(nothing_starts, capsys):
    assert main(["nettest", "--nproc", "2", "--max-time", "0"]) == 2
    assert capsys.readouterr().err == ("pgroups nettest: error: --max-time must be positive, got 0 "
                                       "(a finite number of seconds)\n")


@pytest.mark.parametrize("argv, needle", [
    (["launch", "--nproc", "0", "x.py"], "--nproc must be at least 1, got 0"),
    (["launch", "--nproc", "2", "no_such_script.py"], "script 'no_such_script.py' not found"),
    (["launch", "--nproc", "2"], "no script given: pgroups launch --nproc N SCRIPT [ARGS]"),
    (["run", "--nproc", "-3"], "--nproc must be at least 1, got -3"),
])
def test_launch_and_run_usage_errors_are_one_line_before_anything_starts(argv, needle, nothing_starts, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("yaml_text, key, suggestion", [
    ("nettest: 4\n", "nettest", "parallel.nettest"),                              # belongs under parallel:
    ("tensor: 2\nparallel: {pipeline: 2}\n", "tensor", "parallel.tensor"),
    ("models:\n  a: {tensr: 2, ranks: 0-3}\n", "models.a.tensr", "models.a.parallel.tensor"),  # a near miss
    ("paralel: {tensor: 2}\n", "paralel", "parallel"),                            # a top-level key's own near miss
    ("timeout: 30\n", "timeout", "timeout_s"),
])
def test_a_key_in_the_wrong_block_is_pointed_to_where_it_belongs(tmp_path, capsys, yaml_text, key, suggestion):
    path = tmp_path / "job.yaml"
    path.write_text(yaml_text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{path}: {key}: unknown key (did you mean {suggestion!r}?" in err, err


# ---- progress lines -----------------------------------------------------------------------------

def test_progress_lines_in_a_log_are_throttled_but_phase_changes_always_show():
    stream = io.StringIO()
    progress = Progress("pgroups demo", stream=stream, interval_s=3600.0)
    progress.update("phase one")
    progress.update("a tick inside the phase")     # younger than interval_s: dropped
    progress.update("phase two", force=True)
    lines = stream.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["phase one", "phase two"]
    assert all(line.startswith("[pgroups demo ") and "s] " in line for line in lines)


def test_progress_counts_from_the_commands_start():
    stream = io.StringIO()
    Progress("slow", stream=stream, started=time.monotonic() - 7200.0).update("still going")
    assert stream.getvalue().startswith("[slow 7200.") and stream.getvalue().endswith("s] still going\n")


def test_quiet_gives_a_display_that_says_nothing():
    assert isinstance(progress_for("pgroups run", quiet=True), NullProgress)
    assert isinstance(progress_for("pgroups run", quiet=False), Progress)


def test_validate_of_a_large_world_shows_progress_unless_quiet(tmp_path, capsys, monkeypatch):
    import pgroups.cli

    path = tmp_path / "job.yaml"
    path.write_text("parallel: {tensor: 2, pipeline: 2}\n")
    assert main(["validate", str(path), "-n", "16"]) == 0
    assert capsys.readouterr().err == ""                        # a small world: no lines
    monkeypatch.setattr(pgroups.cli, "VALIDATE_PROGRESS_WORLD", 16)  # as if 16 ranks took seconds
    assert main(["validate", str(path), "-n", "16"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1] for line in err] == [
        f"checking group creation of world 16 under strategy {s!r} ({i}/3)" for i, s in
        enumerate(["local", "split", "all"], start=1)]
    assert main(["validate", str(path), "-n", "16", "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_progress_clock_is_shared_with_child_processes():
    """``pgroups run`` hands its start (time.monotonic) to rank 0, which continues the clock:
    CLOCK_MONOTONIC is system-wide on Linux, so a reading in one process is comparable in another."""
    import subprocess
    import sys

    before = time.monotonic()
    child = float(subprocess.run([sys.executable, "-c", "import time; print(time.monotonic())"],
                                 capture_output=True, text=True, check=True).stdout)
    after = time.monotonic()
    assert before <= child <= after and math.isfinite(child)


def test_a_rank_status_reads_as_a_shell_reports_it():
    """``pgroups launch``'s exit code is the worst rank's status: a rank killed by signal N
    counts 128+N (SIGKILL: 137, a segfault: 139), as bash's ``$?`` shows it."""
    import signal

    from pgroups.spawn import exit_status

    assert [exit_status(code) for code in (0, 1, 7, 255)] == [0, 1, 7, 255]
    assert exit_status(-signal.SIGKILL) == 137 and exit_status(-signal.SIGSEGV) == 139
