"""Shared test helpers: real local gloo processes, and torch's fake backend for huge worlds."""
from __future__ import annotations

import contextlib
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


def _xdist_group(item: pytest.Item) -> Optional[str]:
    """The pytest-xdist group an item must share a worker with, or None to run anywhere.

    A test that uses a fixture of wider than function scope defined in tests/ (a module's
    shared process world) is grouped by its module, so under ``--dist loadgroup`` the fixture
    is built once, on one worker, not once per worker.
    """
    for definitions in item._fixtureinfo.name2fixturedefs.values():
        for definition in definitions:
            if definition.scope != "function" and definition.baseid.startswith("tests"):
                return "shared-fixture:" + item.path.name
    return None


@pytest.hookimpl(tryfirst=True)   # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Put every item in its pytest-xdist group (see _xdist_group)."""
    for item in items:
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
