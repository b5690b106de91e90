"""MoE resharding: routed experts placed by expert parallelism (EP) and expert tensor
parallelism (expert TP) on each side; routers and shared experts are dense tensors.

For EP 1/2/4 x expert TP 1/2 on each side, grouped ``[E, ...]`` weights and one tensor per
expert: the delivered shards equal the shards cut from the full tensors bit for bit, each
destination receives only its own experts, bytes received equal an independent lower bound,
and one MoE layer computed on the destination shards (experts summed over the expert mesh,
the shared expert over TP) equals the unsharded layer.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict

import pytest
import torch

from pgroups.errors import ConfigError
from pgroups.reshard import ModelSpec, ParallelLayout, cut_shards, llama_like, plan_reshard, plan_share
from pgroups.topology import Topology

from reshard_compute import apply_plan, reference_mlp, relative_error, sharded_mlp

HIDDEN, EXPERTS, EXPERT_FFN, SHARED_FFN, TOP_K = 8, 4, 6, 10, 2
WORLD = 8


def moe_model(grouped: bool) -> ModelSpec:
    return llama_like(hidden=HIDDEN, layers=1, heads=2, kv_heads=1, ffn=12, vocab=16, dtype="float32",
                      experts=EXPERTS, expert_ffn=EXPERT_FFN, shared_ffn=SHARED_FFN, grouped_experts=grouped)


def moe_layout(tensor: int, ep: int, etp: int, ranks=None) -> ParallelLayout:
    """Megatron-Core's expert mesh (order tp-ep-dp-pp) with ep / expert TP given directly."""
    size = len(ranks) if ranks is not None else WORLD
    return ParallelLayout.create(Topology.create(size, tensor, 1, order="tp-ep-dp-pp"), ranks,
                                 expert_parallel=ep, expert_tensor=etp)


def full_tensors(model: ModelSpec) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {t.name: torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1] if t.shape else 1)
            for t in model.tensors}


def expert_weights(full: Dict[str, torch.Tensor], grouped: bool, e: int):
    p = "layers.0.mlp.experts."
    if grouped:
        return full[p + "gate_up.weight"][e], full[p + "down.weight"][e]
    return full[f"{p}{e}.gate_up.weight"], full[f"{p}{e}.down.weight"]


