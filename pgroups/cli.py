"""The ``pgroups`` command (console script and ``python -m pgroups``).

- ``pgroups show CONFIG --world-size N [--rank R] [--mode M] [--json]``: the layout, offline
  (every built mode, or one mode — any built-in or axis combination such as ``tp-cp``).
- ``pgroups validate CONFIG [--world-size N]``: exit 0, or exit 2 with one line on stderr.
- ``pgroups run [--nproc N] [CONFIG]``: pgroups' self-check on this machine (local gloo
  processes build every group and all-reduce over each).
- ``pgroups launch --nproc N SCRIPT [ARGS]``: your own script in N local processes, with
  torchrun's environment; the exit code is the worst rank's.
- ``pgroups --version``.

Commands that run longer than a few seconds print progress lines on stderr; ``-q`` silences them.

Exit codes: 0 success, 1 a check failed, 2 usage or config error, 3 timeout. The errors pgroups
raises on purpose (:class:`~pgroups.errors.PGroupsError`: UsageError, ConfigError, LaunchError, …)
are one line on stderr (PGROUPS_TRACEBACK=1 shows a traceback); anything else is a bug and
shows its traceback, exit 1.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import sys
import time
from importlib import resources
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import __version__, creation, nccl_options
from .config import Config, load_config
from .mode_plan import import_plugins, make_initializers, plan_models
from .models import unknown_model
from .errors import ConfigError, GroupTimeoutError, PGroupsError, UsageError, allowed, did_you_mean
from .initializer import default_registry
from .modes import COMBINATION_HELP, is_builtin, canonical_name
from .nccl_options import options_by_mode
from .progress import AnyProgress, NullProgress, progress_for
from .ranks import format_ranks
from .topology import Topology

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3

#: Sub-commands of the higher layers: command -> (module with ``add_parser(subparsers)``, its one-line
#: help). A module is imported only to run or describe its own command (they import torch); the
#: top-level ``--help`` lists them from this table.
EXTENSIONS: Dict[str, Tuple[str, str]] = {
    "nettest": ("pgroups.nettest.cli",
                "network sanity test: busbw per group, names slow or faulty ranks and hosts"),
    "reshard-plan": ("pgroups.reshard.cli", "plan moving a model between two layouts, offline"),
}


def default_config_path() -> str:
    """The bundled default config (8 ranks: tensor 2 x pipeline 2 x data 2)."""
    return str(resources.files("pgroups").joinpath("default.yaml"))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 — like every other bad input
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def positive_seconds(option: str, value: float) -> float:
    """``value`` if it is a positive, finite number of seconds; else UsageError naming ``option``
    (the one rule for every command's timeout)."""
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"{option} must be positive, got {value:g} (a finite number of seconds)")
    return value


def positive_count(option: str, value: int) -> int:
    """``value`` if it is at least 1; else UsageError naming ``option``."""
    if value < 1:
        raise UsageError(f"{option} must be at least 1, got {value}")
    return value


