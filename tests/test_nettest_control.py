"""The control plane's bookkeeping on a real TCPStore, in this one process (no data plane):
per-rank run counters, keys deleted after a normal and after an aborted run, threads joined,
rank 0 reading the ranks' figures in slices, liveness on its own connection."""
from __future__ import annotations

import datetime
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

from pgroups.nettest.bench import Bench
from pgroups.nettest.control import SLICE_BYTES, Coordinator, NettestTimeoutError, second_client, slices
from pgroups.testing.nettest_control import end_aborted_run
from pgroups.testing.nettest_faults import ActiveFaults


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
        assert {"pgroups-nettest-watch", "pgroups-nettest-wait"} <= set(nettest_threads())
        coordinator.close()
        coordinator.shutdown()
        bench.close()
    finally:
        dist.destroy_process_group()
    assert nettest_threads() == before


def test_slices_cover_every_rank_once_in_order_within_the_byte_budget():
    # Reference from first principles: the ranges concatenate to range(world); their count is
    # ceil(total / budget) bounded by [1, world]; with even payloads no slice exceeds the
    # budget by more than one rank's payload.
    for world in (1, 2, 7, 64, 1000, 16384):
        for per_rank in (0, 1, 4096, 35000):
            total = world * per_rank
            got = slices(world, total, SLICE_BYTES)
            assert [r for a, b in got for r in range(a, b)] == list(range(world))
            assert len(got) == max(1, min(world, -(-total // SLICE_BYTES)))
            assert all((b - a) * per_rank <= SLICE_BYTES + per_rank for a, b in got)


def test_rank_0_reads_every_payload_in_slices_not_one_call(store, monkeypatch):
    # Four ranks (threads, one client each) exchange payloads over 1 KB compressed (random hex); with a 1 KB slice
    # budget rank 0 must read them in four multi_get calls, in rank order.
    import pgroups.nettest.control as control

    monkeypatch.setattr(control, "SLICE_BYTES", 1024)
    world, got, multi_gets = 4, {}, []
    real_multi_get = dist.PrefixStore.multi_get

    def counting_multi_get(self, keys):
        multi_gets.append(len(keys))
        return real_multi_get(self, keys)

    monkeypatch.setattr(dist.PrefixStore, "multi_get", counting_multi_get)

    def rank_main(rank):
        client = dist.TCPStore(store.host, store.port, None, False, wait_for_workers=False)
        coordinator = Coordinator(client, rank, world, 10.0, ["h"] * world)
        try:
            got[rank] = coordinator.exchange("sweep0", {"rank": rank, "noise": os.urandom(1200).hex()})
            if rank == 0:   # as every step ends: rank 0 publishes, the others read (their figures stay till then)
                coordinator.publish("verdict", {"exit_code": 0})
            else:
                coordinator.fetch("verdict")
            coordinator.close()
        finally:
            coordinator.shutdown()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [p["rank"] for p in got[0]] == [0, 1, 2, 3]
    assert all(got[r] is None for r in (1, 2, 3))
    assert multi_gets == [1, 1, 1, 1]


def test_the_watcher_answers_an_abort_on_its_own_connection_while_the_main_one_is_busy(store):
    # The main connection is held for 3 s (as by rank 0 reading a large world's figures) when
    # another rank raises the abort: the watcher must see it and answer on the liveness
    # connection meanwhile, so no one takes this rank for silent, and the main thread learns
    # of the abort without a store call of its own.
    client = dist.TCPStore(store.host, store.port, None, False, wait_for_workers=False)
    coordinator = Coordinator(client, 0, 2, 10.0, ["h", "h"], liveness_store=second_client(client))
    raiser = Coordinator(dist.TCPStore(store.host, store.port, None, False, wait_for_workers=False), 1, 2, 10.0,
                         ["h", "h"])
    try:
        assert coordinator.liveness is not coordinator.store
        coordinator.start_liveness()
        busy = coordinator.store._thread.submit(lambda: time.sleep(3.0))
        assert raiser.abort({"message": "group nettest#0 hung", "detected_by": 1})
        assert raiser.silent_ranks(2.2) == []    # rank 1 answered when it raised it, rank 0's watcher since
        assert not busy.done.is_set()            # ... while rank 0's main connection was still busy
        calls = coordinator.store.calls
        with pytest.raises(NettestTimeoutError, match="nettest#0 hung"):
            coordinator.check_abort()
        assert coordinator.store.calls == calls
        busy.done.wait(5)
    finally:
        coordinator.shutdown()
        raiser.shutdown()


def test_a_waiting_rank_of_a_large_world_polls_at_the_paced_interval(store):
    # Rank 1 of a 2,048-rank world waits 1.5 s for a plan. Paced, it polls at once, after
    # poll_s/16, /8, /4, /2, then every poll_s (0.512 s), and reads the heartbeat every
    # beat_s (1.024 s): at most 5 + 1 polls and 2 reads. Unpaced (the 50 ms poll ceiling of
    # a small world and an abort check every 0.5 s) it made about 40.
    world = 2048
    waiter = Coordinator(dist.TCPStore(store.host, store.port, None, False, wait_for_workers=False), 1, world,
                         30.0, ["h"] * world)
    publisher = Coordinator(dist.TCPStore(store.host, store.port, None, False, wait_for_workers=False), 0, world,
                            30.0, ["h"] * world)
    assert (waiter.pacing.poll_s, waiter.pacing.beat_s) == (0.512, 1.024)
    timer = threading.Timer(1.5, publisher.publish, args=("retest", {"tasks": []}))
    try:
        calls = waiter.calls
        timer.start()
        begun = time.monotonic()
        assert waiter.fetch("retest") == {"tasks": []}
        waited = time.monotonic() - begun
        made = waiter.calls - calls - 1   # the last: the plan's get
        # reference: polls in [0, waited] at 0, T/16, 3T/16, 7T/16, 15T/16, then every T; reads every 1.024 s
        poll_s = 0.512
        times = [0.0] + [poll_s * (1 - 2.0 ** -k) for k in (4, 3, 2, 1)]
        while times[-1] + poll_s <= waited + poll_s:
            times.append(times[-1] + poll_s)
        assert waited >= 1.5
        assert made <= len(times) + 2, (made, waited)
    finally:
        timer.join()
        waiter.shutdown()
        publisher.shutdown()


def test_an_aborted_run_of_several_ranks_on_the_store_host_leaves_no_key(store):
    # Four ranks on the store's host (threads, one client pair each) end an aborted run
    # together: each answers, leaves in order and deletes. Rank 0 used to delete the shared
    # keys while another rank still polled aborted-left with add(key, 0), which recreated it:
    # one key left behind, and that rank waited out the 2 s leave bound.
    world, finals, errors = 4, {}, []
    before = store.num_keys()
    coordinators = [Coordinator(dist.TCPStore(store.host, store.port, None, False, wait_for_workers=False), r, world,
                                10.0, ["h"] * world) for r in range(world)]
    report = {"message": "group nettest#0 hung", "kind": "timeout", "detected_by": 2}

    def rank_main(coordinator):
        try:
            coordinator.start_liveness()
            if coordinator.rank == 2:
                coordinator.abort(report)
            finals[coordinator.rank] = end_aborted_run(coordinator)[0]
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            coordinator.shutdown()

    threads = [threading.Thread(target=rank_main, args=(c,)) for c in coordinators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and sorted(finals) == [0, 1, 2, 3], errors
    assert all(f["missing"] == [] for f in finals.values())
    assert store.num_keys() == before + world   # only the per-rank run counters stay


def test_rank_0_decodes_the_payloads_with_the_cyclic_gc_off_and_restores_it(store, monkeypatch):
    # Decoded JSON holds no cycles; with the collector on, rank 0's decode of 2,048 kept
    # payloads cost twice the CPU. Every decode must run with it off, and it is on after.
    import gc

    import pgroups.nettest.control as control

    seen = []
    real_decode = control.decode_payload

    def watching_decode(blob):
        seen.append(gc.isenabled())
        return real_decode(blob)

    monkeypatch.setattr(control, "decode_payload", watching_decode)
    coordinator = Coordinator(store, 0, 1, 5.0, ["h"])
    try:
        assert gc.isenabled()
        assert coordinator.exchange("sweep0", {"rank": 0}) == [{"rank": 0}]
        assert seen == [False] and gc.isenabled()
        gc.disable()   # a collector the caller turned off stays off
        coordinator.exchange("sweep1", None)
        assert seen == [False, False] and not gc.isenabled()
    finally:
        gc.enable()
        coordinator.shutdown()
