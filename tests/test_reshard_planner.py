"""The pure reshard planner, its specs and layouts, and `pgroups reshard-plan`.

Properties over random layout pairs up to world 1024 (with and without context parallelism) are
checked against an oracle that only uses the specs' pieces and the layouts' coordinates: every
destination byte is covered
exactly once, from a rank that holds it, at the right local positions; bytes received equal
the lower bound (ratio 1.0); each step is a matching; same-host holders are preferred.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgroups.cli import main
from pgroups.errors import ConfigError, ReshardError
from pgroups.reshard import (ModelSpec, ParallelLayout, Rule, TensorSpec, balanced_stages, even_stages,
                             llama_like, load_layout, load_model_spec, local_shapes, parts_blocks, plan_reshard,
                             plan_share,
                             qkv_blocks, spec_from_module)
from pgroups.reshard.names import LLAMA, sub_block_model
from pgroups.reshard.spec import Piece
from pgroups.topology import Topology


def layout(tensor: int, pipeline: int, data: int = 1, ranks: Optional[Sequence[int]] = None,
           stages="even", order: str = "tp-pp-dp") -> ParallelLayout:
    size = tensor * pipeline * data
    return ParallelLayout.create(Topology.create(size, tensor, pipeline, order=order),
                                 list(ranks) if ranks is not None else None, stages)


# ---- oracle -----------------------------------------------------------------------------------------
def local_start(pieces: Sequence[Piece], start: int, stop: int) -> Optional[int]:
    """Where global rows [start, stop) begin in a shard made of ``pieces``, if the shard holds
    them all, contiguously; else None."""
    position, expected = start, None
    for g0, g1, local in pieces:
        if g0 <= position < g1:
            here = local + position - g0
            if expected is not None and here != expected:
                return None
            first = here if position == start else None
            take = min(g1, stop) - position
            expected = here + take
            position += take
            if first is not None:
                begin = first
            if position == stop:
                return begin
    return None


def stages_of(lay: ParallelLayout, model: ModelSpec) -> Dict[str, set]:
    """{tensor: stages holding it}: a tied tensor on the first and the last stage."""
    stage = lay.stage_map(model)
    last = lay.topology.pipeline - 1
    return {t.name: {0, last} if t.layer == "tied" else {stage[t.layer]} for t in model.tensors}


def holds(spec: TensorSpec, lay: ParallelLayout, stages: set, rank: int, start: int, stop: int) -> Optional[int]:
    coords = lay.coordinates(rank)
    if coords is None or coords["pp"] not in stages:
        return None
    return local_start(spec.pieces(lay.topology.tensor, coords["tp"]), start, stop)


def check_plan(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec, hosts: Optional[List[str]]) -> None:
    plan = plan_reshard(src, dst, model, hosts)
    src_stage, dst_stage = stages_of(src, model), stages_of(dst, model)
    specs = {s.name: s for s in model.tensors}
    got: Dict[Tuple[int, str], List[Tuple[int, int]]] = defaultdict(list)
    holders_cache: Dict[Tuple[str, int, int], List[int]] = {}

    def holders(spec: TensorSpec, g0: int, g1: int) -> List[int]:
        key = (spec.name, g0, g1)
        if key not in holders_cache:
            holders_cache[key] = [r for r in src.ranks
                                  if holds(spec, src, src_stage[spec.name], r, g0, g1) is not None]
        return holders_cache[key]

    received: Counter = Counter()
    for t in plan.transfers:
        spec = specs[t.tensor]
        if spec.shape:
            g0, g1 = t.global_box[spec.axis]
            assert all(t.global_box[d] == (0, n) for d, n in enumerate(spec.shape) if d != spec.axis)
            assert t.src_box[spec.axis][1] - t.src_box[spec.axis][0] == g1 - g0
        else:
            g0, g1 = 0, 1
        assert g1 > g0 and t.nbytes == (g1 - g0) * spec.row_bytes
        # the sender holds these rows, at src_box, in the source layout
        at_src = holds(spec, src, src_stage[spec.name], t.src, g0, g1)
        assert at_src is not None, f"{t} sent by a rank that does not hold it"
        assert not spec.shape or at_src == t.src_box[spec.axis][0]
        at_dst = holds(spec, dst, dst_stage[spec.name], t.dst, g0, g1)
        assert at_dst is not None, f"{t} received by a rank that does not need it"
        assert not spec.shape or at_dst == t.dst_box[spec.axis][0]
        assert (t.step == -1) == t.is_local
        got[(t.dst, t.tensor)].append((g0, g1))
        if not t.is_local:
            received[t.dst] += t.nbytes
            # a holder on the receiver's host exists → the sender is on the receiver's host
            if hosts is not None:
                same_host = [r for r in holders(spec, g0, g1) if hosts[r] == hosts[t.dst]]
                assert not same_host or hosts[t.src] == hosts[t.dst], f"{t} crosses hosts; {same_host} hold it"
            # a rank never receives over the network bytes it holds itself
            assert holds(spec, src, src_stage[spec.name], t.dst, g0, g1) is None

    needed: Counter = Counter()
    held: Counter = Counter()
    for rank in dst.ranks:
        d = dst.coordinates(rank)
        s = src.coordinates(rank)
        for spec in model.tensors:
            if d["pp"] not in dst_stage[spec.name]:
                assert (rank, spec.name) not in got
                continue
            want = [(a, b) for a, b, _ in spec.pieces(dst.topology.tensor, d["tp"])]
            covered = sorted(got.get((rank, spec.name), []))
            assert _merge(covered) == _merge(sorted(want)), f"rank {rank} {spec.name}: {covered} vs {want}"
            assert sum(b - a for a, b in covered) == sum(b - a for a, b in want), "a byte is covered twice"
            needed[rank] += sum(b - a for a, b in want) * spec.row_bytes
            if s is not None and s["pp"] in src_stage[spec.name]:
                mine = spec.pieces(src.topology.tensor, s["tp"])
                held[rank] += sum(max(0, min(b, m1) - max(a, m0)) for a, b in want for m0, m1, _ in mine) * spec.row_bytes
    for report in plan.receivers:
        assert report.needed_bytes == needed[report.rank]
        assert report.lower_bound_bytes == needed[report.rank] - held[report.rank]
        assert report.received_bytes == received[report.rank]
        assert report.ratio == 1.0
    assert plan.ratio == 1.0
    assert sum(plan.sender_bytes.values()) == plan.received_bytes
    # steps: every pair in one step; per step each rank sends to <= 1 peer and receives from <= 1
    pair_steps = defaultdict(set)
    for t in plan.transfers:
        if not t.is_local:
            pair_steps[(t.src, t.dst)].add(t.step)
    assert all(len(s) == 1 for s in pair_steps.values())
    peer_in_step = {}
    for (s, d), steps in pair_steps.items():
        step = next(iter(steps))   # in one step, a rank exchanges with one peer only
        assert peer_in_step.setdefault((step, s), d) == d, f"rank {s} has two peers in step {step}"
        assert peer_in_step.setdefault((step, d), s) == s, f"rank {d} has two peers in step {step}"
    # a rank takes part in one step per peer, and knows each step from the pair alone
    assert all(next(iter(steps)) == (d + s) % (max(plan.ranks) + 1) for (s, d), steps in pair_steps.items())
    out_degree, in_degree = Counter(s for s, _ in pair_steps), Counter(d for _, d in pair_steps)
    rank_steps = defaultdict(set)
    for (s, d), steps in pair_steps.items():
        rank_steps[s] |= steps
        rank_steps[d] |= steps
    for rank, steps in rank_steps.items():   # one step per peer (sending to it, receiving from it, or both)
        peers = {d for s, d in pair_steps if s == rank} | {s for s, d in pair_steps if d == rank}
        assert len(steps) == len(peers) and max(out_degree[rank], in_degree[rank]) <= len(steps)
    assert plan.max_rank_steps == max((len(s) for s in rank_steps.values()), default=0)
    # each rank's own share, computed alone, is exactly its part of the whole plan
    ranks = plan.ranks
    for rank in sorted({ranks[0], ranks[-1], ranks[len(ranks) // 2], ranks[len(ranks) // 3]}):
        share = plan_share(src, dst, model, rank, hosts)
        assert share == plan.share(rank), f"rank {rank}'s share differs from its part of the whole plan"
        assert share.digest() == plan.digest()


def _merge(intervals: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    merged: List[Tuple[int, int]] = []
    for a, b in intervals:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


# ---- strategies ---------------------------------------------------------------------------------------
@st.composite
def tensor_specs(draw, index: int, num_layers: int) -> TensorSpec:
    ndim = draw(st.integers(0, 3))
    shape = [draw(st.integers(1, 24)) for _ in range(ndim)]
    dtype = draw(st.sampled_from(["float32", "bfloat16", "int8", "float64"]))
    layer = draw(st.sampled_from(["embedding", "head", "tied", *range(num_layers)]))
    tp_dim = draw(st.none() | st.integers(0, ndim - 1)) if ndim else None
    blocks = None
    if tp_dim is not None and draw(st.booleans()):
        if draw(st.booleans()):
            kv = draw(st.integers(1, 4))
            ratio, head_dim = draw(st.integers(1, 4)), draw(st.integers(1, 3))
            blocks = qkv_blocks(kv * ratio, kv, head_dim)
        else:
            blocks = parts_blocks([draw(st.integers(1, 9)) for _ in range(draw(st.integers(2, 3)))])
        shape[tp_dim] = sum(b.size for b in blocks)
    return TensorSpec.create(f"t{index}", shape, dtype, tp_dim, layer, blocks)


@st.composite
def models(draw) -> ModelSpec:
    num_layers = draw(st.integers(0, 6))
    count = draw(st.integers(1, 5))
    return ModelSpec.create([draw(tensor_specs(i, num_layers)) for i in range(count)], num_layers)


@st.composite
def layouts(draw, world: int, max_size: int) -> ParallelLayout:
    tensor = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16]).filter(lambda t: t <= max_size))
    pipeline = draw(st.sampled_from([1, 2, 3, 4, 8]).filter(lambda p: tensor * p <= max_size))
    context = draw(st.sampled_from([1, 1, 2]).filter(lambda c: tensor * pipeline * c <= max_size))
    data = draw(st.integers(1, max(1, max_size // (tensor * pipeline * context))))
    size = tensor * pipeline * context * data
    placement = draw(st.sampled_from(["prefix", "offset", "shuffled"]))
    if placement == "prefix":
        ranks = list(range(size))
    elif placement == "offset":
        start = draw(st.integers(0, world - size))
        ranks = list(range(start, start + size))
    else:
        ranks = draw(st.randoms(use_true_random=False)).sample(range(world), size)
    order = draw(st.sampled_from(["tp-pp-dp", "tp-dp-pp", "dp-tp-pp"] if context == 1 else
                                 ["tp-cp-pp-dp", "tp-cp-dp-pp", "cp-dp-tp-pp"]))
    stages = draw(st.sampled_from(["even", "balanced"]))
    return ParallelLayout.create(Topology.create(size, tensor, pipeline, order=order, context=context), ranks, stages)


@st.composite
def hosts_for(draw, world: int) -> Optional[List[str]]:
    kind = draw(st.sampled_from(["none", "blocks", "random"]))
    if kind == "none":
        return None
    if kind == "blocks":
        per = draw(st.sampled_from([1, 2, 4, 8]))
        return [f"h{r // per}" for r in range(world)]
    rng = draw(st.randoms(use_true_random=False))
    return [f"h{rng.randrange(3)}" for _ in range(world)]


@st.composite
def cases(draw):
    world = draw(st.sampled_from([4, 8, 12, 16, 64, 256, 1024]))
    return world, draw(layouts(world, world)), draw(layouts(world, world)), draw(models()), draw(hosts_for(world))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_every_destination_byte_comes_exactly_once_from_a_holder_at_the_lower_bound(case):
    world, src, dst, model, hosts = case
    too_wide = [(spec, lay.topology.tensor) for spec in model.tensors for lay in (src, dst)
                for b in spec.blocks if b.heads is not None and lay.topology.tensor > b.heads.num_heads]
    if too_wide:   # a TP rank would hold no query head: refused, naming the tensor and the sizes
        spec, tp = too_wide[0]
        with pytest.raises(ReshardError, match=rf"tensor '{spec.name}': \d+ query heads / \d+ KV heads cannot be "
                                               rf"split over tensor parallel size {tp}"):
            plan_reshard(src, dst, model, hosts)
        return
    check_plan(src, dst, model, hosts)


def test_large_world_llama_plan_is_exact():
    model = llama_like(hidden=64, layers=4, heads=8, kv_heads=2, ffn=96, vocab=300, dtype="bfloat16")
    hosts = [f"node{r // 8}" for r in range(1024)]
    check_plan(layout(8, 4, 32), layout(4, 1, 256), model, hosts)


# ---- golden cases ------------------------------------------------------------------------------------------
def one_tensor(shape, tp_dim, blocks=None, dtype="float32") -> ModelSpec:
    return ModelSpec.create([TensorSpec.create("w", shape, dtype, tp_dim, 0, blocks)], 1)


def test_golden_tp2_to_tp3_intersects_intervals():
    plan = plan_reshard(layout(2, 1), layout(3, 1, ranks=[2, 3, 4]), one_tensor((6, 4), 0))
    moves = [(t.src, t.dst, t.global_box[0], t.src_box[0], t.dst_box[0], t.nbytes) for t in plan.transfers]
    assert sorted(moves) == [
        (0, 2, (0, 2), (0, 2), (0, 2), 32),
        (0, 3, (2, 3), (2, 3), (0, 1), 16),
        (1, 3, (3, 4), (0, 1), (1, 2), 16),
        (1, 4, (4, 6), (1, 3), (0, 2), 32),
    ]
    assert plan.max_rank_steps == 2 and plan.ratio == 1.0


def test_golden_fused_qkv_with_gqa_is_split_by_sub_block():
    spec = TensorSpec.create("qkv", (8, 2), "float32", 0, 0, qkv_blocks(num_heads=4, num_kv_heads=2, head_dim=1))
    # [q0 q1 q2 q3 | k0 k1 | v0 v1]; TP 2: rank 1 holds q2 q3, k1, v1
    assert spec.pieces(2, 1) == ((2, 4, 0), (5, 6, 2), (7, 8, 3))
    # TP 4 > 2 KV heads: KV replicated, rank 3 holds q3, k1, v1
    assert spec.pieces(4, 3) == ((3, 4, 0), (5, 6, 1), (7, 8, 2))
    assert spec.local_shape(4, 3) == (3, 2)
    full = torch.arange(16.).reshape(8, 2)
    assert spec.shard(full, 2, 1).tolist() == [[4., 5.], [6., 7.], [10., 11.], [14., 15.]]
    # TP 2 → TP 4 colocated: rank 1 keeps nothing of q, but K/V head 0 it needs come from rank 0
    plan = plan_reshard(layout(2, 1), layout(4, 1), ModelSpec.create([spec], 1))
    to_rank1 = sorted((t.src, t.global_box[0]) for t in plan.transfers if t.dst == 1)
    assert to_rank1 == [(0, (1, 2)), (0, (4, 5)), (0, (6, 7))]


def test_golden_gate_up_parts_split_separately():
    spec = TensorSpec.create("gate_up", (8,), "bfloat16", 0, 0, parts_blocks([4, 4], names=("gate", "up")))
    assert spec.pieces(2, 0) == ((0, 2, 0), (4, 6, 2))
    assert spec.pieces(3, 2) == ((3, 4, 0), (7, 8, 1))


def test_uneven_and_empty_shares_need_no_divisibility():
    spec = TensorSpec.create("w", (2, 5), "float32", 0, 0)
    assert [spec.local_shape(3, r) for r in range(3)] == [(1, 5), (1, 5), (0, 5)]
    check_plan(layout(3, 1), layout(2, 1, 2), ModelSpec.create([spec], 1), None)


def test_load_balancing_updates_loads_across_replicas():
    # four replicas (DP 4) on ranks 0-3 feed four new ranks: each replica serves exactly one
    plan = plan_reshard(layout(1, 1, 4), layout(1, 1, 4, ranks=[4, 5, 6, 7]), llama_like(
        hidden=16, layers=2, heads=4, kv_heads=2, ffn=24, vocab=40))
    assert sorted(plan.sender_bytes.values()) == [plan.model.nbytes] * 4
    assert plan.sender_load_max == plan.sender_load_mean
    assert sorted(r.senders for r in plan.receivers) == [(0,), (1,), (2,), (3,)]


def test_replicated_tensor_is_received_once_per_rank_not_once_per_tp_portion():
    model = ModelSpec.create([TensorSpec.create("norm", (64,), "float32", None, 0)], 1)
    plan = plan_reshard(layout(4, 1, ranks=[0, 1, 2, 3]), layout(2, 1, ranks=[4, 5]), model)
    assert [r.received_bytes for r in plan.receivers] == [256, 256]
    assert len(plan.transfers) == 2 and {t.src for t in plan.transfers} <= {0, 1, 2, 3}
    assert len({t.src for t in plan.transfers}) == 2  # two different replicas serve the two ranks


def test_same_host_sender_is_preferred():
    hosts = ["A"] * 4 + ["B"] * 4
    plan = plan_reshard(layout(1, 1, 2, ranks=[0, 4]), layout(1, 1, 6, ranks=[1, 2, 3, 5, 6, 7]),
                        one_tensor((10, 3), 0), hosts)
    assert {r.rank: r.senders for r in plan.receivers} == {1: (0,), 2: (0,), 3: (0,), 5: (4,), 6: (4,), 7: (4,)}


def test_tied_embedding_is_held_by_first_and_last_stage_and_received_once_per_rank_that_needs_it():
    model = llama_like(hidden=16, layers=4, heads=4, kv_heads=2, ffn=24, vocab=40, tied_embeddings=True)
    assert "lm_head.weight" not in model.names and model["embed.weight"].layer == "tied"
    src, dst = layout(2, 2), layout(2, 4, ranks=list(range(4, 12)))   # pp 2 → pp 4 on other ranks
    assert set(local_shapes(src, model, 0)) >= {"embed.weight"} and "embed.weight" in local_shapes(src, model, 2)
    plan = plan_reshard(src, dst, model)
    tied = Counter(t.dst for t in plan.transfers if t.tensor == "embed.weight")
    # stage 0 (ranks 4, 5) and stage 3 (ranks 10, 11) need it: each receives its TP half, once
    assert sorted(tied) == [4, 5, 10, 11]
    got = {r: sum(t.nbytes for t in plan.transfers if t.tensor == "embed.weight" and t.dst == r) for r in tied}
    assert got == {r: model["embed.weight"].nbytes // 2 for r in (4, 5, 10, 11)}
    check_plan(src, dst, model, None)
    # pipeline 1: first and last stage are one; the rank receives the tensor once
    one = plan_reshard(src, layout(1, 1, 1, ranks=[7]), model)
    assert sum(t.nbytes for t in one.transfers if t.tensor == "embed.weight") == model["embed.weight"].nbytes
    # both source stages hold it: the replicas of stage 0 and of stage 1 share the senders
    spread = plan_reshard(layout(1, 2), layout(1, 1, 2, ranks=[2, 3]), model)
    assert {t.src for t in spread.transfers if t.tensor == "embed.weight"} == {0, 1}


def test_identity_reshard_is_all_local_copies():
    model = llama_like(hidden=16, layers=4, heads=4, kv_heads=2, ffn=24, vocab=40)
    plan = plan_reshard(layout(2, 2, 2), layout(2, 2, 2), model)
    assert plan.received_bytes == 0 and plan.num_steps == 0
    assert all(t.is_local for t in plan.transfers)
    assert [r.local_copy_bytes for r in plan.receivers] == [r.needed_bytes for r in plan.receivers]


def test_pipeline_repartition_moves_only_layers_that_change_stage():
    model = llama_like(hidden=16, layers=4, heads=4, kv_heads=2, ffn=24, vocab=40)
    plan = plan_reshard(layout(1, 2, stages=(2, 2)), layout(1, 2, stages=(1, 3)), model)
    moved = {t.tensor.split(".")[1] for t in plan.transfers if not t.is_local}
    assert moved == {"1"}  # layer 1 goes from stage 0 (rank 0) to stage 1 (rank 1)
    assert {t.src for t in plan.transfers if not t.is_local} == {0}


# ---- stage policies ------------------------------------------------------------------------------------------
def test_even_stages_balance_layer_counts():
    assert even_stages(4, 0, 0, [1] * 10) == [3, 3, 2, 2]
    assert even_stages(3, 0, 0, [1] * 2) == [1, 1, 0]


def test_balanced_stages_balance_bytes_with_embedding_and_head():
    # embedding (10) on stage 0 and head (10) on stage 1 and 8 layers of 2: stage loads 10+6, 10+... equal
    assert balanced_stages(2, 10, 10, [2] * 8) == [4, 4]
    # a heavy embedding pushes layers to the other stages
    counts = balanced_stages(3, 12, 0, [2] * 9)
    assert counts == [0, 4, 5] or max(12 + 2 * counts[0], 2 * counts[1], 2 * counts[2]) <= 12
    assert sum(counts) == 9


def test_custom_stage_policy_and_bad_counts():
    model = llama_like(hidden=16, layers=4, heads=4, kv_heads=2, ffn=24, vocab=40)
    custom = layout(1, 2, stages=lambda stages, emb, head, layers: [len(layers) - 1, 1])
    assert custom.layer_counts(model) == (3, 1)
    with pytest.raises(ConfigError, match=r"stages \[2, 1\] must give 2 non-negative layer counts adding up to "
                                          r"num_layers \(4\)"):
        layout(1, 2, stages=(2, 1)).stage_map(model)
    with pytest.raises(ConfigError, match="one non-negative layer count per pipeline stage"):
        layout(1, 2, stages=(4,))
    with pytest.raises(ConfigError, match="stages 'evn' is not a known policy.*did you mean 'even'"):
        layout(1, 2, stages="evn")


# ---- specs from YAML and modules -------------------------------------------------------------------------------
def test_model_spec_yaml_example_loads(tmp_path):
    model = load_model_spec("config_examples/reshard_model.yaml")
    assert model.num_layers == 4 and len(model.tensors) == 3 + 5 * 4
    qkv = model["layers.2.attn.qkv.weight"]
    assert qkv.layer == 2 and [b.name for b in qkv.blocks] == ["q", "k", "v"]
    assert model["layers.0.input_norm.weight"].tp_dim is None


@pytest.mark.parametrize("text, message", [
    ("tensors: [{name: a, shape: [2], layer: 0, tp_dim: 0, fuse: {}}]", r"tensors\[0\].fuse: unknown key \(did you mean 'fused'\?\)"),
    ("tensors: [{name: a, shape: [2], layer: 0, dtype: bf17}]", "tensor 'a': dtype 'bf17' is not known"),
    ("tensors: [{name: 'l.{layer}.w', shape: [2]}]", "uses {layer}: set num_layers"),
    ("tensors: [{name: a, shape: [2]}]", "tensor 'a': missing 'layer'"),
    ("tensors: [{name: a, shape: [2], layer: 0, tp_dim: 1}]", r"tp_dim 1 is not a dim of shape \[2\]"),
    ("tensors: [{name: a, shape: [5], layer: 0, tp_dim: 0, fused: {parts: [2, 2]}}]", r"2 \+ 2 = 4 != shape\[0\] = 5"),
    ("tensors: [{name: a, shape: [6], layer: 0, tp_dim: 0, fused: {qkv: {heads: 3, kv_heads: 2, head_dim: 1}}}]",
     r"kv_heads\(2\) must divide heads\(3\)"),
    ("tensors: [{name: a, shape: [2], layer: 0}, {name: a, shape: [2], layer: 0}]", "tensor 'a' is listed twice"),
    ("num_layers: 1\ntensors: [{name: a, shape: [2], layer: 3}]", r"layer 3 is outside 0..0"),
    ("tensors: [{name: a, shape: [2], layer: middle}]", "layer 'middle' must be 'embedding', 'head'"),
    ("tensor: []", "tensor: unknown key"),
])
def test_bad_model_specs_raise_one_clear_config_error(text, message):
    with pytest.raises(ConfigError, match=message):
        load_model_spec(text)


def test_synthetic_model_spec_from_yaml():
    model = load_model_spec("synthetic: {hidden: 32, layers: 2, heads: 4, kv_heads: 2, ffn: 48, vocab: 64}")
    assert model.num_layers == 2 and model["layers.1.mlp.gate_up.weight"].shape == (96, 32)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(8, 16, bias=False)   # 4 heads x 2 + 2 kv heads x 2 x 2
        self.out = torch.nn.Linear(8, 8, bias=False)
        self.norm = torch.nn.LayerNorm(8)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.layers = torch.nn.ModuleList([_Block(), _Block()])
        self.head = torch.nn.Linear(8, 10, bias=False)


def test_spec_from_module_with_rules():
    rules = [Rule(r"^embed\.", tp_dim=0, layer="embedding"),
             Rule(r"\.qkv\.weight$", tp_dim=0, blocks=qkv_blocks(4, 2, 2)),
             Rule(r"\.out\.weight$", tp_dim=1),
             Rule(r"^head\.", tp_dim=0, layer="head")]
    model = spec_from_module(_Tiny(), rules)
    assert model.num_layers == 2
    assert model["embed.weight"].layer == "embedding" and model["head.weight"].layer == "head"
    assert model["layers.1.qkv.weight"].layer == 1 and len(model["layers.1.qkv.weight"].blocks) == 3
    assert model["layers.0.out.weight"].tp_dim == 1
    assert model["layers.0.norm.bias"].tp_dim is None
    check_plan(layout(2, 2), layout(4, 1), model, None)
    with pytest.raises(ConfigError, match=r"tensor 'embed.weight': no layer index found"):
        spec_from_module(_Tiny(), rules[1:])


# ---- layouts from YAML ---------------------------------------------------------------------------------------
def test_layout_yaml_with_placement():
    lay = load_layout("parallel: {tensor: 2}\nplacement: {ranks: '4-5,8-9', stages: balanced}", world_size=12)
    assert lay.ranks == (4, 5, 8, 9) and lay.topology.data == 2 and lay.stages == "balanced"
    assert lay.coordinates(8) == {"tp": 0, "pp": 0, "dp": 1} and lay.coordinates(0) is None
    assert lay.replicas(1, 0) == [5, 9]
    plain = load_layout("config_examples/reshard_infer.yaml", world_size=16)
    assert plain.ranks == tuple(range(16)) and plain.topology.data == 8


@pytest.mark.parametrize("text, message", [
    ("parallel: {tensor: 2}\nplacement: {ranks: '0-4'}", r"tensor\(2\) is not divisible|world_size\(5\) is not divisible"),
    ("parallel: {tensor: 2}\nplacement: {ranks: '6-9'}", r"placement.ranks \[8, 9\] are outside the job's ranks 0..7"),
    ("parallel: {tensor: 2}\nplacement: {ranks: '3-1'}", "bad range '3-1'"),
    ("parallel: {tensor: 2}\nplacement: {rank: [0, 1]}", r"placement.rank: unknown key \(did you mean 'ranks'\?\)"),
    ("parallel: {tensor: 2}\nplacement: {ranks: [0, 0]}", "placement ranks must be distinct"),
    ("parallel: {tensor: 2, data: 2}\nplacement: {ranks: '0-5'}", r"data\(2\) = 4 != world_size\(6\)"),
    ("parallel: {tensr: 2}", r"parallel.tensr: unknown key \(did you mean 'tensor'\?\)"),
])
def test_bad_layouts_raise_one_clear_config_error(text, message):
    with pytest.raises(ConfigError, match=message):
        load_layout(text, world_size=8)


# ---- CLI ---------------------------------------------------------------------------------------------------
def test_cli_reshard_plan_text_and_json(capsys):
    args = ["reshard-plan", "config_examples/reshard_train.yaml", "config_examples/reshard_infer.yaml",
            "--world-size", "16", "--ranks-per-host", "8", "--model", "config_examples/reshard_model.yaml"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ratio 1.000" in out and "steps" in out and "sender load max" in out
    assert main(args + ["--json", "--transfers"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ratio"] == 1.0 and data["received_bytes"] == data["lower_bound_bytes"]
    assert len(data["receivers"]) == 16 and data["steps"] >= 1
    assert sum(t["bytes"] for t in data["transfers"] if t["src"] != t["dst"]) == data["received_bytes"]


def test_cli_reshard_plan_bad_input_exits_2_with_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallel: {tensor: 2}\nplacement: {ranks: '0-2'}\n")
    assert main(["reshard-plan", str(bad), "config_examples/reshard_infer.yaml", "--world-size", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err and "not divisible" in err
    assert main(["reshard-plan", "config_examples/reshard_train.yaml", "config_examples/reshard_infer.yaml",
                 "--world-size", "16", "--model", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read model spec" in capsys.readouterr().err


# ---- vocabulary padding -------------------------------------------------------------------------------------
def test_vocab_padding_rows_are_never_sent_and_zero_filled_on_the_destination():
    # Megatron pads 1000 rows to a multiple of 128 x TP: tp 4 → 1024 (256 per rank); inference unpadded
    model = llama_like(hidden=8, layers=2, heads=4, kv_heads=2, ffn=12, vocab=1000, dtype="float32")
    src = ParallelLayout.create(Topology.create(4, 4, 1), vocab_multiple=128)
    dst = ParallelLayout.create(Topology.create(3, 3, 1), list(range(4, 7)))
    emb = model["embed.weight"]
    assert [emb.local_shape(4, r, vocab_multiple=128)[0] for r in range(4)] == [256] * 4
    assert emb.pieces(4, 3, 128) == ((768, 1000, 0),)    # rows 1000..1023 of rank 3 are padding
    plan = plan_reshard(src, dst, model)
    for t in plan.transfers:
        if t.tensor in ("embed.weight", "lm_head.weight"):
            assert t.global_box[0][1] <= 1000 and t.src_box[0][1] <= 256, "a padding row was sent"
    assert plan.ratio == 1.0 and not plan.fills
    # and back: the destination pads to 128 x 2 = 256 multiples → 1024 rows, rank 1 holds 512..1023
    back = plan_reshard(dst, ParallelLayout.create(Topology.create(2, 2, 1), vocab_multiple=128), model)
    fills = {(f.tensor, f.dst): f.dst_box[0] for f in back.fills}
    assert fills == {("embed.weight", 1): (488, 512), ("lm_head.weight", 1): (488, 512)}
    assert all(f.nbytes == 24 * 8 * 4 for f in back.fills)
    assert back.ratio == 1.0
    report = {r.rank: r for r in back.receivers}
    shard_bytes = sum(math.prod(shape) * 4 for shape in local_shapes(back.dst, model, 1).values())
    assert report[1].needed_bytes + sum(f.nbytes for f in back.fills) == shard_bytes   # padding is not "needed"
    full = {s.name: torch.randn(s.shape) for s in model.tensors}
    from reshard_compute import apply_plan
    shards = apply_plan(back, full)
    assert torch.equal(shards[1]["embed.weight"][:488], full["embed.weight"][512:])
    for fill in back.fills:   # apply_plan leaves NaN where nothing arrives: exactly the padding
        assert shards[fill.dst][fill.tensor][fill.dst_box[0][0]:].isnan().all()


def test_cli_reshard_plan_one_rank_share_matches_the_whole_plan(capsys):
    args = ["reshard-plan", "config_examples/reshard_train.yaml", "config_examples/reshard_infer.yaml",
            "--world-size", "16", "--ranks-per-host", "8", "--model", "config_examples/reshard_model.yaml", "--json"]
    assert main(args) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(args + ["--rank", "5"]) == 0
    share = json.loads(capsys.readouterr().out)
    mine = next(r for r in whole["receivers"] if r["rank"] == 5)
    assert share["plan_hash"] == whole["plan_hash"] and len(share["plan_hash"]) == 16
    assert share["received_bytes"] == mine["received"] == share["lower_bound_bytes"]
    assert share["receive_peers"] == mine["senders"]
    assert main(args[:-1] + ["--rank", "5"]) == 0
    out = capsys.readouterr().out
    assert "rank 5's share" in out and f"plan hash {whole['plan_hash']}" in out
    assert main(args + ["--rank", "16"]) == 2
    assert "--rank 16 is outside the job's ranks 0..15" in capsys.readouterr().err


# ---- the whole plan is every rank's share ------------------------------------------------------------------
def _union_cases():
    dense = llama_like(hidden=16, layers=3, heads=4, kv_heads=2, ffn=12, vocab=40, dtype="bfloat16",
                       tied_embeddings=True)
    moe = llama_like(hidden=8, layers=2, heads=4, kv_heads=2, ffn=8, vocab=20, dtype="float32", experts=4,
                     expert_ffn=4, shared_ffn=4, grouped_experts=False)
    hosts = [f"h{r // 4}" for r in range(16)]
    yield "dense tp4pp2 -> tp2 disjoint, hosts", layout(4, 2), layout(2, 1, 4, ranks=range(8, 16)), dense, hosts
    yield "dense pp3 -> tp3 colocated, no hosts", layout(1, 3, 4), layout(3, 1, 4), dense, None
    yield ("dense ISP weight 3 x 2 -> tp4 partly colocated, hosts",
           ParallelLayout.create(Topology.create(6, 1, 1, weight=3), isp=True), layout(4, 1, 1, ranks=range(4, 8)),
           dense, hosts)
    yield ("moe ep2 cp2 -> ep4, padded vocab",
           ParallelLayout.create(Topology.create(8, 2, 2, order="tp-cp-ep-dp-pp", context=2, expert=2, expert_tensor=1)),
           ParallelLayout.create(Topology.create(8, 1, 1, order="tp-ep-dp-pp", expert=4), list(range(4, 12)),
                                 vocab_multiple=8), moe, hosts)


@pytest.mark.parametrize("case", list(_union_cases()), ids=lambda c: c[0])
def test_whole_plan_is_the_union_of_every_ranks_share(case):
    _, src, dst, model, hosts = case
    plan = plan_reshard(src, dst, model, hosts)
    network = [t for t in plan.transfers if not t.is_local]
    sends, recvs, copies, fills = [], [], [], []
    for rank in sorted(set(src.ranks) | set(dst.ranks)):
        share = plan_share(src, dst, model, rank, hosts)
        assert share.digest() == plan.digest()
        report = next((r for r in plan.receivers if r.rank == rank), None)
        assert share.report == report, f"rank {rank}"
        sends += share.sends
        recvs += share.recvs
        copies += share.copies
        fills += share.fills
    order = {spec.name: i for i, spec in enumerate(model.tensors)}

    def key(t):
        return (t.step, t.src, t.dst, order[t.tensor], t.global_box)

    # senders work out their sends by inverting the rule; receivers by applying it: both are the plan
    assert sorted(sends, key=key) == network == sorted(recvs, key=key)
    assert copies == [t for t in plan.transfers if t.is_local]
    assert fills == list(plan.fills) and (fills or "padded" not in case[0])
    assert plan.num_steps == max(t.step for t in network) + 1
    assert plan.sender_bytes == {r: sum(t.nbytes for t in sends if t.src == r) for r in src.ranks}


# ---- reshard-plan on MoE, padded, converted and fused-conversion models ------------------------------------
MOE_SPEC = ("name: tiny-moe\nsynthetic: {hidden: 16, layers: 2, heads: 4, kv_heads: 2, ffn: 32, vocab: 1000, "
            "experts: 8, expert_ffn: 8, shared_ffn: 16, tied_embeddings: true}\n")
MOE_TRAIN = ("parallel: {tensor: 2, pipeline: 2, expert: 4, expert_tensor: 1, order: tp-cp-ep-dp-pp}\n"
             "placement: {vocab_multiple: 128}\n")
MOE_INFER = "parallel: {tensor: 4, expert: 8, expert_tensor: 1, order: tp-ep-dp-pp}\n"


def test_cli_reshard_plan_reports_experts_padding_dtypes_and_fusing(capsys, tmp_path):
    for name, text in (("model.yaml", MOE_SPEC), ("train.yaml", MOE_TRAIN), ("infer.yaml", MOE_INFER)):
        (tmp_path / name).write_text(text)
    args = ["reshard-plan", str(tmp_path / "train.yaml"), str(tmp_path / "infer.yaml"), "-n", "16",
            "--model", str(tmp_path / "model.yaml"), "--dst-dtype", "fp8", "--src-names", "llama"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "routed experts: 8 per MoE layer" in out and "experts per EP rank: 2" in out
    assert "src 1024 rows (padded to a multiple of 128 x TP: 24 padding rows)" in out     # ceil(1000/256)*256
    assert "destination float8_e4m3fn" in out and "on the wire in the destination dtypes" in out
    # 2 layers x (q0 q1 k0 k1 v0 v1)
    assert "converted inside the transfer (2 fused tensors planned as 12 sub-block tensors" in out
    assert "plan hash" in out and "steps" in out
    assert main(args + ["--json", "--transfers"]) == 0
    data = json.loads(capsys.readouterr().out)
    # experts each destination rank owns: its position in its expert group (Megatron: 8 / ep 8 = one each)
    topology = Topology.create(16, 4, 1, order="tp-ep-dp-pp", expert=8, expert_tensor=1)
    position = {r: g.index(r) for g in topology.groups("expert") for r in g}
    assert all(row["experts"] == [position[row["rank"]], position[row["rank"]] + 1] for row in data["receivers"])
    # bytes on the wire: fp8 values (4-byte aligned) + one float32 scale per row of the split axis (and
    # per expert of a grouped weight) for >= 2-D tensors; bf16 for 1-D ones
    model = sub_block_model(load_model_spec(str(tmp_path / "model.yaml")), LLAMA)   # what --src-names plans
    wire: Counter = Counter()
    for t in data["transfers"]:
        if t["src"] == t["dst"]:
            continue
        spec = model[t["tensor"]]
        shape = [b - a for a, b in t["src_local"]]
        if len(spec.shape) < 2:
            wire[t["dst"]] += math.prod(shape) * 2
            continue
        scaled = {spec.axis} | ({spec.experts.dim} if spec.experts is not None and spec.experts.dim is not None
                                else set())
        wire[t["dst"]] += -(-math.prod(shape) // 4) * 4 + 4 * math.prod(shape[d] for d in scaled)
    assert {r["rank"]: r["wire_received"] for r in data["receivers"]} == {r: wire[r] for r in range(16)}
    assert data["wire_received_bytes"] < data["received_bytes"] and data["names"]["src"]["fused"] == 2   # qkv of 2 layers
    assert data["vocab_padding"]["src"]["padding_rows"] == 24 and data["vocab_padding"]["dst"]["padding_rows"] == 0
    assert main(args + ["--rank", "3"]) == 0
    assert "this rank owns 6-7 in the source, 3 in the destination" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--dst-dtype", "fp9"], r"--dst-dtype 'fp9' is not known; allowed: .*'fp8'"),
    (["--src-names", "missing.yaml"], r"missing.yaml: cannot read name map"),
    (["--dst-names", "{tensors: {'layers.{layer}.attn.qkv.weight': {q: 'q.{layer}'}}}"],
     r"has sub-block roles k, q, v but the map names q; to fuse, name every role"),
])
def test_cli_reshard_plan_bad_conversion_options_exit_2_with_one_line(capsys, extra, message):
    import re
    args = ["reshard-plan", "config_examples/reshard_train.yaml", "config_examples/reshard_infer.yaml",
            "--world-size", "16", "--model", "config_examples/reshard_model.yaml"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_cli_agreement_hash_covers_destination_dtypes_and_is_what_the_resharder_compares(capsys):
    import types
    from pgroups.reshard import Resharder
    args = ["reshard-plan", "config_examples/reshard_train.yaml", "config_examples/reshard_infer.yaml",
            "--world-size", "16", "--model", "config_examples/reshard_model.yaml", "--json"]
    runs = {}
    for name, extra in (("none", []), ("bf16", ["--dst-dtype", "bf16"]), ("fp16", ["--dst-dtype", "fp16"]),
                        ("fp8", ["--dst-dtype", "fp8"]), ("fp8 bucket", ["--dst-dtype", "fp8", "--bucket-bytes", "4096"]),
                        ("fp8 verify", ["--dst-dtype", "fp8", "--verify"]), ("fp8 rank 3", ["--dst-dtype", "fp8", "--rank", "3"])):
        assert main(args + extra) == 0
        runs[name] = json.loads(capsys.readouterr().out)
    assert len({r["plan_hash"] for r in runs.values()}) == 1       # the plan itself does not depend on them
    hashes = {name: r["agreement_hash"] for name, r in runs.items()}
    assert hashes["none"] == hashes["bf16"]                         # the model is bf16: nothing is converted
    assert len({hashes[n] for n in ("none", "fp16", "fp8", "fp8 bucket", "fp8 verify")}) == 5
    assert hashes["fp8 rank 3"] == hashes["fp8"]
    # the number a Resharder's ranks compare (its errors print it) for the same options
    model = load_model_spec("config_examples/reshard_model.yaml")
    plan = plan_reshard(load_layout("config_examples/reshard_train.yaml", 16),
                        load_layout("config_examples/reshard_infer.yaml", 16), model)
    fp8 = {t.name: torch.float8_e4m3fn for t in model.tensors if len(t.shape) >= 2}
    context = types.SimpleNamespace(get_global_rank=lambda: 0, config=None)
    for name, kwargs in (("none", {}), ("fp8", {"dst_dtypes": fp8}), ("fp8 bucket", {"dst_dtypes": fp8, "bucket_bytes": 4096}),
                         ("fp8 verify", {"dst_dtypes": fp8, "verify": True})):
        digest = Resharder(plan, context=context, **kwargs).digest
        assert f"{digest & (2 ** 64 - 1):016x}" == hashes[name], name
    assert main(args[:-1] + ["--dst-dtype", "fp8"]) == 0
    assert f"agreement hash {hashes['fp8']}" in capsys.readouterr().out
    assert main(args + ["--bucket-bytes", "0"]) == 2
    assert "--bucket-bytes must be a positive integer, got 0" in capsys.readouterr().err
