"""The start-up register (pure): who never arrived, who stopped answering, which hosts; and the
roll call on a real TCPStore, in one process."""
from __future__ import annotations

import datetime
import time

import pytest
import torch.distributed as dist

from pgroups.nettest.startup import (Arrival, StartupBoard, absentees, describe, encode_arrival, launch_tag,
                                     node_of, parse_register)


def register_of(entries):
    return parse_register("".join(encode_arrival(a) for a in entries))


def test_the_register_round_trips_and_skips_garbage():
    entries = [Arrival(0, "hostA", 0), Arrival(3, "hostB", None), Arrival(12, "n-7.example.org", 3)]
    text = "".join(encode_arrival(a) for a in entries) + "junk;;7|x;"
    assert parse_register(text) == {a.rank: a for a in entries}


def test_missing_ranks_get_the_host_of_a_node_mate():
    # 3 nodes x 2 ranks (torchrun: node n holds ranks 2n, 2n+1); rank 5 never came, node 2's
    # rank 4 did: rank 5's host is known; ranks 2 and 3 (node 1) sent nobody: host unknown
    register = register_of([Arrival(0, "hostA", 0), Arrival(1, "hostA", 0), Arrival(4, "hostC", 2)])
    missing = absentees(6, register, silent=[], local_world_size=2)
    assert missing.never_arrived == (2, 3, 5) and missing.went_silent == ()
    assert missing.hosts == {2: "?", 3: "?", 5: "hostC"}
    assert missing.known_hosts == ["hostC"]
    line = describe(missing, 20.0)
    assert line.startswith("the default group did not form within --timeout 20s: ")
    assert "ranks [2, 3, 5] (hosts hostC; the others' host unknown) never arrived" in line


def test_ranks_that_registered_and_went_silent_are_named_with_their_own_host():
    register = register_of([Arrival(r, f"h{r // 2}", r // 2) for r in range(6) if r != 5])
    missing = absentees(6, register, silent=[4, 9], local_world_size=2)   # 9 never registered: ignored
    assert missing.never_arrived == (5,) and missing.went_silent == (4,)
    assert missing.ranks == [4, 5] and missing.known_hosts == ["h2"]
    assert describe(missing, 5).endswith(
        "ranks [5] (hosts h2) never arrived; ranks [4] (hosts h2) stopped answering "
        "(their host or their processes died before the test began)")


def test_without_node_information_no_host_is_guessed():
    register = register_of([Arrival(0, "a"), Arrival(1, "a")])
    missing = absentees(3, register, silent=[], local_world_size=None)
    assert missing.hosts == {2: "?"} and "ranks [2] (host unknown) never arrived" in describe(missing, 1)


def test_launch_tags_differ_per_launch_and_nodes_come_from_the_launcher():
    assert launch_tag({"TORCHELASTIC_RUN_ID": "j1", "TORCHELASTIC_RESTART_COUNT": "2"}) == "tr-j1-2"
    assert launch_tag({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "3"}) == "slurm-77-3"
    assert launch_tag({"MASTER_PORT": "29500"}) == "port-29500"
    assert node_of({"GROUP_RANK": "4"}) == 4 and node_of({"SLURM_NODEID": "2"}) == 2 and node_of({}) is None


# ---- the roll call on a real store ---------------------------------------------------------------
# Ranks start seconds apart on a loaded machine, so their start-up deadlines end seconds apart:
# a rank that did its roll call and gave up first stops its heartbeat before a later rank
# watches the heartbeats. It is not missing; a rank that registered and then stopped beating is.
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
