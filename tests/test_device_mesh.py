"""Cross-check against torch's own DeviceMesh groups (under torch's fake backend).

torch's DeviceMesh is row-major with the *last* dimension fastest, our order string lists axes
fastest first: order ``"tp-pp-dp"`` is mesh shape ``(dp, pp, tp)`` with names
``("dp", "pp", "tp")``, and in general the mesh dimensions are the order reversed.
"""
from __future__ import annotations

import itertools

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from pgroups import ParallelContext

from conftest import fake_world

MODE_OF_AXIS = {"tp": "tensor", "pp": "pipe", "dp": "data"}
SHAPES = [dict(tensor=2, pipeline=2, data=4), dict(tensor=2, pipeline=3, data=2),
          dict(tensor=4, pipeline=1, data=2)]
ORDERS = ["-".join(p) for p in itertools.permutations(("tp", "pp", "dp"))]


def mesh_for(order: str, sizes: dict):
    dims = tuple(reversed(order.split("-")))
    size_of = {"tp": sizes["tensor"], "pp": sizes["pipeline"], "dp": sizes["data"]}
    return init_device_mesh("cpu", tuple(size_of[d] for d in dims), mesh_dim_names=dims)


@pytest.mark.parametrize("sizes", SHAPES, ids=lambda s: "t{tensor}p{pipeline}d{data}".format(**s))
@pytest.mark.parametrize("order", ORDERS)
def test_groups_match_init_device_mesh(order, sizes):
    world = sizes["tensor"] * sizes["pipeline"] * sizes["data"]
    for rank in sorted({0, 1, world // 2 + 1, world - 1}):
        with fake_world(world, rank):
            mesh = mesh_for(order, sizes)
            ctx = ParallelContext().init_from_config(
                {"parallel": {"tensor": sizes["tensor"], "pipeline": sizes["pipeline"], "order": order}})
            try:
                for axis, mode in MODE_OF_AXIS.items():
                    theirs = dist.get_process_group_ranks(mesh.get_group(axis))
                    ours = dist.get_process_group_ranks(ctx.get_group(mode))
                    assert sorted(theirs) == ours == ctx.get_ranks_in_group(mode), (order, rank, axis)
                    assert mesh.get_local_rank(axis) == ctx.get_local_rank(mode)
                # model = the (pp, tp) sub-mesh: every rank sharing this rank's dp coordinate
                model_dims = tuple(d for d in mesh.mesh_dim_names if d != "dp")  # in mesh order
                model_mesh = sorted(mesh[model_dims].mesh.flatten().tolist())
                assert model_mesh == ctx.get_ranks_in_group("model")
                assert model_mesh == dist.get_process_group_ranks(ctx.get_group("model"))
            finally:
                ctx.destroy()


def test_default_order_is_mesh_dp_pp_tp():
    """The GUIDE's statement, literally: mesh (dp, pp, tp) named ("dp","pp","tp") == "tp-pp-dp"."""
    with fake_world(16, 6):
        mesh = init_device_mesh("cpu", (4, 2, 2), mesh_dim_names=("dp", "pp", "tp"))
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 2, "pipeline": 2}})
        try:
            assert ctx.topology.order == ("tp", "pp", "dp")
            assert dist.get_process_group_ranks(mesh.get_group("tp")) == [6, 7]
            assert dist.get_process_group_ranks(mesh.get_group("pp")) == [4, 6]
            assert dist.get_process_group_ranks(mesh.get_group("dp")) == [2, 6, 10, 14]
            for axis, mode in MODE_OF_AXIS.items():
                assert (dist.get_process_group_ranks(mesh.get_group(axis))
                        == dist.get_process_group_ranks(ctx.get_group(mode)))
        finally:
            ctx.destroy()


# ---- four dense axes: tp, cp, dp, pp in every order ------------------------------------------------

DENSE = ("tp", "cp", "dp", "pp")
ORDERS4 = ["-".join(p) for p in itertools.permutations(DENSE)]
SHAPES4 = [dict(tp=2, cp=2, dp=2, pp=2), dict(tp=2, cp=3, dp=1, pp=2), dict(tp=1, cp=2, dp=3, pp=2)]
MODE_OF = {"tp": "tensor", "cp": "context", "dp": "data", "pp": "pipe"}
COMBOS = [c for n in (2, 3) for c in itertools.combinations(DENSE, n)]


@pytest.mark.parametrize("sizes", SHAPES4, ids=lambda s: "t{tp}c{cp}d{dp}p{pp}".format(**s))
@pytest.mark.parametrize("order", ORDERS4)
def test_context_axis_in_every_order_matches_device_mesh(order, sizes):
    """Every axis and every combination of two or three axes: pgroups' groups (the communicators
    for built modes) == the DeviceMesh sub-mesh, for mesh dims = the order reversed."""
    world = sizes["tp"] * sizes["cp"] * sizes["dp"] * sizes["pp"]
    dims = tuple(reversed(order.split("-")))
    modes = ["-".join(c) for c in COMBOS]
    for rank in sorted({0, world // 2 + 1, world - 1}):
        with fake_world(world, rank):
            mesh = init_device_mesh("cpu", tuple(sizes[d] for d in dims), mesh_dim_names=dims)
            ctx = ParallelContext().init_from_config(
                {"parallel": {"tensor": sizes["tp"], "context": sizes["cp"], "pipeline": sizes["pp"],
                              "order": order, "modes": ["context"] + modes}})
            try:
                for axis, mode in MODE_OF.items():
                    theirs = dist.get_process_group_ranks(mesh.get_group(axis))
                    assert sorted(theirs) == dist.get_process_group_ranks(ctx.get_group(mode)), (order, axis)
                    assert mesh.get_local_rank(axis) == ctx.get_local_rank(mode)
                for combo in COMBOS:
                    in_mesh_order = tuple(d for d in dims if d in combo)
                    sub = sorted(mesh[in_mesh_order].mesh.flatten().tolist())
                    name = "-".join(combo)
                    assert sub == ctx.get_ranks_in_group(name), (order, rank, combo)
                    assert sub == dist.get_process_group_ranks(ctx.get_group(name)), (order, rank, combo)
            finally:
                ctx.destroy()
