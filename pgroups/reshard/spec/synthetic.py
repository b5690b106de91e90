"""A synthetic Llama-style decoder (dense or MoE) with Megatron's TP dims, for planning, tests and
benchmarks without a checkpoint. Pure: no processes."""
from __future__ import annotations

from typing import Any, List, Optional

from .model import EMBEDDING, HEAD, TIED, Experts, ModelSpec, TensorSpec, head_blocks, parts_blocks, qkv_blocks


def llama_like(hidden: int = 4096, layers: int = 32, heads: int = 32, kv_heads: int = 8,
               ffn: int = 14336, vocab: int = 128256, dtype: Any = "bfloat16",
               name: str = "llama-like", experts: int = 0, expert_ffn: Optional[int] = None,
               shared_ffn: int = 0, grouped_experts: bool = True, tied_embeddings: bool = False) -> ModelSpec:
    """A Llama-style decoder with fused QKV (GQA) and fused gate/up, Megatron TP dims:
    embedding and head split by vocab, QKV and gate/up by output rows, o_proj (by query heads)
    and down_proj by input columns, norms replicated. The defaults are Llama-3-8B's shapes.

    ``experts > 0`` makes every MLP a routed MoE: a router ``[E, hidden]`` (replicated), the
    experts' gate/up and down — grouped ``[E, …]`` weights (``grouped_experts``) or one tensor per
    expert — of ``expert_ffn`` (default ``ffn``) placed by EP / expert TP, and, with
    ``shared_ffn > 0``, a shared expert (a dense MLP). ``tied_embeddings``: one ``embed.weight``
    held by the first and last stage, no ``lm_head.weight``."""
    head_dim = hidden // heads
    qkv = qkv_blocks(heads, kv_heads, head_dim)
    o_heads = head_blocks(heads, kv_heads, head_dim, "q")
    specs = [TensorSpec.create("embed.weight", (vocab, hidden), dtype, 0, TIED if tied_embeddings else EMBEDDING,
                               vocab=True)]
    for i in range(layers):
        p = f"layers.{i}."
        specs += [
            TensorSpec.create(p + "input_norm.weight", (hidden,), dtype, None, i),
            TensorSpec.create(p + "attn.qkv.weight", (sum(b.size for b in qkv), hidden), dtype, 0, i, qkv),
            TensorSpec.create(p + "attn.o.weight", (hidden, heads * head_dim), dtype, 1, i, o_heads),
            TensorSpec.create(p + "post_norm.weight", (hidden,), dtype, None, i),
        ]
        if experts:
            specs += _moe_specs(p + "mlp.", i, hidden, experts, expert_ffn or ffn, shared_ffn, grouped_experts, dtype)
        else:
            specs += _mlp_specs(p + "mlp.", i, hidden, ffn, dtype)
    specs.append(TensorSpec.create("norm.weight", (hidden,), dtype, None, HEAD))
    if not tied_embeddings:
        specs.append(TensorSpec.create("lm_head.weight", (vocab, hidden), dtype, 0, HEAD, vocab=True))
    return ModelSpec.create(specs, layers, name)


def _mlp_specs(prefix: str, layer: int, hidden: int, ffn: int, dtype: Any) -> List[TensorSpec]:
    """A dense gated MLP: fused gate/up split by rows, down by the same ffn columns."""
    return [TensorSpec.create(prefix + "gate_up.weight", (2 * ffn, hidden), dtype, 0, layer,
                              parts_blocks((ffn, ffn), 1, ("gate", "up"))),
            TensorSpec.create(prefix + "down.weight", (hidden, ffn), dtype, 1, layer)]


def _moe_specs(prefix: str, layer: int, hidden: int, experts: int, ffn: int, shared_ffn: int,
               grouped: bool, dtype: Any) -> List[TensorSpec]:
    gate_up = parts_blocks((ffn, ffn), 1, ("gate", "up"))
    specs = [TensorSpec.create(prefix + "router.weight", (experts, hidden), dtype, None, layer)]
    if grouped:
        specs += [TensorSpec.create(prefix + "experts.gate_up.weight", (experts, 2 * ffn, hidden), dtype, 1, layer,
                                    gate_up, experts=Experts(experts, dim=0)),
                  TensorSpec.create(prefix + "experts.down.weight", (experts, hidden, ffn), dtype, 2, layer,
                                    experts=Experts(experts, dim=0))]
    else:
        for e in range(experts):
            specs += [TensorSpec.create(f"{prefix}experts.{e}.gate_up.weight", (2 * ffn, hidden), dtype, 0, layer,
                                        gate_up, experts=Experts(experts, index=e)),
                      TensorSpec.create(f"{prefix}experts.{e}.down.weight", (hidden, ffn), dtype, 1, layer,
                                        experts=Experts(experts, index=e))]
    if shared_ffn:
        specs += _mlp_specs(prefix + "shared.", layer, hidden, shared_ffn, dtype)
    return specs
