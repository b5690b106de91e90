"""The local launcher never leaves a child behind: whatever ends the parent's run_local — an
interrupt (Ctrl-C), an exception, or the parent process being killed — every child is gone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def sleeper(folder: str) -> None:
    """A child that records its pid, then waits far longer than any test (a hung collective)."""
    Path(folder, f"{os.getpid()}.pid").write_text("")
    time.sleep(600)


PARENT = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises here even if our launcher ignores it
sys.path.insert(0, {tests!r})
from pgroups.spawn import run_local
from test_spawn import sleeper
run_local(3, sleeper, ({folder!r},))
"""


def _child_pids(folder: Path, count: int, limit_s: float = 120) -> list:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        pids = [int(p.stem) for p in folder.glob("*.pid")]
        if len(pids) == count:
            return pids
        time.sleep(0.2)
    raise AssertionError(f"only {len(list(folder.glob('*.pid')))} of {count} children started")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie is dead (its parent exited before reaping it)


def _run_parent_then(tmp_path: Path, stop) -> list:
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(tests=str(HERE), folder=str(tmp_path))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pids = _child_pids(tmp_path, 3)
        stop(parent)
        parent.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        return [p for p in pids if _alive(p)]
    finally:
        parent.kill()
        for pid in (int(p.stem) for p in tmp_path.glob("*.pid")):  # never leave our own children behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_interrupting_the_parent_leaves_no_child(tmp_path):
    assert _run_parent_then(tmp_path, lambda p: p.send_signal(signal.SIGINT)) == []


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_killing_the_parent_outright_leaves_no_child(tmp_path):
    assert _run_parent_then(tmp_path, lambda p: p.send_signal(signal.SIGKILL)) == []



@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_an_error_while_starting_children_kills_those_started(tmp_path):
    from pgroups.spawn import run_local

    def env_per_rank(rank):
        if rank == 2:
            _child_pids(tmp_path, 2)  # the first two are running
            raise RuntimeError("env_per_rank failed for rank 2")
        return {}

    with pytest.raises(RuntimeError, match="failed for rank 2"):
        run_local(3, sleeper, (str(tmp_path),), env_per_rank=env_per_rank)
    pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2 and not any(_alive(p) for p in pids)


def intra_op_threads() -> int:
    import torch
    return torch.get_num_threads()


@pytest.mark.timeout(180)
def test_each_child_runs_torch_with_omp_num_threads(monkeypatch):
    """The child has torch imported (the fork server preloads it) before the launcher sets its environment;
    OMP_NUM_THREADS must still bind torch's intra-op pool, or N ranks each spin one thread per
    core. The variable given to the child is 1, the machine's default would be its core count."""
    import torch
    from pgroups.spawn import run_local
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.syspath_prepend(str(HERE))
    if os.cpu_count() == 1 and torch.get_num_threads() == 1:
        pytest.skip("one core: torch's default is already 1 thread, so the test could not fail")
    outcomes = run_local(2, intra_op_threads, env={"OMP_NUM_THREADS": "1"}, timeout_s=150)
    assert [o.value for o in outcomes] == [1, 1], outcomes


def startup_view(name: str) -> dict:
    """What a child sees when its target starts: CPU-seconds this process has used so far (a
    forked child starts from zero), and one variable of its environment."""
    return {"cpu_s": time.process_time(), "value": os.environ.get(name)}


@pytest.mark.timeout(180)
def test_children_start_preloaded_with_the_callers_environment_at_the_call(monkeypatch):
    """Children are forked from a server that imported torch once: a child reaches its target
    having used far less CPU than ``import torch`` alone costs (about 1.3 CPU-s here; 0.6 is
    the bound — CPU time, not wall time, so a loaded machine does not move it). The server's
    environment is fixed when it starts; a variable the caller sets afterwards still reaches the
    child, and one the caller removed is gone."""
    from pgroups.spawn import run_local
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("PGROUPS_SPAWN_PROBE", "before")
    first = run_local(2, startup_view, ("PGROUPS_SPAWN_PROBE",), timeout_s=150)  # starts the server if none runs
    monkeypatch.setenv("PGROUPS_SPAWN_PROBE", "after")
    second = run_local(2, startup_view, ("PGROUPS_SPAWN_PROBE",), timeout_s=150)
    monkeypatch.delenv("PGROUPS_SPAWN_PROBE")
    third = run_local(1, startup_view, ("PGROUPS_SPAWN_PROBE",), timeout_s=150)
    assert [o.value["value"] for o in first + second + third] == ["before", "before", "after", "after", None]
    assert all(o.value["cpu_s"] < 0.6 for o in second + third), [o.value for o in second + third]


class Verdict(Exception):
    """A failure that names the ranks that never answered (as nettest's timeout does)."""

    def __init__(self, absent_ranks: tuple) -> None:
        super().__init__(f"ranks {list(absent_ranks)} never answered")
        self.absent_ranks = absent_ranks


def absent_or_verdict(absent: tuple) -> None:
    """Ranks in ``absent`` sleep (a hang); every other rank raises a Verdict naming them."""
    if int(os.environ["RANK"]) in absent:
        time.sleep(600)
    raise Verdict(absent)


def absent_but_one_named(sleeping: tuple) -> None:
    """Ranks in ``sleeping`` sleep; the others raise a Verdict naming only the first of them."""
    if int(os.environ["RANK"]) in sleeping:
        time.sleep(600)
    raise Verdict(sleeping[:1])


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_ranks_a_verdict_names_absent_are_not_waited_for():
    from pgroups.spawn import run_local
    # with the grace period and time limit of an hour, only the verdict can end the wait
    outcomes = run_local(3, absent_or_verdict, ((1,),), timeout_s=3600, failure_grace_s=3600)
    assert [o.error_type for o in outcomes] == ["Verdict", None, "Verdict"]
    assert outcomes[1].timed_out and outcomes[1].error == "killed: named absent by a peer's failure"
    assert outcomes[0].names_absent == (1,)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_rank_no_verdict_names_is_still_waited_for_until_the_grace_ends():
    from pgroups.spawn import run_local
    # rank 0 names rank 1 only; rank 2 sleeps unnamed, so the 2 s grace after the failures decides
    started = time.monotonic()
    outcomes = run_local(3, absent_but_one_named, ((1, 2),), timeout_s=3600, failure_grace_s=2)
    assert time.monotonic() - started >= 2
    assert outcomes[1].error == "killed: named absent by a peer's failure"
    assert outcomes[2].error == "killed: still running at the time limit"


def late_reader() -> str:
    """Rank 0 sets a key on the store it serves and returns at once; rank 1, 2 s slower (a rank
    still finishing its teardown), then reads the key."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        store.set("left", "rank 0")
        return "set"
    time.sleep(2)
    return store.get("left").decode()


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_rank_0s_store_stays_up_until_every_rank_has_reported():
    # before: rank 0's process exited with its target and took the store with it (rank 1:
    # "Connection reset by peer")
    from pgroups.spawn import run_local

    outcomes = run_local(2, late_reader, timeout_s=100)
    assert [(o.error, o.value) for o in outcomes] == [(None, "set"), (None, "rank 0")], outcomes
