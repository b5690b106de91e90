"""How often a rank of ``pgroups nettest`` calls the rendezvous store on its own initiative. Pure.

The control plane's periodic calls — the watcher thread's abort check, a waiting rank's poll,
the heartbeat — are what grows with the world: every rank makes them for as long as it runs.
:class:`Pacing` spaces them by the world size so that the whole world together makes at most a
fixed number of them per second (``budget``), at 8 ranks as at 16,384. The calls that carry
data (a rank's figures, its position, a plan) are a constant number per rank and step, not
periodic, and are not paced.
"""
from __future__ import annotations

from typing import Iterator

import attrs

#: Periodic store calls per second of the whole world, at most, in steady state. One TCPStore
#: client on loopback here makes about 32,000 calls per second; the budget leaves the store
#: three quarters of its time for the calls that carry data (rank 0's collection above all).
STORE_CALLS_PER_S = 8000.0
WATCH_FLOOR_S = 0.5    # the watcher's abort check, at most this often
POLL_FLOOR_S = 0.05    # a waiting rank's poll, at most this often
BEAT_FLOOR_S = 1.0     # a heartbeat (add, or a waiting rank's read), at most this often
#: The budget's shares: the watcher's checks, the polls, the heartbeats (they sum to 1).
WATCH_SHARE, POLL_SHARE, BEAT_SHARE = 0.25, 0.5, 0.25
#: A wait polls first at once, then after poll_s/16, /8, /4, /2, then every poll_s: a wait
#: that ends soon is seen soon, and a wait makes at most FIRST_POLLS polls in its first poll_s.
FIRST_POLLS = 5


def paced_interval(world_size: int, floor_s: float, calls_per_s: float) -> float:
    """Seconds between one rank's periodic calls of one kind so that ``world_size`` ranks
    together make at most ``calls_per_s`` of them per second: ``max(floor_s, world_size /
    calls_per_s)``. Rate of the world = world_size / interval <= calls_per_s, for every
    world size (the floor only makes it smaller). ValueError for a world below 1 or a rate
    that is not positive."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not calls_per_s > 0:
        raise ValueError(f"calls_per_s must be positive, got {calls_per_s}")
    return max(floor_s, world_size / calls_per_s)


@attrs.frozen
class Pacing:
    """One rank's periodic store calls in a world of ``world_size`` ranks.

    - ``watch_s``: the watcher thread checks the abort flag (one call) every ``watch_s``;
    - ``poll_s``: a rank waiting for the others (an exchange, a plan) polls (one call) at most
      every ``poll_s`` once its first FIRST_POLLS polls are done (:meth:`poll_delays`);
    - ``beat_s``: a measuring rank adds to the heartbeat counter, a waiting rank reads it
      (one call), at most every ``beat_s``.

    Bound: each interval is :func:`paced_interval` of its share of ``budget``, so the world's
    periodic calls per second in steady state, ``world_size * (1/watch_s + 1/poll_s +
    1/beat_s)`` (:meth:`world_calls_per_s`), are at most ``budget`` — equal to it once the
    world is large enough that no floor applies (2,000 ranks at the default budget) — and
    per rank they fall as 1/world_size. A wait adds at most FIRST_POLLS - 1 polls in its
    first ``poll_s``. What it costs: the time to notice an abort (``watch_s``), the end of a
    wait (``poll_s``) and a stall (``beat_s``) grows with the world beyond the floors —
    2.0, 1.0, 2.0 s at 4,096 ranks; 8.2, 4.1, 8.2 s at 16,384.
    """

    world_size: int
    budget: float = STORE_CALLS_PER_S

    @property
    def watch_s(self) -> float:
        return paced_interval(self.world_size, WATCH_FLOOR_S, self.budget * WATCH_SHARE)

    @property
    def poll_s(self) -> float:
        return paced_interval(self.world_size, POLL_FLOOR_S, self.budget * POLL_SHARE)

    @property
    def beat_s(self) -> float:
        return paced_interval(self.world_size, BEAT_FLOOR_S, self.budget * BEAT_SHARE)

    def world_calls_per_s(self) -> float:
        """The whole world's periodic calls per second in steady state (every rank waiting
        or measuring, its watcher running)."""
        return self.world_size * (1 / self.watch_s + 1 / self.poll_s + 1 / self.beat_s)

    def poll_delays(self) -> Iterator[float]:
        """The sleeps between a waiting rank's polls: poll_s/16, /8, /4, /2, then poll_s
        forever (the first poll comes at once)."""
        for step in range(FIRST_POLLS - 1, 0, -1):
            yield self.poll_s / 2 ** step
        while True:
            yield self.poll_s
