"""``pgroups nettest`` / ``python -m pgroups.nettest``: the network sanity test.

    pgroups nettest --nproc 8                       # this machine, 8 local gloo processes
    torchrun --nproc-per-node 8 --nnodes 16 … -m pgroups.nettest job.yaml --json net.json
    srun -N 16 --ntasks-per-node 8 pgroups nettest job.yaml --modes all

Exit codes: 0 healthy; 1 a slow or wrong group was found; 2 usage or config error (one line
on stderr); 3 a collective did not finish within ``--timeout`` (the hung group is named, with
its ranks and hosts) or the run exceeded ``--max-time``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, List, Mapping, Optional, Tuple

from ..cli import (EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE, EXTENSIONS, default_config_path, offline_layout,
                   positive_seconds)
from ..config import load_config
from ..errors import ConfigError, PGroupsError, UsageError
from ..hosts import HOSTNAME_ENV, local_hostname
from . import metrics
from .diagnosis import Thresholds
from .hooks import check_fault_spec
from ..progress import Progress
from .report import format_report, plotting_available, write_json, write_plot, write_prometheus
from .runner import NettestOptions, NettestTimeoutError, RankResult, run_rank, select_modes

DEFAULT_ITERS = 5
DEFAULT_WARMUP = 1
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_TIME_S = 1800.0
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "SLURM_PROCID")
REPORT_GRACE_S = 15.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (default: the bundled one)")
    parser.add_argument("--nproc", type=int, help="start N local gloo processes on this machine "
                        "(without it: run as one rank of torchrun / SLURM)")
    parser.add_argument("--modes", default="nettest",
                        help="modes whose groups to test: comma list (tp,dp,… or their aliases tensor,data,…) "
                             "or 'all' (default: nettest)")
    parser.add_argument("--no-host-groups", dest="host_groups", action="store_false",
                        help="skip the host-aware groups (intra-node: one host's ranks; inter-node: one rank per host)")
    parser.add_argument("--collectives", "-c", default="all_reduce",
                        help=f"comma list or 'all' of: {', '.join(metrics.COLLECTIVES)} (default: all_reduce)")
    parser.add_argument("--min-bytes", "-b", default=str(metrics.DEFAULT_MIN_BYTES),
                        help="smallest message (8, 64K, 1M …; default 8)")
    parser.add_argument("--max-bytes", "-e", default="64M", help="largest message (default 64M)")
    parser.add_argument("--step-factor", "-f", type=int, default=2, help="size multiplier between steps (default 2)")
    parser.add_argument("--iters", "-n", type=int, default=DEFAULT_ITERS,
                        help=f"timed operations per size (default {DEFAULT_ITERS})")
    parser.add_argument("--warmup", "-w", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed operations per size before timing (default {DEFAULT_WARMUP})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds one operation may take before its group is declared hung "
                             f"(default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--min-busbw", type=float, help="absolute floor in GB/s for busbw at the largest size")
    parser.add_argument("--slow-factor", type=float, default=Thresholds().slow_factor,
                        help="how many times worse than its peers' median a group must be (default 2; "
                             "doubled when it has fewer than 3 peers)")
    parser.add_argument("--link-slow-factor", type=float, default=None,
                        help=f"the link scan: how many times slower than its class's healthy reference a link, "
                             f"host or rank must be (default {Thresholds().link_slow_factor:g}: more than 30%% "
                             f"slower, NCCL's own threshold; doubled with fewer than 3 healthy links; with "
                             f"--simulate-hosts the default is --slow-factor: the 'links' are memory copies "
                             f"on this machine, as noisy as its CPU)")
    parser.add_argument("--mad-k", type=float, default=Thresholds().mad_k,
                        help="and by how many robust standard deviations of its peers, in ratio (log) space: 1.4826 x MAD of log values (default 4)")
    parser.add_argument("--no-followup", dest="followup", action="store_false",
                        help="report the sweep's findings as they are: no re-test, no pair tests")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="write the full report as JSON ('-': stdout)")
    parser.add_argument("--plot", metavar="PATH.png", help="draw busbw per group and pair (needs matplotlib)")
    parser.add_argument("--prometheus", metavar="FILE.prom",
                        help="write a node-exporter textfile-collector file: run timestamp, verdict, "
                             "busbw per host link, verdict per host")
    parser.add_argument("--no-nccl-diagnostics", dest="nccl_diagnostics", action="store_false",
                        help="on NCCL >= 2.31, do not run NCCL's own diagnostics (NCCL_RUN_DIAGNOSTICS) "
                             "while the groups are created")
    parser.add_argument("--no-tables", dest="tables", action="store_false",
                        help="print only the per-group summary and the verdict, not the per-size tables")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    parser.add_argument("--simulate-hosts", type=int, metavar="H",
                        help="with --nproc: pretend the local ranks sit on H hosts (contiguous blocks), "
                             "to try the host-aware groups and diagnosis on one machine")
    parser.add_argument("--max-time", type=float, default=DEFAULT_MAX_TIME_S,
                        help=f"with --nproc: kill the whole run after this many seconds (default {DEFAULT_MAX_TIME_S:g})")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pgroups nettest`` (called by :func:`pgroups.cli.build_parser`)."""
    parser = subparsers.add_parser(
        "nettest", help=EXTENSIONS["nettest"][1],
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 healthy, 1 slow or wrong group found, 2 usage/config error, 3 timeout.")
    add_arguments(parser)
    parser.set_defaults(func=cmd_nettest)
    return parser


def options_from_args(args: argparse.Namespace, config) -> NettestOptions:
    """Validate the arguments (ValueError / ConfigError naming the bad one) into NettestOptions."""
    for name in ("iters", "step_factor"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must not be negative, got {args.warmup}")
    positive_seconds("--timeout", args.timeout)
    positive_seconds("--max-time", args.max_time)  # 0 would mean no limit at all to run_local
    min_bytes, max_bytes = metrics.parse_size(args.min_bytes), metrics.parse_size(args.max_bytes)
    metrics.size_sweep(min_bytes, max_bytes, args.step_factor)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes:
        raise ValueError("--modes is empty: name modes (e.g. nettest,tp) or 'all'")
    if "all" in modes and len(modes) > 1:
        raise ValueError("--modes: 'all' cannot be combined with other modes")
    rule = Thresholds(args.slow_factor, args.mad_k, args.min_busbw, link_slow_factor(args))
    check_fault_spec()  # a bad test hook is a usage error, before anything starts
    if args.plot and not plotting_available():
        raise ConfigError("--plot needs matplotlib, which is not installed (pip install matplotlib), "
                          "or leave out --plot")
    if args.simulate_hosts is not None and (args.nproc is None or not 1 <= args.simulate_hosts <= args.nproc):
        raise ValueError("--simulate-hosts H needs --nproc N with 1 <= H <= N")
    for flag, path in (("--json", args.json_path), ("--plot", args.plot), ("--prometheus", args.prometheus)):
        check_output_path(flag, path)
    return NettestOptions(config=config, modes=modes, host_groups=args.host_groups,
                          collectives=metrics.parse_collectives(args.collectives), min_bytes=min_bytes,
                          max_bytes=max_bytes, step_factor=args.step_factor, iters=args.iters,
                          warmup=args.warmup, timeout_s=args.timeout, rule=rule, followup=args.followup,
                          progress=not args.quiet, json_path=args.json_path,
                          nccl_diagnostics=args.nccl_diagnostics)


def link_slow_factor(args: argparse.Namespace) -> float:
    """``--link-slow-factor`` as given; by default NCCL's 1.3 on real hosts, and ``--slow-factor``
    with ``--simulate-hosts``: there every pretend host is this machine, its links loopback
    memory copies whose speed scatters with the CPU's load (1.3-2.3x at load 9), not a network."""
    if args.link_slow_factor is not None:
        return args.link_slow_factor
    return args.slow_factor if args.simulate_hosts else Thresholds().link_slow_factor


def check_output_path(flag: str, path: Optional[str]) -> None:
    """An output file must be writable before any process starts (ValueError naming it):
    its folder exists and is writable, and it is not a folder itself. ``-`` and None pass."""
    if path is None or path == "-":
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder; give a file path")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable")


def cmd_nettest(args: argparse.Namespace) -> int:
    if args.nproc is None and not any(v in os.environ for v in LAUNCH_ENV):
        raise ConfigError("no launch environment (torchrun's RANK/WORLD_SIZE or SLURM's SLURM_PROCID): "
                          "use --nproc N to start N local processes, or launch with torchrun / srun")
    world_size = args.nproc if args.nproc is not None else _launch_world_size()
    config = resolve_config(args.config, world_size)
    try:
        options = options_from_args(args, config)
    except PGroupsError:
        raise
    except ValueError as exc:  # the option parsers (sizes, collectives, faults, rule) raise ValueError
        raise UsageError(str(exc)) from None
    if args.nproc is not None:
        return _run_local(args, options, load_config(config))
    if world_size is not None:   # a layout that does not fit the launched world: exit 2 before anyone meets
        loaded = load_config(config)
        loaded.topology(world_size)
        _check_modes(options, loaded, world_size)
    return _run_here(args, options)


def _launch_world_size() -> Optional[int]:
    text = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS")
    return int(text) if text and text.isdigit() else None


def resolve_config(path: Optional[str], world_size: Optional[int]):
    """The config to run: ``path`` as given; without one, the bundled default — or, when its
    layout (8 ranks: tensor 2 x pipeline 2) does not fit ``world_size``, a plain layout with
    the bundled nettest block size, so ``pgroups nettest --nproc N`` works for any N."""
    if path is not None:
        load_config(path)
        return path
    bundled = default_config_path()
    config = load_config(bundled)
    if world_size is None:
        return bundled
    try:
        config.topology(world_size)
        return bundled
    except ConfigError:
        return {"parallel": {"nettest": config.parallel.nettest}, "backend": config.backend,
                "timeout_s": config.timeout_s}


def _check_modes(options: NettestOptions, config, world_size: int) -> None:
    select_modes(options.modes, list(offline_layout(config, world_size)))  # ConfigError for a mode not built


def _run_local(args: argparse.Namespace, options: NettestOptions, config) -> int:
    from ..spawn import run_local

    if args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {args.nproc}")
    config.topology(args.nproc)
    _check_modes(options, config, args.nproc)
    env_per_rank = None
    if args.simulate_hosts:
        base, hosts, nproc = local_hostname(), args.simulate_hosts, args.nproc
        env_per_rank = _SimulatedHosts(base, hosts, nproc)
    # after a rank dies, the others need --timeout to notice and a few seconds to report
    outcomes = run_local(args.nproc, local_worker, (options,), timeout_s=args.max_time,
                         env_per_rank=env_per_rank, failure_grace_s=options.timeout_s + REPORT_GRACE_S)
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        result: RankResult = outcomes[0].value
        return _emit(result.report, args)
    hung = _distinct(o.error.split(": ", 1)[-1] for o in failed if o.error_type == NettestTimeoutError.__name__)
    if hung:
        for message in hung:
            print(f"pgroups nettest: timeout: {message}", file=sys.stderr)
        return EXIT_TIMEOUT
    usage = [o for o in failed if o.error_type in ("ConfigError", "LaunchError", "UnknownModeError")]
    if usage:
        print(f"pgroups nettest: error: {usage[0].error.split(': ', 1)[-1]}", file=sys.stderr)
        return EXIT_USAGE
    if any(o.timed_out for o in failed):
        stuck = [o.rank for o in failed if o.timed_out]
        print(f"pgroups nettest: timeout: the run exceeded --max-time {args.max_time:g}s; ranks {stuck} "
              "were still running and were killed", file=sys.stderr)
        return EXIT_TIMEOUT
    for o in failed[:4]:
        print(f"pgroups nettest: rank {o.rank}: {o.error}", file=sys.stderr)
    lost = [o for o in failed if o.error_type is None]
    return EXIT_TIMEOUT if lost and len(lost) == len(failed) else EXIT_FAILED


class _SimulatedHosts:
    """env_per_rank for --simulate-hosts: contiguous blocks of ranks per pretend host; when the
    blocks are equal, each host is a launcher node as torchrun would make it (GROUP_RANK,
    LOCAL_WORLD_SIZE)."""

    def __init__(self, base: str, hosts: int, nproc: int) -> None:
        self.base, self.hosts, self.nproc = base, hosts, nproc

    def __call__(self, rank: int) -> dict:
        node = rank * self.hosts // self.nproc
        env = {HOSTNAME_ENV: f"{self.base}-sim{node}"}
        if self.nproc % self.hosts == 0:
            env.update(GROUP_RANK=str(node), LOCAL_WORLD_SIZE=str(self.nproc // self.hosts))
        return env


def _distinct(messages) -> List[str]:
    return list(dict.fromkeys(messages))


def local_worker(options: NettestOptions) -> RankResult:
    """One local rank (spawned by ``--nproc``): progress on rank 0's stderr unless --quiet.

    On a timeout the rank's one-line report travels to the parent, which prints it; the
    rank's stderr is then closed, so the C++ warnings of torn-down threads and stores do not
    bury that line.
    """
    try:
        return run_rank(options, Progress("nettest") if options.progress else None)
    except NettestTimeoutError as exc:
        exc.absent_ranks = named_absent(exc.report)  # the launcher need not wait for those
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        raise


def named_absent(hang: Mapping[str, Any]) -> Tuple[int, ...]:
    """The ranks a hang report names as away: never entered the operation, no answer to the
    abort, never arrived at the start-up. Pure."""
    ranks = {e["rank"] for e in hang.get("never_entered", [])}
    ranks.update(hang.get("missing", []), hang.get("never_arrived", []))
    return tuple(sorted(ranks))


def _run_here(args: argparse.Namespace, options: NettestOptions) -> int:
    """This process is one rank of torchrun / SLURM: run, then rank 0 prints the report."""
    try:
        result = run_rank(options, Progress("nettest") if options.progress else None)
    except NettestTimeoutError as exc:  # every surviving rank says the same one line
        print(f"pgroups nettest: timeout: {exc}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_TIMEOUT)  # a hung operation may still hold threads: do not wait for them
    if result.report is not None:
        _emit(result.report, args)
    return result.exit_code


def _emit(report: dict, args: argparse.Namespace) -> int:
    """Print the report, write --json / --plot; return its exit code."""
    if args.json_path != "-":
        print(format_report(report, tables=args.tables))
    if args.json_path:
        write_json(report, args.json_path)
    if args.plot:
        write_plot(report, args.plot)
    if args.prometheus:
        write_prometheus(report, args.prometheus, time.time())
    return int(report["exit_code"])


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m pgroups.nettest [ARGS]``: the same as ``pgroups nettest [ARGS]``."""
    from ..cli import main as pgroups_main

    return pgroups_main(["nettest", *(sys.argv[1:] if argv is None else argv)])
