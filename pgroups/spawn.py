"""Our local launcher: start N processes on this machine the way torchrun would.

Each child gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT,
then runs ``target(*args)``; its return value comes back to the parent. Children are forked
from multiprocessing's fork server, a single-threaded process that imported torch and pgroups
once (:data:`PRELOAD`), so a child starts in about 0.1 CPU-seconds instead of the 1.5 of a fresh
``import torch``; forking the caller itself is unsafe with torch threads, and where there is no
fork server the ``spawn`` method is used. Each child runs with the caller's environment as it is
at the call (not the fork server's, which is fixed when it starts). A child that fails makes the
parent stop the rest; a run longer than ``timeout_s`` is killed and reported. No child outlives
the call: any exit of the parent from it (an exception, Ctrl-C) kills and reaps them all, and on
Linux a child also dies when the parent process is killed outright.

:func:`launch_script` is the same launcher for a user's own script (``pgroups launch``): each rank
is ``python script.py args`` with torchrun's environment, and the parent serves the rendezvous
store as torchrun's agent does.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs


#: grace period for peers after one rank failed (they are usually stuck in a collective)
FAILURE_GRACE_S = 5.0
#: how long children that already reported may take to exit before they are killed
EXIT_GRACE_S = 5.0
#: prctl option: signal this process when its parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1


@attrs.frozen
class RankOutcome:
    """What one local rank did: its return value, or the error it raised, or its exit code."""

    rank: int
    value: Any = None
    error: Optional[str] = None       # "ExceptionType: message" of the first failure
    error_type: Optional[str] = None
    exitcode: Optional[int] = None
    timed_out: bool = False
    #: ranks this rank's failure names as absent (the exception's ``absent_ranks``, if it has one)
    names_absent: Tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out and self.exitcode in (0, None)


#: Modules the fork server imports once, before it forks any child (a module that fails to
#: import is skipped). Read when the server starts, at the first run_local of this process: a
#: caller whose children import more (a test suite) may extend it before that.
PRELOAD = ("torch", "torch.distributed", "pgroups.context", "pgroups.comm", "pgroups.nettest", "pgroups.reshard")


def _start_context() -> Any:
    """The fork server's multiprocessing context (torch and pgroups preloaded), else spawn's."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # takes effect when the server starts (first call)
    return ctx


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _release_fork_server() -> None:
    """Close this child's copy of the fork server's "alive" pipe.

    Every client of the fork server holds the pipe's write end, and the server exits only when
    all have closed it; a forked child inherits one too, so without this the server (the
    child's parent) and a hung child would keep each other alive after the caller was killed.
    Without the copy, the server exits with the caller and PR_SET_PDEATHSIG takes the child.
    (multiprocessing keeps the descriptor in a private attribute: absent, nothing is done.)"""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        os.close(fd)
        server._forkserver_alive_fd = None  # a nested run_local starts a server of its own


def _die_with_parent(parent_pid: int) -> None:
    """Linux: ask the kernel to kill this process when its parent dies — even by SIGKILL, where
    no ``finally`` runs. The parent is the fork server, which exits as soon as the caller
    (``parent_pid``) is gone, or the caller itself under ``spawn``. Elsewhere a no-op."""
    _release_fork_server()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if not _alive(parent_pid):  # the caller died before prctl took effect
        os._exit(1)


