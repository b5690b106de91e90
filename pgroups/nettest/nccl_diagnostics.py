"""NCCL's own diagnostics (NCCL 2.31 and newer) folded into the nettest's report.

Written from NCCL's documentation ("Diagnostics", NCCL 2.31 user guide); **it has not run on a
GPU here**: no machine with NCCL 2.31 was available when it was written. What the documentation
says, and what this module relies on:

- *Active diagnostics* exercise the paths a communicator will use (GPU peer-to-peer inside a
  node, a network bandwidth check across nodes) while the communicator is being created, in
  every ``ncclCommInitRank`` / ``ncclCommSplit``. They are off by default and turned on by
  ``NCCL_RUN_DIAGNOSTICS=1`` in every process, before NCCL reads its parameters (the first
  communicator of the process): :func:`prepare` sets it before the default group forms.
- Each communicator's report is written to the process's **standard output**, its lines
  prefixed ``NCCL DIAG``, whatever ``NCCL_DEBUG`` says. A failed check does not fail the
  communicator's creation: it is only in that report. :class:`StdoutTee` therefore copies
  file descriptor 1 (C and Python writes alike) to where it went before — nothing is lost —
  while keeping the ``NCCL DIAG`` lines.
- *RAS diagnostics* (passive: GPU, driver and NCCL configuration compared across ranks) are
  queried on demand through NCCL's RAS client; the nettest's own drift check
  (:mod:`.preflight`) compares the same facts plus the environment, so they are not run.

The report format of a diagnostic is not specified line by line in the documentation, so the
judgement is deliberately plain (:func:`judge`): every ``NCCL DIAG`` line of every rank goes
into the JSON report as written, and a line that says a check failed (the words fail, failed,
failure, error, mismatch, unreachable, timeout) is a finding against that rank and its host,
with the line as its reason. The decision of whether to run (:func:`decide`) and the judgement
are pure; the tee is the only part that touches the process.
"""
from __future__ import annotations

import os
import re
import sys
import threading
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import attrs

from .preflight import PreflightFinding

MIN_NCCL = (2, 31)
ENV = "NCCL_RUN_DIAGNOSTICS"
MARKER = b"NCCL DIAG"
KIND = "nccl-diagnostics"
MAX_LINES_PER_RANK = 200      # a rank's report lines kept in the JSON (the findings are never cut)
JOIN_S = 2.0                  # how long stop() waits for the copying thread to drain the pipe
_FAILED = re.compile(r"\b(fail|failed|failure|error|errors|mismatch|mismatched|unreachable|timeout|timed out)\b",
                     re.IGNORECASE)


@attrs.frozen
class Decision:
    """Whether this rank runs NCCL's diagnostics, and the one-line reason when it does not."""

    run: bool
    reason: str = ""


