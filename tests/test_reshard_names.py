"""Name maps and fused-layout conversion.

After a reshard, each destination rank turns its shards of fused QKV (Megatron's interleaved or
[Q;K;V]) and fused gate/up into separate q/k/v and gate/up shards under new names, locally; the
result equals the shards of the separate-tensor model bit for bit and computes the unsharded layer.

Separate → fused (an HF checkpoint, or a vLLM-style separate TP layout, into Megatron's layouts),
fused locally on the source or converted inside the transfer (one reshard of sub-blocks on row
views, also on the gloo executor): equal bit for bit to Megatron-Core's TP shards as its rules
give them (re-derived here), at the lower bound, and the layer computes on them for TP 1-8."""
from __future__ import annotations

import json

import attrs
import pytest
import torch

from pgroups.errors import ConfigError
from pgroups.reshard import cut_shards, empty_shards, llama_like, plan_reshard
from pgroups.reshard.names import (LLAMA, convert_shards, fuse_shards, load_name_map, separate_model, sub_block_model,
                                   sub_block_views)

from reshard_compute import apply_plan, canonical, relative_error
from test_reshard_functional import FFN, HEAD_DIM, HIDDEN, layout, one_layer, reference_layer, sharded_layer

SPLIT = load_name_map({"name": "split", "tensors": {"qkv": {"q": "q", "k": "k", "v": "v"},
                                                     "gate_up": {"gate": "gate", "up": "up"}}})


@pytest.mark.parametrize("variant", ["fused", "interleaved"])
@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (6, 3)])
def test_fused_shards_split_locally_into_the_separate_models_shards_and_compute(variant, heads, kv_heads):
    w = canonical(3, HIDDEN, heads, kv_heads, HEAD_DIM, FFN)
    model, full, _ = one_layer(variant, heads, kv_heads, w)
    separate, separate_full, names = one_layer("separate", heads, kv_heads, w)
    x = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(4))
    want = reference_layer(x, w, heads, kv_heads)
    for dst_tp in range(1, heads + 1):
        dst = layout(dst_tp, ranks=list(range(1, dst_tp + 1)))
        shards = apply_plan(plan_reshard(layout(2), dst, model), full)
        converted = {r: convert_shards(shards[r], model, dst, r, SPLIT) for r in dst.ranks}
        for r in dst.ranks:
            expected = cut_shards(dst, separate, r, separate_full.__getitem__)
            assert converted[r].keys() == expected.keys()
            assert all(torch.equal(converted[r][n], t) for n, t in expected.items()), f"TP {dst_tp} rank {r}"
        got = sharded_layer(x, converted, separate, names, dst, heads, kv_heads)
        assert relative_error(got, want) < 1e-5, f"{variant} TP {dst_tp}"


def test_llama_map_gives_hugging_face_names_and_shards():
    model = llama_like(hidden=32, layers=2, heads=8, kv_heads=2, ffn=24, vocab=40, dtype="float32")
    full = {t.name: torch.randn(t.shape) for t in model.tensors}
    dst = layout(3, ranks=[2, 3, 4])
    shards = apply_plan(plan_reshard(layout(4, 2), dst, model), full)
    hf = convert_shards(shards[3], model, dst, 3, LLAMA)   # tp 1 of 3: q heads 3-5, KV heads 0-1
    assert "model.layers.1.self_attn.q_proj.weight" in hf and "model.embed_tokens.weight" in hf
    assert "lm_head.weight" in hf and not any(name.startswith("layers.") for name in hf)
    hd, qkv = 4, full["layers.1.attn.qkv.weight"]
    assert torch.equal(hf["model.layers.1.self_attn.q_proj.weight"], qkv[3 * hd:6 * hd])
    assert torch.equal(hf["model.layers.1.self_attn.k_proj.weight"], qkv[8 * hd:10 * hd])
    assert torch.equal(hf["model.layers.1.self_attn.v_proj.weight"], qkv[10 * hd:12 * hd])
    gate_up = full["layers.0.mlp.gate_up.weight"]                # ffn 24 over 3 ranks: rows 8-15
    assert torch.equal(hf["model.layers.0.mlp.gate_proj.weight"], gate_up[8:16])
    assert torch.equal(hf["model.layers.0.mlp.up_proj.weight"], gate_up[24 + 8:24 + 16])
    assert hf["model.layers.0.mlp.gate_proj.weight"].data_ptr() == shards[3]["layers.0.mlp.gate_up.weight"].data_ptr()


