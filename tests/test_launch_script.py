"""Running one's own script locally: ``pgroups launch --nproc N script.py [args]`` gives each rank
torchrun's environment and the exit code of the worst rank; a failing rank or Ctrl-C ends the
others. Under torchrun (and under ``pgroups launch``) pgroups connects to the launcher's store
instead of serving a second one on the same port."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pgroups.cli import main
from pgroups.launch import free_port

#: the variables a script may read; both launchers must give the same ones
VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
             "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE",
             "OMP_NUM_THREADS")

#: a user's script: pgroups starts torch.distributed itself, then (after destroy) a plain
#: env:// init_process_group as most training scripts do; each all-reduces its rank
TRAIN = textwrap.dedent(f"""
    import json, os, sys
    import torch, torch.distributed as dist
    from pgroups import ParallelContext

    ctx = ParallelContext().init_from_config({{"backend": "gloo", "timeout_s": 60}})
    total = torch.tensor([ctx.get_global_rank()])
    dist.all_reduce(total, group=ctx.get_cpu_group("global"))
    ctx.destroy()
    dist.init_process_group("gloo")
    plain = torch.tensor([dist.get_rank()])
    dist.all_reduce(plain)
    dist.destroy_process_group()
    env = {{name: os.environ[name] for name in {VARIABLES!r} if name in os.environ}}
    print("RESULT " + json.dumps({{"args": sys.argv[1:], "sums": [int(total), int(plain)], "env": env}}), flush=True)
""")

#: the error-looking line a second store server on torchrun's port printed (TCPStore.cpp)
SECOND_STORE = "failed to bind"


def _results(stdout: str):
    """Every rank's RESULT object. Two ranks share one stdout, so a line may hold both ranks'
    writes back to back: each object is decoded where its marker starts, not line by line."""
    decoder, found, at = json.JSONDecoder(), [], stdout.find("RESULT ")
    while at >= 0:
        value, end = decoder.raw_decode(stdout, at + len("RESULT "))
        found.append(value)
        at = stdout.find("RESULT ", end)
    return sorted(found, key=lambda r: int(r["env"]["RANK"]))


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_torchrun_and_pgroups_launch_give_a_script_the_same_world_and_neither_starts_a_second_store(
        tmp_path, capfd, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    launch = ["--nnodes", "1", "--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
              "--nproc-per-node", "2"]
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", *launch, str(script), "--lr", "0.1"],
                              cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=240)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    assert SECOND_STORE not in torchrun.stderr, torchrun.stderr[-3000:]

    monkeypatch.chdir(tmp_path)
    assert main(["launch", "--nproc", "2", str(script), "--lr", "0.1"]) == 0
    ours = capfd.readouterr()
    assert SECOND_STORE not in ours.err, ours.err[-3000:]

    for results in (_results(torchrun.stdout), _results(ours.out)):
        assert [r["sums"] for r in results] == [[1, 1], [1, 1]]          # 0 + 1 on each rank, both inits
        assert [r["args"] for r in results] == [["--lr", "0.1"]] * 2
    for theirs, mine in zip(_results(torchrun.stdout), _results(ours.out)):
        assert set(mine["env"]) == set(theirs["env"])
        assert {k: v for k, v in mine["env"].items() if k != "MASTER_PORT"} == \
            {k: v for k, v in theirs["env"].items() if k != "MASTER_PORT"}


#: a script without torch: rank FAIL exits with CODE at once, the others wait to be ended
WAITER = textwrap.dedent("""
    import os, sys, time
    rank = int(os.environ["RANK"])
    pid_file = os.path.join(sys.argv[1], f"rank{rank}.pid")
    open(pid_file + ".tmp", "w").write(str(os.getpid()))
    os.rename(pid_file + ".tmp", pid_file)   # appears whole
    if rank == int(sys.argv[2]):
        sys.exit(int(sys.argv[3]))
    time.sleep(600)
""")


def _sigint_default() -> None:
    """In the launcher's process before exec: Ctrl-C as in a terminal, even when this test runs
    under a shell job that ignores SIGINT (``( … &)``: the ignored disposition is inherited, and
    Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].startswith("Z")   # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_failing_rank_ends_the_others_and_its_status_is_the_exit_code(tmp_path, capfd, monkeypatch):
    (tmp_path / "waiter.py").write_text(WAITER)
    monkeypatch.chdir(tmp_path)    # -m: the module is found from the working directory, as python -m does
    started = time.monotonic()
    assert main(["launch", "--nproc", "3", "-m", "waiter", str(tmp_path), "1", "7"]) == 7
    elapsed = time.monotonic() - started
    err = capfd.readouterr().err
    assert "pgroups launch: rank 1 exited with status 7; ended ranks [0, 2]" in err, err
    assert elapsed < 100, "the waiting ranks were not ended"   # they would sleep 600 s
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert all(_gone(pid) for pid in pids)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_signal_to_the_launcher_ends_every_rank(tmp_path, signum):
    """Ctrl-C (SIGINT) or SIGTERM: the launcher ends its ranks, says so, exits 128+N (130, 143).
    SIGKILL: no code of the launcher runs; the kernel ends the ranks (PR_SET_PDEATHSIG)."""
    script = tmp_path / "waiter.py"
    script.write_text(WAITER)
    launcher = subprocess.Popen([sys.executable, "-m", "pgroups", "launch", "--nproc", "2", str(script),
                                 str(tmp_path), "-1", "0"], env=_clean_env(), stderr=subprocess.PIPE, text=True,
                                preexec_fn=_sigint_default)
    try:
        deadline = time.monotonic() + 90
        while len(list(tmp_path.glob("rank*.pid"))) < 2:   # both ranks are running
            assert time.monotonic() < deadline and launcher.poll() is None, "the ranks did not start"
            time.sleep(0.05)
        pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
        launcher.send_signal(signum)                          # to the launcher only, not its ranks
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    if signum == signal.SIGKILL:
        assert launcher.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in pids):
            assert time.monotonic() < deadline, "a rank outlived its SIGKILLed launcher"
            time.sleep(0.05)
    else:
        assert launcher.returncode == 128 + signum, err
        assert f"pgroups launch: {signum.name}: ended ranks [0, 1]" in err, err
        assert all(_gone(pid) for pid in pids)
