"""Fault injection for ``pgroups nettest`` — a TEST-ONLY hook, so that the tool's own tests can
prove it finds faults. Imported only when ``PGROUPS_NETTEST_FAULT`` is set
(:func:`pgroups.nettest.hooks.faults_for_rank`) or by the tests.

Set ``PGROUPS_NETTEST_FAULT`` (never in production) to one or more ``;``-separated faults::

    slow:rank=3,sleep_ms=20     rank 3 sleeps 20 ms inside the timed region of every operation
    corrupt:rank=2              rank 2 corrupts what it contributes (its send buffers)
    absent:rank=1               rank 1 never enters any test collective (it sleeps until killed)
    die:host=node7,after=3      every rank of node7 exits at once (no goodbye) inside its 4th
                                timed operation: a host that dies mid-sweep
    slow:host=node7,sleep_ms=5  host node7's network is slow: every rank on it sleeps inside
                                the timed region of every operation that crosses hosts (its
                                group or pair holds ranks of another host); traffic between
                                node7's own ranks is not slowed, as with a slow NIC or link
    slow:host=node7,gbps=0.001  the same, but the sleep is the operation's bytes / 0.001 GB/s
                                (2 MiB: 2.1 s), as on a link shaped to that rate: small
                                messages stay fast, large ones take seconds (gbps also works
                                with rank=R)
    never-start:host=node7      every rank of node7 exits before joining the default group:
                                torchrun started there, its ranks died before the test began
    slow-matmul:host=node7,sleep_ms=200   the pre-flight matmul of node7's ranks takes 200 ms
                                more processor time (a compute-slow host; its network is
                                untouched)
    bad-checksum:rank=2         rank 2's pre-flight matmul result has one wrong element
                                (silent data corruption)
    drift:host=node7,var=NCCL_IB_HCA      node7's ranks report NCCL_IB_HCA=drifted (a host
                                whose configuration differs from the others')

A ``slow:rank=R`` fault slows every operation of rank R, inside its host too (a slow rank).

A fault names ``rank=R`` or ``host=H``. Parsing is pure; a bad spec raises ValueError naming
the part that is wrong and what is allowed.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Mapping, Optional, Sequence, Tuple

import attrs

from ..nettest.hooks import FAULT_ENV

__all__ = ["FAULT_ENV", "ActiveFaults", "Fault", "parse_faults"]
KINDS = ("slow", "corrupt", "absent", "die", "never-start", "slow-matmul", "bad-checksum", "drift")
DRIFTED_VALUE = "drifted"
DEFAULT_SLEEP_MS = 50.0
ABSENT_SLEEP_S = 3600.0
DIE_EXIT_CODE = 137  # what a killed process reports


@attrs.frozen
class Fault:
    """One injected fault and the rank or host it applies to."""

    kind: str
    rank: Optional[int] = None
    host: Optional[str] = None
    sleep_ms: float = DEFAULT_SLEEP_MS
    after: int = 0
    gbps: Optional[float] = None     # slow: sleep bytes / gbps instead of sleep_ms
    var: Optional[str] = None        # drift: the environment variable that differs

    def applies_to(self, rank: int, host: str) -> bool:
        return self.rank == rank or (self.host is not None and self.host == host)


def parse_faults(text: Optional[str]) -> Tuple[Fault, ...]:
    """Parse a PGROUPS_NETTEST_FAULT value (empty or None → no faults)."""
    faults = []
    for part in (text or "").split(";"):
        part = part.strip()
        if part:
            faults.append(_parse_one(part))
    return tuple(faults)


def _parse_one(part: str) -> Fault:
    where = f"{FAULT_ENV}: {part!r}"
    kind, _, options = part.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown fault {kind!r}; allowed: {', '.join(KINDS)}")
    values = {}
    for item in options.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in ("rank", "host", "sleep_ms", "after", "gbps", "var"):
            raise ValueError(f"{where}: bad option {item.strip()!r}; allowed: rank=R, host=H, sleep_ms=MS, "
                             f"after=N, gbps=G, var=NAME")
        values[key] = value
    if ("rank" in values) == ("host" in values):
        raise ValueError(f"{where}: name exactly one of rank=R or host=H")
    try:
        rank = int(values["rank"]) if "rank" in values else None
        sleep_ms = float(values.get("sleep_ms", DEFAULT_SLEEP_MS))
        after = int(values.get("after", 0))
        gbps = float(values["gbps"]) if "gbps" in values else None
    except ValueError:
        raise ValueError(f"{where}: rank and after must be integers, sleep_ms and gbps numbers") from None
    if rank is not None and rank < 0 or sleep_ms < 0 or after < 0:
        raise ValueError(f"{where}: rank, after and sleep_ms must not be negative")
    if gbps is not None and not gbps > 0:
        raise ValueError(f"{where}: gbps must be above 0")
    if (kind == "drift") != ("var" in values):
        raise ValueError(f"{where}: var=NAME goes with drift, and drift needs it")
    return Fault(kind, rank, values.get("host"), sleep_ms, after, gbps, values.get("var"))


@attrs.define
class ActiveFaults:
    """The faults that apply to this rank, as the runner uses them."""

    sleep_s: float = 0.0             # every timed operation (a slow rank)
    host_sleep_s: float = 0.0        # timed operations that cross hosts (a slow host's network)
    seconds_per_byte: float = 0.0    # every timed operation, per byte (a slow rank at a rate)
    host_seconds_per_byte: float = 0.0  # crossing timed operations, per byte (a slow link at a rate)
    corrupt: bool = False
    absent: bool = False
    die_after: Optional[int] = None   # timed operations before the rank dies (None: never)
    never_starts: bool = False
    matmul_sleep_s: float = 0.0      # the pre-flight matmul (a compute-slow rank or host)
    bad_checksum: bool = False       # the pre-flight matmul's result is wrong
    drifted: Tuple[str, ...] = ()    # environment variables reported as DRIFTED_VALUE
    operations: int = 0

    @classmethod
    def for_rank(cls, faults: Sequence[Fault], rank: int, host: str) -> "ActiveFaults":
        mine = [f for f in faults if f.applies_to(rank, host)]
        dies = [f.after for f in mine if f.kind == "die"]
        slow = [f for f in mine if f.kind == "slow" and f.gbps is None]
        rated = [f for f in mine if f.kind == "slow" and f.gbps is not None]
        return cls(sleep_s=sum(f.sleep_ms for f in slow if f.rank is not None) / 1000.0,
                   host_sleep_s=sum(f.sleep_ms for f in slow if f.rank is None) / 1000.0,
                   seconds_per_byte=sum(1 / (f.gbps * 1e9) for f in rated if f.rank is not None),
                   host_seconds_per_byte=sum(1 / (f.gbps * 1e9) for f in rated if f.rank is None),
                   corrupt=any(f.kind == "corrupt" for f in mine),
                   absent=any(f.kind == "absent" for f in mine),
                   die_after=min(dies) if dies else None,
                   never_starts=any(f.kind == "never-start" for f in mine),
                   matmul_sleep_s=sum(f.sleep_ms for f in mine if f.kind == "slow-matmul") / 1000.0,
                   bad_checksum=any(f.kind == "bad-checksum" for f in mine),
                   drifted=tuple(f.var for f in mine if f.kind == "drift" and f.var))

    def inside_timed_region(self, crosses_hosts: bool = True, size_bytes: int = 0) -> None:
        """Called before every timed operation: the injected slowness, or death.
        ``crosses_hosts``: the operation's group or pair holds ranks of another host;
        ``size_bytes``: its message size (for the faults given as a rate)."""
        if self.die_after is not None:
            if self.operations >= self.die_after:
                os._exit(DIE_EXIT_CODE)
            self.operations += 1
        pause = self.sleep_s + size_bytes * self.seconds_per_byte
        if crosses_hosts:
            pause += self.host_sleep_s + size_bytes * self.host_seconds_per_byte
        if pause:
            time.sleep(pause)

    def inside_matmul(self) -> None:
        """Called inside each timed pre-flight matmul: the injected compute slowness — busy,
        ``matmul_sleep_s`` of this process's CPU time, as a slow processor spends it."""
        if self.matmul_sleep_s:
            until = time.process_time() + self.matmul_sleep_s
            while time.process_time() < until:
                pass

    def environment(self, environ: Mapping[str, str]) -> Dict[str, str]:
        """``environ`` as this rank reports it: the drifted variables set to DRIFTED_VALUE."""
        return {**environ, **{var: DRIFTED_VALUE for var in self.drifted}}

    def never_start(self) -> None:
        """The injected death before the start-up (called before the default group forms)."""
        if self.never_starts:
            os._exit(DIE_EXIT_CODE)

    def stay_away(self) -> None:
        """The injected absence: never enter (the launcher or the peers' exit ends this)."""
        if self.absent:
            time.sleep(ABSENT_SLEEP_S)
