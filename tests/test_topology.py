"""Pure topology: golden layouts, properties over random valid configs, and million-rank queries.

No torch.distributed here: the layout of any mode is rank math (``pgroups.topology``) plus the
built-in initializers, which say which ranks form each mode's groups.
"""
from __future__ import annotations

import itertools
from typing import Dict, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgroups import ConfigError, ParallelMode, Topology, default_registry
from pgroups.context import BUILTIN_MODES
from pgroups.topology import parse_order

AXES = ("tp", "pp", "dp")


def layout(topology: Topology) -> Dict[str, List[List[int]]]:
    """Every built-in mode's groups, through the registered initializers."""
    return {m.value: default_registry.create(m).rank_groups(topology) for m in BUILTIN_MODES}


# ---- golden tables (issue 2 / GUIDE) ------------------------------------------------------------

def test_golden_world16_tensor2_pipeline2_zero1_2_nettest8():
    topology = Topology.create(16, tensor=2, pipeline=2, zero1=2, nettest=8)
    assert topology.data == 4
    groups = layout(topology)
    assert groups["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert groups["pipe"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert groups["data"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert groups["model"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert groups["zero1"] == [[0, 4], [8, 12], [1, 5], [9, 13], [2, 6], [10, 14], [3, 7], [11, 15]]
    assert groups["nettest"] == [list(range(0, 8)), list(range(8, 16))]
    assert groups["global"] == [list(range(16))]


def test_golden_classic_internlm_rank_formula():
    """Default order tp-pp-dp: rank = tp + tensor*pp + tensor*pipeline*dp."""
    topology = Topology.create(24, tensor=2, pipeline=3)
    for rank in range(24):
        coords = topology.coordinates(rank)
        assert rank == coords["tp"] + 2 * coords["pp"] + 2 * 3 * coords["dp"]
        assert topology.rank_at(**coords) == rank


def test_golden_world12_nettest5_last_block_partial():
    groups = layout(Topology.create(12, nettest=5))
    assert groups["nettest"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]


def test_nettest_larger_than_world_is_one_group():
    assert layout(Topology.create(12, tensor=2, nettest=32))["nettest"] == [list(range(12))]


def test_golden_order_tp_dp_pp():
    """tp fastest, then dp, pp slowest: rank = tp + tensor*dp + tensor*data*pp."""
    topology = Topology.create(16, tensor=2, pipeline=2, zero1=2, order="tp-dp-pp")
    groups = layout(topology)
    assert groups["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert groups["data"] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert groups["pipe"] == [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]
    assert groups["model"] == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    assert groups["zero1"] == [[0, 2], [4, 6], [1, 3], [5, 7], [8, 10], [12, 14], [9, 11], [13, 15]]


def test_golden_order_dp_pp_tp():
    """dp fastest, tp slowest: rank = dp + data*pp + data*pipeline*tp."""
    groups = layout(Topology.create(16, tensor=2, pipeline=2, order="dp-pp-tp"))
    assert groups["data"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert groups["pipe"] == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert groups["tensor"] == [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]
    assert groups["model"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


def test_modes_accept_enum_or_string():
    topology = Topology.create(8, tensor=2, pipeline=2)
    by_enum = default_registry.create(ParallelMode.PIPELINE).rank_groups(topology)
    assert by_enum == default_registry.create("pipe").rank_groups(topology)


@pytest.mark.parametrize("order", ["tp-pp", "tp-pp-dp-tp", "tp-pp-cp", "", "tp pp dp", "TP-PP-DP"])
def test_bad_order_is_config_error(order):
    with pytest.raises(ConfigError, match="tp, pp, dp"):
        parse_order(order)


def test_order_whitespace_around_axes_is_accepted():
    assert parse_order(" dp - tp-pp ") == ("dp", "tp", "pp")


@pytest.mark.parametrize("kwargs, needle", [
    (dict(world_size=12, tensor=5), "not divisible by tensor(5) * pipeline(1) = 5"),
    (dict(world_size=16, tensor=2, data=4), "tensor(2) * pipeline(1) * data(4) = 8 != world_size(16)"),
    (dict(world_size=16, tensor=2, zero1=3), "zero1(3) must divide data(8); allowed: 1, 2, 4, 8"),
    (dict(world_size=0), "world_size must be a positive integer, got 0"),
    (dict(world_size=8, pipeline=0), "parallel.pipeline must be a positive integer, got 0"),
    (dict(world_size=8, nettest=-1), "parallel.nettest must be a positive integer, got -1"),
    (dict(world_size=8, tensor=True), "parallel.tensor must be a positive integer, got True"),
    (dict(world_size=8, zero1=0), "parallel.zero1 must be a positive integer, got 0"),
])
def test_create_shows_the_arithmetic_that_failed(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        Topology.create(**kwargs)
    assert needle in str(info.value)


def test_rank_outside_world_is_value_error():
    topology = Topology.create(8, tensor=2)
    for bad in (-1, 8, 2.0, True):
        with pytest.raises(ValueError, match="outside 0..7"):
            topology.coordinates(bad)
    with pytest.raises(ValueError, match="tp coordinate 2 outside 0..1"):
        topology.rank_at(tp=2)


# ---- properties over random valid configs ---------------------------------------------------------

@st.composite
def topologies(draw):
    tensor = draw(st.integers(1, 6))
    pipeline = draw(st.integers(1, 5))
    data = draw(st.integers(1, 6))
    zero1 = draw(st.sampled_from([d for d in range(1, data + 1) if data % d == 0]))
    world = tensor * pipeline * data
    nettest = draw(st.integers(1, world + 3))
    order = "-".join(draw(st.permutations(AXES)))
    give_data = draw(st.booleans())
    return Topology.create(world, tensor=tensor, pipeline=pipeline, data=data if give_data else None,
                           zero1=zero1, nettest=nettest, order=order)


def rank_to_group(groups: List[List[int]]) -> Dict[int, List[int]]:
    owner: Dict[int, List[int]] = {}
    for group in groups:
        for rank in group:
            assert rank not in owner, f"rank {rank} is in two groups: {owner[rank]} and {group}"
            owner[rank] = group
    return owner


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_each_rank_in_exactly_one_sorted_group_per_mode(topology):
    for mode, groups in layout(topology).items():
        owner = rank_to_group(groups)
        assert sorted(owner) == list(range(topology.world_size)), mode
        assert all(group == sorted(group) for group in groups), mode


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_group_sizes(topology):
    groups = layout(topology)
    expected = {"global": topology.world_size, "tensor": topology.tensor, "pipe": topology.pipeline,
                "data": topology.data, "model": topology.tensor * topology.pipeline,
                "zero1": topology.zero1}
    for mode, size in expected.items():
        assert {len(g) for g in groups[mode]} == {size}, mode
        assert len(groups[mode]) == topology.world_size // size, mode
    blocks = groups["nettest"]
    assert all(len(block) == topology.nettest for block in blocks[:-1])
    assert 1 <= len(blocks[-1]) <= topology.nettest
    assert [r for block in blocks for r in block] == list(range(topology.world_size))  # consecutive


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_orthogonality(topology):
    """Groups of different axes meet in at most one rank (and always in one via its own rank)."""
    groups = layout(topology)
    owners = {mode: rank_to_group(g) for mode, g in groups.items()}
    for a, b in [("tensor", "pipe"), ("tensor", "data"), ("pipe", "data"), ("model", "data")]:
        for rank in range(topology.world_size):
            shared = set(owners[a][rank]) & set(owners[b][rank])
            assert shared == {rank}, (a, b, rank)
        for ga, gb in itertools.product(groups[a], groups[b]):
            assert len(set(ga) & set(gb)) <= 1, (a, ga, b, gb)


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_zero1_groups_are_consecutive_chunks_of_data_groups(topology):
    groups = layout(topology)
    data_of = rank_to_group(groups["data"])
    for chunk in groups["zero1"]:
        data_group = data_of[chunk[0]]
        start = data_group.index(chunk[0])
        assert start % topology.zero1 == 0
        assert data_group[start:start + topology.zero1] == chunk


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_model_groups_are_the_union_of_tensor_times_pipe(topology):
    groups = layout(topology)
    tensor_of, pipe_of = rank_to_group(groups["tensor"]), rank_to_group(groups["pipe"])
    model_of = rank_to_group(groups["model"])
    for rank in range(topology.world_size):
        union = sorted({r for stage in pipe_of[rank] for r in tensor_of[stage]})
        assert model_of[rank] == union
        # ... which is every rank with the same data coordinate
        dp = topology.coordinates(rank)["dp"]
        assert union == sorted(topology.rank_at(tp, pp, dp)
                               for tp in range(topology.tensor) for pp in range(topology.pipeline))


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_group_of_agrees_with_rank_groups(topology):
    for mode in BUILTIN_MODES:
        init = default_registry.create(mode)
        owner = rank_to_group(init.rank_groups(topology))
        for rank in range(topology.world_size):
            assert init.group_of(topology, rank) == owner[rank], (mode, rank)


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_coordinates_follow_the_order_string(topology):
    """The first axis of the order varies fastest: its stride is 1, the next one's its size…"""
    stride = 1
    for axis in topology.order:
        assert topology.stride(axis) == stride
        stride *= topology.axis_size(axis)
    for rank in range(topology.world_size):
        coords = topology.coordinates(rank)
        assert topology.rank_at(**coords) == rank
        assert rank == sum(coords[a] * topology.stride(a) for a in AXES)


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_equal_layout_keys_mean_identical_groups(topology):
    """Modes whose layout keys are equal share one communicator, so their groups must match."""
    keyed = {}
    for mode in BUILTIN_MODES:
        init = default_registry.create(mode)
        key = init.layout_key(topology)
        groups = sorted(map(tuple, init.rank_groups(topology)))
        if key is not None and key in keyed:
            assert groups == keyed[key][1], (mode, keyed[key][0])
        keyed.setdefault(key, (mode, groups))


def test_documented_sharing_cases():
    """model == tensor when pipeline is 1; zero1 == data when zero1 == data (same layout key)."""
    def key(mode, topology):
        return default_registry.create(mode).layout_key(topology)

    no_pipeline = Topology.create(8, tensor=2, pipeline=1)
    assert key("model", no_pipeline) == key("tensor", no_pipeline)
    full_zero1 = Topology.create(16, tensor=2, pipeline=2, zero1=4)
    assert key("zero1", full_zero1) == key("data", full_zero1)
    half_zero1 = Topology.create(16, tensor=2, pipeline=2, zero1=2)
    assert key("zero1", half_zero1) != key("data", half_zero1)


# ---- one rank's queries at a world of 1,048,576 -------------------------------------------------

MILLION = 1 << 20


@pytest.fixture
def no_world_listing(monkeypatch):
    """Make every whole-world listing fail, so a query that enumerates the world is caught."""
    def refuse(*args, **kwargs):
        raise AssertionError("a one-rank query listed every group of the world")

    for name in ("groups_along", "zero1_groups", "block_groups"):
        monkeypatch.setattr(Topology, name, refuse)


@pytest.mark.parametrize("rank", [0, 1, 777_777, MILLION - 1])
def test_million_rank_world_queries_without_listing_it(no_world_listing, rank):
    topology = Topology.create(MILLION, tensor=8, pipeline=16, zero1=64, nettest=1000)
    data = MILLION // 128
    assert topology.data == data
    coords = topology.coordinates(rank)
    assert rank == coords["tp"] + 8 * coords["pp"] + 128 * coords["dp"]

    def group(mode):
        found = default_registry.create(mode).group_of(topology, rank)
        assert rank in found and found == sorted(found)
        return found

    tensor = group("tensor")
    assert tensor == list(range(rank - coords["tp"], rank - coords["tp"] + 8))
    pipe = group("pipe")
    assert pipe == [rank - 8 * coords["pp"] + 8 * i for i in range(16)]
    data_group = group("data")
    assert data_group == [rank % 128 + 128 * i for i in range(data)]
    model = group("model")
    assert model == list(range(128 * coords["dp"], 128 * coords["dp"] + 128))
    zero1 = group("zero1")
    first = coords["dp"] // 64 * 64
    assert zero1 == [rank % 128 + 128 * i for i in range(first, first + 64)]
    nettest = group("nettest")
    assert nettest == list(range(rank // 1000 * 1000, min(rank // 1000 * 1000 + 1000, MILLION)))
    assert len(group("global")) == MILLION


def test_million_rank_last_nettest_block_is_partial(no_world_listing):
    topology = Topology.create(MILLION, nettest=1000)
    last = default_registry.create("nettest").group_of(topology, MILLION - 1)
    assert last == list(range(1_048_000, MILLION))