def _limit_threads() -> None:
    """Apply ``OMP_NUM_THREADS`` to torch in this child.

    A child has imported torch (the fork server preloads it; a spawned child imports it while
    unpickling its target) before ``_child`` sets the environment, so the variable alone would
    be read too late: every rank would run one intra-op thread per core and N ranks would
    oversubscribe the machine N-fold.
    """
    torch = sys.modules.get("torch")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if torch is not None and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def rank_environment(rank: int, nproc: int, master_port: Optional[int] = None) -> Dict[str, str]:
    """The variables torchrun gives local rank ``rank`` of a one-host job of ``nproc`` processes
    (torch/distributed/elastic/agent/server/local_elastic_agent.py), the store on 127.0.0.1;
    OMP_NUM_THREADS defaults to 1 as torchrun's does with several processes. Pure."""
    env = {"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
           "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
           "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if master_port is not None:
        env["MASTER_PORT"] = str(master_port)
    return env


def _child(rank: int, nproc: int, port_box: Any, caller_env: Mapping[str, str], env: Mapping[str, str],
           target: Callable[..., Any], args: Sequence[Any], results: "mp.Queue", parent_pid: int,
           released: Any) -> None:
    _die_with_parent(parent_pid)
    os.environ.clear()  # the caller's environment at the call, as a spawned child would have it
    os.environ.update(caller_env)
    os.environ.update(rank_environment(rank, nproc))
    os.environ.update(env)
    _limit_threads()
    server, failed = None, False
    try:
        if "MASTER_PORT" not in env:  # rank 0 serves the store (kept alive below)
            server = _rendezvous_port(rank, port_box, parent_pid)
        value = target(*args)
        results.put((rank, value, None, None, ()))
    except BaseException as exc:  # reported to the parent, which decides the exit code
        message = f"{type(exc).__name__}: {exc}"
        if os.environ.get("PGROUPS_TRACEBACK"):
            message += "\n" + traceback.format_exc()
        absent = tuple(int(r) for r in getattr(exc, "absent_ranks", ()))
        results.put((rank, None, message, type(exc).__name__, absent))
        failed = True
    if server is not None:
        # The others may still be reading the store when rank 0's target returns (the last
        # step of a teardown meeting): its server leaves when the parent has every outcome,
        # or once some rank has failed, not before (seen: "Connection reset by peer" on rank 1
        # under load).
        while not released.wait(1.0) and _alive(parent_pid):
            pass
    if failed:
        raise SystemExit(1)


#: How long ranks other than 0 wait for rank 0 to publish the store's port.
PORT_WAIT_S = 120.0


def _rendezvous_port(rank: int, port_box: Any, parent_pid: int) -> Any:
    """Set MASTER_PORT without a pick-then-bind race: rank 0 binds port 0 for the rendezvous
    store (a multi-tenant TCPStore server, which the job's own ``create_store`` on rank 0 then
    shares) and publishes the port the kernel gave it; the others wait for it. Returns rank 0's
    server (keep it alive), None elsewhere. Raises TimeoutError if rank 0 never publishes."""
    if rank == 0:
        import datetime

        import torch.distributed as dist

        server = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=PORT_WAIT_S),
                               multi_tenant=True, wait_for_workers=False)
        port_box.value = server.port
        os.environ["MASTER_PORT"] = str(server.port)
        return server
    deadline = time.monotonic() + PORT_WAIT_S
    while port_box.value == 0:
        if time.monotonic() > deadline or not _alive(parent_pid):
            raise TimeoutError(f"rank {rank}: rank 0 did not publish the rendezvous store's port "
                               f"within {PORT_WAIT_S:g}s")
        time.sleep(0.01)
    os.environ["MASTER_PORT"] = str(port_box.value)
    return None


