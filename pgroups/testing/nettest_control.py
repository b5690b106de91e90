"""The end of an aborted nettest run on one emulated rank, for tests and benchmarks that drive
:class:`pgroups.nettest.control.Coordinator` objects without the rest of the tool."""
from __future__ import annotations

import time
from typing import Any, Dict, Tuple

from pgroups.nettest.control import Coordinator, NettestTimeoutError


def end_aborted_run(coordinator: Coordinator, poll_s: float = 0.01) -> Tuple[Dict[str, Any], float]:
    """Wait until ``coordinator`` knows of the abort (its watcher, or its own :meth:`abort`),
    then end as :func:`pgroups.nettest.failure.conclude` does — the final story, leaving in
    order, the keys deleted. Returns the final report and the seconds from this call to the
    final story (on the rank that raised the abort: the time every rank took to answer).
    Waits as long as the abort takes to come (the caller's test timeout bounds it)."""
    begun = time.perf_counter()
    while True:
        try:
            coordinator.check_abort()
        except NettestTimeoutError as exc:
            final = coordinator.conclude_abort(exc.report)
            break
        time.sleep(poll_s)
    concluded_s = time.perf_counter() - begun
    coordinator.leave_after_abort(final)
    coordinator.close_after_abort(final)
    return final, concluded_s
