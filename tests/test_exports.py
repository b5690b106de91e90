"""Exports: ``gpc.device_mesh`` (a torch DeviceMesh over pgroups' own groups, used by DTensor) and
``gpc.megatron_groups`` (Megatron-Core's ProcessGroupCollection field names).

References are independent of pgroups: torch's own DeviceMesh layout (row-major, last dimension
fastest: ``arange(world).reshape(sizes of the order reversed)``), and Megatron-Core's
``RankGenerator`` / ``generate_masked_orthogonal_rank_groups`` rewritten below.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist

from pgroups import ModeNotInitializedError, ParallelContext
from pgroups.exports import MEGATRON_FIELDS, MegatronGroups, mesh_ranks
from pgroups.topology import Topology

from conftest import fake_world, run_ranks

ORDERS = ["-".join(p) for p in itertools.permutations(("tp", "pp", "dp"))]


# ---- references ----------------------------------------------------------------------------------
def torch_layout_submesh(topology: Topology, rank: int, dims: List[List[str]]) -> List[Any]:
    """The mesh around ``rank`` as torch lays it out: the full mesh is ``arange(world)`` viewed
    with the order's axes reversed (slowest first); keep ``rank``'s index on axes not asked for,
    move the asked axes into ``dims`` order and merge each dimension's axes (slowest first)."""
    torch_dims = list(reversed(topology.order))
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
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dims", [[["dp"], ["pp"], ["tp"]], [["tp"], ["dp"]], [["pp"]],
                                  [["dp"], ["tp", "pp"]], [["pp", "dp"], ["tp"]], [["tp", "pp", "dp"]]])
def test_mesh_ranks_match_torchs_layout(order, dims):
    topology = Topology.create(24, tensor=2, pipeline=3, order=order)  # data 4
    ours_dims = [tuple(a for a in topology.order if a in axes) for axes in dims]
    for rank in range(24):
        assert mesh_ranks(topology, rank, ours_dims) == torch_layout_submesh(topology, rank, dims), (rank, dims)


def test_mesh_ranks_reject_a_shared_axis():
    with pytest.raises(ValueError, match="share an axis"):
        mesh_ranks(Topology.create(8, tensor=2, pipeline=2), 0, [("tp",), ("tp", "pp")])


# ---- DeviceMesh and DTensor on real gloo processes -------------------------------------------------
def dtensor_worker(config: dict) -> Dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    ctx = ParallelContext().init_from_config(config)
    try:
        calls = ctx.backend.calls
        out: Dict[str, Any] = {}
        mesh = ctx.device_mesh(("dp", "pp", "tp"))
        out["names"] = mesh.mesh_dim_names
        out["same_groups"] = all(mesh.get_group(d) is ctx.get_group(m)
                                 for d, m in (("dp", "data"), ("pp", "pipe"), ("tp", "tensor")))
        out["sliced_same"] = mesh["tp"].get_group() is ctx.get_group("tensor")
        out["local"] = [mesh.get_local_rank(d) for d in ("dp", "pp", "tp")]
        out["mode_local"] = [ctx.get_local_rank(m) for m in ("data", "pipe", "tensor")]

        full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
        # rank 0 of each dim group scatters (distribute_tensor's src_data_rank=0): real collectives
        dt = distribute_tensor(full, mesh, [Shard(0), Replicate(), Shard(1)])
        dp, tp = ctx.get_local_rank("data"), ctx.get_local_rank("tensor")
        out["shard_ok"] = torch.equal(dt.to_local(), full.chunk(2, 0)[dp].chunk(2, 1)[tp])
        out["replicate_ok"] = torch.equal(
            dt.redistribute(mesh, [Replicate(), Replicate(), Replicate()]).to_local(), full)
        moved = dt.redistribute(mesh, [Replicate(), Shard(0), Replicate()])  # Shard(0)→R on dp, R→S on pp
        out["reshard_ok"] = torch.equal(moved.to_local(), full.chunk(2, 0)[ctx.get_local_rank("pipe")])
        out["full_ok"] = torch.equal(moved.full_tensor(), full)

        # a combined dimension and mode names: (data, tensor x pipeline)
        mesh2 = ctx.device_mesh(("data", "tp-pp"))
        out["combined_same"] = mesh2.get_group("tp-pp") is ctx.get_group("model")
        out["combined_local"] = mesh2.get_local_rank("tp-pp") == ctx.get_local_rank("model")
        dt2 = distribute_tensor(full, mesh2, [Replicate(), Shard(0)])
        out["combined_shard_ok"] = torch.equal(dt2.to_local(), full.chunk(4, 0)[ctx.get_local_rank("model")])
        out["combined_gather_ok"] = torch.equal(dt2.redistribute(mesh2, [Replicate(), Replicate()]).to_local(), full)
        out["new_calls"] = ctx.backend.calls - calls
        return out
    finally:
        ctx.destroy()


