"""The control plane of ``pgroups nettest`` at scale: N emulated ranks against one real TCPStore.

Each emulated rank is a thread with its own :class:`Coordinator` (its two client connections
to the store, their call threads, its watcher thread) — or, with ``--light``, rank 0 and one
rank per process are, and every other rank is a light rank (``_light_ranks.py``: the same
store calls, driven by one ``selectors`` loop per process) — running the control-plane traffic
of a run with no data plane:

1. *measure*: each rank "measures" for a random 0.5–2.5 s, calling ``beat()`` every 10 ms
   (as the data plane does after each operation: heartbeats and abort checks), then
2. a sweep exchange carrying the records of ``-c all`` over the default sweep (8 B … 64 MiB,
   factor 2: 24 sizes x 6 collectives per rank) — the early ranks poll while the late ones
   measure, and rank 0 collects every payload (direct: ``multi_get`` slices of the N keys);
3. the same payloads collected by *host aggregation*, for comparison: each host's first rank
   reads its 8 ranks' payloads and writes them as one key, rank 0 reads N/8 keys; then rank 0
   reads the N keys directly again (as warm as the aggregation was: the fair comparison);
4. rank 0 thinks for 1 s (beating) while the others wait for its plan (polls), a small scan
   exchange;
5. rank 0 raises the abort flag: every rank's watcher must see it and answer (no false
   "stopped answering"), the run ends as an aborted run does (final report, leaving in order,
   every key deleted).

Printed per world size: store connections per rank, store calls per rank (median, max; rank 0
apart), the store calls per second of the whole emulation (wall of steps 1–5), rank 0's
collection time (direct and by host aggregation; decode included), the time for every rank to
answer the abort, ranks that did not answer, errors ("store gone"), keys left. ``--baseline W``
adds world W unpaced (every interval at its small-world floor: the calls per second grow
with the world).

Projection to 16,384 ranks: the collection reads and decodes every payload once, so its time
grows linearly with N (t x 16384 / N); the periodic calls per second of the world are at most
pacing.STORE_CALLS_PER_S at any N (equal to it from 2,000 ranks), so the store's periodic load
does not grow; the abort reaches every rank within one watch interval (max(0.5, N / 2000) s).

    python bench/bench_nettest_control.py                    # worlds 256 1024 2048
    python bench/bench_nettest_control.py --worlds 256 1024 2048 4096 --light --compare 256 --alone 0 --markdown docs/benchmarks.md
    python bench/bench_nettest_control.py --worlds --alone 2048 --markdown docs/benchmarks.md   # rank 0 alone

On this 2-core machine every emulated rank's threads share 2 cores with the others (and the
store): the times are an upper bound of what the store itself needs.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist

from pgroups.nettest import metrics
from pgroups.nettest.control import (ALIVE_WINDOW_S, SLICE_BYTES, STORE_CALL_TIMEOUT_S, Coordinator,
                                     NettestTimeoutError, decode_payload, encode_payload, second_client, slices)
from pgroups.nettest.pacing import Pacing
from pgroups.testing.nettest_control import end_aborted_run

from _light_ranks import pack, unpack  # bench/ is the script's directory
from _report import Report, add_markdown_argument, markdown_path

HOSTS_RANKS = 8
UNPACED = 1e12   # a budget no world reaches: every interval at its floor
#: How often an emulated rank's main thread wakes while it "measures" or waits for the abort
#: (the real data plane beats after each operation). A wake-up makes no store call unless a
#: paced interval has passed (beat_s and watch_s are at least 0.5 s): waking every 0.1 s instead
#: of every 10 ms leaves the store's traffic as it was and spares 2 cores some 200,000 thread
#: wake-ups per second at 2,048 ranks, which starved the store's own callers.
BEAT_LOOP_S = 0.1


def sweep_records(rank: int, rng: random.Random) -> List[Dict[str, Any]]:
    """One rank's records of a ``-c all`` default sweep, shaped as Bench.measure returns them."""
    sizes = metrics.size_sweep(metrics.DEFAULT_MIN_BYTES, 64 * 1024 * 1024, 2)
    records = []
    for collective in metrics.COLLECTIVES:
        for size in sizes:
            seconds = size / 1e9 * rng.uniform(1.0, 1.3) + 2e-5
            records.append({"rank": rank, "collective": collective, "size": size, "count": max(1, size // 4),
                            "times": [seconds], "op_best": seconds * rng.uniform(0.9, 1.0), "wrong": 0,
                            "wrong_from": {}, "group": f"nettest#{rank // 32}"})
    return records


def aggregate_by_host(coordinator: Coordinator, step: str) -> Tuple[float, float]:
    """Step 3: the host's first rank writes its host's payloads as one key; rank 0 reads the
    N/8 host keys (slices of SLICE_BYTES) and decodes every payload. Rank 0's (wall, CPU)
    seconds, from the barrier before it to the last payload decoded (its process's CPU)."""
    store, rank, world = coordinator.store, coordinator.rank, coordinator.world_size
    coordinator.exchange(f"{step}-agg-start", None)
    begun, cpu = time.perf_counter(), time.process_time()
    hosts = range(0, world, HOSTS_RANKS)
    if rank % HOSTS_RANKS == 0:
        mine = [f"{step}/data/{r}" for r in range(rank, min(world, rank + HOSTS_RANKS))]
        blob = pack(store.call("multi_get", mine))
        store.set(f"agg/{rank}", blob)
        store.add("agg/bytes", len(blob))
        store.add("agg/arrived", 1)
    if rank != 0:
        coordinator.exchange(f"{step}-agg-end", None)
        return 0.0, 0.0
    delays = coordinator.pacing.poll_delays()
    while int(store.add("agg/arrived", 0)) < len(hosts):
        time.sleep(min(next(delays), 0.01))
    total, values = int(store.add("agg/bytes", 0)), 0
    for first, last in slices(len(hosts), total, SLICE_BYTES):
        for value in store.call("multi_get", [f"agg/{h}" for h in list(hosts)[first:last]]):
            values += len([decode_payload(b) for b in unpack(value)])
    seconds, cpu_s = time.perf_counter() - begun, time.process_time() - cpu
    assert values == world, (values, world)
    again, cpu = time.perf_counter(), time.process_time()   # direct again, warm as this was: the fair comparison
    total = int(store.add(f"{step}/bytes", 0))
    for first, last in slices(world, total, SLICE_BYTES):
        values += len([decode_payload(b) for b in store.call("multi_get", [f"{step}/data/{r}" for r in range(first, last)])])
    coordinator.direct_again = (time.perf_counter() - again, time.process_time() - cpu)
    for key in [f"agg/{h}" for h in hosts] + ["agg/bytes", "agg/arrived"]:
        store.delete_key(key)
    coordinator.exchange(f"{step}-agg-end", None)
    return seconds, cpu_s


def connect(host: str, port: int) -> Tuple[dist.TCPStore, Optional[dist.Store]]:
    """One emulated rank's two store connections (the default store's client and its clone)."""
    client = dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=120), wait_for_workers=False)
    return client, second_client(client)


