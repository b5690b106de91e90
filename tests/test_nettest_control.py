"""The control plane's bookkeeping on a real TCPStore, in this one process (no data plane):
per-rank run counters, keys deleted after a normal and after an aborted run, threads joined."""
from __future__ import annotations

import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from pgroups.nettest.bench import Bench
from pgroups.nettest.control import Coordinator, NettestTimeoutError
from pgroups.nettest.faults import ActiveFaults


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=10))


def nettest_threads():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("pgroups-nettest"))


def test_a_rank_never_reuses_a_run_id_when_another_rank_missed_a_run(store):
    # World 2 on one store: in the first run rank 1 never built its coordinator. With one shared
    # counter divided by the world size, rank 0's second run got the first run's id again (and
    # read its keys, an abort flag among them). Per-rank counters: each rank's ids are 0, 1, 2 …
    first = Coordinator(store, 0, 2, 5.0, ["h", "h"])
    second0, second1 = Coordinator(store, 0, 2, 5.0, ["h", "h"]), Coordinator(store, 1, 2, 5.0, ["h", "h"])
    assert (first.run_id, second0.run_id, second1.run_id) == (0, 1, 0)
    for c in (first, second0, second1):
        c.shutdown()


def test_an_aborted_run_deletes_its_keys_and_joins_its_threads(store):
    before_keys, before_threads = store.num_keys(), nettest_threads()
    coordinator = Coordinator(store, 0, 1, 5.0, ["h"])
    coordinator.start_liveness()
    coordinator.position("sweep 1/1 nettest#0 all_reduce 8 B")
    coordinator.exchange("sweep0", [])
    coordinator.publish("retest", {"tasks": []})
    report = {"message": "group nettest#0: all_reduce did not complete", "detected_by": 0}
    assert coordinator.abort(report)
    with pytest.raises(NettestTimeoutError, match="did not complete"):
        coordinator.check_abort()
    final = coordinator.conclude_abort(report)   # rank 0 still answers: nobody is missing
    assert final["missing"] == []
    coordinator.leave_after_abort(final)
    coordinator.close_after_abort(final)
    coordinator.shutdown()
    assert store.num_keys() == before_keys + 1   # only this rank's run counter stays
    assert nettest_threads() == before_threads


def test_a_finished_run_joins_the_coordinator_and_waiter_threads(store):
    before = nettest_threads()
    dist.init_process_group("gloo", store=dist.PrefixStore("world", store), rank=0, world_size=1)
    try:
        coordinator = Coordinator(store, 0, 1, 5.0, ["h"])
        coordinator.start_liveness()
        bench = Bench(torch.device("cpu"), coordinator, ActiveFaults(), 5.0, warmup=0, iters=1)
        data = torch.ones(4)
        bench.run(lambda: [dist.all_reduce(data, async_op=True)])
        assert data.tolist() == [1.0] * 4
        assert {"pgroups-nettest-alive", "pgroups-nettest-wait"} <= set(nettest_threads())
        coordinator.close()
        coordinator.shutdown()
        bench.close()
    finally:
        dist.destroy_process_group()
    assert nettest_threads() == before
