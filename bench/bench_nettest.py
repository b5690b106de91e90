"""What ``pgroups nettest`` measures on this machine, and what it costs.

1. busbw per collective on 2 / 4 / 8 local gloo ranks (one group: the world), as the tool
   reports it at the largest size, beside the **baseline**: a bare torch.distributed loop
   (same collective, size, warm-up and iterations, ``dist.<op>`` back to back, no verification,
   no heartbeat) run in the same session. The ratio tool / bare shows that the tool's figures
   are the network's, not its own overhead.
2. Wall time of the default run ``pgroups nettest --nproc 8`` (8 B … 64 MiB, all_reduce,
   nettest + host groups) beside the **baseline** ``pgroups run --nproc 8`` (start 8 processes,
   build and check every group: the cost of starting at all).

3. ``--scale``: the pure diagnosis at 1024 hosts x 8 ranks (world 8192), no processes:
   (a) the group diagnosis (find_slow + find_wrong) over every collective at every size of
   the default sweep, beside the **baseline** of the previous quadratic leave-one-out (each
   group's reference recomputed from all its peers); (b) the link scan on the synthetic
   network with one slow host (and with four faults): rounds and rank 0's thinking time.

    python bench/bench_nettest.py                       # the full table (several minutes here)
    python bench/bench_nettest.py --ranks 2 4 --size 16M --skip-default
    python bench/bench_nettest.py --scale               # the pure diagnosis at world 8192
    python bench/bench_nettest.py --scale --markdown docs/benchmarks.md   # and rewrite its section there
    python bench/bench_nettest.py --default-only --repeats 3   # part 2 alone, medians of 3

4. ``--netns-healthy N`` (root): time to verdict on the emulated cluster of
   tests/nettest_netns.py (every host's link at 100 Mbit/s) — N healthy runs at 3 and at 4
   hosts (2 ranks each), then one run each with a slow host, two slow hosts of four, a slow
   link, and a link so slow that one operation takes seconds: verdicts, exit codes, the tool's
   and the wall time.

    python bench/bench_nettest.py --netns-healthy 10

5. ``--netns-sensitivity N`` (root): NCCL's threshold on the emulated cluster — every host's
   link at R = 100 Mbit/s; N healthy runs, N with one host at 0.7 R, N with one link at
   0.7 R: how often the fault is named (and nothing else), false alarms, time to the verdict.

    python bench/bench_nettest.py --netns-sensitivity 10

Loopback gloo on a 2-core machine: the figures say how this machine behaves, not a network.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from pgroups.nettest import metrics
from pgroups.nettest.bench import launch, make_buffers
from pgroups.spawn import run_local
from pgroups.units import format_bytes

from _report import Report, add_markdown_argument, markdown_path  # bench/ is the script's directory


def bare_loop(collectives: List[str], size_bytes: int, warmup: int, iters: int) -> Dict[str, float]:
    """The baseline, on one rank: seconds per operation of a bare loop, per collective."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    ranks, me = list(range(dist.get_world_size())), dist.get_rank()
    seconds = {}
    for collective in collectives:
        shape = metrics.message_shape(collective, size_bytes, len(ranks))
        buffers = make_buffers(collective, shape, ranks, me, torch.device("cpu"), corrupt=False)
        recv = buffers.timed if collective == "all_reduce" else buffers.recv
        for _ in range(warmup):
            for work in launch(collective, None, ranks, me, buffers.timed, recv):
                work.wait()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            for work in launch(collective, None, ranks, me, buffers.timed, recv):
                work.wait()
        seconds[collective] = (time.perf_counter() - start) / iters
    dist.destroy_process_group()
    return seconds


