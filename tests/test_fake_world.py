"""The context at scale, in one process: torch's fake backend as one rank of a huge world.

Every query must answer exactly what the pure topology says, the groups torch holds must have
those ranks, and under the members-only strategy a rank's group-creation calls must not grow
with the world size.
"""
from __future__ import annotations

import pytest
import torch.distributed as dist

from pgroups import ModeNotInitializedError, ParallelContext, ParallelMode, Topology, default_registry
from pgroups.context import BUILTIN_MODES
from pgroups.modes import VOCABULARY, aliases_of

from conftest import fake_world

WORLD = 4096
CONFIG = {"parallel": {"tensor": 4, "pipeline": 8, "zero1": 4, "nettest": 100}}  # data 128


def pure_group(topology: Topology, mode: str, rank: int):
    return default_registry.create(mode).group_of(topology, rank)


@pytest.mark.parametrize("rank", [0, 1, 2049, WORLD - 1])
def test_every_query_answers_as_the_pure_topology(rank):
    topology = Topology.create(WORLD, tensor=4, pipeline=8, zero1=4, nettest=100)
    with fake_world(WORLD, rank):
        ctx = ParallelContext().init_from_config(dict(CONFIG, cpu_groups="eager"))
        try:
            assert ctx.get_global_rank() == rank
            assert ctx.modes == list(BUILTIN_MODES)
            for mode in BUILTIN_MODES:
                ranks = pure_group(topology, mode, rank)
                local = ranks.index(rank)
                for key in (mode, *aliases_of(mode), *[e for c, _, e, _ in VOCABULARY if c == mode]):
                    # the canonical name, its InternEvo names and the enum are the same mode
                    assert ctx.get_ranks_in_group(key) == ranks
                    assert ctx.get_world_size(key) == len(ranks)
                    assert ctx.get_local_rank(key) == local
                assert dist.get_process_group_ranks(ctx.get_group(mode)) == ranks, mode
                assert dist.get_process_group_ranks(ctx.get_cpu_group(mode)) == ranks, mode
                assert dist.get_rank(ctx.get_group(mode)) == local
                assert ctx.to_global_rank(mode, len(ranks) - 1) == ranks[-1]
                assert ctx.to_local_rank(mode, ranks[0]) == 0
                assert ctx.is_first_rank(mode) == (local == 0)
                assert ctx.is_last_rank(mode) == (local == len(ranks) - 1)
                assert ctx.get_next_global_rank(mode) == ranks[(local + 1) % len(ranks)]
                assert ctx.get_prev_global_rank(mode) == ranks[(local - 1) % len(ranks)]
            stage = topology.coordinates(rank)["pp"]
            assert ctx.is_pipeline_first_stage() == (stage == 0)
            assert ctx.is_pipeline_last_stage() == (stage == 7)
            assert ctx.get_next_global_rank() == topology.rank_at(
                **dict(topology.coordinates(rank), pp=(stage + 1) % 8))
            assert ctx.get_rank_groups("tensor") == topology.groups_along(("tp",))
            assert ctx.get_rank_groups(ParallelMode.ZERO1) == topology.zero1_groups()
            assert f"rank {rank}" in ctx.describe() and "nettest" in ctx.describe()
        finally:
            ctx.destroy()


def test_local_rank_conversion_rejects_ranks_outside_the_group():
    with fake_world(64, 5):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 4}})
        try:
            with pytest.raises(ValueError, match="not in this rank's 'tp' group"):
                ctx.to_local_rank("tensor", 8)
            with pytest.raises(ValueError, match="outside 0..3"):
                ctx.to_global_rank("tensor", 4)
        finally:
            ctx.destroy()


def calls_for(world: int, strategy: str, rank: int = 5, **extra) -> int:
    with fake_world(world, rank):
        ctx = ParallelContext().init_from_config(
            dict({"parallel": {"tensor": 4, "pipeline": 4, "zero1": 2, "nettest": 64},
                  "strategy": strategy}, **extra))
        try:
            return ctx.backend.calls
        finally:
            ctx.destroy()


def test_local_strategy_calls_do_not_grow_with_world_size():
    counts = {world: calls_for(world, "local", cpu_groups="eager") for world in (1024, 4096, 16384)}
    assert len(set(counts.values())) == 1, counts
    # at most a device group and a CPU twin per mode
    assert 0 < counts[1024] <= 2 * len(BUILTIN_MODES), counts