def test_name_map_yaml_and_errors():
    names = load_name_map('name: mine\ntensors: {"layers.{layer}.w": "model.layers.{layer}.weight"}')
    assert names.target("layers.12.w") == "model.layers.12.weight" and names.target("other") == "other"
    assert load_name_map("llama") is LLAMA
    with pytest.raises(ConfigError, match="a name map needs 'tensors:'.*shipped maps: llama"):
        load_name_map("name: x\n")
    with pytest.raises(ConfigError, match=r"tensors.w: expected a new name or \{role: new name\}"):
        load_name_map({"tensors": {"w": 3}})
    model = llama_like(hidden=8, layers=1, heads=2, kv_heads=1, ffn=4, vocab=6, dtype="float32")
    bad = load_name_map({"tensors": {"layers.{layer}.attn.qkv.weight": {"query": "q"}}})
    shards = cut_shards(layout(1), model, 0, lambda n: torch.zeros(model[n].shape))
    with pytest.raises(ConfigError, match=r"tensor 'layers.0.attn.qkv.weight' has no sub-block role 'query'; "
                                          r"its roles: k, q, v"):
        convert_shards(shards, model, layout(1), 0, bad)


# ---- separate → fused: an HF checkpoint (or a vLLM-style separate layout) into Megatron's layouts ------------
def megatron_shards(w, heads: int, kv_heads: int, variant: str, tp_size: int) -> list:
    """Megatron-Core's TP shards of the fused weights, from its rules (written here, not from
    pgroups): linear_qkv is, per query group g, [g's query heads; k_g; v_g] ("interleaved"; vLLM's
    QKVParallelLinear: per rank [its q; its k; its v], "fused"), split into ``tp_size`` equal
    row chunks; fc1 of a gated MLP is, per rank, [its gate rows; its up rows]; linear_proj and fc2
    split their input columns."""
    hd = w["q"].shape[0] // heads
    if variant == "interleaved":
        q = w["q"].view(kv_heads, heads // kv_heads * hd, -1)
        k, v = w["k"].view(kv_heads, hd, -1), w["v"].view(kv_heads, hd, -1)
        qkv = torch.cat([q, k, v], dim=1).reshape(-1, w["q"].shape[1]).chunk(tp_size)
    else:
        qkv = [torch.cat(parts) for parts in zip(*(w[r].chunk(tp_size) for r in "qkv"))]
    return [{"qkv": qkv[k], "gate_up": torch.cat([w["gate"].chunk(tp_size)[k], w["up"].chunk(tp_size)[k]]),
             "o": w["o"].chunk(tp_size, 1)[k], "down": w["down"].chunk(tp_size, 1)[k]} for k in range(tp_size)]


def vllm_separate_shards(full, tp_size: int) -> list:
    """Separate q / k / v / gate / up shards of a TP layout as vLLM-style engines split them when TP
    divides the KV heads: contiguous equal row chunks (o / down by columns, norms whole)."""
    cols = {"o", "down"}
    return [{n: (t if t.dim() == 1 else t.tensor_split(tp_size, 1 if n in cols else 0)[k]).contiguous()
             for n, t in full.items()} for k in range(tp_size)]


def test_fusing_is_the_inverse_of_splitting_with_the_llama_map():
    model = llama_like(hidden=32, layers=2, heads=8, kv_heads=2, ffn=24, vocab=40, dtype="float32", experts=0)
    full = {t.name: torch.randn(t.shape) for t in model.tensors}
    for tp in (1, 3, 4):
        lay = layout(tp, 2)
        for r in lay.ranks:
            shards = cut_shards(lay, model, r, full.__getitem__)
            hf = convert_shards(shards, model, lay, r, LLAMA)
            assert "model.layers.0.self_attn.k_proj.weight" in hf or "lm_head.weight" in hf
            back = fuse_shards(hf, model, lay, r, LLAMA)
            assert back.keys() == shards.keys() and all(torch.equal(back[n], t) for n, t in shards.items())


def test_fuse_errors_name_the_tensor():
    model = llama_like(hidden=8, layers=1, heads=2, kv_heads=1, ffn=4, vocab=6, dtype="float32")
    sep = separate_model(model, LLAMA)
    full = {t.name: torch.zeros(t.shape) for t in sep.tensors}
    lay = layout(2)
    shards = cut_shards(lay, sep, 0, full.__getitem__)
    del shards["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ConfigError, match=r"rank 0: tensor 'model.layers.0.mlp.up_proj.weight' \(part of "
                                          r"'layers.0.mlp.gate_up.weight' under name map 'llama'\) is not among"):
        fuse_shards(shards, model, lay, 0, LLAMA)
    whole = dict(full)                      # unsharded tensors given to TP rank 0 of 2
    with pytest.raises(ConfigError, match=r"tensor 'model.layers.0.self_attn.q_proj.weight' has 8 rows on dim 0, "
                                          r"but its part of 'layers.0.attn.qkv.weight' on this rank \(TP rank 0 of 2\) "
                                          r"has 4"):
        fuse_shards(whole, model, lay, 0, LLAMA)
    partial = load_name_map({"tensors": {"layers.{layer}.attn.qkv.weight": {"q": "q", "k": "k"}}})
    with pytest.raises(ConfigError, match=r"has sub-block roles k, q, v but the map names k, q; to fuse, name every"):
        separate_model(model, partial)


# ---- locally or inside the transfer (one reshard of sub-blocks, each side's shards as views) ----------------
def nan_shards(lay, model):
    return {r: empty_shards(lay, model, r, fill=float("nan")) for r in lay.ranks}


def separate_to_fused(way: str, model, src, separate, dst):
    """Reshard separate shards on ``src`` into ``model``'s fused shards on ``dst``: fused locally on
    the source first, or converted inside the transfer (sub-block reshard on views). Returns
    ``(fused shards per dst rank, the plan that ran)``."""
    if way == "local":
        plan = plan_reshard(src, dst, model)
        return apply_plan(plan, None, {r: fuse_shards(separate[r], model, src, r, SPLIT) for r in src.ranks}), plan
    views = {r: sub_block_views(separate[r], model, src, r, SPLIT, separate=True) for r in src.ranks}
    assert all(v.untyped_storage().data_ptr() in {t.untyped_storage().data_ptr() for t in separate[r].values()}
               for r in src.ranks for v in views[r].values()), "views, not copies"
    plan, fused = plan_reshard(src, dst, sub_block_model(model, SPLIT)), nan_shards(dst, model)
    apply_plan(plan, None, views, {r: sub_block_views(fused[r], model, dst, r, SPLIT, separate=False)
                                   for r in dst.ranks})
    return fused, plan


@pytest.mark.parametrize("way", ["local", "in-transfer"])
@pytest.mark.parametrize("variant", ["interleaved", "fused"])
@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (6, 3)])
def test_separate_shards_become_megatrons_fused_shards_bit_exact_at_the_lower_bound(way, variant, heads, kv_heads):
    w = canonical(5, HIDDEN, heads, kv_heads, HEAD_DIM, FFN)
    model, _, names = one_layer(variant, heads, kv_heads, w)
    _, separate_full, _ = one_layer("separate", heads, kv_heads, w)
    assert {t.name: t.shape for t in separate_model(model, SPLIT).tensors} == {
        n: tuple(t.shape) for n, t in separate_full.items()}
    x = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(6))
    want = reference_layer(x, w, heads, kv_heads)
    for src_tp in (1, kv_heads):          # an HF checkpoint (TP 1), a separate TP layout
        src = layout(src_tp)
        separate = vllm_separate_shards(separate_full, src_tp)
        for dst_tp in range(1, heads + 1):
            dst = layout(dst_tp, ranks=list(range(1, dst_tp + 1)))
            fused, plan = separate_to_fused(way, model, src, separate, dst)
            assert plan.ratio == 1.0 and plan.received_bytes == plan_reshard(src, dst, model).lower_bound_bytes
            case = f"{way} {variant}: separate TP {src_tp} -> fused TP {dst_tp}"
            assert not any(t.isnan().any() for s in fused.values() for t in s.values()), f"{case}: a row not written"
            if kv_heads % dst_tp == 0:    # Megatron's layouts exist: equal to them bit for bit
                for k, expected in enumerate(megatron_shards(w, heads, kv_heads, variant, dst_tp)):
                    got = fused[dst.global_rank(k)]
                    assert all(torch.equal(got[n], t) for n, t in expected.items()), f"{case}: TP rank {k}"
            assert relative_error(sharded_layer(x, fused, model, names, dst, heads, kv_heads), want) < 1e-5, case