def tool_figures(nproc: int, size: str, warmup: int, iters: int) -> Dict[str, float]:
    """busbw (GB/s) the tool reports at ``size`` for every collective over the world group."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "net.json")
        cmd = [sys.executable, "-m", "pgroups.nettest", "--nproc", str(nproc), "--modes", "global",
               "--no-host-groups", "-c", "all", "-b", size, "-e", size, "-n", str(iters), "-w", str(warmup),
               "--no-followup", "--quiet", "--json", path]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode not in (0, 1):
            raise SystemExit(f"nettest failed ({done.returncode}): {done.stderr.strip()}")
        report = json.load(open(path))
    return {m["collective"]: m["busbw_gbps"] for m in report["measurements"]}


def wall(cmd: List[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return time.perf_counter() - start


def quadratic_outliers(values, higher_is_better, rule):
    """The baseline: leave-one-out as it was, the peers' median and MAD recomputed per group."""
    from pgroups.nettest.diagnosis import worse_than_peers

    found = {}
    for key, value in values.items():
        dev = worse_than_peers(value, [v for k, v in values.items() if k != key], higher_is_better, rule)
        if dev is not None:
            found[key] = dev
    return found


def scale(report: Report, hosts: int = 1024, ranks_per_host: int = 8, repeats: int = 3) -> None:
    """Part 3: the pure diagnosis at ``hosts`` x ``ranks_per_host``."""
    import random
    import statistics

    from pgroups.nettest import diagnosis
    from pgroups.nettest.groups import build_catalog
    from pgroups.nettest.linkscan import LinkScan, run_scan
    from pgroups.testing.nettest_network import SyntheticNetwork, host_names

    world = hosts * ranks_per_host
    names = host_names(hosts, ranks_per_host)
    catalog = build_catalog({"nettest": [list(range(i, i + 32)) for i in range(0, world, 32)]}, names)
    rng = random.Random(0)
    sizes = metrics.size_sweep(8, 64 * 1024 * 1024, 2)
    measurements = [diagnosis.Measurement(g.id, c, metrics.message_shape(c, size, g.size).size_bytes, g.size, 1,
                                          (1e-5 + size / 1e9) * rng.uniform(0.9, 1.2))
                    for g in catalog for c in metrics.COLLECTIVES for size in sizes]
    rule = diagnosis.Thresholds()

    def timed(outliers_fn) -> float:
        original = diagnosis.outliers
        diagnosis.outliers = outliers_fn
        try:
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                diagnosis.find_slow(catalog, measurements, rule)
                diagnosis.find_wrong(catalog, measurements)
                runs.append(time.perf_counter() - start)
            return statistics.median(runs)
        finally:
            diagnosis.outliers = original

    ours, base = timed(diagnosis.outliers), timed(quadratic_outliers)
    table = report.table(f"group diagnosis, world {world} ({hosts} hosts x {ranks_per_host}), {len(catalog)} groups, "
                         f"{len(metrics.COLLECTIVES)} collectives x {len(sizes)} sizes = {len(measurements)} "
                         f"measurements; median of {repeats}", ["approach", "seconds", "vs baseline"])
    table.add("quadratic leave-one-out (baseline)", base, "1.00x")
    table.add("sorted leave-one-out (pgroups)", ours, f"{ours / base:.3f}x")
    table = report.table(f"link scan, {hosts} hosts x {ranks_per_host} ranks, synthetic network (pure; measuring "
                         "excluded)", ["faults", "inter rounds", "intra rounds", "think s", "named"], "lrrrl")

    def host(index: int) -> str:  # the faults' hosts and ranks are chosen at 1024 hosts; smaller runs wrap them
        return f"node{index % hosts:04d}"
    for label, faults in (("one slow host", {"host": [host(513)]}),
                          ("slow host, link, 2 ranks", {"host": [host(100)], "link": [(host(0), host(1))],
                                                        "rank": [77 % world, 4000 % world]})):
        thinking = []
        for seed in range(repeats):
            net = SyntheticNetwork(names, seed=seed)
            for h in faults.get("host", []):
                net.host_factor[h] = 0.02
            for a, b in faults.get("link", []):
                net.slow_link(a, b, 0.05)
            for r in faults.get("rank", []):
                net.rank_factor[r] = 0.05
            spent = [0.0]

            def measure(round_, net=net, spent=spent):
                begin = time.perf_counter()
                samples = net.measure(round_)
                spent[0] += time.perf_counter() - begin
                return samples

            start = time.perf_counter()
            scan = run_scan(LinkScan(names), measure)
            culprits = scan.culprits()
            thinking.append(time.perf_counter() - start - spent[0])
        named = ", ".join(f"{c.kind} {c.hosts[0]}" + (f" r{c.ranks[0]}" if c.kind == "rank" else "") for c in culprits)
        table.add(label, scan.inter_rounds(), len(scan.rounds) - scan.inter_rounds(), statistics.median(thinking),
                  named)