def test_all_strategy_calls_equal_the_number_of_distinct_groups():
    world = 1024
    topology = Topology.create(world, tensor=4, pipeline=4, zero1=2, nettest=64)
    distinct = {tuple(group) for mode in BUILTIN_MODES
                for group in default_registry.create(mode).rank_groups(topology)
                if len(group) < world}  # the world itself is the default group
    assert calls_for(world, "all") == len(distinct)
    assert calls_for(world, "all", rank=world - 1) == len(distinct)


def test_identical_modes_share_one_group_object():
    with fake_world(16, 3):
        ctx = ParallelContext().init_from_config(
            {"parallel": {"tensor": 2, "pipeline": 1, "zero1": 8}, "cpu_groups": "eager"})
        try:
            assert ctx.get_group("model") is ctx.get_group("tensor")
            assert ctx.get_cpu_group("model") is ctx.get_cpu_group("tensor")
            assert ctx.get_group("zero1") is ctx.get_group("data")
            assert ctx.get_cpu_group("zero1") is ctx.get_cpu_group("data")
            assert ctx.get_group("nettest") is ctx.get_group("global")  # nettest 32 > world 16
        finally:
            ctx.destroy()
    with fake_world(16, 3):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 2, "pipeline": 2, "zero1": 2}})
        try:
            assert ctx.get_group("model") is not ctx.get_group("tensor")
            assert ctx.get_group("zero1") is not ctx.get_group("data")
        finally:
            ctx.destroy()


def test_unbuilt_mode_raises_naming_it_and_listing_built_modes():
    ctx = ParallelContext()
    with pytest.raises(ModeNotInitializedError, match="not initialized"):
        ctx.get_group("tensor")
    with pytest.raises(ModeNotInitializedError, match="not initialized"):
        ctx.get_global_rank()
    with fake_world(8, 0):
        ctx.init_from_config({"parallel": {"tensor": 2}})
        try:
            for query in (ctx.get_group, ctx.get_cpu_group, ctx.get_local_rank, ctx.get_world_size,
                          ctx.get_ranks_in_group, ctx.get_rank_groups, ctx.is_first_rank):
                with pytest.raises(ModeNotInitializedError) as info:
                    query("micro_data")
                message = str(info.value)
                assert "'micro_data'" in message
                for built in ("'dp'", "'global'", "'tp-pp'", "'nettest'", "'pp'", "'tp'", "'zero1'"):
                    assert built in message
            with pytest.raises(ModeNotInitializedError, match="'ep' was not built"):
                ctx.get_local_rank(ParallelMode.EXPERT)  # a built-in mode this layout does not build
            with pytest.raises(ModeNotInitializedError, match="'tp-cp' was not built"):
                ctx.get_world_size("tp-cp")
            with pytest.raises(ModeNotInitializedError, match="did you mean 'tensor'"):
                ctx.get_world_size("tensr")
        finally:
            ctx.destroy()
    with pytest.raises(ModeNotInitializedError):
        ctx.get_world_size("tensor")  # destroyed: no silent 0/1


def test_destroy_then_init_again():
    with fake_world(32, 9):
        ctx = ParallelContext()
        ctx.init_from_config({"parallel": {"tensor": 2, "pipeline": 2}})
        assert ctx.is_initialized() and ctx.is_initialized("pipe")
        with pytest.raises(RuntimeError, match="already initialized"):
            ctx.init_from_config({"parallel": {"tensor": 2}})
        ctx.destroy()
        assert not ctx.is_initialized() and ctx.modes == []
        ctx.destroy()  # idempotent
        ctx.init_from_config({"parallel": {"tensor": 4, "order": "tp-dp-pp"}})
        try:
            assert dist.get_process_group_ranks(ctx.get_group("tensor")) == [8, 9, 10, 11]
            assert ctx.get_ranks_in_group("data") == list(range(1, 32, 4))
        finally:
            ctx.destroy()


def test_gpc_module_instance():
    from pgroups import gpc

    with fake_world(16, 13):
        gpc.init_from_config({"parallel": {"tensor": 2, "pipeline": 2}})
        try:
            assert dist.get_process_group_ranks(gpc.get_group(ParallelMode.TENSOR)) == [12, 13]
            assert gpc.get_ranks_in_group("pipe") == [13, 15]
            assert gpc.is_pipeline_first_stage() and not gpc.is_pipeline_last_stage()
        finally:
            gpc.destroy()
    assert not gpc.is_initialized()


