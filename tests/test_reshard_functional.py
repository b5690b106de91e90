"""Functional correctness: destination shards compute what the full model computes.

One decoder layer (GQA attention without RoPE, gated MLP) runs tensor-parallel on the shards a
plan delivers — partial o_proj / down_proj outputs summed over the TP group — and must equal the
unsharded layer computed from canonical weights (fp32, 1e-5 relative), for TP 1-8 on each side,
including TP sizes that divide neither head count, in the three QKV layouts (fused [Q;K;V],
Megatron's interleaved per query group, separate q/k/v) and fused / separate gate-up. A TP size
above the query heads is refused before any communication with ReshardError. On 4 gloo ranks
the executor moves TP 4 -> TP 3 and ISP weight 2 x 2 -> TP 3 (``tests/test_reshard_isp.py`` has
the ISP sweep).
"""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch

from pgroups.errors import ReshardError
from pgroups.reshard import (ModelSpec, ParallelLayout, TensorSpec, head_blocks, llama_like, parts_blocks,
                             plan_reshard, qkv_blocks, qkv_interleaved_blocks)
from pgroups.spawn import run_local
from pgroups.topology import Topology

from reshard_compute import (apply_plan, canonical, reference_attention, reference_mlp, relative_error, rms,
                             sharded_attention, sharded_mlp, tp_group)

HIDDEN, HEAD_DIM, FFN, VOCAB = 16, 4, 20, 30


def layout(tensor: int, pipeline: int = 1, data: int = 1, ranks=None, vocab_multiple=None) -> ParallelLayout:
    return ParallelLayout.create(Topology.create(tensor * pipeline * data, tensor, pipeline), ranks,
                                 vocab_multiple=vocab_multiple)


def one_layer(variant: str, heads: int, kv_heads: int, w: Dict[str, torch.Tensor]) -> Tuple[ModelSpec, Dict, Dict]:
    """(model spec, full tensors, role → tensor name) of one layer in QKV layout ``variant``."""
    group = heads // kv_heads
    q, k, v = w["q"], w["k"], w["v"]
    full = {"input_norm": w["norm1"], "post_norm": w["norm2"], "o": w["o"], "down": w["down"],
            "embed": torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(11))}
    specs = [TensorSpec.create("embed", (VOCAB, HIDDEN), "float32", 0, 0, vocab=True),
             TensorSpec.create("input_norm", (HIDDEN,), "float32", None, 0),
             TensorSpec.create("post_norm", (HIDDEN,), "float32", None, 0),
             TensorSpec.create("o", (HIDDEN, heads * HEAD_DIM), "float32", 1, 0,
                               head_blocks(heads, kv_heads, HEAD_DIM, "q")),
             TensorSpec.create("down", (HIDDEN, FFN), "float32", 1, 0)]
    names = {"o": "o", "down": "down"}
    if variant == "separate":
        for role, tensor in (("q", q), ("k", k), ("v", v)):
            blocks = head_blocks(heads, kv_heads, HEAD_DIM, "q" if role == "q" else "kv")
            specs.append(TensorSpec.create(role, tuple(tensor.shape), "float32", 0, 0, blocks))
            full[role], names[role] = tensor, role
        for role in ("gate", "up"):
            specs.append(TensorSpec.create(role, (FFN, HIDDEN), "float32", 0, 0))
            full[role], names[role] = w[role], role
    else:
        if variant == "fused":
            blocks, qkv = qkv_blocks(heads, kv_heads, HEAD_DIM), torch.cat([q, k, v])
        else:   # Megatron: per query group, its q heads, its k head, its v head
            blocks = qkv_interleaved_blocks(heads, kv_heads, HEAD_DIM)
            qkv = torch.cat([part for g in range(kv_heads) for part in (
                q[g * group * HEAD_DIM:(g + 1) * group * HEAD_DIM], k[g * HEAD_DIM:(g + 1) * HEAD_DIM],
                v[g * HEAD_DIM:(g + 1) * HEAD_DIM])])
        specs.append(TensorSpec.create("qkv", tuple(qkv.shape), "float32", 0, 0, blocks))
        specs.append(TensorSpec.create("gate_up", (2 * FFN, HIDDEN), "float32", 0, 0, parts_blocks((FFN, FFN), names=("gate", "up"))))
        full["qkv"], full["gate_up"] = qkv, torch.cat([w["gate"], w["up"]])
        names.update(qkv="qkv", gate_up="gate_up")
    return ModelSpec.create(specs, 1), full, names