def test_fused_to_separate_inside_the_transfer_gives_the_separate_layouts_shards():
    heads, kv_heads = 8, 2
    w = canonical(9, HIDDEN, heads, kv_heads, HEAD_DIM, FFN)
    model, _, _ = one_layer("interleaved", heads, kv_heads, w)
    _, separate_full, _ = one_layer("separate", heads, kv_heads, w)
    sub, sep = sub_block_model(model, SPLIT), separate_model(model, SPLIT)
    for src_tp, dst_tp in ((2, 1), (2, 2), (1, 2), (1, 1)):   # Megatron needs TP | query groups
        src, dst = layout(src_tp), layout(dst_tp, ranks=list(range(3, 3 + dst_tp)))
        megatron = megatron_shards(w, heads, kv_heads, "interleaved", src_tp)   # Megatron's own shards
        rest = vllm_separate_shards({n: separate_full[n] for n in ("embed", "input_norm", "post_norm")}, src_tp)
        fused_src = {src.global_rank(k): {**rest[k], **megatron[k]} for k in range(src_tp)}
        out = {r: empty_shards(dst, sep, r, fill=float("nan")) for r in dst.ranks}
        apply_plan(plan_reshard(src, dst, sub),
                   None, {r: sub_block_views(fused_src[r], model, src, r, SPLIT, separate=False) for r in src.ranks},
                   {r: sub_block_views(out[r], model, dst, r, SPLIT, separate=True) for r in dst.ranks})
        for k, expected in enumerate(vllm_separate_shards(separate_full, dst_tp)):
            got = out[dst.global_rank(k)]
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[n], t) for n, t in expected.items()), f"TP {src_tp} -> {dst_tp}: rank {k}"


def e2e_worker(heads: int, kv_heads: int) -> dict:
    """An HF checkpoint on rank 0 (TP 1, separate q/k/v, gate/up) → Megatron's interleaved fused
    layout at TP 2 on ranks 1-2, by the executor on gloo: the sub-block reshard writes straight
    into the fused destination shards. Returns this rank's fused shards (as lists)."""
    from pgroups import gpc
    from pgroups.reshard import execute_plan, plan_share

    gpc.init_from_config({"parallel": {"tensor": 1, "pipeline": 1}, "backend": "gloo", "timeout_s": 60,
                          "groups": "lazy"})
    w = canonical(11, HIDDEN, heads, kv_heads, HEAD_DIM, FFN)
    model, _, _ = one_layer("interleaved", heads, kv_heads, w)
    _, separate_full, _ = one_layer("separate", heads, kv_heads, w)
    src, dst = layout(1), layout(2, ranks=[1, 2])
    rank = gpc.get_global_rank()
    share = plan_share(src, dst, sub_block_model(model, SPLIT), rank, gpc.get_hostnames())
    source = sub_block_views(separate_full, model, src, rank, SPLIT, separate=True) if rank in src else {}
    fused = empty_shards(dst, model, rank, fill=float("nan")) if rank in dst else {}
    target = sub_block_views(fused, model, dst, rank, SPLIT, separate=False) if rank in dst else {}
    execute_plan(share, source, target, timeout_s=30)
    gpc.destroy()
    return {name: tensor.tolist() for name, tensor in fused.items()}


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_gloo_executor_converts_an_hf_checkpoint_into_megatrons_layout_inside_the_transfer():
    from pgroups.spawn import run_local

    heads, kv_heads = 8, 2
    outcomes = run_local(3, e2e_worker, (heads, kv_heads), timeout_s=170, env={"OMP_NUM_THREADS": "1"})
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    w = canonical(11, HIDDEN, heads, kv_heads, HEAD_DIM, FFN)
    shards = {o.rank: {n: torch.tensor(v) for n, v in o.value.items()} for o in outcomes}
    for k, expected in enumerate(megatron_shards(w, heads, kv_heads, "interleaved", 2)):
        assert all(torch.equal(shards[1 + k][n], t) for n, t in expected.items()), f"TP rank {k}"


