"""RLHF-shaped reshard pairs at any world (pure): the training → inference layouts the simulated
figures of :mod:`pgroups.reshard.plan` are stated for (``bench/bench_reshard_sim.py``, the
README, ``tests/test_reshard_sim.py``).

- ``dense-tp4``: a 70B-shaped dense model (hidden 8192, GQA 64/8, ffn 28672, vocab 128256, bf16),
  tensor 8 x pipeline 4 x data → tensor 4 x data, colocated (same ranks);
- ``dense-tp8``: the same → tensor 8 x data, colocated;
- ``dense-disjoint``: tensor 8 x pipeline 4 on the first half of the ranks → tensor 4 on the other
  half (a separate rollout placement);
- ``moe``: a MoE model (hidden 2048, 128 experts of ffn 768 per layer, GQA 32/4, vocab 151936,
  bf16), tensor 2 x pipeline 4, expert 8 x expert-tensor 1 → tensor 4, expert 16 x expert-tensor
  1, colocated (Megatron-Core's order ``tp-cp-ep-dp-pp``);
- ``moe-etp``: the same source → tensor 4, expert 8 x expert-tensor 2 (the expert tensor
  parallelism changes).

``layers_per_stage`` keeps that many decoder layers per training stage (0: all — 20 of the dense
model's 80, 12 of the MoE's 48): every layer of a stage moves between the same ranks, so fewer
layers keep the peer pattern and scale the messages down.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

from ...topology import Topology
from ..layout import ParallelLayout
from ..spec import ModelSpec, llama_like

MOE_ORDER = "tp-cp-ep-dp-pp"   # Megatron-Core's default order
PAIRS = ("dense-tp4", "dense-tp8", "dense-disjoint", "moe", "moe-etp")

Pair = Tuple[Callable[[], ModelSpec], ParallelLayout, ParallelLayout]


def dense_70b(layers: int = 80) -> ModelSpec:
    return llama_like(hidden=8192, layers=layers, heads=64, kv_heads=8, ffn=28672, vocab=128256,
                      name="dense-70b-shapes")


def moe_model(layers: int = 48) -> ModelSpec:
    return llama_like(hidden=2048, layers=layers, heads=32, kv_heads=4, ffn=768, vocab=151936, experts=128,
                      name="moe-128x768")


def _layout(ranks: Sequence[int], **sizes: int) -> ParallelLayout:
    return ParallelLayout.create(Topology.create(len(ranks), **sizes), list(ranks))


def pairs(world: int, layers_per_stage: int = 0) -> Dict[str, Pair]:
    """``{name: (model factory, training layout, inference layout)}`` at ``world`` ranks (a
    multiple of 64)."""
    dense = lambda: dense_70b(4 * layers_per_stage if layers_per_stage else 80)  # noqa: E731
    moe = lambda: moe_model(4 * layers_per_stage if layers_per_stage else 48)  # noqa: E731
    every, first, second = range(world), range(world // 2), range(world // 2, world)
    moe_src = _layout(every, tensor=2, pipeline=4, expert=8, expert_tensor=1, order=MOE_ORDER)
    return {
        "dense-tp4": (dense, _layout(every, tensor=8, pipeline=4), _layout(every, tensor=4)),
        "dense-tp8": (dense, _layout(every, tensor=8, pipeline=4), _layout(every, tensor=8)),
        "dense-disjoint": (dense, _layout(first, tensor=8, pipeline=4), _layout(second, tensor=4)),
        "moe": (moe, moe_src, _layout(every, tensor=4, expert=16, expert_tensor=1, order=MOE_ORDER)),
        "moe-etp": (moe, moe_src, _layout(every, tensor=4, expert=8, expert_tensor=2, order=MOE_ORDER)),
    }
