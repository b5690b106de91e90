"""pgroups.deadlines: the one rule for how long pgroups waits, and a census of every wait.

The census parses the package (no imports, no processes) and lists every ``.wait(...)`` call
by file and enclosing function. A wait that is neither ``deadlines.wait_within`` itself nor
registered below with the reason it is safe fails the test — so a new waiter cannot bypass
the rule ("every Python-side wait ends before the communicator's watchdog") unnoticed.
"""
from __future__ import annotations

import ast
import datetime
import pathlib
import sys

import pytest

from pgroups import deadlines

PACKAGE = pathlib.Path(deadlines.__file__).parent

GROUP_DEADLINE = ("a collective's Work without its own timeout: gloo ends it at the group's timeout "
                  "(timeout_s) and it runs inside comm_errors, which names the group; on NCCL it is "
                  "a stream wait, the communicator's watchdog (timeout_s + margin) ends a hang")
THREAD = "a threading.Event / future of pgroups' own, not a communicator"
CHILD = "a child process of pgroups' local launcher (Popen.wait: after kill, or bounded by the grace period)"

#: (file relative to the package, enclosing qualname) -> why this wait obeys the rule
WAITERS = {
    ("backend.py", "CreationRendezvous.meet"): "a store wait bounded by creation_timeout_s (a store has no watchdog)",
    ("comm/isp/grads.py", "GradReducer.complete"): GROUP_DEADLINE,
    ("comm/isp/runtime.py", "WeightParallel._wait_gather"): GROUP_DEADLINE,
    ("comm/isp/runtime.py", "WeightParallel._release_block"): GROUP_DEADLINE,
    ("comm/raw.py", "gather_raw"): GROUP_DEADLINE,
    ("comm/weights.py", "WeightGatherHandle.wait"): GROUP_DEADLINE,
    ("comm/weights.py", "all_gather_weight"): "calls WeightGatherHandle.wait",
    ("nettest/bench.py", "Bench.run"): "calls Bench.wait",
    ("nettest/bench.py", "Bench.wait"): "nettest's --timeout, on a waiter thread polled between abort checks",
    ("nettest/bench.py", "Bench._timed"): "calls Bench.wait; the unbounded wait is inside a timed section "
                                          "whose operations Bench.wait already completed",
    ("nettest/control.py", "_GuardedStore.call"): THREAD,
    ("nettest/control.py", "Coordinator.start_liveness.watch"): THREAD,
    ("nettest/startup.py", "StartupBoard._register_and_beat"): THREAD,
    ("spawn.py", "_child"): "rank 0 of the local launcher keeps its store up until the parent has every "
                            "outcome: a multiprocessing Event polled each second, ended by the parent's exit",
    ("spawn.py", "_terminate"): CHILD,
    ("spawn.py", "launch_script"): CHILD,
}


def wait_sites() -> set:
    """Every (file, enclosing qualname) in the package that calls ``<something>.wait(...)``."""
    sites = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        scope: list = []

        class Visitor(ast.NodeVisitor):
            def visit_scope(self, node):
                scope.append(node.name)
                self.generic_visit(node)
                scope.pop()

            visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_scope

            def visit_Call(self, node):
                if isinstance(node.func, ast.Attribute) and node.func.attr == "wait":
                    sites.add((path.relative_to(PACKAGE).as_posix(), ".".join(scope)))
                self.generic_visit(node)

        Visitor().visit(ast.parse(path.read_text(), str(path)))
    return sites


def test_every_wait_in_the_package_goes_through_deadlines_or_is_registered_with_its_reason():
    sites = wait_sites() - {("deadlines.py", "wait_within")}
    unregistered = sorted(sites - set(WAITERS))
    assert not unregistered, (
        f"new waits {unregistered}: wait through pgroups.deadlines.wait_within (or timeouts_named), or "
        f"register them in WAITERS with the reason they end before the communicator's watchdog")
    stale = sorted(set(WAITERS) - sites)
    assert not stale, f"registered waits that no longer exist (remove them from WAITERS): {stale}"


def test_the_census_sees_a_wait_it_was_not_told_about(tmp_path, monkeypatch):
    """The census is not blind: a module with an unregistered ``work.wait()`` is found."""
    (tmp_path / "rogue.py").write_text("def sync(work):\n    work.wait()\n")
    (tmp_path / "deadlines.py").write_text("def wait_within(work, t):\n    work.wait(t)\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    assert wait_sites() == {("rogue.py", "sync"), ("deadlines.py", "wait_within")}


@pytest.mark.parametrize("backend, margin", [("nccl", deadlines.NCCL_WATCHDOG_MARGIN_S), ("cpu:gloo,cuda:nccl",
                         deadlines.NCCL_WATCHDOG_MARGIN_S), ("gloo", 0.0), ("fake", 0.0)])
def test_communicators_outlive_the_python_deadline_only_where_a_watchdog_exists(backend, margin):
    timeout = datetime.timedelta(seconds=30)
    assert deadlines.communicator_timeout(backend, timeout) == timeout + datetime.timedelta(seconds=margin)
    assert deadlines.NCCL_WATCHDOG_MARGIN_S >= 30   # the watchdog fires well after a wait_within at timeout_s


@pytest.mark.parametrize("text, kind", [
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242", "peer lost"),
    ("Connection reset by peer", "peer lost"),
    ("NCCL error: remote process exited or there was a network error, ncclRemoteError", "peer lost"),
    ("Timed out waiting 1000ms for send operation to complete", "timeout"),
    ("Wait timeout after 30000ms", "timeout"),
    ("Tensors must be CUDA and dense", None),
])
def test_failures_are_classified_as_a_lost_peer_a_timeout_or_neither(text, kind):
    assert deadlines.classify(RuntimeError(text)) == kind


def test_timeouts_named_renames_only_timeouts():
    from pgroups.errors import GroupTimeoutError

    with pytest.raises(GroupTimeoutError, match="mode 'tensor' ranks 0-1"):
        with deadlines.timeouts_named(lambda exc: "mode 'tensor' ranks 0-1"):
            raise RuntimeError("Timed out waiting 30000ms for recv operation to complete")
    with pytest.raises(RuntimeError, match="must be dense"):
        with deadlines.timeouts_named(lambda exc: "unused"):
            raise RuntimeError("Tensors must be dense")
