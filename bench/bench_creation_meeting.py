"""The store traffic of group creation at scale: N emulated ranks meeting through one real TCPStore.

Before each creation step the members of a group meet through the rendezvous store
(:class:`pgroups.backend.CreationRendezvous`): that gives the creation deadline whose error names
who never entered, and the agreement on how many groups each member holds. With the ``split`` and
``all`` strategies (one creation call by every rank) the meeting is world-wide; with ``local``
only a group's members meet. This benchmark measures what those meetings cost the store when the
world is large: each emulated rank is a thread with its own store client (as each real rank has
its own connection), in a few worker processes (so that the clients are not all behind one GIL),
and every rank runs ``--steps`` meetings, as a build of that many world-wide steps would.

Printed per world size and meeting kind: store calls per rank and per step, the wall time of one
step (the slowest rank, median over steps), the calls per second the store served, and the time
projected to ``--project`` ranks (linear in the world: every rank's calls go to the one store).

    python bench/bench_creation_meeting.py                        # worlds 256 512 1024 2048
    python bench/bench_creation_meeting.py --worlds 2048 --steps 8
    python bench/bench_creation_meeting.py --markdown docs/benchmarks.md   # also rewrite its section there

On a 2-core machine the clients and the store share the cores: the times are an upper bound of
what the store alone needs; the load average is printed with each run.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Dict, Sequence

import torch.distributed as dist

from _report import Report, add_markdown_argument, markdown_path  # bench/ is the script's directory
from pgroups.backend import CreationRendezvous

TIMEOUT_S = 300.0
GROUP = 8   # the ``local`` meeting's group size (a tensor-parallel group of 8)


class CountingStore:
    """A store client that counts its calls (each one round trip to the store)."""

    def __init__(self, store: Any) -> None:
        self._store, self.calls = store, 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return method(*args, **kwargs)
        return counted


def worker(ranks: Sequence[int], world: int, port: int, steps: int, kind: str, prefix: str,
           begin: Any, out: Any) -> None:
    """Ranks ``ranks`` (one thread each) run ``steps`` meetings; per rank: calls, step end times."""
    results: Dict[int, Any] = {}
    clients = {r: CountingStore(dist.TCPStore("127.0.0.1", port, world + 1, False,
                                              timeout=datetime.timedelta(seconds=TIMEOUT_S),
                                              wait_for_workers=False)) for r in ranks}
    ready = threading.Barrier(len(ranks) + 1)

    def one(rank: int) -> None:
        store = clients[rank]
        meeting = CreationRendezvous(store, TIMEOUT_S)
        first = rank // GROUP * GROUP
        members = list(range(world)) if kind == "world" else list(range(first, first + GROUP))
        ready.wait()
        ends = []
        for step in range(steps):
            meeting.meet(f"{prefix}/s{step}/{members[0]}", "bench", members, rank, 0)
            ends.append(time.perf_counter())
        results[rank] = (store.calls, ends)

    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in ranks]
    for t in threads:
        t.start()
    begin.wait()        # every worker's clients are connected
    ready.wait()
    for t in threads:
        t.join()
    out.put(results)


def measure(world: int, steps: int, kind: str, procs: int, port: int) -> Dict[str, float]:
    prefix = f"w{world}-{kind}-{time.monotonic_ns()}"
    ctx = multiprocessing.get_context("fork")
    begin, out = ctx.Barrier(procs + 1), ctx.Queue()
    chunks = [list(range(world))[p::procs] for p in range(procs)]
    workers = [ctx.Process(target=worker, args=(c, world, port, steps, kind, prefix, begin, out)) for c in chunks]
    for w in workers:
        w.start()
    begin.wait()
    started = time.perf_counter()
    results: Dict[int, Any] = {}
    for _ in workers:
        results.update(out.get(timeout=TIMEOUT_S * 2))
    for w in workers:
        w.join()
    wall = time.perf_counter() - started
    calls = [c for c, _ in results.values()]
    ends = [max(results[r][1][k] for r in results) for k in range(steps)]   # a step ends with its slowest rank
    step_times = [ends[0] - started] + [b - a for a, b in zip(ends, ends[1:])]
    return {"calls_per_rank": statistics.mean(calls) / steps, "step_s": statistics.median(step_times),
            "wall_s": wall, "calls_per_s": sum(calls) / wall}


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--procs", type=int, default=4, help="worker processes holding the emulated ranks")
    parser.add_argument("--kinds", nargs="+", default=["world", "local"], choices=["world", "local"])
    parser.add_argument("--project", type=int, default=16384)
    add_markdown_argument(parser)
    args = parser.parse_args(argv)
    report = Report("creation-meeting", argv, markdown_path(parser, args), script=Path(__file__).name)
    store = dist.TCPStore("127.0.0.1", 0, max(args.worlds) + 1, True,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S), wait_for_workers=False)
    report.note(f"{args.steps} meetings per rank and world; {args.procs} worker processes hold the emulated "
                f"ranks; TCPStore libuv backend: {getattr(store, 'libuvBackend', '?')}")
    table = report.table("", ["world", "meeting", "calls/rank/step", "step (s)", "store calls/s",
                              f"step at {args.project} (s, projected)"], "rlrrrr", stream=True)
    for world in args.worlds:
        for kind in args.kinds:
            m = measure(world, args.steps, kind, args.procs, store.port)
            table.add(world, kind, f"{m['calls_per_rank']:.2f}", f"{m['step_s']:.3f}",
                      f"{m['calls_per_s']:.0f}", f"{m['step_s'] * args.project / world:.1f}")
    report.finish()


if __name__ == "__main__":
    main()