def rank_main(rank: int, world: int, budget: float, clients: Tuple[dist.TCPStore, Optional[dist.Store]], start: Any,
              out: Dict[str, Any]) -> None:
    """One emulated rank's control plane (a thread); its counts and rank 0's figures go to ``out``."""
    hostnames = [f"host{r // HOSTS_RANKS}" for r in range(world)]
    rng = random.Random(rank)
    client, liveness = clients
    out["connections"] = 1 + (liveness is not None)
    coordinator = None
    begun = time.perf_counter()
    try:
        coordinator = Coordinator(client, rank, world, 60.0, hostnames, liveness_store=liveness)
        if budget != Pacing(world).budget:
            coordinator.pacing = Pacing(world, budget)
        coordinator.start_liveness()
        records = sweep_records(rank, rng)
        start.wait(1800)
        begun = time.perf_counter()
        out["step"] = "1 measure"
        until = time.monotonic() + rng.uniform(0.5, 2.5)
        while time.monotonic() < until:   # 1. measuring: the data plane beats after each operation
            coordinator.beat()
            time.sleep(BEAT_LOOP_S)
        out["step"] = "2 sweep exchange"
        coordinator.exchange("sweep0", records)                  # 2. direct collection on rank 0
        out["collect_s"], out["collect_cpu_s"] = coordinator.collect_s, coordinator.collect_cpu_s
        out["step"] = "3 host aggregation"
        out["aggregate_s"], out["aggregate_cpu_s"] = aggregate_by_host(coordinator, "sweep0")   # 3. host aggregation
        out["again_s"], out["again_cpu_s"] = getattr(coordinator, "direct_again", (0.0, 0.0))
        out["step"] = "4 plan"
        if rank == 0:                                            # 4. rank 0 thinks, the others wait
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                coordinator.beat()
                time.sleep(0.01)
            coordinator.publish("retest", {"tasks": []})
        else:
            coordinator.fetch("retest")
        coordinator.exchange("scan0", [{"pair": [rank, rank ^ 1], "times": [1e-3]}])
        out["calls_before_abort"] = coordinator.calls
        out["steps_s"] = time.perf_counter() - begun
        out["step"] = "5 abort"
        if rank == 0:                                            # 5. the abort, and who answers it
            coordinator.abort({"message": "bench: the end", "kind": "stall", "detected_by": 0})
        final, out["answer_s"] = end_aborted_run(coordinator, poll_s=BEAT_LOOP_S)   # rank 0: until every rank answered
        out["silent"] = final.get("missing", [])
    except (NettestTimeoutError, RuntimeError, threading.BrokenBarrierError) as exc:
        out["error"] = f"rank {rank} (step {out.get('step', '0 start')}, {time.perf_counter() - begun:.1f} s in): {type(exc).__name__}: {exc}"
    finally:
        if coordinator is not None:
            out["calls"] = coordinator.calls
            coordinator.shutdown()


