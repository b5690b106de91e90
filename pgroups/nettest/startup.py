"""Start-up with a deadline: which ranks never joined, when the default group cannot form.

``init_process_group`` waits for every rank; a rank that never comes (its host died after
torchrun started there, its process crashed before the test began) would make the others
wait for the group's timeout and then fail with torch's error, naming nobody. The nettest
initializes with ``--timeout`` as that deadline and, before it, every rank registers on the
rendezvous store (one ``append`` to one key, from a background thread, so that rank 0 — who
may be the one to start the store — is not blocked) and keeps a start-up heartbeat there
until its run has begun. When the start-up fails, every surviving rank reads the register
and watches the heartbeats for a moment: the ranks that never registered **never arrived**,
the ones whose heartbeat stopped **died during the start-up** — unless they gave up
themselves: a rank that has done its roll call says so on the store before its heartbeat
ends, so a rank whose own deadline came later (it started later: seen 2.5 s and more apart
on a loaded machine) does not name it. Their hosts are named when
the store knows them: a rank's own registration names its host; for a rank that never
arrived, the host of another rank of the same launcher node (torchrun's ``GROUP_RANK``).

A host whose torchrun never joins the rendezvous at all is not ours to see: torchrun's own
rendezvous waits for it (``--rdzv-conf timeout``) and reports it before any rank starts.

The bookkeeping (parse the register, decide who is missing, word the line) is pure; the
store calls are at the edges, each bounded.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import attrs

from ..ranks import format_ranks
from .pacing import Pacing

START_PREFIX = "pgroups-nettest/start/"
BEAT_S = 1.0          # the start-up heartbeat's interval in a small world (Pacing's beat_s in any)
ROLL_CALL_S = 2.5     # how long a failed rank watches the start-up heartbeats (plus beat_s - BEAT_S)
LEAVE_WAIT_S = 7.0    # how long the store's host waits for the others to read it (start-up skew)
STORE_TIMEOUT_S = 6.0  # the roll call may take this much beyond ROLL_CALL_S: then the store is gone


@attrs.frozen
class Arrival:
    """One rank's registration: its host and (when the launcher says) its node index."""

    rank: int
    host: str
    node: Optional[int] = None


def launch_tag(env: Mapping[str, str]) -> str:
    """A name for this launch, so that a later job on the same store never reads this one's
    register: torchrun's run id and restart count, SLURM's job and step, else the port."""
    if "TORCHELASTIC_RUN_ID" in env:
        return f"tr-{env['TORCHELASTIC_RUN_ID']}-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_STEP_ID', '0')}"
    return f"port-{env.get('MASTER_PORT', '0')}"


def node_of(env: Mapping[str, str]) -> Optional[int]:
    """This process's launcher node (torchrun's GROUP_RANK, SLURM's SLURM_NODEID), if known."""
    for key in ("GROUP_RANK", "SLURM_NODEID"):
        text = env.get(key, "")
        if text.isdigit():
            return int(text)
    return None


def encode_arrival(arrival: Arrival) -> str:
    """One register entry (host names hold neither ``|`` nor ``;``)."""
    node = "" if arrival.node is None else str(arrival.node)
    return f"{arrival.rank}|{node}|{arrival.host};"


