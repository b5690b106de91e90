"""Shared test helpers: real local gloo processes, and torch's fake backend for huge worlds."""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import hypothesis
import pytest
import torch.distributed as dist

from pgroups import spawn
from pgroups.spawn import RankOutcome, run_local

# Property tests check what holds, not how fast: on a shared 2-core machine with other work running
# one example can take seconds, and hypothesis' default 200 ms deadline would fail a correct case.
hypothesis.settings.register_profile("pgroups", deadline=None, print_blob=True)
hypothesis.settings.load_profile("pgroups")

# Children of run_local are forked from a server that imported these once; each test module a
# child unpickles its target from imports pytest, and the DeviceMesh tests DTensor (0.15 and
# 0.55 CPU-seconds a child otherwise).
spawn.PRELOAD = spawn.PRELOAD + ("pytest", "hypothesis", "torch.distributed.tensor")


def run_ranks(nproc: int, target: Callable[..., Any], *args: Any, timeout_s: float = 120.0,
              env: Optional[dict] = None) -> List[Any]:
    """Run ``target(*args)`` on ``nproc`` local gloo ranks; fail the test if any rank failed.

    ``target`` must be a module-level function (children are spawned). Returns rank values.
    """
    outcomes = run_local(nproc, target, args, timeout_s=timeout_s, env=env)
    failures = [f"rank {o.rank}: {o.error}" for o in outcomes if not o.ok]
    assert not failures, "\n".join(failures)
    return [o.value for o in outcomes]


def run_ranks_outcomes(nproc: int, target: Callable[..., Any], *args: Any, timeout_s: float = 120.0,
                       env: Optional[dict] = None) -> List[RankOutcome]:
    """Like run_ranks, but return every RankOutcome (for tests that expect failures)."""
    return run_local(nproc, target, args, timeout_s=timeout_s, env=env)


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """torch's fake process group as rank ``rank`` of ``world_size`` in this one process."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def fresh_registry():
    """An InitializerRegistry with only the built-ins, so tests can register modes freely."""
    from pgroups.initializer import InitializerRegistry

    return InitializerRegistry()


@pytest.fixture
def no_world_listing(monkeypatch):
    """Make every whole-world listing fail, so a query that enumerates the world is caught."""
    from pgroups import Topology
    from pgroups.mesh import GridMesh, Mesh, SplitMesh

    def refuse(*args, **kwargs):
        raise AssertionError("a one-rank query listed every group of the world")

    for name in ("groups_along", "zero1_groups", "block_groups", "groups", "embedding_groups"):
        monkeypatch.setattr(Topology, name, refuse)
    for cls in (Mesh, GridMesh, SplitMesh):
        monkeypatch.setattr(cls, "groups", refuse)


#: Test files whose tests run alone under pytest-xdist: on one worker (one xdist group), and while
#: one of them runs no other test runs on any worker (see pytest_runtest_protocol). The emulated
#: cluster judges bandwidth on links shaped to 100 Mbit/s, which holds only while the network, not
#: the CPU, is the bottleneck: beside two other workers (load about 5, or 7 with two CPU hogs) a
#: healthy host measured 1.28x slower than the others and was named slow, and a host 30 % slower
#: was not named.
EXCLUSIVE_FILES = ("test_nettest_netns.py",)


def _alone(item: Optional[pytest.Item]) -> bool:
    return item is not None and item.path.name in EXCLUSIVE_FILES


def _xdist_group(item: pytest.Item) -> Optional[str]:
    """The pytest-xdist group an item must share a worker with, or None to run anywhere.

    A file in EXCLUSIVE_FILES is one group. A test that uses a fixture of wider than function
    scope defined in tests/ (a module's shared process world) is grouped by its module, so under
    ``--dist loadgroup`` the fixture is built once, on one worker, not once per worker.
    """
    if _alone(item):
        return "alone:" + item.path.name
    for definitions in item._fixtureinfo.name2fixturedefs.values():
        for definition in definitions:
            if definition.scope != "function" and definition.baseid.startswith("tests"):
                return "shared-fixture:" + item.path.name
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Put every item in its pytest-xdist group (see _xdist_group), and under ``-n`` EXCLUSIVE_FILES last.

    xdist (``--dist loadgroup --no-loadscope-reorder``) hands out the work in this order, so the
    tests that run alone start when the other workers are on their last tests: each of those
    ends its current test, then waits for the exclusive ones to end (see
    pytest_runtest_protocol), instead of exclusive tests waiting at the start behind a shared
    process world being built.
    """
    for item in items:
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    if getattr(config.option, "numprocesses", None):
        items[:] = [item for item in items if not _alone(item)] + [item for item in items if _alone(item)]


def _worker_lock_folder(config: pytest.Config) -> Optional[Path]:
    """The folder shared by the pytest-xdist workers of this run (the parent of each worker's
    base temporary folder), or None when the tests run in one process."""
    if not hasattr(config, "workerinput"):
        return None
    return config._tmp_path_factory.getbasetemp().parent   # xdist: <run's basetemp>/popen-gwN


#: the exclusive lock's file while this worker holds it (across consecutive EXCLUSIVE_FILES tests)
_held_alone: List[Any] = []


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Iterator[None]:
    """Under pytest-xdist, tests of EXCLUSIVE_FILES run with no other test running on any worker.

    A readers-writer lock on a file the workers share, held around the whole protocol (setup,
    with any module-scoped fixture it builds, call and teardown): other tests take it shared;
    the first of a run of consecutive EXCLUSIVE_FILES tests takes it exclusive and the last one
    releases it. A turnstile lock, held by the exclusive taker while it waits, stops new shared
    holders, so it gets its turn as soon as the tests running on the other workers end.
    Outermost (tryfirst), so pytest-timeout does not count the wait.
    """
    folder = _worker_lock_folder(item.config)
    if folder is None:
        yield
        return
    if _alone(item) and not _held_alone:
        with open(folder / "pgroups-alone.turnstile", "a") as turnstile:
            fcntl.flock(turnstile, fcntl.LOCK_EX)
            _held_alone.append(open(folder / "pgroups-alone.lock", "a"))
            fcntl.flock(_held_alone[0], fcntl.LOCK_EX)
    if _alone(item):
        try:
            yield
        finally:
            if not _alone(nextitem):
                _held_alone.pop().close()   # closing the file releases its lock
        return
    with open(folder / "pgroups-alone.turnstile", "a") as turnstile:
        fcntl.flock(turnstile, fcntl.LOCK_EX)   # waits while an exclusive taker waits; closing releases
    with open(folder / "pgroups-alone.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield
