"""The control plane of ``pgroups nettest`` at scale: N emulated ranks against one real TCPStore.

Each emulated rank is a thread of this process with its own :class:`Coordinator` (its own two
client connections to the store, its own call threads and liveness thread) — the control-plane
traffic of a run with no data plane: a sweep exchange carrying the records of ``-c all`` over
the default sweep (8 B … 64 MiB, factor 2: 24 sizes x 6 collectives per rank), a plan that
rank 0 publishes and every rank fetches, a second exchange, rank 0's liveness check (who
stopped answering over ALIVE_WINDOW_S, as after an abort: must be nobody), and the end of the
run (every key deleted). Printed per world size: store connections and calls per rank (rank 0
apart), the payload, rank 0's collection time, and the projection to 16,384 ranks (the
collection reads every rank's payload once: its time grows with world x payload).

**Baseline** in the same run: what the tool did before — rank 0 reads every rank's
uncompressed JSON in one ``multi_get`` with one fixed 8 s deadline.

    python bench/bench_nettest_control.py                    # worlds 256 512 1024 2048
    python bench/bench_nettest_control.py --worlds 2048 --project 16384
    python bench/bench_nettest_control.py --worlds 256 512 2048 --markdown docs/benchmarks.md   # and its section

On this 2-core machine every rank's thread shares the GIL with the others: the times are an
upper bound of what the store itself needs. ``alone`` times rank 0's collection with nothing
else of the benchmark running, in wall and in CPU seconds (client and store server share this
process): on a machine shared with other work the CPU seconds are the figure that projects.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from pgroups.nettest import metrics
from pgroups.nettest.control import (ALIVE_WINDOW_S, STORE_CALL_TIMEOUT_S, Coordinator, NettestTimeoutError,
                                     encode_payload, second_client)

from _report import Report, add_markdown_argument, markdown_path  # bench/ is the script's directory

HOSTS_RANKS = 8


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


def rank_main(rank: int, world: int, host: str, port: int, start: Any, out: Dict[str, Any]) -> None:
    """One emulated rank's control plane (a thread); its counts and rank 0's figures go to ``out``."""
    hostnames = [f"host{r // HOSTS_RANKS}" for r in range(world)]
    rng = random.Random(rank)
    client = dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    liveness = second_client(client)
    out["connections"] = 1 + (liveness is not None)
    coordinator = None
    try:
        coordinator = Coordinator(client, rank, world, 60.0, hostnames, liveness_store=liveness)
        coordinator.start_liveness()
        start.wait(600)
        records = sweep_records(rank, rng)
        coordinator.exchange("sweep0", records)
        if rank == 0:
            coordinator.publish("retest", {"tasks": []})
        else:
            coordinator.fetch("retest")
        coordinator.exchange("scan0", [{"pair": [rank, rank ^ 1], "times": [1e-3]}])
        if rank == 0:
            out["collect_s"], out["decode_s"] = coordinator.collect_s, coordinator.decode_s
            out["baseline_s"] = baseline(world, client, records)
            silent_started = time.perf_counter()
            out["silent"] = coordinator.silent_ranks(ALIVE_WINDOW_S)
            out["silent_check_s"] = time.perf_counter() - silent_started
            out["payload"] = len(encode_payload(records))
            out["payload_json"] = len(json.dumps(records))
        coordinator.exchange("end", None)
        coordinator.close()
    except (NettestTimeoutError, RuntimeError, threading.BrokenBarrierError) as exc:
        out["error"] = f"rank {rank}: {type(exc).__name__}: {exc}"
    finally:
        if coordinator is not None:
            out["calls"] = coordinator.calls
            coordinator.shutdown()


def worker(index: int, workers: int, world: int, host: str, port: int, results: Any) -> None:
    """One process: rank 0 alone in the first (as in a real job, its process serves only it),
    ranks 1 … spread over the others, as threads."""
    threading.stack_size(512 * 1024)
    mine = [0] if index == 0 else list(range(index, world, workers - 1))
    start = threading.Barrier(len(mine))
    outs = {rank: {} for rank in mine}
    threads = [threading.Thread(target=rank_main, args=(r, world, host, port, start, outs[r])) for r in mine]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(outs)


def one_world(world: int, server: dist.TCPStore, workers: int) -> Dict[str, Any]:
    """Run the control plane of ``world`` emulated ranks in ``workers`` processes; rank 0's
    figures and the per-rank counts."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=worker, args=(i, workers, world, server.host, server.port, results))
                 for i in range(workers)]
    begun = time.perf_counter()
    for process in processes:
        process.start()
    outs: Dict[int, Dict[str, Any]] = {}
    for _ in processes:
        outs.update(results.get())
    for process in processes:
        process.join()
    calls = [outs[r].get("calls", 0) for r in range(world)]
    result = dict(outs[0])
    wall_s = time.perf_counter() - begun
    result.update(world=world, wall_s=wall_s, calls_per_s=sum(calls) / wall_s,
                  errors=[o["error"] for o in outs.values() if "error" in o],
                  calls0=calls[0], calls_max=max(calls[1:]), calls_median=sorted(calls[1:])[world // 2],
                  connections=max(o.get("connections", 0) for o in outs.values()), keys_left=server.num_keys())
    return result


def baseline(world: int, client: dist.TCPStore, records: List[Dict[str, Any]]) -> float:
    """The previous collection, timed in rank 0's process: ``world`` copies of its records as
    plain JSON read in one multi_get and decoded. Seconds."""
    payload = json.dumps(records)
    keys = [f"baseline/{r}" for r in range(world)]
    client.multi_set(keys, [payload] * world)
    begun = time.perf_counter()
    values = [json.loads(v) for v in client.multi_get(keys)]
    seconds = time.perf_counter() - begun
    assert len(values) == world
    for key in keys:
        client.delete_key(key)
    return seconds


def alone(report: Report, server: dist.TCPStore, count: int, project: int) -> None:
    """Rank 0's collection with nothing else running: ``count`` payloads of one rank's -c all
    records read in slices and decoded, as Coordinator.exchange does; projected to ``project``."""
    from pgroups.nettest.control import SLICE_BYTES, decode_payload, slices

    records = sweep_records(0, random.Random(0))
    blob = encode_payload(records)
    keys = [f"alone/{r}" for r in range(count)]
    server.multi_set(keys, [blob] * count)
    begun, cpu = time.perf_counter(), time.process_time()
    store_s = 0.0
    for first, last in slices(count, len(blob) * count, SLICE_BYTES):
        got = time.perf_counter()
        blobs = server.multi_get(keys[first:last])
        store_s += time.perf_counter() - got
        values = [decode_payload(b) for b in blobs]
        assert len(values) == last - first
    total, total_cpu = time.perf_counter() - begun, time.process_time() - cpu
    plain = json.dumps(records)
    server.multi_set(keys, [plain] * count)
    begun, cpu = time.perf_counter(), time.process_time()
    values = [json.loads(v) for v in server.multi_get(keys)]
    baseline_s, baseline_cpu = time.perf_counter() - begun, time.process_time() - cpu
    for key in keys:
        server.delete_key(key)
    scale = project / count
    report.note(f"alone, {count} payloads (server in this process): sliced read + decode {total:.2f} s wall, "
          f"{total_cpu:.2f} s CPU (store wait {store_s:.2f} s); projected to {project}: {total * scale:.1f} s wall, "
          f"{total_cpu * scale:.1f} s CPU. Baseline, one multi_get of plain JSON + decode: {baseline_s:.2f} s wall, "
                f"{baseline_cpu:.2f} s CPU; projected {baseline_s * scale:.1f} s wall, {baseline_cpu * scale:.1f} s CPU "
                f"(load average {os.getloadavg()[0]:.1f})")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--project", type=int, default=16384)
    parser.add_argument("--alone", type=int, default=2048, help="payloads for the collection timed alone")
    parser.add_argument("--workers", type=int, default=9, help="processes the emulated ranks are spread over")
    add_markdown_argument(parser)
    args = parser.parse_args(argv)
    report = Report("nettest-control", argv, markdown_path(parser, args), script=Path(__file__).name)
    server = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=60),
                           wait_for_workers=False)
    report.note(f"store call deadline {STORE_CALL_TIMEOUT_S:g} s; projection to {args.project} ranks; "
                f"{args.workers} processes")
    alone(report, server, args.alone, args.project)
    table = report.table("", ["ranks", "conns/rank", "calls/rank (median, max)", "calls rank 0",
                              "payload/rank (JSON -> sent)", "collect s (decode)", "projected s",
                              "baseline 1 multi_get s", "baseline projected s", "silent", "errors", "keys left",
                              "wall s (store calls/s)", "liveness check s", "load"], stream=True)
    failures = []
    for world in args.worlds:
        keys_before = server.num_keys()
        r = one_world(world, server, args.workers)
        failures += [f"{world} ranks: {error}" for error in r["errors"][:3]]
        if "collect_s" not in r:
            table.add(world, *["-"] * 9, len(r["errors"]), *["-"] * 4)
            continue
        base = r["baseline_s"]
        scale = args.project / world
        table.add(world, r["connections"], f"{r['calls_median']}, {r['calls_max']}", r["calls0"],
                  f"{r['payload_json'] / 1024:.1f} KB -> {r['payload'] / 1024:.1f} KB",
                  f"{r['collect_s']:.2f} ({r['decode_s']:.2f})", f"{r['collect_s'] * scale:.1f}", f"{base:.2f}",
                  f"{base * scale:.1f}", len(r["silent"]), len(r["errors"]), r["keys_left"] - keys_before - world,
                  f"{r['wall_s']:.1f} ({r['calls_per_s']:.0f})", f"{r['silent_check_s']:.1f}",
                  f"{os.getloadavg()[0]:.1f}")
    for failure in failures:
        report.note(f"error: {failure}")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