def parse_register(text: str) -> Dict[int, Arrival]:
    """The register's entries by rank (malformed entries are skipped)."""
    found: Dict[int, Arrival] = {}
    for entry in text.split(";"):
        parts = entry.split("|", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        rank, node, host = parts
        found[int(rank)] = Arrival(int(rank), host, int(node) if node.isdigit() else None)
    return found


@attrs.frozen
class Absentees:
    """Who is missing at start-up: ranks that never arrived, ranks that arrived and then went
    silent, and the hosts known for each (``?`` where the store does not know)."""

    never_arrived: tuple
    went_silent: tuple
    hosts: Mapping[int, str]

    @property
    def ranks(self) -> List[int]:
        return sorted(self.never_arrived + self.went_silent)

    @property
    def known_hosts(self) -> List[str]:
        return sorted({h for h in self.hosts.values() if h != "?"})


def absentees(world_size: int, register: Mapping[int, Arrival], silent: Sequence[int],
              local_world_size: Optional[int]) -> Absentees:
    """Pure: the ranks missing from ``register`` and the ``silent`` ones, with their hosts.

    A rank that never arrived gets the host of a registered rank of the same node: the node is
    the registration's own when given, and a missing rank's node is ``rank // local_world_size``
    (torchrun gives each node a contiguous block of ``--nproc-per-node`` ranks)."""
    never = tuple(r for r in range(world_size) if r not in register)
    gone = tuple(sorted(r for r in silent if r in register))
    host_of_node: Dict[int, str] = {}
    for arrival in register.values():
        if arrival.node is not None:
            host_of_node.setdefault(arrival.node, arrival.host)
    hosts: Dict[int, str] = {r: register[r].host for r in gone}
    for rank in never:
        node = rank // local_world_size if local_world_size else None
        hosts[rank] = host_of_node.get(node, "?") if node is not None else "?"
    return Absentees(never, gone, hosts)


def describe(missing: Absentees, timeout_s: float) -> str:
    """The one line every surviving rank prints."""
    parts = []
    for ranks, what in ((missing.never_arrived, "never arrived"), (missing.went_silent, "stopped answering")):
        if not ranks:
            continue
        hosts = sorted({missing.hosts[r] for r in ranks})
        known = [h for h in hosts if h != "?"]
        where = f"hosts {', '.join(known)}" if known else "host unknown"
        if known and "?" in hosts:
            where += "; the others' host unknown"
        parts.append(f"ranks {format_ranks(ranks)} ({where}) {what}")
    return (f"the default group did not form within --timeout {timeout_s:g}s: " + "; ".join(parts)
            + " (their host or their processes died before the test began)")


class StartupBoard:
    """This rank's registration and start-up heartbeat on the store at ``addr:port``.

    :meth:`start` returns at once (a daemon thread connects, registers, then beats every
    ``beat_s``: BEAT_S in a small world, :class:`.pacing.Pacing`'s ``beat_s`` in a large one,
    so the world's start-up heartbeats stay within the store's budget); :meth:`stop` ends the
    heartbeat once the run has begun; :meth:`find_missing`,
    after a failed start-up, says who is missing (None if the store cannot be read)."""

    def __init__(self, addr: str, port: int, rank: int, world_size: int, host: str,
                 node: Optional[int], local_world_size: Optional[int], tag: str, timeout_s: float) -> None:
        self.addr, self.port, self.rank, self.world_size = addr, port, rank, world_size
        self.arrival = Arrival(rank, host, node)
        self.local_world_size = local_world_size
        self.prefix = f"{START_PREFIX}{tag}/"
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._client: Any = None
        self.beat_s = max(BEAT_S, Pacing(world_size).beat_s)
        self.roll_call_s = ROLL_CALL_S + self.beat_s - BEAT_S   # a live rank beats at least once in it, 1.5 s to spare

    @classmethod
    def from_environment(cls, launch: Any, host: str, timeout_s: float) -> "StartupBoard":
        env = os.environ
        local = env.get("LOCAL_WORLD_SIZE", "")
        return cls(launch.master_addr, launch.master_port, launch.rank, launch.world_size, host,
                   node_of(env), int(local) if local.isdigit() else None, launch_tag(env), timeout_s)

    def _connect(self, timeout_s: float) -> Any:
        from ..launch import store_client

        return store_client(self.addr, self.port, timeout_s)

    def start(self) -> None:
        threading.Thread(target=self._register_and_beat, name="pgroups-nettest-start", daemon=True).start()

    def _register_and_beat(self) -> None:
        try:
            client = self._connect(self.timeout_s)
            client.append(self.prefix + "register", encode_arrival(self.arrival))
            self._client = client
            while not self._stop.is_set():
                client.add(f"{self.prefix}beat/{self.rank}", 1)
                self._stop.wait(self.beat_s)
        except Exception:  # noqa: BLE001 - the start-up's own failure reports what went wrong
            return

    def stop(self) -> None:
        self._stop.set()

    def find_missing(self) -> Optional[Absentees]:
        """After a failed start-up: read the register, watch the heartbeats for ``roll_call_s``,
        say who is missing — not the ranks whose heartbeat ended because they gave up first —;
        mark this rank as given up, then as done reading. None if the register cannot be
        read (the store is gone); if the store goes during the roll call, the register read
        stands and nobody is called silent. Bounded: the store calls run on a helper thread
        given ``roll_call_s`` + STORE_TIMEOUT_S in all. A rank on the store's host then waits (at
        most LEAVE_WAIT_S) for the others to have read: when its ranks exit, the store may go."""
        box: Dict[str, Any] = {}

        def read() -> None:
            try:
                client = self._client or self._connect(min(self.timeout_s, STORE_TIMEOUT_S))
                key = self.prefix + "register"
                box["register"] = parse_register(client.get(key).decode() if client.check([key]) else "")
                beats = {r: f"{self.prefix}beat/{r}" for r in box["register"] if r != self.rank}
                first = {r: int(client.add(k, 0)) for r, k in beats.items()}
                time.sleep(self.roll_call_s)
                still = [r for r, k in beats.items() if int(client.add(k, 0)) == first[r]]
                # marked before this rank's heartbeat ends (stop() below runs after this thread)
                client.append(self.prefix + "gave-up", f"{self.rank},")
                gave_up = {int(r) for r in client.get(self.prefix + "gave-up").decode().split(",") if r}
                box["silent"] = [r for r in still if r not in gave_up]
                client.add(self.prefix + "left", 1)
                box["client"] = client
            except Exception:  # noqa: BLE001 - the store went away: what was read stands
                return

        reader = threading.Thread(target=read, name="pgroups-nettest-roll-call", daemon=True)
        reader.start()
        reader.join(self.roll_call_s + STORE_TIMEOUT_S)
        self.stop()
        if "register" not in box:
            return None
        missing = absentees(self.world_size, box["register"], box.get("silent", []), self.local_world_size)
        if "client" in box and self.on_store_host():
            self._wait_for_readers(box["client"], self.world_size - len(missing.ranks))
        return missing

    def on_store_host(self) -> bool:
        """True if the store lives with this rank's host: rank 0's process (our launcher,
        SLURM), or torchrun's agent on node 0 (static rendezvous): then this rank must not
        leave before the others have read it."""
        return self.rank == 0 or self.arrival.node == 0

    def forget(self) -> None:
        """The run is over on every rank: delete this rank's start-up keys (rank 0 the shared
        ones too). Best effort, bounded."""
        client = self._client
        if client is None:
            return
        keys = [f"{self.prefix}beat/{self.rank}"] + ([self.prefix + "register", self.prefix + "left",
                                                      self.prefix + "gave-up"] if self.rank == 0 else [])
        worker = threading.Thread(target=lambda: [client.delete_key(k) for k in keys], daemon=True)
        worker.start()
        worker.join(STORE_TIMEOUT_S)

    def _wait_for_readers(self, client: Any, readers: int) -> None:
        deadline = time.monotonic() + LEAVE_WAIT_S
        try:
            while int(client.add(self.prefix + "left", 0)) < readers and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