def worker(index: int, workers: int, world: int, budget: float, host: str, port: int, results: Any,
           everyone: Any, light: bool) -> None:
    """One process: rank 0 alone in the first (as in a real job, its process serves only it),
    ranks 1 … spread over the others — as threads of real Coordinators, or (``light``) the
    first of them real and the others light ranks driven by this thread (:mod:`_light_ranks`).
    They start together once every rank of every process has its coordinator (``everyone``: a
    barrier of the processes)."""
    threading.stack_size(512 * 1024)
    mine = [0] if index == 0 else list(range(index, world, workers - 1))
    real, lights = (mine[:1], mine[1:]) if light else (mine, [])
    start = threading.Barrier(len(real) + (1 if lights else 0), action=lambda: everyone.wait(1800))
    outs: Dict[int, Dict[str, Any]] = {rank: {} for rank in real}
    # connected one after the other: 4,096 connects at once overflowed the server's listen
    # backlog, and clients retrying with back-off took over 6 minutes to connect 2,048 ranks
    clients = [connect(host, port) for _ in real]
    threads = [threading.Thread(target=rank_main, args=(r, world, budget, c, start, outs[r]))
               for r, c in zip(real, clients)]
    for thread in threads:
        thread.start()
    if lights:
        outs.update(run_light(lights, world, budget, host, port, start))
    for thread in threads:
        thread.join()
    results.put(outs)


def run_light(ranks: List[int], world: int, budget: float, host: str, port: int, start: Any) -> Dict[int, Dict[str, Any]]:
    """Light ranks ``ranks`` in this thread: connect (two raw connections each), take the run
    counter, wait at ``start`` with the real ranks, run the script; their figures."""
    import _light_ranks as light
    import _store_wire as wire

    pacing = Pacing(world, budget)
    loop = light.Loop()
    none_blob = encode_payload(None)
    small = encode_payload([{"pair": [0, 1], "times": [1e-3]}])
    scripts = []
    for rank in ranks:
        rng = random.Random(rank)   # as rank_main: the same records, then the same measuring time
        blob = encode_payload(sweep_records(rank, rng))
        r = light.LightRank(rank, world, pacing, wire.connect(host, port, rank), wire.connect(host, port, rank))
        loop.register(r)
        scripts.append(light.Script(r, HOSTS_RANKS, rng.uniform(0.5, 2.5), blob, small, BEAT_LOOP_S, none_blob))
    for script in scripts:
        loop.spawn(script.start())
    loop.run()
    start.wait(1800)
    for script in scripts:
        loop.spawn(script.watcher())
        loop.spawn(script.run())
    loop.run()
    return {script.r.rank: light.result(script.r) for script in scripts}


