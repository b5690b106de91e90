"""Where a reshard layout puts routed experts and dense weights is where pgroups' own groups say
they are: layouts built from a topology (or a layout YAML) place expert e's expert-TP shard k on
exactly the members of the topology's ``expert`` / ``expert_tensor`` / ``expert_data`` groups,
for Megatron-Core's and InternEvo's expert layouts and several orders, with and without context
and pipeline parallelism; context-parallel ranks hold full dense weights as data-parallel ranks
do, and a reshard from / to a context-parallel layout is exact and at the lower bound.

The expected placement is derived from the groups alone, with Megatron-Core's rules: the j-th
member (sorted) of an expert group owns experts ``[j E / ep, (j + 1) E / ep)``; the k-th member of
an expert-TP group holds row chunk k of each of gate and up (column chunk k of down); a rank's
pipeline stage is its position in its pipeline group. What a rank holds is read back from the
values of shards cut from tensors whose every row encodes (expert, row).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Set, Tuple

import pytest
import torch

from pgroups.config import config_from_dict
from pgroups.errors import ConfigError
from pgroups.reshard import ParallelLayout, cut_shards, llama_like, load_layout, plan_reshard
from pgroups.topology import Topology

from reshard_compute import apply_plan
from test_reshard_planner import check_plan

E, FFN, HIDDEN = 4, 4, 4

# (parallel config, world size): Megatron-Core's mesh (the order names ep) and InternEvo's
CONFIGS = [
    ({"tensor": 2, "pipeline": 2, "expert": 4, "expert_tensor": 1, "order": "tp-cp-ep-dp-pp"}, 16),
    ({"tensor": 2, "context": 2, "pipeline": 2, "expert": 2, "expert_tensor": 1, "order": "tp-cp-ep-dp-pp"}, 16),
    ({"tensor": 2, "pipeline": 2, "expert": 2, "expert_tensor": 1, "order": "tp-ep-pp-dp"}, 16),
    ({"tensor": 2, "pipeline": 1, "expert": 2, "expert_tensor": 2, "order": "tp-dp-ep-pp"}, 8),
    ({"tensor": 1, "context": 2, "pipeline": 2, "expert": 4, "order": "cp-tp-ep-dp-pp"}, 16),
    ({"tensor": 2, "pipeline": 2, "expert": 4, "expert_tensor": 1, "expert_layout": "internevo"}, 16),
    ({"tensor": 2, "context": 2, "pipeline": 2, "expert": 2, "expert_tensor": 2, "expert_layout": "internevo",
      "order": "tp-cp-pp-dp"}, 16),
    ({"tensor": 4, "pipeline": 1, "expert": 2, "expert_tensor": 2, "expert_layout": "internevo",
      "order": "dp-tp-pp"}, 16),
    ({"tensor": 2, "pipeline": 2}, 8),    # no expert parallelism: experts placed like dense tensors
]


def moe(grouped: bool):
    return llama_like(hidden=HIDDEN, layers=2, heads=4, kv_heads=2, ffn=8, vocab=8, dtype="float32",
                      experts=E, expert_ffn=FFN, grouped_experts=grouped)


def encoded(model) -> Dict[str, torch.Tensor]:
    """Full tensors whose entries say (expert, row, column): 10000 e + 100 row + column."""
    full = {}
    for spec in model.tensors:
        t = torch.zeros(spec.shape)
        if spec.experts is not None:
            rows, cols = spec.shape[-2:]
            base = 100 * torch.arange(rows).view(-1, 1) + torch.arange(cols).view(1, -1)
            if spec.experts.dim is not None:
                t = base + 10000 * torch.arange(E).view(-1, 1, 1)
            else:
                t = base + 10000 * spec.experts.index
        full[spec.name] = t.float()
    return full


def held_expert_rows(shards: Dict[str, torch.Tensor], layer: int, grouped: bool) -> Set[Tuple[str, int, int]]:
    """``{(part, expert, row or column)}`` of ``layer``'s experts in one rank's shards."""
    out = set()
    prefix = f"layers.{layer}.mlp.experts."
    for name, t in shards.items():
        if not name.startswith(prefix):
            continue
        part = "gate_up" if "gate_up" in name else "down"
        values = t.reshape(-1, t.shape[-2], t.shape[-1])
        lines = values[:, :, 0] if part == "gate_up" else values[:, 0, :]
        for v in lines.flatten().tolist():
            v = int(v)
            out.add((part, v // 10000, v % 10000 // 100 if part == "gate_up" else v % 100))
    return out


def expected_expert_rows(topology: Topology) -> Dict[int, Set[Tuple[str, int, int]]]:
    """Per rank, from the topology's groups alone: Megatron-Core's expert and expert-TP rules."""
    def position(mode: str) -> Dict[int, Tuple[int, int]]:
        return {r: (g.index(r), len(g)) for g in topology.groups(mode) for r in g}

    ep, etp = position("expert"), position("expert_tensor")
    rows = {}
    for r in range(topology.world_size):
        (j, ep_size), (k, etp_size) = ep[r], etp[r]
        chunk = FFN // etp_size
        mine = range(k * chunk, (k + 1) * chunk)
        rows[r] = ({("gate_up", e, row) for e in range(j * E // ep_size, (j + 1) * E // ep_size)
                    for row in list(mine) + [FFN + i for i in mine]}
                   | {("down", e, col) for e in range(j * E // ep_size, (j + 1) * E // ep_size) for col in mine})
    return rows


def layout_yaml(parallel: dict, world: int) -> ParallelLayout:
    text = "parallel: {" + ", ".join(f"{k}: {v}" for k, v in parallel.items()) + "}\n"
    return load_layout(text, world_size=world)


@pytest.mark.parametrize("parallel, world", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
                         if isinstance(c, dict) else str(c))
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-expert"])
def test_expert_shards_sit_on_the_topologys_expert_groups(parallel, world, grouped):
    topology = config_from_dict({"parallel": parallel}).topology(world)
    model, full = moe(grouped), None
    full = encoded(model)
    stage = {r: g.index(r) for g in topology.groups("pipe") for r in g}
    want = expected_expert_rows(topology)
    for lay in (ParallelLayout.create(topology), layout_yaml(parallel, world)):
        holders: Dict[Tuple[int, str, int, int], Set[int]] = defaultdict(set)
        for r in range(world):
            shards = cut_shards(lay, model, r, full.__getitem__)
            for layer in range(2):
                got = held_expert_rows(shards, layer, grouped)
                on_stage = stage[r] == layer * topology.pipeline // 2
                assert got == (want[r] if on_stage else set()), f"rank {r} layer {layer}"
                for item in got:
                    holders[(layer,) + item].add(r)
        # the ranks holding one expert's shard are exactly one expert-data group
        expert_data = {tuple(g) for g in topology.groups("expert_data")}
        assert all(tuple(sorted(rs)) in expert_data for rs in holders.values())


def test_direct_expert_sizes_build_the_mesh_a_config_gives():
    for order, layout_kind in (("tp-cp-ep-dp-pp", "megatron"), ("tp-pp-dp", "internevo")):
        plain = Topology.create(16, 2, 2, order=order, context=2 if "cp" in order else 1, expert_layout=layout_kind)
        direct = ParallelLayout.create(plain, expert_parallel=2, expert_tensor=1)
        configured = ParallelLayout.create(Topology.create(16, 2, 2, order=order, context=plain.context, expert=2,
                                                           expert_tensor=1, expert_layout=layout_kind))
        assert direct.topology.groups("expert") == configured.topology.groups("expert")
        assert all(direct.mesh_coordinates(r, True) == configured.mesh_coordinates(r, True) for r in range(16))
        assert [direct.mesh_rank(*direct.mesh_coordinates(r, True), expert=True) for r in range(16)] == list(range(16))
    with pytest.raises(ConfigError, match=r"has no ep but expert\(2\) > 1.*expert_layout: internevo"):
        ParallelLayout.create(Topology.create(8, 2, 1), expert_parallel=2)
    with pytest.raises(ConfigError, match=r"placement.expert_parallel\(4\) contradicts parallel.expert\(2\)"):
        load_layout("parallel: {tensor: 2, expert: 2, expert_layout: internevo}\nplacement: {expert_parallel: 4}",
                    world_size=8)
    same = load_layout("parallel: {tensor: 2, expert_layout: internevo}\nplacement: {expert_parallel: 4, "
                       "expert_tensor: 1}", world_size=8)
    assert same.mesh_sizes(True) == (1, 4, 2)


# ---- context parallelism: cp ranks hold full dense weights, like dp ranks -----------------------------------
def dense_rows(shards: Dict[str, torch.Tensor], name: str) -> Tuple[float, ...]:
    return tuple(shards[name].reshape(shards[name].shape[0], -1)[:, 0].tolist())


@pytest.mark.parametrize("order", ["tp-cp-pp-dp", "tp-cp-dp-pp", "cp-tp-dp-pp"])
def test_context_parallel_ranks_hold_the_full_dense_shard_of_their_tensor_rank(order):
    topology = Topology.create(16, 2, 2, order=order, context=2)
    lay = ParallelLayout.create(topology)
    model = llama_like(hidden=8, layers=2, heads=4, kv_heads=2, ffn=8, vocab=16, dtype="float32")
    full = {s.name: torch.arange(s.numel, dtype=torch.float32).view(s.shape) for s in model.tensors}
    shards = {r: cut_shards(lay, model, r, full.__getitem__) for r in range(16)}
    name = "layers.0.mlp.down.weight"          # split on its input dim: [hidden, ffn / tp]
    stage = {r: g.index(r) for g in topology.groups("pipe") for r in g}
    for group in topology.groups("tensor"):    # tp rank k = position in the sorted tensor group
        if stage[group[0]] != 0:
            continue
        for k, r in enumerate(group):
            assert torch.equal(shards[r][name], full[name][:, k * 4:(k + 1) * 4]), f"rank {r}"
    for mode in ("context", "data", "dp-cp"):  # every context / data replica holds the same shards
        for group in topology.groups(mode):
            for r in group[1:]:
                assert shards[r].keys() == shards[group[0]].keys()
                assert all(torch.equal(shards[r][n], shards[group[0]][n]) for n in shards[r]), f"{mode} {group}"
    assert sorted(lay.replicas(0, 0)) == sorted(next(g for g in topology.groups("dp-cp") if g[0] == lay.global_rank()))


@pytest.mark.parametrize("src_cp, dst_cp", [(2, 1), (1, 2), (2, 2)])
def test_reshard_to_and_from_context_parallel_layouts_is_exact_and_minimal(src_cp, dst_cp):
    model = llama_like(hidden=8, layers=2, heads=4, kv_heads=2, ffn=12, vocab=20, dtype="float32",
                       experts=4, expert_ffn=4, shared_ffn=4)
    src = ParallelLayout.create(Topology.create(8, 2, 2, order="tp-cp-ep-dp-pp", context=src_cp, expert=2,
                                                expert_tensor=1))
    dst = ParallelLayout.create(Topology.create(8, 4 // dst_cp, 1, order="tp-cp-dp-pp", context=dst_cp),
                                list(range(4, 12)))
    dense = llama_like(hidden=8, layers=2, heads=4, kv_heads=2, ffn=12, vocab=20, dtype="float32", tied_embeddings=True)
    check_plan(src, dst, dense, ["a"] * 6 + ["b"] * 6)   # the planner oracle: coverage, lower bound, hosts
    plan = plan_reshard(src, dst, model)
    full = {s.name: torch.randn(s.shape) for s in model.tensors}
    got = apply_plan(plan, full)
    for r in dst.ranks:
        want = cut_shards(dst, model, r, full.__getitem__)
        assert all(torch.equal(got[r][n], t) for n, t in want.items()), f"rank {r}"
    assert plan.ratio == 1.0


@pytest.mark.parametrize("parallel", [CONFIGS[1][0], CONFIGS[6][0]], ids=["megatron", "internevo"])
@pytest.mark.parametrize("rank", [0, 5, 11, 15])
def test_layout_of_a_running_context_places_this_ranks_experts_by_its_groups(parallel, rank):
    """``ParallelLayout.create(gpc.topology)`` on an initialised context (torch's fake backend, rank
    ``rank`` of 16): the experts this rank holds are its expert group position's, its shard is its
    expert-TP group position's, and every member of its expert-data group holds the same shards."""
    from pgroups import ParallelContext
    from conftest import fake_world

    model = moe(grouped=True)
    full = encoded(model)
    with fake_world(16, rank):
        ctx = ParallelContext().init_from_config({"parallel": parallel})
        try:
            lay = ParallelLayout.create(ctx.topology)
            expert, etp = ctx.get_ranks_in_group("expert"), ctx.get_ranks_in_group("expert_tensor")
            j, k = expert.index(rank), etp.index(rank)
            layer = ctx.get_local_rank("pipe") * 2 // ctx.get_world_size("pipe")
            chunk = FFN // len(etp)
            mine = held_expert_rows(cut_shards(lay, model, rank, full.__getitem__), layer, True)
            experts = range(j * E // len(expert), (j + 1) * E // len(expert))
            assert {e for _, e, _ in mine} == set(experts)
            assert {row for part, _, row in mine if part == "gate_up"} == {
                r for i in range(k * chunk, (k + 1) * chunk) for r in (i, FFN + i)}
            for peer in ctx.get_ranks_in_group("expert_data"):
                assert held_expert_rows(cut_shards(lay, model, peer, full.__getitem__), layer, True) == mine
        finally:
            ctx.destroy()
