"""The start-up roll call on a real TCPStore, in one process: who a failed start-up names.

Ranks start seconds apart on a loaded machine, so their start-up deadlines end seconds apart:
a rank that did its roll call and gave up first stops its heartbeat before a later rank
watches the heartbeats. It is not missing; a rank that registered and then stopped beating is.
"""
from __future__ import annotations

import datetime
import time

import pytest
import torch.distributed as dist

from pgroups.nettest.startup import Arrival, StartupBoard, encode_arrival

WORLD = 3


def board(port: int, rank: int) -> StartupBoard:
    b = StartupBoard("127.0.0.1", port, rank, WORLD, f"host{rank}", None, None, "test", 10.0)
    b.beat_s, b.roll_call_s = 0.05, 0.5   # the roll call sees 10 beats of a live rank
    return b


def registered(server, ranks: int, limit_s: float = 30.0) -> None:
    key = "pgroups-nettest/start/test/register"
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.check([key]) and server.get(key).decode().count(";") >= ranks:
            return
        time.sleep(0.01)
    raise AssertionError(f"fewer than {ranks} ranks registered: {server.get(key) if server.check([key]) else None}")


@pytest.mark.timeout(60)
def test_a_rank_that_gave_up_first_is_not_named_and_a_dead_one_is():
    server = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    # rank 0 registered and died at once (no heartbeat); ranks 1 and 2 are alive
    server.append("pgroups-nettest/start/test/register", encode_arrival(Arrival(0, "host0")))
    early, late = board(server.port, 1), board(server.port, 2)
    early.start()
    late.start()
    registered(server, WORLD)
    first = early.find_missing()   # rank 1's deadline comes first: it gives up, its heartbeat ends
    assert first is not None and first.went_silent == (0,) and first.never_arrived == ()
    second = late.find_missing()   # rank 2 watches after rank 1 has stopped beating
    assert second is not None and second.never_arrived == ()
    assert second.went_silent == (0,), "rank 1 gave up itself: it is not missing"
    assert second.hosts == {0: "host0"}