def run_local(nproc: int, target: Callable[..., Any], args: Sequence[Any] = (),
              timeout_s: Optional[float] = None, env: Optional[Mapping[str, str]] = None,
              env_per_rank: Optional[Callable[[int], Mapping[str, str]]] = None,
              failure_grace_s: float = FAILURE_GRACE_S,
              on_wait: Optional[Callable[[int], None]] = None) -> List[RankOutcome]:
    """Run ``target(*args)`` in ``nproc`` local processes; return one RankOutcome per rank.

    ``target`` must be importable (a module-level function). ``env`` is added to every child's
    environment, ``env_per_rank(rank)`` to one's. Never hangs: after ``timeout_s`` (or
    ``failure_grace_s`` after the first failure, for the others to report it) the remaining
    children are killed. A failure whose exception has ``absent_ranks`` (a verdict naming ranks
    that never answered) ends the wait for those ranks: once every rank still running is named
    so, they are killed at once (``timed_out``) instead of after the grace period.
    ``on_wait(ranks reported so far)`` is called while waiting, about five times a second (a
    progress display throttles it).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    ctx = _start_context()
    caller_env = dict(os.environ)
    results: "mp.Queue" = ctx.Queue()
    port_box = ctx.Value("i", 0)  # rank 0 publishes the port its store bound (no pick-then-bind race)
    released = ctx.Event()        # set once every outcome is in or a rank failed: rank 0's store may leave
    procs: List[Any] = []
    try:
        for rank in range(nproc):
            child_env = dict(env or {})
            if env_per_rank is not None:
                child_env.update(env_per_rank(rank))
            proc = ctx.Process(target=_child, daemon=False,
                               args=(rank, nproc, port_box, caller_env, child_env, target, tuple(args), results,
                                     os.getpid(), released))
            proc.start()
            procs.append(proc)
        return _collect(procs, results, nproc, timeout_s, failure_grace_s, on_wait, released)
    finally:  # any exit of the parent — an error, Ctrl-C — kills and reaps every child
        released.set()
        _kill_and_reap(procs)
        results.close()


def _collect(procs: List[Any], results: "mp.Queue", nproc: int, timeout_s: Optional[float],
             failure_grace_s: float = FAILURE_GRACE_S,
             on_wait: Optional[Callable[[int], None]] = None, released: Any = None) -> List[RankOutcome]:
    outcomes: Dict[int, RankOutcome] = {}
    deadline = time.monotonic() + timeout_s if timeout_s else None
    failed_at: Optional[float] = None
    while len(outcomes) < nproc and not _only_named_absent_left(outcomes, nproc):
        if failed_at is not None and released is not None:
            released.set()   # a failed job: rank 0 need not outlive its own end (as before)
        if on_wait is not None:
            on_wait(len(outcomes))
        now = time.monotonic()
        limits = [t for t in (deadline, failed_at + failure_grace_s if failed_at else None) if t]
        if limits and now >= min(limits):
            break
        try:
            rank, value, error, error_type, absent = results.get(timeout=0.2)
            outcomes[rank] = RankOutcome(rank, value, error, error_type, names_absent=absent)
            if error and failed_at is None:
                failed_at = time.monotonic()
        except queue.Empty:
            for rank, proc in enumerate(procs):  # a child that died without reporting (killed, segfault)
                if rank not in outcomes and proc.exitcode not in (None, 0) and _drained(results, outcomes):
                    outcomes[rank] = RankOutcome(rank, error=f"process exited with code {proc.exitcode}",
                                                 exitcode=proc.exitcode)
                    failed_at = failed_at or time.monotonic()
    if released is not None:
        released.set()
    exit_deadline = time.monotonic() + EXIT_GRACE_S
    for rank, proc in enumerate(procs):
        if rank not in outcomes:
            proc.kill()
        proc.join(timeout=max(0.1, exit_deadline - time.monotonic()))
        if proc.is_alive():  # it reported, but is stuck on its way out (threads of a hung collective)
            proc.kill()
            proc.join(timeout=5)
        if rank not in outcomes:
            named = rank in {r for o in outcomes.values() for r in o.names_absent}
            why = "named absent by a peer's failure" if named else "still running at the time limit"
            outcomes[rank] = RankOutcome(rank, error=f"killed: {why}", exitcode=proc.exitcode, timed_out=True)
    return [outcomes[r] for r in range(nproc)]


def _only_named_absent_left(outcomes: Mapping[int, RankOutcome], nproc: int) -> bool:
    """True when some rank reported and every rank that has not is named absent by a reported
    failure: nothing more will come (the verdict is in), the rest need not be waited for."""
    named = {r for o in outcomes.values() for r in o.names_absent}
    return bool(named) and all(r in named for r in range(nproc) if r not in outcomes)


def _kill_and_reap(procs: List[Any]) -> None:
    """Kill every child still running and wait for each, so none outlives run_local."""
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(timeout=10)


def _drained(results: "mp.Queue", outcomes: Dict[int, RankOutcome]) -> bool:
    """Pull anything still queued (a child may report just before exiting); True if nothing was."""
    drained = True
    while True:
        try:
            rank, value, error, error_type, absent = results.get_nowait()
        except queue.Empty:
            return drained
        outcomes[rank] = RankOutcome(rank, value, error, error_type, names_absent=absent)
        drained = False


# ---- a user's script: `pgroups launch --nproc N script.py [args]` -----------------------------------

#: how long ranks get to exit after SIGTERM (a peer failed, Ctrl-C) before they are killed
TERMINATE_GRACE_S = 5.0


class _Stopped(Exception):
    """The launcher itself got SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@attrs.frozen
class ScriptRun:
    """How a ``launch_script`` run ended.

    ``exit_code``: 0 when every rank exited 0; else the worst status among the ranks that ended
    on their own (a rank killed by signal N counts 128+N, as a shell reports it); 128+N when the
    launcher got signal N (Ctrl-C: 130). ``failed_rank``: the first rank seen failing (None if
    none did). ``ended``: the ranks the launcher stopped because another failed or it was
    interrupted (their statuses do not count).
    """

    exit_code: int
    statuses: Tuple[int, ...]
    failed_rank: Optional[int] = None
    ended: Tuple[int, ...] = ()
    signal_name: Optional[str] = None


