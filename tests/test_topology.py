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
    return {m: default_registry.create(m).rank_groups(topology) for m in BUILTIN_MODES}


# ---- golden tables (the layout facts of docs/GUIDE: world 16, tensor 2, pipeline 2) ------------------

def test_golden_world16_tensor2_pipeline2_zero1_2_nettest8():
    topology = Topology.create(16, tensor=2, pipeline=2, zero1=2, nettest=8)
    assert topology.data == 4
    groups = layout(topology)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert groups["pp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert groups["dp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert groups["tp-pp"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
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
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert groups["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert groups["pp"] == [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]
    assert groups["tp-pp"] == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    assert groups["zero1"] == [[0, 2], [4, 6], [1, 3], [5, 7], [8, 10], [12, 14], [9, 11], [13, 15]]


def test_golden_order_dp_pp_tp():
    """dp fastest, tp slowest: rank = dp + data*pp + data*pipeline*tp."""
    groups = layout(Topology.create(16, tensor=2, pipeline=2, order="dp-pp-tp"))
    assert groups["dp"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert groups["tp"] == [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]
    assert groups["tp-pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


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
    expected = {"global": topology.world_size, "tp": topology.tensor, "pp": topology.pipeline,
                "dp": topology.data, "tp-pp": topology.tensor * topology.pipeline,
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
    for a, b in [("tp", "pp"), ("tp", "dp"), ("pp", "dp"), ("tp-pp", "dp")]:
        for rank in range(topology.world_size):
            shared = set(owners[a][rank]) & set(owners[b][rank])
            assert shared == {rank}, (a, b, rank)
        for ga, gb in itertools.product(groups[a], groups[b]):
            assert len(set(ga) & set(gb)) <= 1, (a, ga, b, gb)


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_zero1_groups_are_consecutive_chunks_of_data_groups(topology):
    groups = layout(topology)
    data_of = rank_to_group(groups["dp"])
    for chunk in groups["zero1"]:
        data_group = data_of[chunk[0]]
        start = data_group.index(chunk[0])
        assert start % topology.zero1 == 0
        assert data_group[start:start + topology.zero1] == chunk


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_model_groups_are_the_union_of_tensor_times_pipe(topology):
    groups = layout(topology)
    tensor_of, pipe_of = rank_to_group(groups["tp"]), rank_to_group(groups["pp"])
    model_of = rank_to_group(groups["tp-pp"])
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


@pytest.mark.parametrize("layout", ["megatron", "internevo"])
@pytest.mark.parametrize("rank", [0, 777_777, MILLION - 1])
def test_million_rank_world_new_modes_without_listing_it(no_world_listing, rank, layout):
    """tensor 8 x context 2 x pipeline 16 x data 4096, expert 8, weight 4: every built-in mode
    and a few combinations, one rank's group from its own coordinates only."""
    topology = Topology.create(MILLION, tensor=8, pipeline=16, context=2, expert=8, weight=4,
                               order="tp-cp-ep-dp-pp", expert_layout=layout)
    coords = topology.coordinates(rank)
    assert rank == coords["tp"] + 8 * coords["cp"] + 16 * coords["dp"] + (MILLION // 16) * coords["pp"]
    sizes = {"tensor": 8, "context": 2, "pipe": 16, "data": MILLION // 256, "model": 128, "expert": 8,
             "expert_tensor": 8, "expert_data": MILLION // 16 // 64, "weight": 4,
             "weight_data": MILLION // 16 // 4, "tp-cp": 16, "dp-cp": MILLION // 128, "tp-ep-pp": 1024,
             "zero1": MILLION // 16 // 4}
    stage = coords["pp"]
    if stage in (0, 15):
        sizes["embedding"] = 2
    else:
        assert topology.group_of(rank, "embedding") is None  # middle stages hold no embedding
    for mode, size in sizes.items():
        found = topology.group_of(rank, mode)
        assert rank in found and found == sorted(found) and len(found) == size, mode
    assert topology.group_of(rank, "tp-cp") == list(range(rank - rank % 16, rank - rank % 16 + 16))
    assert topology.group_of(rank, "weight") == list(range(rank - rank % 4, rank - rank % 4 + 4))
    if stage in (0, 15):
        first = rank % (MILLION // 16)
        assert topology.group_of(rank, "embedding") == [first, first + 15 * (MILLION // 16)]


# ---- meshes: layout keys, runs and listings agree -------------------------------------------------

MODES = ["tensor", "context", "pipe", "data", "model", "zero1", "nettest", "global", "embedding",
         "expert", "expert_tensor", "expert_data", "weight", "weight_data", "tp-cp", "dp-cp",
         "tp-dp-cp", "tp-ep", "tp-ep-pp", "ep-edp", "wp-pp", "wdp-pp", "cp-pp"]


@st.composite
def nd_topologies(draw):
    tp, cp, pp, dp = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                      draw(st.integers(1, 4)))
    stage = tp * cp * dp
    layout = draw(st.sampled_from(["megatron", "internevo"]))
    names = ["tp", "cp", "dp", "pp"] + (["ep"] if draw(st.booleans()) else [])
    order = draw(st.permutations(names))
    ep = draw(st.sampled_from([d for d in range(1, stage + 1) if stage % d == 0]))
    etp = draw(st.sampled_from([d for d in range(1, stage // ep + 1) if (stage // ep) % d == 0]))
    weight = draw(st.one_of(st.none(), st.sampled_from([d for d in range(1, stage + 1) if stage % d == 0])))
    world = stage * pp
    nettest = draw(st.integers(1, world + 2))
    try:  # Megatron's expert mesh refuses some orders: InternEvo's then
        topology = Topology.create(world, tensor=tp, pipeline=pp, context=cp, expert=ep, expert_tensor=etp,
                                   weight=weight, order="-".join(order), expert_layout=layout, nettest=nettest)
        topology.resolve("ep")
        return topology
    except ConfigError:
        return Topology.create(world, tensor=tp, pipeline=pp, context=cp, expert=ep, expert_tensor=etp,
                               weight=weight, order="-".join(order), expert_layout="internevo", nettest=nettest)


def partition_of_runs(runs, world):
    """The groups a set of runs describes: ranks equal outside the runs' digits."""
    groups = {}
    for rank in range(world):
        key = rank - sum((rank // s) % n * s for s, n in runs)
        groups.setdefault(key, []).append(rank)
    return sorted(groups.values())


@settings(max_examples=150, deadline=None)
@given(nd_topologies())
def test_every_mode_partitions_the_world_and_group_of_agrees(topology):
    for mode in MODES:
        groups = topology.groups(mode)
        owner = rank_to_group(groups)
        assert all(g == sorted(g) for g in groups), mode
        if mode == "embedding":  # middle stages hold no embedding
            assert set(owner) <= set(range(topology.world_size))
        else:
            assert sorted(owner) == list(range(topology.world_size)), mode
        if mode != "zero1":
            assert [g[0] for g in groups] == sorted(g[0] for g in groups), mode  # by smallest member
        for rank in range(topology.world_size):
            assert topology.group_of(rank, mode) == owner.get(rank), (mode, rank)


@settings(max_examples=150, deadline=None)
@given(nd_topologies())
def test_layout_keys_are_sound_and_runs_describe_the_groups(topology):
    """Equal keys (across meshes) mean identical groups — what lets modes share a communicator."""
    seen = {}
    for mode in MODES:
        key = topology.layout_key(mode)
        groups = sorted(topology.groups(mode))
        if key[0] == "runs":
            assert partition_of_runs(key[1], topology.world_size) == groups, mode
        if key in seen:
            assert groups == seen[key][1], (mode, seen[key][0])
        seen.setdefault(key, (mode, groups))


def test_keys_find_identical_groups_across_meshes():
    """With etp*ep covering a stage, tp-ep of the expert mesh is the dense tp-dp and tp-ep-pp is
    the world; wp is tensor when weight == tensor (tp fastest): one communicator each."""
    topology = Topology.create(16, tensor=2, pipeline=2, expert=8, expert_tensor=1, weight=2,
                               order="tp-ep-dp-pp")
    assert topology.layout_key("tp-ep") == topology.layout_key("tp-dp")
    assert topology.layout_key("weight") == topology.layout_key("tensor")
    assert topology.layout_key("tp-ep-pp") == topology.layout_key("global")
    assert topology.layout_key("weight_data") == topology.layout_key("data")


def test_split_mesh_unaligned_runs_fall_back_to_a_sound_key():
    """A stage of tp(2)·dp(3) ranks with pp between them, cut in weight groups of 3: not a grid
    of the rank, so the key is structural — and still equal for equal structure."""
    topology = Topology.create(12, tensor=2, pipeline=2, weight=3, order="tp-pp-dp")
    assert topology.group_of(0, "weight") == [0, 1, 4]
    assert topology.layout_key("weight")[0] == "split"
    other = Topology.create(12, tensor=2, pipeline=2, expert=1, expert_tensor=3, weight=3,
                            order="tp-pp-dp", expert_layout="internevo")
    assert other.layout_key("expert_tensor") == other.layout_key("weight")
    assert other.groups("expert_tensor") == other.groups("weight")


@pytest.mark.parametrize("name, needle", [
    ("tp-wp", "mixes axes of different meshes"),
    ("cp-ep", "mixes axes of different meshes"),
    ("tp-tp", "names the same axis of the dense mesh twice"),
    ("etp-tp", "names the same axis of the expert mesh twice"),
])
def test_bad_combinations_are_config_errors(name, needle):
    topology = Topology.create(8, tensor=2)
    with pytest.raises(ConfigError, match=needle):
        topology.groups(name)


def test_combination_names_are_order_free_and_alias_megatrons_expert_names():
    topology = Topology.create(32, tensor=2, context=2, pipeline=2, expert=2, order="tp-cp-ep-dp-pp")
    assert topology.groups("dp-cp") == topology.groups("cp-dp") == topology.groups("dp-cp")
    assert topology.groups("tp-ep") == topology.groups("etp-ep") == topology.groups("ep-tp")
    assert topology.groups("tp") == topology.groups("tensor")
    assert topology.groups("dp-ep") == topology.groups("edp-ep")


def test_a_topology_built_directly_is_validated_like_create():
    """Topology(...) cannot hold sizes that create() would refuse: a 12-rank layout claiming a
    16-rank world fails at construction with create()'s message, not later as a rank range."""
    with pytest.raises(ConfigError, match=r"tensor\(2\) \* pipeline\(2\) \* data\(3\) = 12 != world_size\(16\)"):
        Topology(16, 2, 2, 3, 1, 32, ("tp", "pp", "dp"))
    with pytest.raises(ConfigError, match=r"zero1\(3\) must divide data\(4\)"):
        Topology(16, 2, 2, 4, 3, 32, ("tp", "pp", "dp"))
    assert Topology(16, 2, 2, 4, 2, 32, ("tp", "pp", "dp")) == Topology.create(16, 2, 2, zero1=2)