def routing(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """Dense ``[tokens, E]`` routing weights: softmax over the top-k router logits, 0 elsewhere."""
    logits = x @ router.T
    top, index = logits.topk(TOP_K, -1)
    return torch.zeros_like(logits).scatter(-1, index, torch.softmax(top, -1))


def reference_moe(x: torch.Tensor, full: Dict[str, torch.Tensor], grouped: bool) -> torch.Tensor:
    weights = routing(x, full["layers.0.mlp.router.weight"])
    out = torch.zeros_like(x)
    for e in range(EXPERTS):
        gate_up, down = expert_weights(full, grouped, e)
        gate, up = gate_up.chunk(2, 0)
        out += weights[:, e:e + 1] * reference_mlp(x, gate, up, down)
    p = "layers.0.mlp.shared."
    gate, up = full[p + "gate_up.weight"].chunk(2, 0)
    return out + reference_mlp(x, gate, up, full[p + "down.weight"])


def sharded_moe(x: torch.Tensor, shards, model: ModelSpec, dst: ParallelLayout, grouped: bool) -> torch.Tensor:
    """Experts: every rank of expert-DP replica 0 adds its experts' expert-TP partials; shared
    expert: the dense TP group of data replica 0 adds its partials."""
    etp, ep, _ = dst.mesh_sizes(expert=True)
    out = torch.zeros_like(x)
    for rank in dst.ranks:
        e_tp, e_ep, replica, _ = dst.mesh_coordinates(rank, expert=True)
        if replica != 0:
            continue
        mine = shards[rank]
        weights = routing(x, mine["layers.0.mlp.router.weight"])
        first = e_ep * EXPERTS // ep if EXPERTS % ep == 0 else None
        owned = [e for e in range(EXPERTS) if (model["layers.0.mlp.experts.down.weight"].experts if grouped else
                                               model[f"layers.0.mlp.experts.{e}.down.weight"].experts).owner(ep, e) == e_ep]
        assert first is None or owned == list(range(first, first + EXPERTS // ep))
        for local, e in enumerate(owned):
            if grouped:
                names = {"gate_up": "gate_up", "down": "down"}
                parts = {"gate_up": mine["layers.0.mlp.experts.gate_up.weight"][local],
                         "down": mine["layers.0.mlp.experts.down.weight"][local]}
            else:
                names = {"gate_up": f"layers.0.mlp.experts.{e}.gate_up.weight",
                         "down": f"layers.0.mlp.experts.{e}.down.weight"}
                parts = mine
            out += weights[:, e:e + 1] * sharded_mlp(x, parts, names)
    shared = {"gate_up": "layers.0.mlp.shared.gate_up.weight", "down": "layers.0.mlp.shared.down.weight"}
    for tp in range(dst.topology.tensor):
        out += sharded_mlp(x, shards[dst.global_rank(tp, 0, 0)], shared)
    return out


def lower_bound(model: ModelSpec, src: ParallelLayout, dst: ParallelLayout, rank: int) -> int:
    """Bytes ``rank`` needs in ``dst`` and does not hold in ``src``: expert ranges and row pieces
    intersected directly from the specs (independent of the planner's units and rule)."""
    total = 0
    for spec in model.tensors:
        d = dst.mesh_coordinates(rank, spec.is_expert)
        s = src.mesh_coordinates(rank, spec.is_expert)
        d_tp, d_ep, _ = dst.mesh_sizes(spec.is_expert)
        s_tp, s_ep, _ = src.mesh_sizes(spec.is_expert)
        if not spec.held_by(d_ep, d[1]):
            continue
        need = math.prod(spec.local_shape(d_tp, d[0], d_ep, d[1])) * spec.itemsize
        held = 0
        if s is not None and spec.held_by(s_ep, s[1]):
            rows = sum(max(0, min(b, y) - max(a, x)) for a, b, _ in spec.pieces(d_tp, d[0])
                       for x, y, _ in spec.pieces(s_tp, s[0]))
            rest = spec.numel // spec.axis_len if spec.shape else 1
            if spec.experts is not None and spec.experts.dim is not None:
                (a, b), (x, y) = spec.expert_range(d_ep, d[1]), spec.expert_range(s_ep, s[1])
                rest = rest // EXPERTS * max(0, min(b, y) - max(a, x))
            held = rows * rest * spec.itemsize
        total += need - held
    return total


SIZES = [(ep, etp) for ep in (1, 2, 4) for etp in (1, 2)]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-expert"])
def test_expert_relayouts_are_bit_exact_minimal_and_compute_the_moe_layer(grouped):
    model = moe_model(grouped)
    full = full_tensors(model)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3))
    want = reference_moe(x, full, grouped)
    for (s_ep, s_etp), (d_ep, d_etp) in itertools.product(SIZES, SIZES):
        src = moe_layout(2, s_ep, s_etp)                          # ranks 0-7: tensor 2 x data 4
        dst = moe_layout(1, d_ep, d_etp, ranks=list(range(4, 12)))  # ranks 4-11: data 8, half overlapping
        case = f"ep {s_ep} etp {s_etp} -> ep {d_ep} etp {d_etp}"
        plan = plan_reshard(src, dst, model)
        shards = apply_plan(plan, full)
        for rank in dst.ranks:
            expected = cut_shards(dst, model, rank, full.__getitem__)
            assert shards[rank].keys() == expected.keys()
            assert all(torch.equal(shards[rank][n], t) for n, t in expected.items()), f"{case}: rank {rank}"
            report = next(r for r in plan.receivers if r.rank == rank)
            assert report.received_bytes == lower_bound(model, src, dst, rank), f"{case}: rank {rank}"
        # each destination receives only its own experts
        for t in plan.transfers:
            spec = model[t.tensor]
            if spec.experts is None:
                continue
            _, ep, _, _ = dst.mesh_coordinates(t.dst, expert=True)
            if spec.experts.dim is None:
                assert spec.experts.owner(d_ep, spec.experts.index) == ep, case
            else:
                first, stop = spec.expert_range(d_ep, ep)
                assert first <= t.global_box[0][0] and t.global_box[0][1] <= stop, case
        assert plan_share(src, dst, model, 5) == plan.share(5)
        got = sharded_moe(x, shards, model, dst, grouped)
        assert relative_error(got, want) < 1e-5, case


def test_expert_sizes_must_divide_a_stage():
    with pytest.raises(ConfigError, match=r"parallel.expert: tensor\(2\)\*data\(4\)=8 ranks per stage are not "
                                          r"divisible by expert_tensor\(2\)\*expert\(3\)"):
        moe_layout(2, 3, 2)


def test_expert_mesh_orders_expert_tp_fastest_then_ep_then_expert_dp():
    lay = moe_layout(2, 2, 2)   # tensor 2 x data 4; stage index i = tp + 2 * dp
    assert [lay.mesh_coordinates(r, expert=True)[:3] for r in range(8)] == [
        (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    assert all(lay.mesh_rank(*lay.mesh_coordinates(r, expert=True), expert=True) == r for r in range(8))
