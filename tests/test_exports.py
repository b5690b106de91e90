"""Exports: ``gpc.device_mesh`` (a torch DeviceMesh over pgroups' own groups, used by DTensor) and
``gpc.megatron_groups`` (Megatron-Core's ProcessGroupCollection field names).

References are independent of pgroups: torch's own DeviceMesh layout (row-major, last dimension
fastest: ``arange(world).reshape(sizes of the order reversed)``), and Megatron-Core's
``RankGenerator`` / ``generate_masked_orthogonal_rank_groups`` rewritten below.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist

from pgroups import ModeNotInitializedError, ParallelContext, UnknownModeError
from pgroups.exports import MEGATRON_FIELDS, mesh_ranks
from pgroups.topology import Topology

from conftest import fake_world, run_ranks

ORDERS = ["-".join(p) for p in itertools.permutations(("tp", "pp", "dp"))]
CP_ORDERS = ["tp-cp-dp-pp", "tp-pp-cp-dp", "dp-cp-tp-pp", "cp-tp-pp-dp"]


# ---- references ----------------------------------------------------------------------------------
def torch_layout_submesh(topology: Topology, rank: int, dims: List[List[str]]) -> List[Any]:
    """The mesh around ``rank`` as torch lays it out: the full mesh is ``arange(world)`` viewed
    with the order's axes reversed (slowest first); keep ``rank``'s index on axes not asked for,
    move the asked axes into ``dims`` order and merge each dimension's axes (slowest first)."""
    torch_dims = list(reversed(topology.order))  # the dense axes the order names (cp may be left out: size 1)
    full = torch.arange(topology.world_size).reshape([topology.axis_size(a) for a in torch_dims])
    where = (full == rank).nonzero()[0].tolist()
    asked = [a for axes in dims for a in sorted(axes, key=torch_dims.index)]
    index = tuple(slice(None) if a in asked else where[i] for i, a in enumerate(torch_dims))
    kept = [a for a in torch_dims if a in asked]
    sub = full[index].permute([kept.index(a) for a in asked])
    sizes = [math.prod(topology.axis_size(a) for a in axes) for axes in dims]
    return sub.reshape(sizes).tolist()


