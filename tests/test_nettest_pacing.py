"""The pacing of nettest's periodic store calls (pure): whatever the world size, the whole world
makes at most the budget's calls per second, and exactly the budget once no floor applies —
counted by simulating every rank's calls over a horizon, not read back from the formula."""
from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgroups.nettest.pacing import (BEAT_FLOOR_S, POLL_FLOOR_S, STORE_CALLS_PER_S, WATCH_FLOOR_S, Pacing,
                                    paced_interval)


def calls_in(interval_s: float, horizon_s: float) -> int:
    """Calls one rank makes at 0, interval, 2·interval, … before ``horizon_s``."""
    return math.ceil(horizon_s / interval_s - 1e-9)


def world_calls_per_s(pacing: Pacing, horizon_s: float) -> float:
    """Every rank's watcher checks, polls and heartbeats in [0, horizon), all ranks together, per second."""
    per_rank = sum(calls_in(i, horizon_s) for i in (pacing.watch_s, pacing.poll_s, pacing.beat_s))
    return pacing.world_size * per_rank / horizon_s


@settings(max_examples=300, deadline=None)
@given(world=st.integers(1, 1_000_000), budget=st.sampled_from([1000.0, STORE_CALLS_PER_S, 50_000.0]))
def test_the_world_never_makes_more_periodic_calls_than_the_budget(world, budget):
    pacing = Pacing(world, budget)
    horizon = 1000 * max(pacing.watch_s, pacing.poll_s, pacing.beat_s)   # long enough for the boundary call to vanish
    assert world_calls_per_s(pacing, horizon) <= budget * (1 + 3 / 1000) + 1e-9
    # the floors hold: no rank calls more often than a small world's ranks do
    assert pacing.watch_s >= WATCH_FLOOR_S and pacing.poll_s >= POLL_FLOOR_S and pacing.beat_s >= BEAT_FLOOR_S


@settings(max_examples=100, deadline=None)
@given(small=st.integers(2000, 100_000), large=st.integers(100_000, 1_000_000))
def test_past_the_floors_the_calls_per_second_are_the_same_at_every_world_size(small, large):
    # from 2,000 ranks world / (8000 * share) >= every floor: 2000 / 2000 = 1.0 s for beats and
    # watches (a quarter of 8,000 each), 2000 / 4000 = 0.5 s >= 0.05 s for polls
    rates = [world_calls_per_s(Pacing(world), 1000 * Pacing(world).watch_s) for world in (small, large)]
    assert rates[0] == pytest.approx(STORE_CALLS_PER_S, rel=4e-3)
    assert rates[1] == pytest.approx(STORE_CALLS_PER_S, rel=4e-3)
    # ... so per rank they fall as 1 / world
    assert rates[1] / large < rates[0] / small or small == large


def test_the_paced_intervals_at_16384_ranks():
    pacing = Pacing(16384)
    assert (pacing.watch_s, pacing.poll_s, pacing.beat_s) == (8.192, 4.096, 8.192)
    assert Pacing(8).watch_s == WATCH_FLOOR_S and Pacing(8).poll_s == POLL_FLOOR_S


@settings(max_examples=200, deadline=None)
@given(world=st.integers(1, 100_000), waited=st.floats(0.0, 100.0))
def test_a_wait_makes_at_most_four_extra_polls_in_its_first_interval(world, waited):
    pacing = Pacing(world)
    delays = list(itertools.islice(pacing.poll_delays(), 400))
    times = list(itertools.accumulate([0.0] + delays))
    polls = [t for t in times if t <= waited]
    if times[-1] > waited:
        # reference: the steady schedule of a poll every poll_s from 0, plus 4 at most
        assert len(polls) <= math.floor(waited / pacing.poll_s) + 1 + 4
    assert all(d <= pacing.poll_s for d in delays) and delays[4:] == [pacing.poll_s] * (len(delays) - 4)
    assert delays[0] == pacing.poll_s / 16


def test_bad_input_names_what_is_wrong():
    with pytest.raises(ValueError, match="world_size must be at least 1, got 0"):
        paced_interval(0, 1.0, 10.0)
    with pytest.raises(ValueError, match="calls_per_s must be positive, got 0"):
        paced_interval(8, 1.0, 0.0)
