"""Group-creation contracts that NCCL imposes, checked without a GPU: the pure decisions (which
strategy, whether lazy creation can work) and, on torch's fake backend at full scale, how many
creation calls one rank makes for host groups.

The rules re-derived from torch 2.13's distributed_c10d.py: with a default group bound to a
device, every NCCL group creation splits the world communicator (non-members enter it too), so
members-only creation — ``local`` strategy, lazy requests — would deadlock there.
"""
from __future__ import annotations

import itertools

import pytest
import torch.distributed as dist

from pgroups import ConfigError, LaunchError, ParallelContext
from pgroups.backend import check_lazy_creation, strategy_for

from conftest import fake_world


# ---- which strategy --------------------------------------------------------------------------

def expected_strategy(requested, world_collective, can_split):
    """The rule, written out: None means refused."""
    if requested == "auto":
        return "split" if can_split else "all" if world_collective else "local"
    if requested == "split":
        return "split" if can_split else None
    if requested == "local":
        return None if world_collective else "local"
    return "all"


@pytest.mark.parametrize("requested, world_collective, can_split",
                         [(r, w, c) for r, w, c in itertools.product(("auto", "all", "local", "split"),
                                                                     (False, True), (False, True))
                          if w or not c])  # split needs a world-collective (device-bound) default group
def test_strategy_decision_table(requested, world_collective, can_split):
    expected = expected_strategy(requested, world_collective, can_split)
    if expected is None:
        with pytest.raises(LaunchError) as info:
            strategy_for(requested, world_collective, can_split)
        assert f"strategy {requested!r}" in str(info.value)
    else:
        assert strategy_for(requested, world_collective, can_split) == expected


def test_local_on_a_device_bound_nccl_default_group_says_why():
    with pytest.raises(LaunchError) as info:
        strategy_for("local", world_collective=True, can_split=True)
    message = str(info.value)
    assert "split of the world communicator" in message and "would deadlock" in message
    assert "use strategy: auto, split or all" in message


# ---- lazy creation -----------------------------------------------------------------------------

def test_lazy_groups_are_refused_where_creation_splits_the_world():
    check_lazy_creation("lazy", "local", world_collective=False)
    check_lazy_creation("lazy", "all", world_collective=False)  # gloo: every rank requests every mode
    check_lazy_creation("eager", "split", world_collective=True)
    check_lazy_creation("eager", "all", world_collective=True)
    for strategy, world_collective in (("split", True), ("all", True)):
        with pytest.raises(ConfigError, match=f"groups: lazy cannot work with strategy {strategy!r} here: "
                                              ".*split of the world communicator.*Use groups: eager"):
            check_lazy_creation("lazy", strategy, world_collective)


# ---- host groups: one creation call per kind, at any scale ------------------------------------

def host_group_calls(world: int, ranks_per_host: int, rank: int) -> int:
    """This rank's creation calls for the two kinds of host groups the network test builds:
    intra-host blocks, and inter-host groups (local rank i of every host)."""
    hosts = world // ranks_per_host
    intra = [list(range(h * ranks_per_host, (h + 1) * ranks_per_host)) for h in range(hosts)]
    inter = [list(range(i, world, ranks_per_host)) for i in range(ranks_per_host)]
    with fake_world(world, rank):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": ranks_per_host}})
        try:
            before = ctx.backend.calls
            for kind, groups in (("intra", intra), ("inter", inter)):
                group = ctx.backend.build_for_rank_lists(f"nettest-{kind}", groups)
                expected = next(g for g in groups if rank in g)
                assert dist.get_process_group_ranks(group) == expected
                ctx.backend.build_for_rank_lists(f"nettest-{kind}", groups, cpu=True)
            return ctx.backend.calls - before
        finally:
            ctx.destroy()


def test_host_groups_cost_one_call_per_kind_at_16k_ranks_on_2048_hosts():
    # two kinds x (device group + CPU twin) = 4 calls, whatever the number of hosts; entering
    # every group instead would cost 2 * (2048 + 8) calls per rank.
    assert host_group_calls(16384, 8, rank=16384 - 3) == 4
    assert host_group_calls(64, 8, rank=61) == 4
