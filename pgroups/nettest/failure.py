"""The failure path of ``pgroups nettest``: what a hang says (:func:`hang_report`, pure), the
alarm every rank answers, the end of an aborted run (:func:`conclude`: the final story, the
report written once, the ranks on the store's host leaving last), a start-up that never formed
(:func:`failed_startup`), and tearing down a context a hung operation may still hold.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Sequence

import torch.distributed as dist

from ..deadlines import is_timeout
from ..context import ParallelContext
from ..torch_private import abort_process_groups
from ..units import format_bytes
from . import startup
from .control import NettestTimeoutError, StoreGoneError, first_words, short_ranks, store_gone
from .report import write_json
from .startup import StartupBoard

if TYPE_CHECKING:
    from .bench import GroupFailure
    from .runner import NettestOptions
    from .steps import RankRun

CLOSE_WAIT_S = 2.0


def hang_report(group_id: str, ranks: List[int], where: str, collective: str, size_bytes: int,
                failure: "GroupFailure", positions: Mapping[int, str], hostnames: Sequence[str],
                timeout_s: float, detected_by: int) -> Dict[str, Any]:
    """The abort report of an operation that timed out or failed on ``group_id``: one line
    (``message``) naming the group, its ranks and hosts, what happened — "did not complete
    within --timeout" when the cause is a timeout, else the cause's text, "when issued" if it
    failed at issue — and every peer whose last position (``positions``: rank → where it
    last was) is not ``where`` (it never entered the operation). Pure."""
    absent = {r: p for r, p in positions.items() if p != where}
    hosts = list(dict.fromkeys(hostnames[r] for r in ranks))
    cause = str(failure)
    timed_out = is_timeout(failure.__cause__ or failure)
    when = " when issued" if failure.phase == "issue" else ""
    size = format_bytes(size_bytes)
    what = (f"{collective} of {size} did not complete within {timeout_s:g}s" if timed_out
            else f"{collective} of {size} failed{when} ({cause})")
    culprits = "; ".join(f"rank {r} (host {hostnames[r]}) never entered it (last at: {p})"
                         for r, p in sorted(absent.items()))
    message = f"group {group_id} (ranks {ranks}, hosts {hosts}): {what}" + (f"; {culprits}" if culprits else "")
    return {"message": message, "kind": "timeout" if timed_out else "failure", "group": group_id,
            "ranks": ranks, "hosts": hosts, "collective": collective, "size_bytes": size_bytes,
            "timeout_s": timeout_s, "detected_by": detected_by,
            "never_entered": [{"rank": r, "host": hostnames[r], "last_at": p} for r, p in sorted(absent.items())],
            "cause": cause, "failed_at": failure.phase}


def alarm(coordinator: Any, report: Dict[str, Any]) -> None:
    """Raise the abort flag with ``report`` and raise the first report raised (every rank
    tells one story): always raises NettestTimeoutError."""
    coordinator.abort(report)
    coordinator.check_abort()
    raise NettestTimeoutError(report["message"], report)


def finish_before_terminate() -> None:
    """From here the rank only reports (every step bounded): a launcher that stops a host's
    other ranks when one exits (torchrun sends SIGTERM) must not cut a rank off before its one
    line and the report — it exits 3 moments later by itself (torchrun's SIGKILL follows
    after 30 s anyway)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def failed_startup(board: StartupBoard, options: "NettestOptions", exc: BaseException) -> BaseException:
    """The default group (or the first exchange) did not form: name who never arrived, write
    the report (the lowest rank present writes it), and return the error to raise —
    NettestTimeoutError if ranks are missing, StoreGoneError if the store cannot be read, the
    original error if everyone is there (something else failed)."""
    finish_before_terminate()
    missing = board.find_missing()
    if missing is None:   # the store is gone: each host's first local rank writes what it knows
        error = store_gone(f"unreachable after the start-up failed: {first_words(str(exc))}")
        writer = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0"
        report = error.report
    elif not missing.ranks:
        return exc
    else:
        message = startup.describe(missing, options.timeout_s)
        report = {"message": message, "kind": "start-up", "missing": missing.ranks,
                  "never_arrived": list(missing.never_arrived), "stopped_answering": list(missing.went_silent),
                  "missing_hosts": missing.known_hosts, "cause": first_words(str(exc))}
        present = [r for r in range(board.world_size) if r not in set(missing.ranks)]
        writer = bool(present) and board.rank == present[0]
        error = NettestTimeoutError(message, report)
    if options.json_path and writer:
        write_json({"status": "timeout", "exit_code": 3, "world_size": board.world_size, "timeout": report,
                    "options": options.to_json()}, options.json_path)
    return error


def conclude(run: "RankRun", exc: NettestTimeoutError) -> NettestTimeoutError:
    """After an abort: answer, learn the final story, write the report, leave in order."""
    finish_before_terminate()
    coordinator, report = run.coordinator, exc.report
    store_gone = isinstance(exc, StoreGoneError)
    if not store_gone:
        try:
            report = coordinator.conclude_abort(report)
        except StoreGoneError as gone:
            store_gone, report = True, dict(report, message=f"{report.get('message', exc)}; {gone}")
    coordinator.stop_liveness()
    missing = set(report.get("missing", []))
    if store_gone:
        same_host = [r for r, h in enumerate(run.hostnames) if h == run.hostnames[run.rank]]
        writer = run.rank == min(same_host)
        store_host = run.hostnames[0]
        with_it = [r for r, h in enumerate(run.hostnames) if h == store_host]
        report = dict(report, missing=with_it, missing_hosts=[store_host],
                      message=f"{report.get('message', exc)}: probably with {store_host} "
                              f"(ranks {short_ranks(with_it)}), where it runs")
    else:
        writer = run.rank == 0 or (0 in missing and report.get("detected_by") == run.rank)
    if writer and run.options.json_path:
        write_json(dict(run.partial, status="timeout", timeout=report, exit_code=3,
                        options=run.options.to_json(), elapsed_s=time.perf_counter() - run.started),
                   run.options.json_path)
    if not store_gone:
        try:
            coordinator.leave_after_abort(report)
            coordinator.close_after_abort(report)
        except StoreGoneError:
            pass
    error_type = StoreGoneError if store_gone else NettestTimeoutError
    return error_type(report.get("message", str(exc)), report)


def close_context(ctx: ParallelContext, hung: bool) -> None:
    """Destroy the context; after a hang, abort NCCL communicators first, and do not wait
    longer than CLOSE_WAIT_S for a destroy that a hung operation may block."""
    if hung and dist.is_initialized() and ctx.backend is not None and ctx.backend.device_backend == "nccl":
        abort_process_groups()
    if not hung:
        ctx.destroy(sync=False)
        return
    closer = threading.Thread(target=_destroy_quietly, args=(ctx,), daemon=True)
    closer.start()
    closer.join(CLOSE_WAIT_S)


def _destroy_quietly(ctx: ParallelContext) -> None:
    try:
        ctx.destroy(sync=False)
    except Exception:  # noqa: BLE001 - tearing down after a hang: nothing left to report
        pass
