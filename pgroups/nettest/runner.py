"""``pgroups nettest`` on one rank: :func:`run_rank` starts the rank, runs the steps and ends
every run — healthy, aborted, or never formed — the same way.

The pieces, each in its own module:

- :mod:`.steps`: the steps (sweep, re-test, link scan, verdict), each returning what it found;
- :mod:`.bench`, the **data plane**: the collectives under test on the groups under test (NCCL
  device groups on GPUs, gloo on CPU). ``Bench.run`` issues every operation and waits for it
  inside the failure handling; only ``--timeout`` ends an operation;
- :mod:`.control`, the **control plane**: the rendezvous store of the default group (no
  collective at all): figures, positions, plans, heartbeats, the *abort* flag;
- :mod:`.failure`: what a hang says, and the end of an aborted or never-formed run.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import attrs
import torch
import torch.distributed as dist

from ..config import load_config
from ..context import ParallelContext
from ..errors import GroupTimeoutError, LaunchError
from ..hosts import local_hostname
from ..launch import from_environment
from ..progress import NullProgress  # ranks other than 0 say nothing
from . import metrics, nccl_diagnostics, probe
from .control import NettestTimeoutError
from .diagnosis import Thresholds
from .failure import close_context, conclude, failed_startup
from .hooks import faults_for_rank
from .startup import StartupBoard
from .steps import RankRun, select_modes

__all__ = ["NettestOptions", "NettestTimeoutError", "RankResult", "run_rank", "select_modes"]



@attrs.frozen
class NettestOptions:
    """Everything a rank needs to run the test (picklable, the same on every rank)."""

    config: Any
    modes: Tuple[str, ...] = ("nettest",)
    host_groups: bool = True
    collectives: Tuple[str, ...] = ("all_reduce",)
    min_bytes: int = metrics.DEFAULT_MIN_BYTES
    max_bytes: int = metrics.DEFAULT_MAX_BYTES
    step_factor: int = 2
    iters: int = 5
    warmup: int = 1
    timeout_s: float = 60.0
    rule: Thresholds = Thresholds()
    followup: bool = True
    progress: bool = True
    json_path: Optional[str] = None
    nccl_diagnostics: bool = True

    @property
    def sizes(self) -> List[int]:
        return metrics.size_sweep(self.min_bytes, self.max_bytes, self.step_factor)

    def to_json(self) -> Dict[str, Any]:
        return {"modes": list(self.modes), "host_groups": self.host_groups,
                "collectives": list(self.collectives), "min_bytes": self.min_bytes,
                "max_bytes": self.max_bytes, "step_factor": self.step_factor, "iters": self.iters,
                "warmup": self.warmup, "timeout_s": self.timeout_s, "followup": self.followup,
                "nccl_diagnostics": self.nccl_diagnostics}


@attrs.frozen
class RankResult:
    """What one rank's run ends with: the exit code every rank agrees on, and rank 0's report."""

    rank: int
    exit_code: int
    report: Optional[Dict[str, Any]] = None


def run_rank(options: NettestOptions, progress: Any = None) -> RankResult:
    """Initialize this rank from the environment (torchrun, SLURM, or our local launcher), run
    the test and return its RankResult (the report on rank 0 only).

    ``progress`` (used on rank 0 only) has ``update(text)`` and ``done()``. Raises
    NettestTimeoutError when a group hangs or a rank dies: every surviving rank first answers
    the abort, the rank that raised it names the ranks that did not answer, the report (what
    was measured, and the hang) is written to ``options.json_path`` by rank 0 — or by the rank
    that raised the abort when rank 0 is gone, or by the lowest rank of each host when the
    store is gone — and the ranks on the store's host leave last. When the default group does
    not form within ``--timeout`` (ranks that never came or died during the start-up), the
    NettestTimeoutError names them (:mod:`.startup`). ConfigError / LaunchError for bad input. The context is destroyed in every case; on NCCL the communicators are
    aborted first after a hang (destroying one with a hung operation would wait for it).
    """
    config = load_config(options.config)
    # The groups' deadline is --timeout: gloo groups time out with it (a hung operation fails by
    # itself at about the moment our wait gives up, and no thread is left blocked at exit); NCCL
    # communicators get pgroups.deadlines' watchdog margin on top, so that the tool, not NCCL's
    # watchdog, reports the hang.
    config = attrs.evolve(config, timeout_s=options.timeout_s)
    board = _startup_board(options) if not dist.is_initialized() else None
    faults_for_rank(_env_rank(), local_hostname()).never_start()
    if board is not None:
        board.start()
    nccl_diag = _prepare_nccl_diagnostics(options, config)
    ctx = ParallelContext()
    run: Optional[RankRun] = None
    hung = False
    shown, progress = progress, NullProgress()
    try:
        try:
            ctx.init_from_config(config)
            if ctx.get_global_rank() == 0 and shown is not None:
                progress = shown
            run = RankRun(ctx, options, progress, nccl_diag)
        except (LaunchError, GroupTimeoutError, RuntimeError) as exc:
            if board is None or isinstance(exc, NettestTimeoutError):
                raise
            raise failed_startup(board, options, exc) from None
        if board is not None:
            board.stop()
        report = run.run()
        if board is not None:
            board.forget()
        return RankResult(run.rank, run.exit_code, report)
    except NettestTimeoutError as exc:
        hung = True
        if run is None:
            raise
        raise conclude(run, exc) from None
    finally:
        progress.done()
        if nccl_diag[1] is not None:
            nccl_diag[1].stop()   # a run that ended early: put standard output back
        if run is not None:
            run.bench.close()
            run.coordinator.shutdown()
        close_context(ctx, hung)


def _prepare_nccl_diagnostics(options: NettestOptions, config: Any
                              ) -> Tuple[nccl_diagnostics.Decision, Optional[nccl_diagnostics.StdoutTee]]:
    """Before the default group forms: decide whether NCCL's own diagnostics run on this rank
    (:func:`.nccl_diagnostics.decide`; NCCL is expected when a GPU is visible and the config
    does not ask for gloo), turn them on in this process's environment and start keeping the
    ``NCCL DIAG`` lines of standard output."""
    uses_nccl = torch.cuda.is_available() and config.backend != "gloo"
    decision = nccl_diagnostics.decide(options.nccl_diagnostics, uses_nccl,
                                       nccl_diagnostics.parse_version(probe.nccl_version()), os.environ)
    nccl_diagnostics.prepare(decision, os.environ)
    return decision, (nccl_diagnostics.StdoutTee().start() if decision.run else None)


def _env_rank() -> int:
    text = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or ""
    return int(text) if text.isdigit() else -1


def _startup_board(options: NettestOptions) -> Optional[StartupBoard]:
    try:
        launch = from_environment()
    except LaunchError:
        return None   # the context's own start-up says what is missing
    return StartupBoard.from_environment(launch, local_hostname(), options.timeout_s)