def version_text() -> str:
    """``pgroups X (torch Y)``; torch's version read from its metadata, without importing it."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return f"pgroups {__version__} (torch {torch_version})"


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")


CONFIG_HELP = "YAML config file (see config_examples/)"
WORLD_HELP = "number of ranks of the job to lay out"


def command_word(argv: Sequence[str]) -> Optional[str]:
    """The sub-command ``argv`` names (its first word that is not an option), or None."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The ``pgroups`` parser. With ``argv``, only the extension ``argv`` names is imported (the
    others are listed with their help, and take no arguments); without it, every extension."""
    parser = _Parser(prog="pgroups", description="Process-group topology manager for PyTorch.",
                     epilog="Exit codes: 0 success, 1 a check failed, 2 usage or config error, 3 timeout "
                            "(launch: the worst rank's).")
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print pgroups' and torch's versions and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    show = sub.add_parser("show", help="print the layout of every mode, offline")
    show.add_argument("config", help=CONFIG_HELP)
    show.add_argument("--world-size", "-n", type=int, required=True, help=WORLD_HELP)
    show.add_argument("--rank", type=int, help="show only this rank's groups")
    show.add_argument("--mode", help="show only this mode: a built one, a built-in mode or an axis "
                                     "combination such as tp-cp (built or not)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--model", help="a config with models: show only this model")
    show.set_defaults(func=cmd_show)

    validate = sub.add_parser("validate", help="check a config (and a world size) without running")
    validate.add_argument("config", help=CONFIG_HELP)
    validate.add_argument("--world-size", "-n", type=int,
                          help=WORLD_HELP + "; with it the layout, user modes' groups and the "
                               "group-creation schedule are checked too")
    add_quiet(validate)
    validate.set_defaults(func=cmd_validate)

    run = sub.add_parser("run", help="pgroups' self-check: local gloo processes build every group and "
                                     "all-reduce over each (not your script: see launch)")
    run.add_argument("config", nargs="?", help="YAML config (default: the bundled one)")
    run.add_argument("--nproc", type=int, default=8, help="number of local processes (default 8)")
    run.add_argument("--timeout", type=float, default=300.0,
                     help="seconds before the run is killed (positive; default 300)")
    add_quiet(run)
    run.set_defaults(func=cmd_run)

    launch = sub.add_parser("launch", help="run your own script in N local processes, as torchrun would",
                            description="Run SCRIPT in N local processes with torchrun's environment "
                                        "(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, ...). "
                                        "A rank that fails or Ctrl-C ends the others; the exit code is the "
                                        "worst rank's.")
    launch.add_argument("--nproc", type=int, required=True, help="number of local processes (ranks)")
    launch.add_argument("--module", "-m", action="store_true", help="SCRIPT is a module: run python -m SCRIPT")
    launch.add_argument("script", nargs="?", help="your Python script (a module name with -m)")
    launch.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    launch.set_defaults(func=cmd_launch)

    wanted = None if argv is None else command_word(argv)
    for command, (module, help_text) in EXTENSIONS.items():
        if argv is None or command == wanted:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(command, help=help_text)
    return parser


def offline_layout(config: Config, world_size: int) -> Dict[str, List[List[int]]]:
    """Every built mode's groups for ``world_size``, computed without processes (a context's
    modes, in its creation order). For a config with models: every model's, as ``model.mode``."""
    import_plugins(config)
    if config.models:
        return {f"{model}.{mode}": groups for model, (_, layout) in model_layouts(config, world_size).items()
                for mode, groups in layout.items()}
    topology = config.topology(world_size)
    initializers = make_initializers(default_registry, config, topology)
    return {name: init.rank_groups(topology) for name, init in initializers.items()}


def model_layouts(config: Config, world_size: int) -> Dict[str, Any]:
    """``{model: (global ranks, {mode: groups in global ranks})}`` for a config with models."""
    return {name: (ranks, {mode: init.rank_groups(topology) for mode, init in inits.items()})
            for name, (ranks, topology, inits, _) in plan_models(default_registry, config, world_size).items()}


def one_mode_layout(config: Config, world_size: int, mode: str) -> Dict[str, List[List[int]]]:
    """``{mode: groups}`` for a mode the config builds, or any built-in mode / axis combination.

    Raises ConfigError (via UnknownModeError) naming what exists for anything else.
    """
    layout = offline_layout(config, world_size)
    name = canonical_name(mode)  # the layout's keys are canonical names
    if name in layout:
        return {name: layout[name]}
    if not is_builtin(mode):
        raise ConfigError(f"--mode {mode!r} is not built by {config.source or 'this config'}"
                          f"{did_you_mean(mode, layout)}; built modes: {allowed(layout)}, "
                          f"or any built-in mode, {COMBINATION_HELP}")
    return {name: config.topology(world_size).groups(mode)}


def describe_meshes(topology: Topology) -> Dict[str, Dict[str, object]]:
    """``{"dense": {"axes": [...], "sizes": [...]}, …}`` — axes fastest first."""
    return {name: {"axes": list(mesh.axes), "sizes": list(mesh.sizes)}
            for name, mesh in (("dense", topology.dense), ("expert", topology.expert_mesh),
                               ("weight", topology.weight_mesh))}