def test_sub_block_conversion_refuses_what_views_cannot_hold():
    moe = llama_like(hidden=8, layers=1, heads=2, kv_heads=1, ffn=4, vocab=6, dtype="float32", experts=2)
    grouped = load_name_map({"name": "experts", "tensors": {
        "layers.{layer}.mlp.experts.gate_up.weight": {"gate": "gate", "up": "up"}}})
    with pytest.raises(ConfigError, match=r"tensor 'layers.0.mlp.experts.gate_up.weight' is split on dim 1: converting "
                                          r"it inside the transfer needs dim 0 .* fuse_shards / convert_shards"):
        sub_block_model(moe, grouped)
    model = llama_like(hidden=8, layers=1, heads=2, kv_heads=1, ffn=4, vocab=6, dtype="float32")
    sep = separate_model(model, LLAMA)
    shards = cut_shards(layout(2), sep, 1, lambda n: torch.zeros(sep[n].shape))
    del shards["model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(ConfigError, match=r"rank 1: tensor 'model.layers.0.self_attn.v_proj.weight' is not among"):
        sub_block_views(shards, model, layout(2), 1, LLAMA, separate=True)
    whole = {t.name: torch.zeros(t.shape) for t in model.tensors}   # unsharded fused tensors on TP rank 1 of 2
    with pytest.raises(ConfigError, match=r"rank 1: tensor 'layers.0.attn.qkv.weight' has shape \(16, 8\); TP rank 1 "
                                          r"of 2 holds \(12, 8\)"):
        sub_block_views(whole, model, layout(2), 1, LLAMA, separate=False)


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (6, 3)])
def test_megatron_interleaved_to_vllm_fused_qkv_inside_the_transfer(heads, kv_heads):
    """Megatron's interleaved QKV (TP | query groups) → vLLM's per-rank [q; k; v] at every TP 1-8:
    one sub-block reshard, each side's views of its own fused layout."""
    w = canonical(13, HIDDEN, heads, kv_heads, HEAD_DIM, FFN)
    megatron_model, _, _ = one_layer("interleaved", heads, kv_heads, w)
    vllm_model, _, names = one_layer("fused", heads, kv_heads, w)
    sub = sub_block_model(megatron_model, SPLIT)
    assert sub == attrs.evolve(sub_block_model(vllm_model, SPLIT), name=sub.name), "the same sub-blocks"
    _, separate_full, _ = one_layer("separate", heads, kv_heads, w)
    rest = vllm_separate_shards({n: separate_full[n] for n in ("embed", "input_norm", "post_norm")}, kv_heads)
    src = layout(kv_heads)
    source = {src.global_rank(k): {**rest[k], **m}
              for k, m in enumerate(megatron_shards(w, heads, kv_heads, "interleaved", kv_heads))}
    views = {r: sub_block_views(source[r], megatron_model, src, r, SPLIT, separate=False) for r in src.ranks}
    x = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(14))
    want = reference_layer(x, w, heads, kv_heads)
    for dst_tp in range(1, heads + 1):
        dst = layout(dst_tp, ranks=list(range(2, dst_tp + 2)))
        plan = plan_reshard(src, dst, sub)
        assert plan.ratio == 1.0 and plan.received_bytes == plan_reshard(src, dst, vllm_model).lower_bound_bytes
        fused = nan_shards(dst, vllm_model)
        apply_plan(plan, None, views, {r: sub_block_views(fused[r], vllm_model, dst, r, SPLIT, separate=False)
                                       for r in dst.ranks})
        if kv_heads % dst_tp == 0:
            for k, expected in enumerate(megatron_shards(w, heads, kv_heads, "fused", dst_tp)):
                got = fused[dst.global_rank(k)]
                assert all(torch.equal(got[n], t) for n, t in expected.items()), f"TP {dst_tp}: rank {k}"
        got = sharded_layer(x, fused, vllm_model, names, dst, heads, kv_heads)
        assert relative_error(got, want) < 1e-5, f"interleaved TP {kv_heads} -> [q;k;v] TP {dst_tp}"


