"""Where ``pgroups nettest`` meets its test hooks: without ``PGROUPS_NETTEST_FAULT`` (every real
run) nothing of :mod:`pgroups.testing` is imported and every hook is a no-op (:class:`NoFaults`).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

FAULT_ENV = "PGROUPS_NETTEST_FAULT"


class NoFaults:
    """The faults of a rank when none are injected: the interface of
    :class:`pgroups.testing.nettest_faults.ActiveFaults`, doing nothing."""

    corrupt = False
    bad_checksum = False

    def inside_timed_region(self, crosses_hosts: bool = True, size_bytes: int = 0) -> None:
        pass

    def inside_matmul(self) -> None:
        pass

    def environment(self, environ: Mapping[str, str]) -> Dict[str, str]:
        return dict(environ)

    def never_start(self) -> None:
        pass

    def stay_away(self) -> None:
        pass


def fault_spec() -> Optional[str]:
    """The hook's value, None when unset or empty."""
    return os.environ.get(FAULT_ENV) or None


def check_fault_spec() -> None:
    """A bad hook value is a usage error before anything starts: ValueError naming it."""
    if fault_spec() is not None:
        from ..testing.nettest_faults import parse_faults

        parse_faults(fault_spec())


def faults_for_rank(rank: int, host: str) -> Any:
    """The injected faults of ``rank`` on ``host`` (``ActiveFaults``), or :class:`NoFaults`."""
    if fault_spec() is None:
        return NoFaults()
    from ..testing.nettest_faults import ActiveFaults, parse_faults

    return ActiveFaults.for_rank(parse_faults(fault_spec()), rank, host)