def reference_layer(x: torch.Tensor, w: Dict[str, torch.Tensor], heads: int, kv_heads: int) -> torch.Tensor:
    h = x + reference_attention(rms(x, w["norm1"]), w, heads, kv_heads)
    return h + reference_mlp(rms(h, w["norm2"]), w["gate"], w["up"], w["down"])


def sharded_layer(x: torch.Tensor, shards: Dict[int, Dict[str, torch.Tensor]], model: ModelSpec, names: Dict,
                  dst: ParallelLayout, heads: int, kv_heads: int, stage: int = 0) -> torch.Tensor:
    ranks = tp_group(dst, stage)
    specs = {t.name: t for t in model.tensors}
    tp_size = len(ranks)
    attn = sum(sharded_attention(rms(x, shards[r]["input_norm"]), shards[r], specs, names, tp_size, tp, heads,
                                 kv_heads) for tp, r in enumerate(ranks))
    h = x + attn
    return h + sum(sharded_mlp(rms(h, shards[r]["post_norm"]), shards[r], names) for r in ranks)


CASES = [(variant, heads, kv) for variant in ("fused", "interleaved", "separate") for heads, kv in ((8, 2), (6, 3))]


@pytest.mark.parametrize("variant, heads, kv_heads", CASES)
def test_destination_shards_compute_the_unsharded_layer_for_tp_1_to_8(variant, heads, kv_heads):
    w = canonical(heads * 10 + kv_heads, HIDDEN, heads, kv_heads, HEAD_DIM, FFN)
    model, full, names = one_layer(variant, heads, kv_heads, w)
    x = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(1))
    want = reference_layer(x, w, heads, kv_heads)
    checked = refused = 0
    for src_tp in range(1, 9):
        for dst_tp in range(1, 9):
            # source TP ranks 0..S-1, destination TP ranks on 2..T+1: overlapping, with local copies
            src, dst = layout(src_tp), layout(dst_tp, ranks=list(range(2, dst_tp + 2)))
            if max(src_tp, dst_tp) > heads:
                side, size = ("source", src_tp) if src_tp > heads else ("destination", dst_tp)
                with pytest.raises(ReshardError, match=rf"{side} layout .*: tensor '\w+': {heads} query heads / "
                                                       rf"{kv_heads} KV heads cannot be split over tensor parallel "
                                                       rf"size {size}: TP rank {heads} would hold no query head"):
                    plan_reshard(src, dst, model)
                refused += 1
                continue
            plan = plan_reshard(src, dst, model)
            assert plan.ratio == 1.0
            shards = apply_plan(plan, full)
            assert not any(t.isnan().any() for s in shards.values() for t in s.values()), "a byte was not delivered"
            got = sharded_layer(x, shards, model, names, dst, heads, kv_heads)
            assert relative_error(got, want) < 1e-5, f"{variant} {heads}/{kv_heads} heads: TP {src_tp} -> {dst_tp}"
            checked += 1
    assert checked == min(8, heads) ** 2 and refused == 64 - checked


def test_issue_case_tp4_pp2_to_tp3_llama_like_computes():
    # 8 query heads, 2 KV heads: tp 3 > 2 KV heads → query heads 3/3/2, KV heads the ones they use
    model = llama_like(hidden=32, layers=2, heads=8, kv_heads=2, ffn=24, vocab=40, dtype="float32")
    plan = plan_reshard(layout(4, 2), layout(3, ranks=[2, 3, 4]), model)
    hd = 4
    qkv, o = model["layers.0.attn.qkv.weight"], model["layers.0.attn.o.weight"]
    # rank 2 (tp 0 of 3): q heads 0-2 and o_proj's input columns of exactly those heads
    assert qkv.pieces(3, 0) == ((0, 3 * hd, 0), (8 * hd, 9 * hd, 3 * hd), (10 * hd, 11 * hd, 4 * hd))
    assert o.pieces(3, 0) == ((0, 3 * hd, 0),)
    # rank 3 (tp 1 of 3): q heads 3-5 use KV heads 0 and 1: it holds both
    assert qkv.pieces(3, 1) == ((3 * hd, 6 * hd, 0), (8 * hd, 10 * hd, 3 * hd), (10 * hd, 12 * hd, 5 * hd))
    assert o.pieces(3, 1) == ((3 * hd, 6 * hd, 0),)
    assert plan.ratio == 1.0