def megatron_rank_groups(sizes: Dict[str, int], order: str, token: str) -> List[List[int]]:
    """Megatron-Core's RankGenerator(tp, ep, dp, pp, cp, order).get_ranks(token), rewritten:
    axes missing from the order are appended (they must have size 1), then the masked
    orthogonal groups of the axes in ``token``."""
    names = order.split("-") + [n for n in ("tp", "pp", "dp", "ep", "cp") if n not in order.split("-")]
    shape = [sizes.get(n, 1) for n in names]
    mask = [n in token.split("-") for n in names]
    world = math.prod(shape)

    def prefix_product(values):
        out = [1]
        for v in values:
            out.append(out[-1] * v)
        return out

    def decompose(index, dims):
        strides = prefix_product(dims)
        return [(index // d) % s for s, d in zip(dims, strides)]

    stride = prefix_product(shape)
    masked = [(s, d) for s, d, m in zip(shape, stride, mask) if m]
    unmasked = [(s, d) for s, d, m in zip(shape, stride, mask) if not m]
    group_size = math.prod(s for s, _ in masked)
    groups = []
    for g in range(world // group_size):
        gidx = decompose(g, [s for s, _ in unmasked])
        base = sum(i * d for i, (_, d) in zip(gidx, unmasked))
        groups.append([base + sum(i * d for i, (_, d) in zip(decompose(r, [s for s, _ in masked]), masked))
                       for r in range(group_size)])
    return groups


# ---- pure mesh layout ------------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS + CP_ORDERS)
@pytest.mark.parametrize("dims", [[["dp"], ["pp"], ["tp"]], [["tp"], ["dp"]], [["pp"]],
                                  [["dp"], ["tp", "pp"]], [["pp", "dp"], ["tp"]], [["tp", "pp", "dp"]],
                                  [["dp"], ["cp"], ["tp"]], [["dp", "cp"], ["tp"]], [["tp", "cp"], ["pp"]]])
def test_mesh_ranks_match_torchs_layout(order, dims):
    context = 2 if "cp" in order else 1
    if context == 1 and any("cp" in axes for axes in dims):
        return
    topology = Topology.create(24 * context, tensor=2, pipeline=3, order=order, context=context)  # data 4
    mesh = topology.mesh("dense")
    for rank in range(topology.world_size):
        assert mesh_ranks(mesh, rank, [tuple(axes) for axes in dims]) == torch_layout_submesh(topology, rank, dims)


def test_mesh_ranks_reject_a_shared_axis():
    with pytest.raises(ValueError, match="share an axis"):
        mesh_ranks(Topology.create(8, tensor=2, pipeline=2).mesh("dense"), 0, [("tp",), ("tp", "pp")])


# ---- DeviceMesh and DTensor on real gloo processes -------------------------------------------------
def dtensor_case(config: dict, dims: Tuple[str, str, str], modes: Tuple[str, str, str],
                 combined: Tuple[str, str], combined_mode: str) -> Dict[str, Any]:
    """On one rank: a 3-D mesh over ``dims`` (whose groups are ``modes``' groups) and a 2-D mesh
    ``combined`` (outer dimension, then one dimension over the ``combined_mode`` groups)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    ctx = ParallelContext().init_from_config(config)
    try:
        calls = ctx.backend.calls
        out: Dict[str, Any] = {}
        mesh = ctx.device_mesh(dims)
        out["names"] = mesh.mesh_dim_names
        out["same_groups"] = all(mesh.get_group(d) is ctx.get_group(m) for d, m in zip(dims, modes))
        out["sliced_same"] = mesh[dims[2]].get_group() is ctx.get_group(modes[2])
        out["local"] = [mesh.get_local_rank(d) for d in dims]
        out["mode_local"] = [ctx.get_local_rank(m) for m in modes]

        full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
        # rank 0 of each dim group scatters (distribute_tensor's src_data_rank=0): real collectives
        dt = distribute_tensor(full, mesh, [Shard(0), Replicate(), Shard(1)])
        outer, inner = ctx.get_local_rank(modes[0]), ctx.get_local_rank(modes[2])
        out["shard_ok"] = torch.equal(dt.to_local(), full.chunk(2, 0)[outer].chunk(2, 1)[inner])
        out["replicate_ok"] = torch.equal(
            dt.redistribute(mesh, [Replicate(), Replicate(), Replicate()]).to_local(), full)
        moved = dt.redistribute(mesh, [Replicate(), Shard(0), Replicate()])  # S→R on dim 0, R→S on dim 1
        out["reshard_ok"] = torch.equal(moved.to_local(), full.chunk(2, 0)[ctx.get_local_rank(modes[1])])
        out["full_ok"] = torch.equal(moved.full_tensor(), full)

        mesh2 = ctx.device_mesh(combined)
        out["combined_same"] = mesh2.get_group(combined[1]) is ctx.get_group(combined_mode)
        out["combined_local"] = mesh2.get_local_rank(combined[1]) == ctx.get_local_rank(combined_mode)
        dt2 = distribute_tensor(full, mesh2, [Replicate(), Shard(0)])
        out["combined_shard_ok"] = torch.equal(dt2.to_local(), full.chunk(4, 0)[ctx.get_local_rank(combined_mode)])
        out["combined_gather_ok"] = torch.equal(dt2.redistribute(mesh2, [Replicate(), Replicate()]).to_local(), full)
        out["new_calls"] = ctx.backend.calls - calls
        return out
    finally:
        ctx.destroy()


GLOO_CASES = {
    # world 8: tensor 2 x pipeline 2 x data 2; mesh (dp, pp, tp); (data, tp-pp) with tp-pp = model
    "tp-pp-dp": ({"parallel": {"tensor": 2, "pipeline": 2}},
                 ("dp", "pp", "tp"), ("data", "pipe", "tensor"), ("data", "tp-pp"), "model"),
    # world 8: tensor 2 x context 2 x data 2; mesh (dp, cp, tp); (tp, dp-cp) with dp-cp listed
    "tp-cp-dp-pp": ({"parallel": {"tensor": 2, "context": 2, "order": "tp-cp-dp-pp", "modes": ["dp-cp"]}},
                    ("dp", "cp", "tp"), ("data", "context", "tensor"), ("tensor", "dp-cp"), "dp-cp"),
}


def dtensor_worker(cases: Dict[str, tuple]) -> Dict[str, Dict[str, Any]]:
    """Every case in turn in one world (each builds its own context and destroys it)."""
    return {name: dtensor_case({**case[0], "timeout_s": 60}, *case[1:]) for name, case in cases.items()}


@pytest.fixture(scope="module")
def dtensor_results() -> List[Dict[str, Dict[str, Any]]]:
    """One world of 8 gloo ranks runs every case of GLOO_CASES (one spawn for all of them)."""
    return run_ranks(8, dtensor_worker, GLOO_CASES, timeout_s=400)


@pytest.mark.multiprocess
@pytest.mark.timeout(420)
@pytest.mark.parametrize("case", sorted(GLOO_CASES))
def test_device_mesh_reuses_our_groups_and_dtensor_works(case, dtensor_results):
    dims = GLOO_CASES[case][1]
    for rank, out in enumerate(result[case] for result in dtensor_results):
        assert out["names"] == dims
        assert out["same_groups"] and out["sliced_same"] and out["combined_same"], rank
        assert out["local"] == out["mode_local"] and out["combined_local"], rank
        for key in ("shard_ok", "replicate_ok", "reshard_ok", "full_ok", "combined_shard_ok", "combined_gather_ok"):
            assert out[key], (rank, key)
        assert out["new_calls"] == 0, rank


# ---- DeviceMesh on the fake backend: layout at scale, errors ----------------------------------------
def test_device_mesh_at_world_4096_creates_no_group():
    with fake_world(4096, 1234):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 8, "pipeline": 4}})
        try:
            calls = ctx.backend.calls
            mesh = ctx.device_mesh(("pp", "dp", "tp"))
            assert mesh.shape == (4, 128, 8)
            assert mesh.mesh.tolist() == torch_layout_submesh(ctx.topology, 1234, [["pp"], ["dp"], ["tp"]])
            for name, mode in (("pp", "pipe"), ("dp", "data"), ("tp", "tensor")):
                assert mesh.get_group(name) is ctx.get_group(mode)
                assert dist.get_process_group_ranks(mesh.get_group(name)) == ctx.get_ranks_in_group(mode)
            assert ctx.backend.calls == calls
        finally:
            ctx.destroy()


@pytest.mark.parametrize("rank", [0, 6, 9, 15])
def test_device_mesh_on_the_expert_mesh_has_megatrons_expert_groups(rank):
    """World 16, tensor 2 x context 2 x pipeline 2, expert 2, expert_tensor 1 (edp 4), order
    tp-cp-ep-dp-pp: a mesh (pp, edp, ep, etp) over the expert modes' groups; each dimension's
    group is Megatron's decoupled expert RankGenerator's, and a coordinate is the local rank."""
    parallel = {"tensor": 2, "context": 2, "pipeline": 2, "expert": 2, "expert_tensor": 1, "order": "tp-cp-ep-dp-pp"}
    _, expert = megatron_sizes(parallel, 16)
    with fake_world(16, rank):
        ctx = ParallelContext().init_from_config({"parallel": parallel})
        try:
            calls = ctx.backend.calls
            mesh = ctx.device_mesh(("pp", "edp", "ep", "etp"))
            assert mesh.shape == (2, 4, 2, 1)
            assert sorted(mesh.mesh.flatten().tolist()) == list(range(16))
            for dim, token in (("pp", "pp"), ("edp", "dp"), ("ep", "ep"), ("etp", "tp")):
                theirs = sorted(next(g for g in megatron_rank_groups(expert, parallel["order"], token) if rank in g))
                assert dist.get_process_group_ranks(mesh.get_group(dim)) == theirs, dim
                assert mesh.get_local_rank(dim) == theirs.index(rank), dim
            assert ctx.backend.calls == calls
        finally:
            ctx.destroy()


@pytest.mark.parametrize("dims, error, needle", [
    (("tp", "zero1"), ValueError, "'zero1' is not a view of a mesh"),
    (("tp", "ep"), ValueError, "lie on different meshes"),
    (("tp", "foo"), UnknownModeError, "'foo' is not a built-in mode"),
    (("tp", "tp-pp"), ValueError, "share an axis"),
    (("tp", "tp"), ValueError, "distinct"),
    ((), ValueError, "one or more"),
    (("tp-dp",), ModeNotInitializedError, "mode 'tp-dp' was not built and no built mode has its groups; "
                                          "list it under parallel.modes"),
])
def test_device_mesh_errors(dims, error, needle):
    with fake_world(16, 3):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 2, "pipeline": 2}})
        try:
            with pytest.raises(error, match=needle):
                ctx.device_mesh(dims)
        finally:
            ctx.destroy()


# ---- Megatron-Core groups -------------------------------------------------------------------
#: Each field's RankGenerator token in Megatron-Core, and whether it is on the expert generator.
MEGATRON_TOKENS = {"tp": ("tp", False), "pp": ("pp", False), "mp": ("tp-pp", False), "cp": ("cp", False),
                   "tp_cp": ("tp-cp", False), "tp_dp_cp": ("tp-dp-cp", False), "dp": ("dp", False),
                   "dp_cp": ("dp-cp", False), "ep": ("ep", True), "expt_tp": ("tp", True),
                   "tp_ep": ("tp-ep", True), "tp_ep_pp": ("tp-ep-pp", True), "expt_dp": ("dp", True)}
#: Every combination Megatron-Core builds, listed so that each field has a built mode.
ALL_COMBINATIONS = ["cp", "tp-cp", "dp-cp", "tp-dp-cp", "ep", "etp", "edp", "tp-ep", "tp-ep-pp"]
MEGATRON_LAYOUTS = [  # world 16
    *({"tensor": 2, "pipeline": 2, "order": order} for order in ORDERS),
    {"tensor": 2, "context": 2, "pipeline": 2, "expert": 2, "expert_tensor": 1, "order": "tp-cp-ep-dp-pp"},
    {"tensor": 2, "context": 2, "expert": 4, "order": "tp-cp-ep-dp-pp"},
    {"tensor": 1, "context": 4, "pipeline": 2, "expert": 2, "order": "tp-cp-ep-dp-pp"},
    {"tensor": 2, "context": 2, "pipeline": 2, "expert": 2, "order": "tp-ep-dp-cp-pp"},
]


def megatron_sizes(parallel: dict, world: int):
    """Megatron's two generators: dense RankGenerator(tp, ep=1, dp, pp, cp) and the decoupled
    expert one RankGenerator(tp=etp, ep, dp=edp, pp, cp=1), with the same order string."""
    tp, cp, pp = parallel.get("tensor", 1), parallel.get("context", 1), parallel.get("pipeline", 1)
    ep, etp = parallel.get("expert", 1), parallel.get("expert_tensor", tp)
    dense = {"tp": tp, "cp": cp, "pp": pp, "dp": world // (tp * cp * pp), "ep": 1}
    expert = {"tp": etp, "ep": ep, "pp": pp, "dp": world // (etp * ep * pp), "cp": 1}
    return dense, expert


@pytest.mark.parametrize("parallel", MEGATRON_LAYOUTS, ids=lambda p: "-".join(f"{k[:2]}{v}" for k, v in p.items()))
def test_megatron_groups_equal_megatrons_rank_generators(parallel):
    world = 16
    dense, expert = megatron_sizes(parallel, world)
    order = parallel["order"]
    fields = [f for f in MEGATRON_FIELDS if f != "embd"]
    for rank in (0, 5, 11, 15):
        with fake_world(world, rank):
            ctx = ParallelContext().init_from_config({"parallel": {**parallel, "modes": ALL_COMBINATIONS}})
            try:
                calls = ctx.backend.calls
                groups = ctx.megatron_groups(fields)
                for field in fields:
                    token, on_expert = MEGATRON_TOKENS[field]
                    theirs = next(g for g in megatron_rank_groups(expert if on_expert else dense, order, token)
                                  if rank in g)
                    assert dist.get_process_group_ranks(getattr(groups, field)) == sorted(theirs), field
                    assert getattr(groups, field) is ctx.get_group(groups.modes[field])
                assert ctx.backend.calls == calls
            finally:
                ctx.destroy()


@pytest.mark.parametrize("rank", range(8))
def test_megatron_embedding_group_is_first_and_last_stage_or_none(rank):
    """World 8, tensor 2 x pipeline 4: Megatron's embedding ranks are [first, last] of each
    pipeline group; a middle stage is in none (None, as Megatron-Core's getter returns)."""
    with fake_world(8, rank):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 2, "pipeline": 4, "modes": ["embedding"]}})
        try:
            groups = ctx.megatron_groups(["embd", "pp"])
            pipe = next(g for g in megatron_rank_groups({"tp": 2, "pp": 4, "dp": 1}, "tp-pp-dp", "pp") if rank in g)
            ends = [pipe[0], pipe[-1]]
            if rank in ends:
                assert dist.get_process_group_ranks(groups.embd) == sorted(ends)
            else:
                assert groups.embd is None and groups.modes["embd"] == "embedding"
        finally:
            ctx.destroy()


def test_megatron_fields_use_built_modes_with_identical_groups():
    """Without parallel.modes: at context 1 and expert 1, tp_cp is tp, dp_cp is dp,
    tp_ep_pp is tp-pp, expt_dp is dp; at pipeline 2 embd is pp."""
    with fake_world(16, 6):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 2, "pipeline": 2}})
        try:
            groups = ctx.megatron_groups(["tp_cp", "dp_cp", "expt_tp", "tp_ep", "tp_ep_pp", "expt_dp", "embd"])
            assert groups.modes == {"tp_cp": "tp", "dp_cp": "dp", "expt_tp": "tp", "tp_ep": "tp",
                                    "tp_ep_pp": "tp-pp", "expt_dp": "dp", "embd": "pp"}
        finally:
            ctx.destroy()