# ---- a map is one-to-one; YAML names the roles of fused parts -------------------------------------------------
@pytest.mark.parametrize("tensors, first, second, new", [
    ({"layers.{layer}.input_norm.weight": "norm", "layers.{layer}.post_norm.weight": "norm"},
     "'layers.0.input_norm.weight'", "'layers.0.post_norm.weight'", "norm"),
    ({"embed.weight": "norm.weight"}, "'embed.weight'", "'norm.weight'", "norm.weight"),   # onto an unmapped name
    ({"layers.{layer}.attn.qkv.weight": {"q": "x", "k": "x", "v": "v"}},
     "'layers.0.attn.qkv.weight' (role q)", "'layers.0.attn.qkv.weight' (role k)", "x"),
])
def test_a_map_sending_two_sources_to_one_name_is_refused_naming_both(tensors, first, second, new):
    model = llama_like(hidden=8, layers=1, heads=2, kv_heads=1, ffn=4, vocab=6, dtype="float32")
    names = load_name_map({"name": "clash", "tensors": tensors})
    lay = layout(1)
    shards = cut_shards(lay, model, 0, lambda n: torch.zeros(model[n].shape))
    message = (f"name map 'clash' sends both {first} and {second} to '{new}'").replace("(", r"\(").replace(")", r"\)")
    for call in (lambda: convert_shards(shards, model, lay, 0, names), lambda: separate_model(model, names),
                 lambda: fuse_shards(shards, model, lay, 0, names)):
        with pytest.raises(ConfigError, match=message):
            call()
    if not isinstance(next(iter(tensors.values())), str):
        with pytest.raises(ConfigError, match=message):
            sub_block_model(model, names)
    # every tensor in, every tensor out, when the names are distinct
    fine = load_name_map({"tensors": {"layers.{layer}.input_norm.weight": "n1", "layers.{layer}.post_norm.weight": "n2"}})
    assert len(convert_shards(shards, model, lay, 0, fine)) == len(shards) == len(model.tensors)


