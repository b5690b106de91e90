"""An emulated cluster on one machine: one network namespace per host, veth pairs on a bridge.

Each "host" is a namespace with its own UTS hostname (``unshare --uts``) and one interface
(``eth0``) on a bridge that lives in a switch namespace of its own, so nothing touches the
machine's own network. ``GLOO_SOCKET_IFNAME=eth0`` makes gloo use it. Faults are real network
faults: ``tc ... tbf rate 200mbit burst 64kb latency 200ms`` on a host's interface (both
directions) slows the host; the same tbf under an ``htb`` class chosen by a ``u32`` filter on
the peer's address slows one link only (the ``prio`` qdisc and netem are not available
here). A host is killed by cutting its link and killing every process in its namespace: its
peers hear nothing more.

One torchrun per namespace (static rendezvous on the first host) runs ``python -m
pgroups.nettest``: a real multi-host job. Names are unique per cluster (``pgXXXX``), so
parallel test runs do not collide; :meth:`EmulatedCluster.close` tears everything down
(``ss -K`` inside each namespace first: a socket retrying to a deleted namespace keeps its
veth alive for minutes). Needs root and a working ``ip netns``: :func:`unavailable_reason`.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple


def _tbf(rate: str) -> List[str]:
    """A token bucket at ``rate`` (``200mbit``: about 50x slower than the bridge here)."""
    return ["rate", rate, "burst", "64kb", "latency", "200ms"]


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=60)


def unavailable_reason() -> Optional[str]:
    """Why the emulated cluster cannot be built here (None if it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "unshare", "ss", "chrt"):
        if _run("sh", "-c", f"command -v {tool}", check=False).returncode != 0:
            return f"{tool} is not installed"
    name = f"pgprobe{os.getpid() % 100000}"
    probe = _run("ip", "netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.strip()}"
    _run("ip", "netns", "delete", name, check=False)
    return None


class EmulatedCluster:
    """``hosts`` namespaces on one bridge; ``ns(i)``, ``address(i)``, ``hostname(i)``."""

    def __init__(self, hosts: int) -> None:
        self.id = f"pg{os.getpid() % 1000:03d}{random.randrange(16 ** 3):03x}"
        self.hosts = hosts
        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(0, 250)}"
        self.switch = f"{self.id}sw"
        self.procs: Dict[int, subprocess.Popen] = {}
        self.created: List[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def ns(self, i: int) -> str:
        return f"{self.id}h{i}"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def hostname(self, i: int) -> str:
        return f"host{chr(ord('A') + i)}"

    def _in(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", ns, *cmd, check=check)

    def _build(self) -> None:
        _run("ip", "netns", "add", self.switch)
        self.created.append(self.switch)
        self._in(self.switch, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.switch, "ip", "link", "set", "br0", "up")
        for i in range(self.hosts):
            ns, outside = self.ns(i), f"{self.id}p{i}"
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            # IPv4 only: gloo may otherwise pick eth0's IPv6 link-local address, which the
            # per-destination (IPv4) filter of slow_link would not see
            self._in(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", f"{self.id}e{i}")
            _run("ip", "link", "set", outside, "netns", self.switch)
            _run("ip", "link", "set", f"{self.id}e{i}", "netns", ns)
            self._in(ns, "ip", "link", "set", f"{self.id}e{i}", "name", "eth0")
            self._in(ns, "ip", "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            self._in(ns, "ip", "link", "set", "eth0", "up")
            self._in(ns, "ip", "link", "set", "lo", "up")
            self._in(self.switch, "ip", "link", "set", outside, "master", "br0")
            self._in(self.switch, "ip", "link", "set", outside, "up")

    # -- faults -------------------------------------------------------------------------------
    def slow_host(self, i: int, rate: str = "200mbit") -> None:
        """tbf at ``rate`` on both directions of host ``i``'s link."""
        shaped = _tbf(rate)
        self._in(self.ns(i), "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", *shaped)
        self._in(self.switch, "tc", "qdisc", "add", "dev", f"{self.id}p{i}", "root", "tbf", *shaped)

    def slow_link(self, i: int, j: int, rate: str = "200mbit") -> None:
        """tbf at ``rate`` on the traffic between hosts ``i`` and ``j`` only (each side, towards
        the other)."""
        self._egress(i, None, {j: rate})
        self._egress(j, None, {i: rate})

    def shape(self, rate: str, host_rates: Optional[Dict[int, str]] = None,
              link_rates: Optional[Dict[Tuple[int, int], str]] = None) -> None:
        """Every host's link at ``rate`` (both directions), some hosts at their own
        (``host_rates``), some links (``link_rates``: ``(i, j) -> rate``) below it: the
        cluster whose healthy links all run at one rate R, with faults at a fraction of R."""
        host_rates, link_rates = dict(host_rates or {}), dict(link_rates or {})
        for i in range(self.hosts):
            mine = host_rates.get(i, rate)
            towards = {b if a == i else a: r for (a, b), r in link_rates.items() if i in (a, b)}
            self._egress(i, mine, towards)
            self._in(self.switch, "tc", "qdisc", "add", "dev", f"{self.id}p{i}", "root", "tbf", *_tbf(mine))

    def _egress(self, i: int, rate: Optional[str], towards: Dict[int, str]) -> None:
        """Host ``i``'s outgoing traffic: at ``rate`` (None: unshaped), and towards each peer of
        ``towards`` at its own rate (an ``htb`` class per peer, chosen by a ``u32`` filter on the
        peer's address, each with a tbf leaf; the ``prio`` qdisc and netem are not available)."""
        ns = self.ns(i)
        if not towards:
            self._in(ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", *_tbf(rate))
            return
        self._in(ns, "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10")
        classes = [("10", rate, None)] + [(str(20 + k), r, peer) for k, (peer, r) in enumerate(sorted(towards.items()))]
        for minor, leaf_rate, peer in classes:
            self._in(ns, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", f"1:{minor}",
                     "htb", "rate", "100gbit", "quantum", "60000")
            if leaf_rate is not None:
                self._in(ns, "tc", "qdisc", "add", "dev", "eth0", "parent", f"1:{minor}", "handle", f"{minor}:",
                         "tbf", *_tbf(leaf_rate))
            if peer is not None:
                self._in(ns, "tc", "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1",
                         "u32", "match", "ip", "dst", f"{self.address(peer)}/32", "flowid", f"1:{minor}")

    def kill_host(self, i: int) -> None:
        """Cut host ``i``'s link, then kill every process in its namespace: silence."""
        self._in(self.switch, "ip", "link", "set", f"{self.id}p{i}", "down", check=False)
        self._kill_namespace(i)

    def _kill_namespace(self, i: int) -> None:
        pids = self._in(self.ns(i), "ip", "netns", "pids", self.ns(i), check=False).stdout.split()
        listed = _run("ip", "netns", "pids", self.ns(i), check=False).stdout.split()
        for pid in set(pids) | set(listed):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    # -- the job ------------------------------------------------------------------------------
    def start(self, nproc_per_host: int, args: Sequence[str], log_dir: str, port: int = 29500,
              env: Optional[Dict[str, str]] = None) -> None:
        """torchrun on every host (node rank = host index, store on host 0) running
        ``python -m pgroups.nettest ARGS``; each host's output goes to ``log_dir/host<i>.log``,
        each worker's to torchrun's ``--log-dir`` below it."""
        for i in range(self.hosts):
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.hosts),
                        "--nproc-per-node", str(nproc_per_host), "--node-rank", str(i),
                        "--master-addr", self.address(0), "--master-port", str(port),
                        "--log-dir", os.path.join(log_dir, f"workers{i}"), "--redirects", "3",
                        "--max-restarts", "0", "-m", "pgroups.nettest", *args]
            child_env = dict(os.environ, GLOO_SOCKET_IFNAME="eth0", **(env or {}))
            for key in ("PGROUPS_HOSTNAME", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                child_env.pop(key, None)
            self.procs[i] = self._on_host(i, torchrun, child_env, os.path.join(log_dir, f"host{i}.log"))

    def start_ranks(self, nproc_per_host: int, args: Sequence[str], log_dir: str, port: int = 29500,
                    env: Optional[Dict[str, str]] = None) -> None:
        """``python -m pgroups.nettest ARGS`` as every rank, without torchrun (torch's ``env://``
        variables; rank 0 serves the store on host 0): a torchrun agent per host imports torch
        too, a cost where a test does not promise anything of torchrun. ``procs`` is keyed by
        rank; rank r's output goes to ``log_dir/rank<r>.log``."""
        world = self.hosts * nproc_per_host
        for rank in range(world):
            i, local = divmod(rank, nproc_per_host)
            child_env = dict(os.environ, GLOO_SOCKET_IFNAME="eth0", RANK=str(rank), WORLD_SIZE=str(world),
                             LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(nproc_per_host),
                             MASTER_ADDR=self.address(0), MASTER_PORT=str(port), OMP_NUM_THREADS="1", **(env or {}))
            child_env.pop("PGROUPS_HOSTNAME", None)
            self.procs[rank] = self._on_host(i, [sys.executable, "-m", "pgroups.nettest", *args], child_env,
                                             os.path.join(log_dir, f"rank{rank}.log"))

    def _on_host(self, i: int, argv: Sequence[str], env: Dict[str, str], log_path: str) -> subprocess.Popen:
        """Start ``argv`` on host ``i`` (its namespace, its hostname), output to ``log_path``.
        ``ip netns exec``, ``unshare`` and ``sh`` each exec the next: the process is ``argv``'s."""
        script = f"hostname {self.hostname(i)} && exec \"$@\""
        with open(log_path, "w") as log:
            return subprocess.Popen(["ip", "netns", "exec", self.ns(i), "unshare", "--uts", "sh", "-c", script,
                                     "sh", *argv],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def realtime_when(self, ready: Callable[[], bool], limit_s: float) -> bool:
        """Once ``ready()`` (polled every 0.1 s, at most ``limit_s``): every process of the run,
        all its threads, at real-time priority (``chrt -r 1``); False if it never was ready.

        For runs that time shaped links, from the moment they measure: real hosts have CPUs of
        their own, while here every host shares this machine's two cores with whatever else runs
        (other tests, CPU hogs), and a rank that waits for the CPU while a transfer is timed adds
        that wait to the link's time (beside two CPU hogs a host 30 % slower was once not
        named). A real-time task runs before any normal one, and a measuring rank mostly waits
        on the network. Not from the start: eight ranks importing torch at real-time priority
        leave other tests 5 % of the CPU for seconds (a store call of another test then timed
        out after 5 s).
        """
        deadline = time.monotonic() + limit_s
        while not ready():
            if time.monotonic() > deadline or all(p.poll() is not None for p in self.procs.values()):
                return False
            time.sleep(0.1)
        for proc in self.procs.values():
            _run("chrt", "-a", "-r", "-p", "1", str(proc.pid), check=False)   # an ended one: nothing to do
        return True

    def wait(self, timeout_s: float) -> Dict[int, Optional[int]]:
        """Each process's exit code (per host with :meth:`start`, per rank with
        :meth:`start_ranks`; None: still running at the deadline)."""
        deadline = time.monotonic() + timeout_s
        codes: Dict[int, Optional[int]] = {}
        for i, proc in self.procs.items():
            try:
                codes[i] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[i] = None
        return codes

    def close(self) -> None:
        """Kill what runs, drop sockets (``ss -K``), delete the namespaces."""
        for i in range(self.hosts):
            if self.ns(i) in self.created:
                self._kill_namespace(i)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.created:
            self._in(ns, "ss", "-K", check=False)
        for ns in reversed(self.created):
            _run("ip", "netns", "delete", ns, check=False)
        self.created.clear()