def test_issue_case_6_heads_3_kv_heads_tp2_holds_the_kv_heads_it_uses():
    spec = TensorSpec.create("qkv", (12, 1), "float32", 0, 0, qkv_blocks(6, 3, 1))
    # whole query groups: rank 0 groups 0-1 (q 0-3, kv 0-1), rank 1 group 2 (q 4-5, kv 2)
    assert spec.pieces(2, 0) == ((0, 4, 0), (6, 8, 4), (9, 11, 6))
    assert spec.pieces(2, 1) == ((4, 6, 0), (8, 9, 2), (11, 12, 3))


# ---- end to end on real gloo processes ------------------------------------------------------------------
# tp 4 -> tp 3: uneven heads; the 30-row vocabulary padded to 32 (8 per rank) on the source and to 36
# (12 per rank) on the destination, whose last rank zero-fills 6 padding rows
E2E = {"heads": 8, "kv_heads": 2, "src_tp": 4, "dst_ranks": [1, 2, 3], "src_vocab_multiple": 2,
       "dst_vocab_multiple": 4}


def e2e_worker(variant: str) -> Dict[str, list]:
    """Reshard one layer from TP 4 (ranks 0-3) to TP 3 (ranks 1-3) with the executor; return
    this rank's destination shards (as lists: tensors would travel by shared memory)."""
    from pgroups import gpc
    from pgroups.reshard import cut_shards, empty_shards, execute_plan, plan_share

    gpc.init_from_config({"parallel": {"tensor": 1, "pipeline": 1}, "backend": "gloo", "timeout_s": 60,
                          "groups": "lazy"})
    heads, kv_heads = E2E["heads"], E2E["kv_heads"]
    model, full, _ = one_layer(variant, heads, kv_heads, canonical(5, HIDDEN, heads, kv_heads, HEAD_DIM, FFN))
    src = layout(E2E["src_tp"], vocab_multiple=E2E["src_vocab_multiple"])
    dst = layout(len(E2E["dst_ranks"]), ranks=E2E["dst_ranks"], vocab_multiple=E2E["dst_vocab_multiple"])
    rank = gpc.get_global_rank()
    result = {}
    # then the same layer from ISP shards (weight 2 x weight_data 2: rows of dim 0, WeightParallel's)
    isp = ParallelLayout.create(Topology.create(4, 1, 1, weight=2), isp=True)
    for label, source, target in (("tp", src, dst), ("isp", isp, layout(len(E2E["dst_ranks"]), ranks=E2E["dst_ranks"]))):
        share = plan_share(source, target, model, rank, gpc.get_hostnames())
        mine = empty_shards(target, model, rank, fill=float("nan"))
        execute_plan(share, cut_shards(source, model, rank, full.__getitem__), mine, timeout_s=30)
        result[label] = {name: tensor.tolist() for name, tensor in mine.items()}
    gpc.destroy()
    return result


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
@pytest.mark.parametrize("variant", ["interleaved", "separate"])
def test_gloo_reshard_tp4_to_tp3_computes_the_unsharded_layer(variant):
    """TP 4 -> TP 3, and ISP weight 2 x 2 -> TP 3, with the executor on 4 gloo ranks."""
    outcomes = run_local(4, e2e_worker, (variant,), timeout_s=170, env={"OMP_NUM_THREADS": "1"})
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    heads, kv_heads = E2E["heads"], E2E["kv_heads"]
    w = canonical(5, HIDDEN, heads, kv_heads, HEAD_DIM, FFN)
    model, full, names = one_layer(variant, heads, kv_heads, w)
    shards = {o.rank: {name: torch.tensor(v) for name, v in o.value["tp"].items()} for o in outcomes}
    embed = full["embed"]
    assert torch.equal(shards[3]["embed"][:6], embed[24:]) and shards[3]["embed"].shape[0] == 12
    assert (shards[3]["embed"][6:] == 0).all(), "vocabulary padding rows are zero-filled"
    assert torch.equal(torch.cat([shards[1]["embed"], shards[2]["embed"]]), embed[:24])
    x = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(2))
    dst = layout(len(E2E["dst_ranks"]), ranks=E2E["dst_ranks"])
    got = sharded_layer(x, shards, model, names, dst, heads, kv_heads)
    assert relative_error(got, reference_layer(x, w, heads, kv_heads)) < 1e-5
    from_isp = {o.rank: {name: torch.tensor(v) for name, v in o.value["isp"].items()} for o in outcomes}
    got = sharded_layer(x, from_isp, model, names, dst, heads, kv_heads)
    assert relative_error(got, reference_layer(x, w, heads, kv_heads)) < 1e-5, "from ISP shards"
