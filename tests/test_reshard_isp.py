"""Resharding straight from weight-parallel (ISP) shards: a layout with ``isp=True`` (YAML
``placement: {isp: true}``) holds every tensor that tensor parallelism splits as ``pgroups.comm``'s
WeightParallel holds a linear or an embedding — rows of dim 0 (``out_features``) in
``torch.tensor_split`` pieces over the ``weight`` group, uneven sizes included — and every other
tensor whole. From it the planner reaches any TP layout:

- the source shards are ``torch.tensor_split``'s rows (the reference here, not the planner);
- every destination shard is bit-exact, the bytes received equal the lower bound worked out here
  from the two layouts' rows (disjoint and colocated placements), and one decoder layer computes
  on the destination shards as the unsharded layer does, in the three QKV layouts, weight 1-4
  (with weight-data replicas) to TP 1-8;
- what cannot be (an ISP destination, routed experts from ISP, per-row fp8 of a row-parallel
  weight whose rows the sender does not all hold) is one ConfigError naming it.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from pgroups.cli import main
from pgroups.errors import ConfigError
from pgroups.reshard import ParallelLayout, Resharder, cut_shards, llama_like, load_layout, local_shapes, plan_reshard
from pgroups.reshard.wire import Shapes, first_scale_cut
from pgroups.topology import Topology

from reshard_compute import apply_plan, canonical, relative_error
from test_reshard_functional import FFN, HEAD_DIM, HIDDEN, layout, one_layer, reference_layer, sharded_layer


def isp(weight: int, weight_data: int = 1, ranks=None) -> ParallelLayout:
    return ParallelLayout.create(Topology.create(weight * weight_data, 1, 1, weight=weight), ranks, isp=True)


def test_isp_source_shards_are_tensor_split_rows_of_every_tp_split_tensor():
    model = llama_like(hidden=24, layers=2, heads=6, kv_heads=2, ffn=36, vocab=50, dtype="float32")
    full = {t.name: torch.randn(t.shape) for t in model.tensors}
    source = isp(3, 2)                                    # weight groups [0, 1, 2] and [3, 4, 5]
    for rank in source.ranks:
        wp = rank % 3
        shards = cut_shards(source, model, rank, full.__getitem__)
        assert shards.keys() == full.keys()
        for name, shard in shards.items():
            want = full[name].tensor_split(3)[wp] if model[name].tp_dim is not None else full[name]
            assert torch.equal(shard, want), (rank, name)
    assert "ISP weights: split on dim 0 over weight 3 x weight_data 2" in source.describe()


def held_bytes(spec, src: ParallelLayout, dst: ParallelLayout, rank: int) -> int:
    """Bytes of ``rank``'s destination shard of ``spec`` it already holds as an ISP source, from
    the two layouts' rows alone: its tensor_split rows of dim 0 intersected with its destination
    pieces of the split axis."""
    if rank not in src:
        return 0
    if spec.tp_dim is None:
        return spec.nbytes                                # replicated on every ISP rank
    wp, wsize = src.mesh_coordinates(rank)[0], src.mesh_sizes()[0]
    tp, tsize = dst.mesh_coordinates(rank)[0], dst.mesh_sizes()[0]
    sizes = [len(part) for part in torch.arange(spec.shape[0]).tensor_split(wsize)]
    a = sum(sizes[:wp])
    b = a + sizes[wp]
    row = math.prod(spec.shape[1:]) * spec.itemsize
    pieces = spec.pieces(tsize, tp, dst.vocab_multiple)
    if spec.tp_dim == 0:
        return sum(max(0, min(b, g1) - max(a, g0)) for g0, g1, _ in pieces) * row
    columns = sum(g1 - g0 for g0, g1, _ in pieces)
    return (b - a) * columns * math.prod(spec.shape[2:]) * spec.itemsize


@pytest.mark.parametrize("variant, heads, kv_heads", [("fused", 8, 2), ("interleaved", 6, 3), ("separate", 8, 2)])
def test_isp_to_tp_shards_compute_at_the_lower_bound(variant, heads, kv_heads):
    w = canonical(heads * 7 + kv_heads, HIDDEN, heads, kv_heads, HEAD_DIM, FFN)
    model, full, names = one_layer(variant, heads, kv_heads, w)
    x = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(3))
    want = reference_layer(x, w, heads, kv_heads)
    for weight, weight_data in ((3, 1), (4, 2)):          # uneven rows (3 does not divide 16 or 20); replicas
        src = isp(weight, weight_data)
        for dst_tp in range(1, heads + 1):
            # disjoint for odd TP sizes, colocated (local copies) for even ones
            for ranks in [list(range(src.size, src.size + dst_tp)) if dst_tp % 2 else list(range(dst_tp))]:
                dst = layout(dst_tp, ranks=ranks)
                plan = plan_reshard(src, dst, model)
                shards = apply_plan(plan, full)
                where = f"{variant} {heads}/{kv_heads}: ISP {weight} x {weight_data} -> TP {dst_tp} on {ranks}"
                for r in dst.ranks:
                    expected = cut_shards(dst, model, r, full.__getitem__)
                    assert all(torch.equal(shards[r][n], t) for n, t in expected.items()), where
                    needed = sum(t.numel() * t.element_size() for t in expected.values())
                    held = sum(held_bytes(model[n], src, dst, r) for n in expected)
                    report = next(rep for rep in plan.receivers if rep.rank == r)
                    assert report.received_bytes == report.lower_bound_bytes == needed - held, where
                got = sharded_layer(x, shards, model, names, dst, heads, kv_heads)
                assert relative_error(got, want) < 1e-5, where


def test_isp_source_refusals_name_what_is_wrong():
    model = llama_like(hidden=24, layers=1, heads=6, kv_heads=2, ffn=36, vocab=50, dtype="float32")
    with pytest.raises(ConfigError, match="an ISP .* layout is a source only"):
        plan_reshard(layout(2), isp(2), model)
    moe = llama_like(hidden=8, layers=1, heads=2, kv_heads=1, ffn=8, vocab=10, dtype="float32", experts=2)
    with pytest.raises(ConfigError, match="routed experts from an ISP layout are not supported"):
        plan_reshard(isp(2), layout(2, ranks=[2, 3]), moe)
    with pytest.raises(ConfigError, match=r"isp: true needs weight parallelism \(parallel.weight\)"):
        ParallelLayout.create(Topology.create(2, 1, 1), isp=True)
    # per-row fp8 of o_proj / down_proj (scales per input column) would need every row on the sender
    plan = plan_reshard(isp(2), layout(2, ranks=[2, 3]), model)
    fp8 = {t.name: torch.float8_e4m3fn for t in model.tensors if len(t.shape) >= 2}
    problem = first_scale_cut(plan.transfers, Shapes(plan), fp8)
    assert problem is not None and "needs the sender to hold all of dim 0" in problem
    resharder = Resharder(plan, context=type("C", (), {"config": None, "get_global_rank": lambda self: 2})(),
                          dst_dtypes=fp8)
    assert "needs the sender to hold all of dim 0" in str(resharder._budget_problem)


def test_isp_layout_from_yaml_and_the_cli(capsys, tmp_path):
    (tmp_path / "isp.yaml").write_text("parallel: {tensor: 1, weight: 4}\nplacement: {isp: true, ranks: '0-7'}\n")
    (tmp_path / "tp.yaml").write_text("parallel: {tensor: 2}\nplacement: {ranks: '8-9'}\n")
    source = load_layout(str(tmp_path / "isp.yaml"), 10)
    assert source.isp and source.mesh_sizes() == (4, 1, 2)
    model = load_model_spec_example()
    assert local_shapes(source, model, 1)["layers.0.attn.o.weight"] == (1536 // 4, 1536)
    args = ["reshard-plan", str(tmp_path / "isp.yaml"), str(tmp_path / "tp.yaml"), "-n", "10",
            "--model", "config_examples/reshard_model.yaml", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ratio"] == 1.0 and data["max_rank_ratio"] == 1.0 and data["received_bytes"] == data["lower_bound_bytes"]
    assert main(args[:-1] + ["--dst-dtype", "fp8"]) == 2
    assert "needs the sender to hold all of dim 0" in capsys.readouterr().err


def load_model_spec_example():
    from pgroups.reshard import load_model_spec
    return load_model_spec("config_examples/reshard_model.yaml")