def one_world(world: int, budget: float, server: dist.TCPStore, workers: int, light: bool = False) -> Dict[str, Any]:
    """Run the control plane of ``world`` emulated ranks in ``workers`` processes; rank 0's
    figures and the per-rank counts."""
    context = multiprocessing.get_context("forkserver")   # torch imported once, not once per process
    context.set_forkserver_preload(["torch", "torch.distributed", "pgroups.nettest.control"])
    results = context.Queue()
    keys_before = server.num_keys()
    everyone = context.Barrier(workers)
    processes = [context.Process(target=worker,
                                 args=(i, workers, world, budget, server.host, server.port, results, everyone, light))
                 for i in range(workers)]
    for process in processes:
        process.start()
    outs: Dict[int, Dict[str, Any]] = {}
    for _ in processes:
        outs.update(results.get())
    for process in processes:
        process.join()
    calls = sorted(outs[r].get("calls", 0) for r in range(1, world))
    steps_s = max(o.get("steps_s", 0.0) for o in outs.values())
    result = dict(outs[0])
    result.update(world=world, calls_per_s=sum(o.get("calls_before_abort", 0) for o in outs.values()) / max(steps_s, 1e-9),
                  errors=[o["error"] for o in outs.values() if "error" in o], calls0=outs[0].get("calls", 0),
                  calls_max=calls[-1], calls_median=calls[len(calls) // 2], steps_s=steps_s,
                  connections=max(o.get("connections", 0) for o in outs.values()),
                  keys_left=server.num_keys() - keys_before - world)   # the per-rank run counters stay
    return result


COLUMNS = ["ranks", "pacing", "store conns / rank", "calls / rank (median, max)", "calls, rank 0",
           "store calls/s", "collection: first (CPU s) → projected CPU s", "direct again", "by host",
           "abort answered by all, s", "no answer", "errors (store gone)", "keys left", "load"]


def add_row(table: Any, r: Dict[str, Any], label: str, project: int) -> None:
    """One run's row; the collection's CPU seconds projected to ``project`` ranks (x project / N)."""
    load = f"{os.getloadavg()[0]:.1f}"
    if "collect_s" not in r or r["errors"]:
        kinds: Dict[str, int] = {}
        for error in r["errors"]:
            kind = "store gone" if "store" in error and "gone" in error else error.split(":")[1].strip()
            kinds[kind] = kinds.get(kind, 0) + 1
        table.add(r["world"], label, *[""] * 9, ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())), "", load)
        def seconds_in(error: str) -> float:
            return float(error.split(", ", 1)[1].split(" s in")[0]) if " s in)" in error else 0.0
        for error in sorted(r["errors"], key=seconds_in)[:3]:
            print(f"  the earliest: {error[:300]}", flush=True)
        return
    scale = project / r["world"]

    def collection(wall: float, cpu: float) -> str:
        return f"{wall:.2f} ({cpu:.2f}) → {cpu * scale:.1f}"

    table.add(r["world"], label, r["connections"], f"{r['calls_median']}, {r['calls_max']}", r["calls0"],
              f"{r['calls_per_s']:.0f}", collection(r["collect_s"], r["collect_cpu_s"]),
              collection(r["again_s"], r["again_cpu_s"]), collection(r["aggregate_s"], r["aggregate_cpu_s"]),
              f"{r['answer_s']:.2f}", len(r["silent"]), 0, r["keys_left"], load)


def alone(report: Report, count: int, project: int) -> None:
    """Rank 0's collection with nothing else running, through the real ``Coordinator.exchange``:
    ``count - 1`` ranks' payloads posted as each rank posts its own (one ``set`` each), then
    rank 0's exchange reads and decodes them all — with the cyclic GC paused during the decode
    (as the tool does) and, as the baseline, with it running. Wall and CPU seconds, and the CPU
    projected to ``project`` ranks."""
    import contextlib

    import pgroups.nettest.control as control

    server = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=120),
                           wait_for_workers=False)
    blobs = [encode_payload(sweep_records(r, random.Random(r))) for r in range(64)]
    table = report.table(f"rank 0's collection alone: {count} payloads of {len(blobs[0]) / 1024:.1f} KB, "
                         f"projected to {project} (CPU x {project} / {count})",
                         ["decode", "wall s", "CPU s", f"CPU s at {project}", "load"])
    paused = control.gc_paused
    for label, pause in (("GC paused (the tool)", paused), ("GC running (before)", contextlib.nullcontext),
                         ("GC paused, again", paused)):
        control.gc_paused = pause
        coordinator = Coordinator(server, 0, count, 60.0, ["h"] * count)
        step = f"alone{len(table.rows)}"
        for rank in range(1, count):
            coordinator.store.set(f"{step}/data/{rank}", blobs[rank % 64])
            coordinator.store.add(f"{step}/bytes", len(blobs[rank % 64]))
        coordinator.store.add(f"{step}/arrived", count - 1)
        values = coordinator.exchange(step, sweep_records(0, random.Random(0)))
        assert values is not None and len(values) == count
        del values
        table.add(label, f"{coordinator.collect_s:.2f}", f"{coordinator.collect_cpu_s:.2f}",
                  f"{coordinator.collect_cpu_s * project / count:.1f}", f"{os.getloadavg()[0]:.1f}")
        coordinator.close()
        coordinator.shutdown()
    control.gc_paused = paused


