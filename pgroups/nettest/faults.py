"""Fault injection — a TEST-ONLY hook, so that the tool's own tests can prove it finds faults.

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
    never-start:host=node7      every rank of node7 exits before joining the default group:
                                torchrun started there, its ranks died before the test began

A ``slow:rank=R`` fault slows every operation of rank R, inside its host too (a slow rank).

A fault names ``rank=R`` or ``host=H``. Parsing is pure; a bad spec raises ValueError naming
the part that is wrong and what is allowed.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence, Tuple

import attrs

FAULT_ENV = "PGROUPS_NETTEST_FAULT"
KINDS = ("slow", "corrupt", "absent", "die", "never-start")
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
        if not sep or key not in ("rank", "host", "sleep_ms", "after"):
            raise ValueError(f"{where}: bad option {item.strip()!r}; allowed: rank=R, host=H, sleep_ms=MS, after=N")
        values[key] = value
    if ("rank" in values) == ("host" in values):
        raise ValueError(f"{where}: name exactly one of rank=R or host=H")
    try:
        rank = int(values["rank"]) if "rank" in values else None
        sleep_ms = float(values.get("sleep_ms", DEFAULT_SLEEP_MS))
        after = int(values.get("after", 0))
    except ValueError:
        raise ValueError(f"{where}: rank and after must be integers and sleep_ms a number") from None
    if rank is not None and rank < 0 or sleep_ms < 0 or after < 0:
        raise ValueError(f"{where}: rank, after and sleep_ms must not be negative")
    return Fault(kind, rank, values.get("host"), sleep_ms, after)


@attrs.define
class ActiveFaults:
    """The faults that apply to this rank, as the runner uses them."""

    sleep_s: float = 0.0             # every timed operation (a slow rank)
    host_sleep_s: float = 0.0        # timed operations that cross hosts (a slow host's network)
    corrupt: bool = False
    absent: bool = False
    die_after: Optional[int] = None   # timed operations before the rank dies (None: never)
    never_starts: bool = False
    operations: int = 0

    @classmethod
    def for_rank(cls, faults: Sequence[Fault], rank: int, host: str) -> "ActiveFaults":
        mine = [f for f in faults if f.applies_to(rank, host)]
        dies = [f.after for f in mine if f.kind == "die"]
        slow = [f for f in mine if f.kind == "slow"]
        return cls(sleep_s=sum(f.sleep_ms for f in slow if f.rank is not None) / 1000.0,
                   host_sleep_s=sum(f.sleep_ms for f in slow if f.rank is None) / 1000.0,
                   corrupt=any(f.kind == "corrupt" for f in mine),
                   absent=any(f.kind == "absent" for f in mine),
                   die_after=min(dies) if dies else None,
                   never_starts=any(f.kind == "never-start" for f in mine))

    def inside_timed_region(self, crosses_hosts: bool = True) -> None:
        """Called before every timed operation: the injected slowness, or death.
        ``crosses_hosts``: the operation's group or pair holds ranks of another host."""
        if self.die_after is not None:
            if self.operations >= self.die_after:
                os._exit(DIE_EXIT_CODE)
            self.operations += 1
        pause = self.sleep_s + (self.host_sleep_s if crosses_hosts else 0.0)
        if pause:
            time.sleep(pause)

    def never_start(self) -> None:
        """The injected death before the start-up (called before the default group forms)."""
        if self.never_starts:
            os._exit(DIE_EXIT_CODE)

    def stay_away(self) -> None:
        """The injected absence: never enter (the launcher or the peers' exit ends this)."""
        if self.absent:
            time.sleep(ABSENT_SLEEP_S)