@pytest.mark.parametrize("order", ["tp-pp-dp", "dp-tp-pp"])
def test_device_mesh_reuses_our_groups_and_dtensor_works(order):
    config = {"parallel": {"tensor": 2, "pipeline": 2, "order": order}, "timeout_s": 60}
    for rank, out in enumerate(run_ranks(8, dtensor_worker, config, timeout_s=180)):
        assert out["names"] == ("dp", "pp", "tp")
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
            topology = ctx.topology
            assert mesh.mesh.tolist() == torch_layout_submesh(topology, 1234, [["pp"], ["dp"], ["tp"]])
            for name, mode in (("pp", "pipe"), ("dp", "data"), ("tp", "tensor")):
                assert mesh.get_group(name) is ctx.get_group(mode)
                assert dist.get_process_group_ranks(mesh.get_group(name)) == ctx.get_ranks_in_group(mode)
            assert ctx.backend.calls == calls
        finally:
            ctx.destroy()


@pytest.mark.parametrize("dims, error, needle", [
    (("tp", "zero1"), ValueError, "'zero1' is not an axis"),
    (("tp", "tp-pp"), ValueError, "share an axis"),
    (("tp", "tp"), ValueError, "distinct"),
    ((), ValueError, "one or more"),
    (("tp-dp",), ModeNotInitializedError, "no built mode has the groups along tp-dp"),
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
def megatron_token(field: str) -> str:
    """Megatron's generator token of each field (expert fields on the expert generator, whose
    tp is the expert tensor size; with no expert parallelism both generators coincide)."""
    return {"tp": "tp", "pp": "pp", "mp": "tp-pp", "cp": "cp", "tp_cp": "tp-cp", "ep": "ep",
            "expt_tp": "tp", "tp_ep": "tp-ep", "tp_ep_pp": "tp-ep-pp", "tp_dp_cp": "tp-dp-cp",
            "dp": "dp", "dp_cp": "dp-cp", "expt_dp": "dp"}[field]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("tensor, pipeline", [(2, 2), (4, 1), (1, 4), (2, 4)])
def test_megatron_groups_equal_megatrons_rank_generator(order, tensor, pipeline):
    world = 16
    sizes = {"tp": tensor, "pp": pipeline, "dp": world // (tensor * pipeline)}
    # cp and ep need groups of one rank, tp_dp_cp the groups along tp and dp: this layout has a
    # mode with those groups only when an axis has size 1
    fields = [f for f in MEGATRON_FIELDS
              if f != "embd" and (1 in sizes.values() or f not in ("cp", "ep", "tp_dp_cp"))]
    for rank in (0, 5, 11, 15):
        with fake_world(world, rank):
            ctx = ParallelContext().init_from_config(
                {"parallel": {"tensor": tensor, "pipeline": pipeline, "order": order}})
            try:
                calls = ctx.backend.calls
                groups = ctx.megatron_groups(fields)
                for field in fields:
                    theirs = next(g for g in megatron_rank_groups(sizes, order, megatron_token(field)) if rank in g)
                    assert dist.get_process_group_ranks(getattr(groups, field)) == sorted(theirs), field
                    assert getattr(groups, field) is ctx.get_group(groups.modes[field])
                assert ctx.backend.calls == calls
            finally:
                ctx.destroy()


def test_megatron_groups_name_what_is_missing():
    with fake_world(16, 3):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 2, "pipeline": 2}})
        try:
            with pytest.raises(ModeNotInitializedError, match="megatron group 'embd'"):
                ctx.megatron_groups()  # all fields, resolved in Megatron's field order
            with pytest.raises(ModeNotInitializedError, match=r"megatron group 'cp' \(context parallel\): "
                                                              r"no built mode has the groups along no axis"):
                ctx.megatron_groups(["tp", "cp"])
            with pytest.raises(ModeNotInitializedError, match="megatron group 'embd'.*no 'embedding' mode"):
                ctx.megatron_groups(["embd"])
            with pytest.raises(ValueError, match=r"unknown Megatron-Core group field\(s\) \['tensor'\]"):
                ctx.megatron_groups(["tp", "tensor"])
            groups = ctx.megatron_groups(["tp", "dp"])
            assert groups.modes == {"tp": "tensor", "dp": "data"}
            assert set(groups.as_dict()) == {"tp", "dp"}
            with pytest.raises(AttributeError, match="'pp' was not requested"):
                groups.pp
            with pytest.raises(AttributeError, match="not a Megatron-Core ProcessGroupCollection field"):
                groups.tensor
            with pytest.raises(AttributeError, match="read-only"):
                groups.tp = None
            assert repr(groups) == "MegatronGroups(tp(2), dp(4))"
        finally:
            ctx.destroy()


def test_megatron_groups_type_is_importable_without_megatron():
    assert MegatronGroups.__module__ == "pgroups.exports"
    assert set(MEGATRON_FIELDS) == {"tp", "pp", "mp", "embd", "cp", "tp_cp", "ep", "expt_tp", "tp_ep",
                                    "tp_ep_pp", "tp_dp_cp", "dp", "dp_cp", "expt_dp"}