def parse_version(text: Any) -> Optional[Tuple[int, ...]]:
    """NCCL's version as a tuple from ``torch.cuda.nccl.version()``'s answer (a tuple, or an
    int such as 22703 from old builds) or a dotted string; None when unknown."""
    if isinstance(text, tuple):
        return tuple(int(v) for v in text)
    if isinstance(text, int):
        return (text // 10000, text // 100 % 100, text % 100) if text >= 10000 else (text // 1000, text // 100 % 10, text % 100)
    parts = str(text).split(".")
    return tuple(int(p) for p in parts) if parts and all(p.isdigit() for p in parts) else None


def decide(enabled: bool, uses_nccl: bool, version: Optional[Tuple[int, ...]],
           environ: Mapping[str, str]) -> Decision:
    """Whether NCCL's active diagnostics run on this rank (pure): asked for (``--no-nccl-
    diagnostics`` turns them off), on NCCL communicators, with NCCL >= 2.31, and not turned off
    by the user's own ``NCCL_RUN_DIAGNOSTICS=0``."""
    if not enabled:
        return Decision(False, "off (--no-nccl-diagnostics)")
    if not uses_nccl:
        return Decision(False, "not an NCCL job (the groups under test are gloo)")
    if version is None:
        return Decision(False, "NCCL's version is unknown")
    if tuple(version[:2]) < MIN_NCCL:
        shown = ".".join(map(str, version))
        return Decision(False, f"NCCL {shown} has no built-in diagnostics (they need NCCL "
                               f"{'.'.join(map(str, MIN_NCCL))} or newer)")
    if environ.get(ENV, "").strip() == "0":
        return Decision(False, f"turned off by {ENV}=0 in the environment")
    return Decision(True)


def prepare(decision: Decision, environ: MutableMapping[str, str]) -> None:
    """Turn NCCL's active diagnostics on in ``environ`` (this process's, before its first
    communicator) when ``decision`` says to run them and the user set nothing."""
    if decision.run:
        environ.setdefault(ENV, "1")


def judge(lines_by_rank: Sequence[Optional[Mapping[str, Any]]], hostnames: Sequence[str]
          ) -> Tuple[List[PreflightFinding], Dict[str, Any]]:
    """Rank 0: every rank's record (``{"ran": bool, "reason": str, "lines": [...]}``, None for
    a rank that sent nothing) → the findings (one per failed check line, naming the rank and
    its host) and the report's ``nccl_diagnostics`` part: which ranks ran them, why the others
    did not (each reason with its ranks), and each rank's ``NCCL DIAG`` lines."""
    findings: List[PreflightFinding] = []
    not_run: Dict[str, List[int]] = {}
    reports: Dict[str, List[str]] = {}
    ran: List[int] = []
    for rank, record in enumerate(lines_by_rank):
        record = record or {"ran": False, "reason": "this rank sent no record", "lines": []}
        if not record.get("ran"):
            not_run.setdefault(str(record.get("reason", "")), []).append(rank)
            continue
        ran.append(rank)
        lines = [str(line) for line in record.get("lines", [])]
        reports[str(rank)] = lines[:MAX_LINES_PER_RANK]
        host = hostnames[rank] if rank < len(hostnames) else "?"
        for line in lines:
            if _FAILED.search(line):
                findings.append(PreflightFinding(KIND, (), (rank,), (
                    f"NCCL diagnostics on rank {rank} (host {host}): {line.strip()}")))
    part = {"ran_on": ran, "not_run": [{"reason": r, "ranks": rs} for r, rs in not_run.items()],
            "reports": reports, "findings": [f.to_json() for f in findings],
            "note": "written from NCCL 2.31's documentation; not yet run on a GPU by pgroups' tests"}
    return findings, {"nccl_diagnostics": part}


class StdoutTee:
    """Copy what this process writes to file descriptor ``fd`` (standard output) to where it
    went before, and keep the lines that hold ``marker``.

    ``start()`` puts a pipe in place of ``fd`` and a thread that writes every byte on to the
    original ``fd`` (so the user sees exactly what they saw before, C and Python writes alike)
    and keeps the marked lines; ``stop()`` puts the original back, lets the thread drain the
    pipe (for at most ``JOIN_S``) and returns the kept lines. Not reentrant; one per process.
    """

    def __init__(self, fd: int = 1, marker: bytes = MARKER) -> None:
        self.fd, self.marker = fd, marker
        self._saved: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._kept: List[str] = []

    def start(self) -> "StdoutTee":
        sys.stdout.flush()
        self._saved = os.dup(self.fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, self.fd)
        os.close(write_end)
        self._thread = threading.Thread(target=self._copy, args=(read_end, self._saved),
                                        name="pgroups-nccl-diag-tee", daemon=True)
        self._thread.start()
        return self

    def _copy(self, read_end: int, target: int) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(target, view):]
                pending += chunk
                *lines, pending = pending.split(b"\n")
                self._keep(lines)
        finally:
            self._keep([pending])
            os.close(read_end)

    def _keep(self, lines: Sequence[bytes]) -> None:
        for line in lines:
            if self.marker in line:
                self._kept.append(line.decode("utf-8", "replace").rstrip("\r"))

    def stop(self) -> List[str]:
        """Restore ``fd`` and return the kept lines (the tee may not be started: then [])."""
        if self._saved is None:
            return []
        sys.stdout.flush()
        os.dup2(self._saved, self.fd)   # closes the pipe's write end: the copying thread sees EOF
        if self._thread is not None:
            self._thread.join(JOIN_S)
        if self._thread is None or not self._thread.is_alive():
            os.close(self._saved)   # else a process forked meanwhile still holds the pipe: leave it to the thread
        self._saved, self._thread = None, None
        return list(self._kept)