def test_lazy_groups_are_built_on_first_request():
    with fake_world(64, 10):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 4}, "groups": "lazy"})
        try:
            assert ctx.backend.calls == 0
            group = ctx.get_group("tensor")
            assert ctx.backend.calls == 1
            assert dist.get_process_group_ranks(group) == [8, 9, 10, 11]
            assert ctx.get_group("tensor") is group and ctx.backend.calls == 1
        finally:
            ctx.destroy()


def test_million_rank_world_one_rank_without_listing_it(no_world_listing):
    """At 1,048,576 ranks a rank builds its groups from its own coordinates only."""
    world, rank = 1 << 20, 777_777
    with fake_world(world, rank):
        ctx = ParallelContext().init_from_config(
            {"parallel": {"tensor": 8, "pipeline": 16, "zero1": 64, "nettest": 1000}})
        try:
            assert ctx.backend.calls == 6  # tensor, pipe, data, model, zero1, nettest
            tensor = dist.get_process_group_ranks(ctx.get_group("tensor"))
            assert tensor == list(range(777_776, 777_784))
            data = dist.get_process_group_ranks(ctx.get_group("data"))
            assert len(data) == world // 128 and data[0] == rank % 128 and rank in data
            assert ctx.get_local_rank("nettest") == 777
        finally:
            ctx.destroy()


def test_million_rank_world_n_axis_modes_without_listing_it(no_world_listing):
    """Context, expert and weight modes and combinations at 1,048,576 ranks: one rank builds its
    groups from its own coordinates, one call per distinct layout."""
    world, rank = 1 << 20, 777_777
    config = {"parallel": {"tensor": 8, "context": 2, "pipeline": 16, "expert": 8, "weight": 4,
                           "order": "tp-cp-ep-dp-pp", "modes": ["tp-cp", "dp-cp", "tp-ep-pp"]}}
    with fake_world(world, rank):
        ctx = ParallelContext().init_from_config(config)
        try:
            topology = ctx.topology
            distinct = {ctx.get_initializer(m).layout_key(topology) for m in ctx.modes if m != "global"}
            assert ctx.backend.calls == len(distinct)  # identical layouts share one communicator
            for mode in ctx.modes:
                ranks = topology.group_of(rank, mode)
                assert dist.get_process_group_ranks(ctx.get_group(mode)) == ranks, mode
            assert ctx.get_world_size("tp-cp") == 16 and ctx.get_world_size("dp-cp") == world // 128
            assert ctx.get_group("expert_tensor") is ctx.get_group("tensor")  # etp defaults to tensor
        finally:
            ctx.destroy()


def test_a_group_handle_answers_the_five_queries_at_once():
    """ctx.group(mode): the device group, CPU group, sorted ranks, this rank's position, size,
    device and a label — the same answers as the separate queries."""
    from pgroups import ParallelContext

    with fake_world(16, 6):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 2, "pipeline": 2}})
        try:
            handle = ctx.group("data")
            assert handle.group is ctx.get_group("data") and handle.cpu_group is ctx.get_cpu_group("data")
            assert list(handle.ranks) == ctx.get_ranks_in_group("data") == [2, 6, 10, 14]
            assert handle.rank == ctx.get_group_rank("data") == ctx.get_local_rank("data") == 1
            assert handle.size == ctx.get_world_size("data") == 4 and str(handle.device) == "cpu"
            assert handle.label == "mode 'dp' (ranks [2, 6, 10, 14])"
            with pytest.raises(AttributeError):
                handle.rank = 0  # immutable
            on_cpu = handle.on_cpu()
            assert on_cpu.group is handle.cpu_group and on_cpu.ranks == handle.ranks and str(on_cpu.device) == "cpu"
            # groups that are no mode (nettest's host groups) come as the same handle type
            hosts = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
            host = ctx.group_for_rank_lists("nettest-intra-node", hosts, "intra-node", "host group")
            assert dist.get_process_group_ranks(host.group) == [4, 5, 6, 7]
            assert (host.ranks, host.rank, host.size) == ((4, 5, 6, 7), 2, 4)
            assert host.label == "host group 'intra-node' (ranks [4, 5, 6, 7])"
            assert ctx.group_for_rank_lists("nettest-few", [[0, 1]], "few", "host group") is None  # rank 6: in none
        finally:
            ctx.destroy()