MEGATRON_YAML = """
name: megatron-in-yaml
num_layers: 2
dtype: float32
tensors:
  - {name: embed.weight, shape: [40, 32], tp_dim: 0, layer: embedding}
  - {name: "layers.{layer}.input_norm.weight", shape: [32]}
  - name: "layers.{layer}.attn.qkv.weight"
    shape: [48, 32]                      # 8 q heads + 2 k + 2 v heads of 4
    tp_dim: 0
    fused: {qkv_interleaved: {heads: 8, kv_heads: 2, head_dim: 4}}
  - name: "layers.{layer}.attn.o.weight"
    shape: [32, 32]
    tp_dim: 1
    fused: {heads: {heads: 8, kv_heads: 2, head_dim: 4}}
  - {name: "layers.{layer}.post_norm.weight", shape: [32]}
  - name: "layers.{layer}.mlp.gate_up.weight"
    shape: [48, 32]
    tp_dim: 0
    fused: {parts: {sizes: [24, 24], names: [gate, up]}}
  - {name: "layers.{layer}.mlp.down.weight", shape: [32, 24], tp_dim: 1}
  - {name: norm.weight, shape: [32], layer: head}
  - {name: lm_head.weight, shape: [40, 32], tp_dim: 0, layer: head}
"""


def test_the_llama_map_converts_a_megatron_model_declared_in_yaml():
    from pgroups.reshard import load_model_spec
    model = load_model_spec(MEGATRON_YAML)
    assert [b.name for b in model["layers.0.mlp.gate_up.weight"].blocks] == ["gate", "up"]
    w = {"q": torch.randn(32, 32), "k": torch.randn(8, 32), "v": torch.randn(8, 32), "gate": torch.randn(24, 32),
         "up": torch.randn(24, 32)}
    for tp_size in (1, 2):
        for k, mega in enumerate(megatron_shards({**w, "o": torch.randn(32, 32), "down": torch.randn(32, 24)},
                                                 8, 2, "interleaved", tp_size)):
            lay = layout(tp_size)
            shards = cut_shards(lay, model, k, lambda n: torch.randn(model[n].shape))
            shards["layers.1.attn.qkv.weight"], shards["layers.1.mlp.gate_up.weight"] = mega["qkv"], mega["gate_up"]
            hf = convert_shards(shards, model, lay, k, LLAMA)
            p = "model.layers.1."
            # Hugging Face's separate tensors, cut as the row chunks a TP rank of a separate layout holds
            for name, full in ((p + "self_attn.q_proj.weight", w["q"]), (p + "self_attn.k_proj.weight", w["k"]),
                               (p + "self_attn.v_proj.weight", w["v"]), (p + "mlp.gate_proj.weight", w["gate"]),
                               (p + "mlp.up_proj.weight", w["up"])):
                assert torch.equal(hf[name], full.chunk(tp_size)[k]), (tp_size, k, name)
            assert len(hf) == len(shards) + 3 * 2     # qkv → 3 and gate_up → 2 in each of 2 layers


@pytest.mark.parametrize("parts, message", [
    ("{sizes: [2, 2], names: [gate]}", r"fused.parts.names must be 2 distinct names, one per size"),
    ("{sizes: [2, 2], names: [gate, gate]}", r"fused.parts.names must be 2 distinct names"),
    ("{sizes: [2, 2], name: [gate, up]}", r"fused.parts.name: unknown key \(did you mean 'names'\?\)"),
])
def test_bad_part_names_raise_one_clear_config_error(parts, message):
    from pgroups.reshard import load_model_spec
    with pytest.raises(ConfigError, match=message):
        load_model_spec(f"tensors: [{{name: a, shape: [4], layer: 0, tp_dim: 0, fused: {{parts: {parts}}}}}]")


def test_the_shipped_model_example_converts_under_the_llama_map(capsys):
    from pgroups.cli import main
    args = ["reshard-plan", "config_examples/reshard_train.yaml", "config_examples/reshard_infer.yaml",
            "--world-size", "16", "--model", "config_examples/reshard_model.yaml"]
    for side in ("--src-names", "--dst-names"):
        assert main(args + [side, "llama", "--json"]) == 0, capsys.readouterr().err
        data = json.loads(capsys.readouterr().out)
        names = data["names"][side[2:5]]
        # 4 layers x (qkv, gate_up) split by role; every tensor but lm_head (same name in HF) renamed
        assert names["fused"] == 8 and names["renamed"] == 3 + 5 * 4 - 1 and data["ratio"] == 1.0
