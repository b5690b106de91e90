"""Helpers for the functional reshard tests: run layers tensor-parallel on shards and unsharded.

The reference computes from *canonical* weights (Wq, Wk, Wv, Wo, W_gate, W_up, W_down, routed
experts) with plain torch; the sharded run sees only the destination shards a plan produced,
plus which heads each local row block is (read from the spec's sub-blocks), and sums the
partial o_proj / down_proj outputs over the TP group, as Megatron's row-parallel layers do.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from pgroups.reshard import ModelSpec, ParallelLayout, Plan, TensorSpec, cut_shards, empty_shards


def region(tensor: torch.Tensor, box) -> torch.Tensor:
    for dim, (start, stop) in enumerate(box):
        tensor = tensor.narrow(dim, start, stop - start)
    return tensor


def apply_plan(plan: Plan, full: Optional[Mapping[str, torch.Tensor]],
               src: Optional[Mapping[int, Mapping[str, torch.Tensor]]] = None,
               dst: Optional[Mapping[int, Mapping[str, torch.Tensor]]] = None) -> Dict[int, Dict[str, torch.Tensor]]:
    """Run ``plan`` in one process: source shards ``src`` (default: cut from ``full``), destination
    shards ``dst`` (default: new, NaN) receive exactly what the plan's transfers say. Returns
    ``{dst rank: shards}``."""
    if src is None:
        src = {r: cut_shards(plan.src, plan.model, r, full.__getitem__) for r in plan.src.ranks}
    if dst is None:
        dst = {r: empty_shards(plan.dst, plan.model, r, fill=float("nan")) for r in plan.dst.ranks}
    for t in plan.transfers:
        region(dst[t.dst][t.tensor], t.dst_box).copy_(region(src[t.src][t.tensor], t.src_box))
    return dst


def local_heads(spec: TensorSpec, tp_size: int, tp_rank: int) -> List[Tuple[str, int]]:
    """``[(kind, global head)]`` for each ``head_dim`` rows of the local shard, in local order;
    kind is the first letter of the block's name (q / k / v)."""
    heads = []
    for block in spec.blocks:
        start, stop = block.share(tp_size, tp_rank)
        for row in range(start, stop, block.unit):
            heads.append((block.name[0], block.heads.first + row // block.unit))
    return heads


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one head: ``[B, S, hd]`` each."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.triu(torch.ones(q.shape[1], q.shape[1], dtype=torch.bool), 1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), -1) @ v


def reference_attention(x: torch.Tensor, w: Mapping[str, torch.Tensor], heads: int, kv_heads: int) -> torch.Tensor:
    hd = w["q"].shape[0] // heads
    group = heads // kv_heads
    q, k, v = x @ w["q"].T, x @ w["k"].T, x @ w["v"].T
    outs = [attention(q[..., h * hd:(h + 1) * hd], k[..., (h // group) * hd:(h // group + 1) * hd],
                      v[..., (h // group) * hd:(h // group + 1) * hd]) for h in range(heads)]
    return torch.cat(outs, -1) @ w["o"].T


def reference_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def sharded_attention(x: torch.Tensor, shards: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec],
                      names: Mapping[str, str], tp_size: int, tp_rank: int, heads: int, kv_heads: int) -> torch.Tensor:
    """One TP rank's partial attention output. ``names`` maps roles to tensor names: ``qkv`` (fused,
    any block order) or ``q``/``k``/``v``; and ``o``. Raises KeyError if the rank lacks a KV head
    one of its query heads uses."""
    group = heads // kv_heads
    rows: Dict[Tuple[str, int], torch.Tensor] = {}
    order: List[int] = []
    for role in ("qkv",) if "qkv" in names else ("q", "k", "v"):
        spec = specs[names[role]]
        projected = x @ shards[names[role]].T
        hd = spec.blocks[0].unit
        for i, (kind, head) in enumerate(local_heads(spec, tp_size, tp_rank)):
            kind = kind if role == "qkv" else role
            rows[(kind, head)] = projected[..., i * hd:(i + 1) * hd]
            if kind == "q":
                order.append(head)
    outs = []
    for head in order:
        kv = head // group
        if ("k", kv) not in rows or ("v", kv) not in rows:
            raise KeyError(f"TP rank {tp_rank} of {tp_size} holds query head {head} but not KV head {kv}")
        outs.append(attention(rows[("q", head)], rows[("k", kv)], rows[("v", kv)]))
    if not outs:
        return torch.zeros(*x.shape[:-1], shards[names["o"]].shape[0])
    return torch.cat(outs, -1) @ shards[names["o"]].T


def sharded_mlp(x: torch.Tensor, shards: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> torch.Tensor:
    """One TP rank's partial MLP output, from a fused ``gate_up`` shard (``[gate share; up
    share]``) or separate ``gate`` / ``up`` shards, and its ``down`` shard."""
    if "gate_up" in names:
        gate, up = shards[names["gate_up"]].chunk(2, dim=-2)
    else:
        gate, up = shards[names["gate"]], shards[names["up"]]
    return reference_mlp(x, gate, up, shards[names["down"]])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def tp_group(layout: ParallelLayout, stage: int = 0) -> List[int]:
    """Global ranks of TP ranks 0..T-1 of data replica 0 at ``stage``."""
    return [layout.global_rank(tp, stage, 0) for tp in range(layout.topology.tensor)]


def canonical(seed: int, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int) -> Dict[str, torch.Tensor]:
    """Random canonical weights of one decoder layer (fp32)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    return {"q": rand(heads * head_dim, hidden), "k": rand(kv_heads * head_dim, hidden),
            "v": rand(kv_heads * head_dim, hidden), "o": rand(hidden, heads * head_dim),
            "gate": rand(ffn, hidden), "up": rand(ffn, hidden), "down": rand(hidden, ffn),
            "norm1": 1 + 0.1 * torch.randn(hidden, generator=g), "norm2": 1 + 0.1 * torch.randn(hidden, generator=g)}


def sum_over(ranks: Sequence[int], partial) -> torch.Tensor:
    return sum(partial(rank) for rank in ranks)


__all__ = ["ModelSpec", "apply_plan", "attention", "canonical", "local_heads", "reference_attention",
           "reference_mlp", "region", "relative_error", "rms", "sharded_attention", "sharded_mlp", "sum_over",
           "tp_group"]