def cmd_show(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.rank is not None and not 0 <= args.rank < args.world_size:
        raise UsageError(f"--rank {args.rank} is outside 0..{args.world_size - 1} (world size {args.world_size})")
    if config.models or args.model is not None:
        return show_models(config, args)
    topology = config.topology(args.world_size)
    if args.mode is not None:
        layout = one_mode_layout(config, args.world_size, args.mode)
    else:
        layout = offline_layout(config, args.world_size)
    if args.rank is not None:
        layout = {m: [g for g in groups if args.rank in g] for m, groups in layout.items()}
    if args.json:
        print(json.dumps({"world_size": args.world_size, "order": "-".join(topology.order),
                          "meshes": describe_meshes(topology), "modes": layout}))
        return EXIT_OK
    print(topology.describe())
    print_layout(layout)
    return EXIT_OK


def show_models(config: Config, args: argparse.Namespace) -> int:
    """``pgroups show`` for a config with models: each model's ranks and groups (global ranks)."""
    if not config.models:
        raise UsageError(f"--model {args.model!r}: {args.config} has no models: (one layout over the world)")
    import_plugins(config)
    if args.model is not None and args.model not in config.models:
        raise UsageError(str(unknown_model(args.model, config.models)))
    layouts = model_layouts(config, args.world_size)
    names = [args.model] if args.model is not None else list(layouts)
    shown = {}
    for name in names:
        ranks, layout = layouts[name]
        if args.mode is not None:
            mode = canonical_name(args.mode)  # the layout's keys are canonical names
            if mode not in layout:
                raise UsageError(f"--mode {args.mode!r} is not built by model {name!r}"
                                 f"{did_you_mean(args.mode, layout)}; its modes: {allowed(layout)}")
            layout = {mode: layout[mode]}
        if args.rank is not None:
            layout = {m: [g for g in groups if args.rank in g] for m, groups in layout.items()}
        shown[name] = {"ranks": list(ranks), "describe": config.models[name].topology(args.world_size).describe(),
                       "modes": layout}
    if args.json:
        print(json.dumps({"world_size": args.world_size, "models": shown}))
        return EXIT_OK
    for name, model in shown.items():
        print(f"model {name}: ranks {format_ranks(model['ranks'], compact=True)}; {model['describe']}")
        print_layout(model["modes"])
    return EXIT_OK


def print_layout(layout: Dict[str, List[List[int]]]) -> None:
    width = max([10] + [len(m) for m in layout])
    for mode, groups in layout.items():
        shown = groups if len(groups) <= 16 else groups[:16]
        more = f" … ({len(groups)} groups)" if len(groups) > 16 else ""
        print(f"{mode:<{width}} {' '.join(format_ranks(g, compact=True) for g in shown)}{more}")


def cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    import_plugins(config)
    # small worlds are checked in milliseconds: lines only where the check takes seconds
    progress = progress_for("pgroups validate", args.quiet or (args.world_size or 0) < VALIDATE_PROGRESS_WORLD)
    if args.world_size is not None and config.models:
        checked = check_models_creation(config, args.world_size, progress)
        print(f"{args.config}: ok ({len(config.models)} models on world {args.world_size}: "
              f"{', '.join(config.models)}); group creation checked for every rank under strategy "
              f"{', '.join(checked)}: no rank waits for a peer that never comes")
    elif args.world_size is not None:
        topology = config.topology(args.world_size)
        initializers = make_initializers(default_registry, config, topology)
        checked = check_creation(config, topology, initializers, progress)
        print(f"{args.config}: ok ({topology.describe()}); group creation checked for every rank "
              f"under strategy {', '.join(checked)}: no rank waits for a peer that never comes")
    else:
        print(f"{args.config}: ok (not checked without -n WORLD_SIZE: the layout, the groups of "
              "user modes, and the group-creation schedule)")
    return EXIT_OK


def check_models_creation(config: Config, world_size: int, progress: AnyProgress = NullProgress()) -> List[str]:
    """The checker over a config with models (eager device groups): each model's steps walked by
    its ranks under ``local`` (the members agree on their count when they meet), by every rank
    where creation is world-collective. Returns the strategies checked; ConfigError naming the
    model and mode that would deadlock."""
    plans = plan_models(default_registry, config, world_size)

    def deadlock_under(strategy: str) -> Optional[creation.Deadlock]:
        steps: List[creation.Step] = []
        owners: Dict[Any, object] = {}  # identical groups share a communicator across models
        for name, (ranks, topology, inits, options) in plans.items():
            model_steps = creation.config_steps(inits, topology, strategy, cpu_twins=config.cpu_groups == "eager",
                                                options={m: nccl_options.options_key(o) for m, o in options.items()},
                                                owners=owners, label=name, world_size=world_size)
            steps += creation.placed_steps(name, model_steps, ranks)
        return creation.check_steps(steps, world_size, agree=True)

    return checked_strategies(config, world_size, deadlock_under, progress)


#: ``validate`` shows progress lines from this world size up (the creation check of 1,024 ranks
#: takes seconds; below it, milliseconds): whether a line appears does not depend on the load
VALIDATE_PROGRESS_WORLD = 1024

#: Above this world, ``validate`` leaves the ``all`` strategy out: it models one call per group
#: per rank (O(world * groups)); pgroups never picks ``all`` on its own where it can split.
ALL_STRATEGY_CHECK_LIMIT = 2048


def check_creation(config: Config, topology: Topology, initializers: Dict[str, Any],
                   progress: AnyProgress = NullProgress()) -> List[str]:
    """Run :mod:`pgroups.creation`'s checker over every rank for each strategy ``config`` can
    resolve to; return the strategies checked. Raises ConfigError naming the step (mode) that
    would deadlock."""
    world = topology.world_size

    def deadlock_under(strategy: str) -> Optional[creation.Deadlock]:
        options = options_by_mode(config.nccl_options, initializers, canonical_name)
        steps = creation.config_steps(initializers, topology, strategy, cpu_twins=config.cpu_groups != "off",
                                      options={m: nccl_options.options_key(o) for m, o in options.items()})
        device = [s for s in steps if s.label.endswith("/device")]
        cpu = [s for s in steps if s.label.endswith("/cpu")]
        # eager steps: every rank walks them in order; lazy ones: members request them in mode order
        eager = (device if config.groups == "eager" else []) + (cpu if config.cpu_groups == "eager" else [])
        lazy = (device if config.groups == "lazy" else []) + (cpu if config.cpu_groups == "lazy" else [])
        calls = {r: creation.eager_schedule(eager, world, r) + creation.lazy_schedule(lazy, r) for r in range(world)}
        return creation.find_deadlock(calls, world)

    return checked_strategies(config, world, deadlock_under, progress)


def checked_strategies(config: Config, world_size: int,
                       deadlock_under: Callable[[str], Optional[creation.Deadlock]],
                       progress: AnyProgress = NullProgress()) -> List[str]:
    """Run ``deadlock_under`` for each strategy ``config`` can resolve to (``auto``: local on
    gloo, split on a device-bound NCCL group, all without ``split_group`` — left out above
    ALL_STRATEGY_CHECK_LIMIT); return those checked. ConfigError naming the step on a deadlock."""
    strategies = [config.strategy] if config.strategy != "auto" else ["local", "split", "all"]
    checked = []
    for strategy in strategies:
        if strategy == "all" and config.strategy == "auto" and world_size > ALL_STRATEGY_CHECK_LIMIT:
            continue
        progress.update(f"checking group creation of world {world_size} under strategy {strategy!r} "
                        f"({strategies.index(strategy) + 1}/{len(strategies)})", force=True)
        deadlock = deadlock_under(strategy)
        if deadlock is not None:
            where = f"{config.source}: " if config.source else ""
            raise ConfigError(f"{where}mode {deadlock.label.split('/')[0]!r} under strategy {strategy!r}: "
                              f"{deadlock.message()}")
        checked.append(strategy)
    return checked


def cmd_run(args: argparse.Namespace) -> int:
    from .selfcheck import format_selfcheck, merge_results, selfcheck_worker
    from .spawn import run_local

    started = time.monotonic()
    positive_count("--nproc", args.nproc)
    positive_seconds("--timeout", args.timeout)
    path = args.config or default_config_path()
    config = load_config(path)
    if not config.models:
        config.topology(args.nproc)  # validate before starting anything
    offline_layout(config, args.nproc)
    progress = progress_for("pgroups run", args.quiet, started)
    progress.update(f"starting {args.nproc} local processes", force=True)
    outcomes = run_local(args.nproc, selfcheck_worker, (path, None if args.quiet else started),
                         timeout_s=args.timeout, on_wait=lambda reported: progress.update(
                             f"waiting: {reported} of {args.nproc} ranks finished (all are killed at "
                             f"--timeout {args.timeout:g}s)"))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        timed_out = any(o.timed_out or o.error_type in ("GroupTimeoutError", "TimeoutError") for o in failed)
        for o in failed[:8]:
            print(f"pgroups run: rank {o.rank}: {o.error}", file=sys.stderr)
        return EXIT_TIMEOUT if timed_out else EXIT_FAILED
    result = merge_results([o.value for o in outcomes])
    print(format_selfcheck(result, args.nproc))
    bad = sum(f["device_failures"] + f["cpu_failures"] for f in result["modes"].values())
    return EXIT_OK if bad == 0 else EXIT_FAILED


def cmd_launch(args: argparse.Namespace) -> int:
    from .spawn import launch_script

    positive_count("--nproc", args.nproc)
    if args.script is None:
        raise UsageError("no script given: pgroups launch --nproc N SCRIPT [ARGS] (or -m MODULE [ARGS])")
    if not args.module and not os.path.isfile(args.script):
        raise UsageError(f"script {args.script!r} not found (give a Python file, or -m MODULE)")
    command = [sys.executable, *(["-m"] if args.module else []), args.script, *args.script_args]
    run = launch_script(args.nproc, command)
    if run.signal_name is not None:
        print(f"pgroups launch: {run.signal_name}: ended ranks {format_ranks(list(run.ended))}", file=sys.stderr)
    elif run.failed_rank is not None:
        ended = f"; ended ranks {format_ranks(list(run.ended))}" if run.ended else ""
        print(f"pgroups launch: rank {run.failed_rank} exited with status {run.statuses[run.failed_rank]}"
              f"{ended}; exit status {run.exit_code} (the worst of the ranks that ended on their own)",
              file=sys.stderr)
    return run.exit_code


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except GroupTimeoutError as exc:
        print(f"pgroups {args.command}: timeout: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except PGroupsError as exc:  # not ValueError: a bug's ValueError shows its traceback, exit 1
        if os.environ.get("PGROUPS_TRACEBACK"):
            raise
        print(f"pgroups {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