def shaped_run(cluster_class: Any, hosts: int, rate: str, host_rates: Dict[int, str], link_rates: Dict[tuple, str],
               extra: Sequence[str] = ()) -> Tuple[Dict[int, Optional[int]], Dict[str, Any], float]:
    """One run of the tool on an emulated cluster of ``hosts`` hosts (2 plain ranks each,
    ``-e 1M --timeout 20``), every link at ``rate`` but those in ``host_rates`` /
    ``link_rates``: the exit codes per rank, the JSON report ({} if none) and the seconds from
    starting the ranks to the last exit."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "net.json")
        cluster = cluster_class(hosts)
        try:
            cluster.shape(rate, host_rates=host_rates, link_rates=link_rates)
            start = time.perf_counter()
            cluster.start_ranks(2, ["-e", "1M", "--no-tables", "--timeout", "20", "--quiet", "--json", path, *extra], tmp)
            codes = cluster.wait(600)
            seconds = time.perf_counter() - start
        finally:
            cluster.close()
        return codes, (json.load(open(path)) if os.path.exists(path) else {}), seconds


def netns(report: Report, healthy_runs: int, rate_mbit: int = 100) -> None:
    """Part 4: time to verdict on the emulated cluster (namespaces, bridge, tbf), every host's
    link at R, plain processes, 2 ranks per host, -e 1M (as tests/test_nettest_netns.py): healthy
    at 3 and 4 hosts (``healthy_runs`` each), then one run per fault — one host at R/4, two hosts
    of four at R/4, one link at R/4, one link so slow (6 Mbit/s) that one operation takes
    seconds. A run is right when its exit codes and the kinds and hosts it names are exactly
    the expected ones."""
    import statistics

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from nettest_netns import EmulatedCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"emulated cluster unavailable: {reason}")
    rate, quarter = f"{rate_mbit}mbit", f"{rate_mbit // 4}mbit"
    name = [f"host{chr(ord('A') + i)}" for i in range(4)]
    cases = [(f"healthy, {hosts} hosts", hosts, {}, {}, [], set(), healthy_runs) for hosts in (3, 4)]
    cases += [("host D of 4 at R/4", 4, {3: quarter}, {}, [], {("host", (name[3],))}, 1),
              ("hosts B and D of 4 at R/4", 4, {1: quarter, 3: quarter}, {}, [], {"split"}, 1),
              ("link B-D of 4 at R/4", 4, {}, {(1, 3): quarter}, [], {("link", (name[1], name[3]))}, 1),
              ("link B-D at 6 Mbit/s (-n 1: one operation > 1 s)", 4, {}, {(1, 3): "6mbit"}, ["-n", "1"],
               {("link", (name[1], name[3]))}, 1)]
    table = report.table(f"emulated cluster: 2 ranks per host, R = {rate}, -e 1M, --timeout 20, plain processes",
                         ["case", "runs", "verdict as expected", "exit codes", "tool s (median)", "wall s (median)",
                          "load (min-max)", "named (first run)"], "lrrrrrrl")
    for label, hosts, host_rates, link_rates, extra, expected, runs in cases:
        right, tool, wall, loads, codes_seen, named_first = 0, [], [], [], set(), None
        for _ in range(runs):
            loads.append(os.getloadavg()[0])
            codes, found, seconds = shaped_run(EmulatedCluster, hosts, rate, host_rates, link_rates, extra)
            wall.append(seconds)
            culprits = found.get("culprits", [])
            named = {c["kind"] if c["kind"] == "split" else (c["kind"], tuple(c["hosts"])) for c in culprits}
            codes_seen |= set(codes.values())
            right += named == expected and set(codes.values()) == ({1} if expected else {0})
            tool.append(found.get("elapsed_s") or float("nan"))
            if named_first is None:
                named_first = "; ".join(c["reason"] for c in culprits)[:160]
        table.add(label, runs, f"{right}/{runs}", ",".join(sorted(map(str, codes_seen))),
                  f"{statistics.median(tool):.1f}", f"{statistics.median(wall):.1f}",
                  f"{min(loads):.1f}-{max(loads):.1f}", named_first or "")


def netns_sensitivity(report: Report, runs: int, rate_mbit: int = 100, hosts: int = 4) -> None:
    """Part 5: detection at NCCL's threshold on the emulated cluster: every host's link at R,
    ``runs`` healthy runs, ``runs`` with the last host at 0.7 R, ``runs`` with link B-(last)
    at 0.7 R (plain processes, 2 ranks per host, -e 1M). Counts what was named, and the time
    to the verdict (the tool's own elapsed time, and the wall time from starting the ranks)."""
    import statistics

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from nettest_netns import EmulatedCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"emulated cluster unavailable: {reason}")
    rate, slow = f"{rate_mbit}mbit", f"{int(rate_mbit * 0.7)}mbit"
    last = hosts - 1
    name = [f"host{chr(ord('A') + i)}" for i in range(hosts)]
    cases = (("healthy, every link at R", {}, {}, set()),
             (f"host {name[last]} at 0.7 R", {last: slow}, {}, {("host", (name[last],))}),
             (f"link {name[1]}-{name[last]} at 0.7 R", {}, {(1, last): slow}, {("link", (name[1], name[last]))}))
    table = report.table(f"emulated cluster: {hosts} hosts x 2 ranks, R = {rate}, -e 1M, --timeout 20, plain processes",
                         ["case", "runs", "named, nothing else", "false alarms", "tool s (median, max)",
                          "wall s (median)", "load (min-max)", "fault's busbw / reference"], "lrrrrrrr")
    for label, host_rates, link_rates, expected in cases:
        right = wrong = 0
        tool, wall, loads, ratios = [], [], [], []
        for _ in range(runs):
            loads.append(os.getloadavg()[0])
            codes, found, seconds = shaped_run(EmulatedCluster, hosts, rate, host_rates, link_rates)
            wall.append(seconds)
            named = {(c["kind"], tuple(c["hosts"])) for c in found.get("culprits", [])}
            exit_ok = set(codes.values()) == ({1} if expected else {0})
            right += bool(expected) and named == expected and exit_ok
            wrong += bool(named - expected) or (not expected and not exit_ok)
            tool.append(found.get("elapsed_s") or float("nan"))
            links = found.get("links") or {}
            ref = (links.get("reference") or {}).get("link_reference", {}).get("busbw_gbps")
            if expected and ref:
                a, b = (name[last], name[0]) if host_rates else (name[1], name[last])
                ratios.append(min(links["matrix"][a][b]["busbw_gbps"]) / ref)
        table.add(label, runs, f"{right}/{runs}" if expected else "-", f"{wrong}/{runs}",
                  f"{statistics.median(tool):.1f}, {max(tool):.1f}", f"{statistics.median(wall):.1f}",
                  f"{min(loads):.1f}-{max(loads):.1f}", f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--size", default="64M", help="message size for the busbw table (default 64M)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip-default", action="store_true", help="skip the wall time of the default run")
    parser.add_argument("--scale", action="store_true", help="only the pure diagnosis at --hosts x 8 ranks")
    parser.add_argument("--hosts", type=int, default=1024, help="with --scale: hosts of 8 ranks (default 1024)")
    parser.add_argument("--default-only", action="store_true",
                        help="only the wall time of the default run beside its baseline (part 2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --default-only: alternating runs of the default and its baseline (medians)")
    parser.add_argument("--netns-sensitivity", type=int, metavar="N",
                        help="only the emulated cluster at NCCL's threshold: N runs healthy, N with one host "
                             "at 0.7 R, N with one link at 0.7 R")
    parser.add_argument("--netns-healthy", type=int, metavar="N",
                        help="only the emulated cluster's time to verdict: N healthy runs at 3 and 4 hosts, then "
                             "one run per fault (a slow host, two slow hosts of four, a slow link, a link so slow "
                             "that one operation takes seconds)")
    add_markdown_argument(parser)
    args = parser.parse_args(argv)
    markdown = markdown_path(parser, args)
    # one section per part: each is run on its own
    section = ("nettest-sensitivity" if args.netns_sensitivity else "nettest-netns" if args.netns_healthy else "nettest-scale" if args.scale
               else "nettest-default" if args.default_only else "nettest")
    report = Report(section, argv, markdown, script=Path(__file__).name)
    if args.netns_sensitivity:
        netns_sensitivity(report, args.netns_sensitivity)
    elif args.netns_healthy:
        netns(report, args.netns_healthy)
    elif args.scale:
        scale(report, args.hosts)
    elif args.default_only:
        default_wall(report, args.repeats)
    else:
        busbw_table(report, args)
        if not args.skip_default:
            default_wall(report)
    report.finish()
    return 0


def busbw_table(report: Report, args: argparse.Namespace) -> None:
    """Part 1: busbw per collective, the tool beside a bare loop, at every world of ``--ranks``."""
    size_bytes = metrics.parse_size(args.size)
    report.note(f"busbw (GB/s) at {format_bytes(size_bytes)}, gloo over loopback; tool = pgroups nettest, "
                f"bare = torch.distributed loop (baseline); {args.iters} iterations")
    table: Dict[int, Dict[str, tuple]] = {}
    for n in args.ranks:
        tool = tool_figures(n, args.size, args.warmup, args.iters)
        outcomes = run_local(n, bare_loop, (list(metrics.COLLECTIVES), size_bytes, args.warmup, args.iters),
                             timeout_s=1200)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise SystemExit(f"bare loop failed: {failed[0].error}")
        bare = {c: metrics.busbw(c, n, metrics.message_shape(c, size_bytes, n).size_bytes,
                                 sum(o.value[c] for o in outcomes) / n) for c in metrics.COLLECTIVES}
        table[n] = {c: (tool[c], bare[c]) for c in metrics.COLLECTIVES}
    out = report.table("", ["collective"] + [f"{n} ranks: tool / bare (ratio)" for n in args.ranks])
    for c in metrics.COLLECTIVES:
        out.add(c, *(f"{table[n][c][0]:.3f} / {table[n][c][1]:.3f} ({table[n][c][0] / table[n][c][1]:.2f})"
                     for n in args.ranks))


def default_wall(report: Report, repeats: int = 1) -> None:
    """Part 2: the default run beside its baseline, alternating, in the same session; medians.
    From the run's JSON: the link scan's own seconds and rounds, and the tool's time from the
    groups being ready to the verdict."""
    base_cmd = [sys.executable, "-m", "pgroups", "run", "--nproc", "8"]
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "default.json")
        for _ in range(repeats):
            base = wall(base_cmd)
            ours = wall([sys.executable, "-m", "pgroups.nettest", "--nproc", "8", "--quiet", "--json", path])
            with open(path) as f:
                result = json.load(f)
            links = result.get("links", {})
            rows.append((base, ours, result["elapsed_s"], links.get("elapsed_s", 0.0),
                         len(links.get("rounds", [])), result["exit_code"]))
    load_after = os.getloadavg()[0]
    med = [statistics.median(r[i] for r in rows) for i in range(5)]
    table = report.table(f"default run, {repeats} alternating pair(s), medians; load average {load_before:.1f} "
                         f"before, {load_after:.1f} after", ["command", "wall (s)", "vs baseline"])
    table.add("pgroups run --nproc 8 (baseline)", f"{med[0]:.1f}", "1.00x")
    table.add("pgroups nettest --nproc 8", f"{med[1]:.1f}", f"{med[1] / med[0]:.2f}x")
    report.note(f"+{med[1] - med[0]:.1f} s for the default sweep; of which the tool from groups ready to verdict "
                f"{med[2]:.1f} s; link scan {med[3]:.2f} s in {med[4]:.0f} rounds; exit codes {[r[5] for r in rows]}")


if __name__ == "__main__":
    sys.exit(main())