IN_NETNS = "PGROUPS_BENCH_IN_NETNS"


def in_own_netns(argv: List[str]) -> bool:
    """Re-run this script in a network namespace of its own (loopback only), when it can
    (root, ``unshare`` and ``ip`` present); returns False if it cannot (the caller goes on here).

    Why: every store connection makes its client and the server look up the peer's name
    (``::ffff:127.0.0.1``, not in /etc/hosts, so it goes to DNS). On this machine about 4% of
    those lookups waited 5 s on the resolver, and the server answers nothing meanwhile:
    connecting 4,096 clients took 13 minutes. With no route to a resolver the lookup fails at
    once (torch logs "The hostname of the client socket cannot be retrieved") and 1,000
    connections take about 1 s."""
    import shutil
    import subprocess

    if os.environ.get(IN_NETNS) or os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        return False
    env = dict(os.environ, **{IN_NETNS: "1"})
    command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
               str(Path(__file__).resolve()), *argv]
    code = subprocess.call(command, env=env)
    if code:
        sys.exit(code)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="*", default=[256, 1024, 2048],
                        help="emulated world sizes (none: only --alone, into a section of its own)")
    parser.add_argument("--project", type=int, default=16384)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes the emulated ranks are spread over (default 16; with --light 5)")
    parser.add_argument("--light", action="store_true",
                        help="one real Coordinator per process (rank 0 alone in its own), every other rank a light "
                             "rank: the same store calls from a selectors loop, no threads of its own")
    parser.add_argument("--shared-netns", action="store_true",
                        help="stay in this network namespace (default: a namespace of its own when root)")
    parser.add_argument("--compare", type=int, nargs="*", default=[], metavar="WORLD",
                        help="with --light: also run these worlds with real Coordinators only (the model's check)")
    parser.add_argument("--alone", type=int, default=2048, metavar="N",
                        help="rank 0's collection of N payloads alone, GC paused and running (0: skip)")
    parser.add_argument("--budget", type=float, default=Pacing(1).budget,
                        help="periodic store calls/s of the whole world (the pacing's budget; default the tool's)")
    parser.add_argument("--baseline", type=int, nargs="*", default=[], metavar="WORLD",
                        help="also run these worlds unpaced (every interval at its small-world floor)")
    add_markdown_argument(parser)
    args = parser.parse_args(argv)
    if not args.shared_netns and in_own_netns(sys.argv[1:] if argv is None else list(argv)):
        return 0
    if args.workers is None:
        args.workers = 5 if args.light else 16
    section = "nettest-control" if args.worlds else "nettest-control-alone"
    report = Report(section, argv, markdown_path(parser, args), script=Path(__file__).name)
    payload = encode_payload(sweep_records(0, random.Random(0)))
    pacing = Pacing(args.project)
    if os.environ.get(IN_NETNS):
        report.note("Run in a network namespace of its own (loopback only): each store connection's reverse name "
                    "lookup fails at once instead of waiting on this machine's resolver.")
    report.note(f"Store call deadline {STORE_CALL_TIMEOUT_S:g} s; payload {len(payload) / 1024:.1f} KB per rank "
                f"(`-c all`, default sweep); {args.workers} processes. Collections: wall s (rank 0's CPU s) → CPU s "
                f"projected to {args.project} ranks (x {args.project} / N). At {args.project} ranks the pacing gives "
                f"watch {pacing.watch_s:.2f} s, poll {pacing.poll_s:.2f} s, beat {pacing.beat_s:.2f} s: at most "
                f"{pacing.world_calls_per_s():.0f} periodic store calls/s of the world; abort window "
                f"{ALIVE_WINDOW_S + pacing.watch_s:.1f} s.")
    if args.alone:
        alone(report, args.alone, args.project)
    if not args.worlds:
        report.finish()
        return 0
    table = report.table("emulated ranks against one TCPStore", COLUMNS, stream=True)
    for world in args.worlds:
        runs = [(args.budget, f"paced, {args.budget:g}/s", args.light, args.workers)]
        runs += [(UNPACED, "unpaced", args.light, args.workers)] if world in args.baseline else []
        runs += [(args.budget, f"paced, {args.budget:g}/s", False, 16)] if args.light and world in args.compare else []
        for budget, label, light, workers in runs:
            server = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=120),
                                   wait_for_workers=False)   # a new store per run: its keys are the run's
            kind = f"light ({workers - 1} real)" if light else "real"
            add_row(table, one_world(world, budget, server, workers, light), f"{label}, {kind}", args.project)
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