def exit_status(returncode: int) -> int:
    """A child's ``returncode`` as a shell reports it: the exit code, or 128+N for signal N. Pure."""
    return returncode if returncode >= 0 else 128 - returncode


def launch_script(nproc: int, command: Sequence[str], env: Optional[Mapping[str, str]] = None,
                  grace_s: float = TERMINATE_GRACE_S, poll_s: float = 0.05) -> ScriptRun:
    """Run ``command`` (e.g. ``[sys.executable, "train.py", "--lr", "1e-3"]``) as ``nproc`` local
    ranks with torchrun's variables (:func:`rank_environment`), ``env`` added.

    This process serves the rendezvous store on a port the kernel picks and sets
    TORCHELASTIC_USE_AGENT_STORE=True, as torchrun's agent does: ``init_process_group()`` (env://)
    and pgroups both connect to it as clients. The first rank that exits non-zero ends the others
    (SIGTERM, SIGKILL after ``grace_s``); so does SIGINT/SIGTERM to this process. No rank outlives
    the call (on Linux not even a SIGKILL of this process). Returns a :class:`ScriptRun`.
    """
    import datetime

    import torch.distributed as dist

    from .launch import AGENT_STORE_VAR

    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=1800),
                          wait_for_workers=False)
    preexec = _die_with_launcher(os.getpid())
    procs: List[subprocess.Popen] = []
    try:
        with _signals_raise():
            try:
                for rank in range(nproc):
                    child_env = {**os.environ, **rank_environment(rank, nproc, store.port),
                                 AGENT_STORE_VAR: "True", **(env or {})}
                    procs.append(subprocess.Popen(list(command), env=child_env, preexec_fn=preexec))
                return _supervise(procs, grace_s, poll_s)
            except (KeyboardInterrupt, _Stopped) as exc:
                signum = exc.signum if isinstance(exc, _Stopped) else signal.SIGINT
                ended = tuple(r for r, p in enumerate(procs) if p.poll() is None)
                _terminate(procs, grace_s)
                return ScriptRun(128 + int(signum), tuple(exit_status(p.wait()) for p in procs),
                                 ended=ended, signal_name=signal.Signals(signum).name)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        del store


def _die_with_launcher(launcher_pid: int) -> Callable[[], None]:
    """The function a script's process runs between fork and exec: on Linux, be killed when the
    launcher dies (PR_SET_PDEATHSIG survives exec), and exit at once if it already has. libc is
    loaded here, in the launcher, so the child between fork and exec makes two system calls and
    nothing else (the launcher has threads: the store's)."""
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            libc = None

    def preexec() -> None:
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != launcher_pid:
            os._exit(1)

    return preexec


def _supervise(procs: List[subprocess.Popen], grace_s: float, poll_s: float) -> ScriptRun:
    statuses: List[Optional[int]] = [None] * len(procs)
    failed_rank: Optional[int] = None
    ended: Tuple[int, ...] = ()
    kill_at: Optional[float] = None
    while any(status is None for status in statuses):
        for rank, proc in enumerate(procs):
            if statuses[rank] is None and proc.poll() is not None:
                statuses[rank] = exit_status(proc.returncode)
                if statuses[rank] != 0 and failed_rank is None:
                    failed_rank = rank
                    # who is still running now is stopped by us; anyone who already exited counts
                    for other, peer in enumerate(procs):
                        if statuses[other] is None and peer.poll() is not None:
                            statuses[other] = exit_status(peer.returncode)
                    ended = tuple(r for r, status in enumerate(statuses) if status is None)
                    for r in ended:
                        procs[r].terminate()
                    kill_at = time.monotonic() + grace_s
        if kill_at is not None and time.monotonic() > kill_at:
            for r in ended:
                if procs[r].poll() is None:
                    procs[r].kill()
        time.sleep(poll_s)
    final = tuple(int(s) for s in statuses if s is not None)
    own = [status for rank, status in enumerate(final) if rank not in ended]
    return ScriptRun(max(own, default=0), final, failed_rank, ended)


def _terminate(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every running rank, SIGKILL those still running after ``grace_s``."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


class _signals_raise:
    """While active (main thread only), SIGTERM raises _Stopped like SIGINT raises KeyboardInterrupt."""

    def __enter__(self) -> None:
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise _Stopped(signum)

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