def test_megatron_groups_name_what_is_missing():
    with fake_world(16, 3):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 2, "context": 2, "pipeline": 2,
                                                               "order": "tp-cp-dp-pp"}})
        try:
            with pytest.raises(ModeNotInitializedError, match=r"megatron group 'tp_cp' \(tensor x context parallel\): "
                                                              r"mode 'tp-cp' was not built .* parallel.modes"):
                ctx.megatron_groups()  # all fields, resolved in Megatron's field order
            with pytest.raises(ValueError, match=r"unknown Megatron-Core group field\(s\) \['tensor'\]"):
                ctx.megatron_groups(["tp", "tensor"])
            groups = ctx.megatron_groups(["tp", "cp", "dp"])
            assert groups.modes == {"tp": "tp", "cp": "cp", "dp": "dp"}
            assert set(groups.as_dict()) == {"tp", "cp", "dp"}
            with pytest.raises(AttributeError, match="'pp' was not requested"):
                groups.pp
            with pytest.raises(AttributeError, match="not a Megatron-Core ProcessGroupCollection field"):
                groups.tensor
            with pytest.raises(AttributeError, match="read-only"):
                groups.tp = None
            assert repr(groups) == "MegatronGroups(tp(2), cp(2), dp(2))"
        finally:
            ctx.destroy()


def test_megatron_field_names_are_megatrons():
    assert set(MEGATRON_FIELDS) == {"tp", "pp", "mp", "embd", "cp", "tp_cp", "ep", "expt_tp", "tp_ep",
                                    "tp_ep_pp", "tp_dp_cp", "dp", "dp_cp", "expt_dp"}
