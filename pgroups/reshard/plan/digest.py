"""The plan hash: a 64-bit digest of everything a plan is a function of, which every rank computes
alone and the executor compares over the world before any byte moves. Pure: no processes."""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Tuple

from ..layout import ParallelLayout
from ..spec import ModelSpec

#: bumped whenever the rule that turns inputs into a plan changes (it is part of the digest)
PLAN_RULE_VERSION = "pgroups-reshard-plan/3"

def _layout_key(layout: ParallelLayout, model: ModelSpec) -> Tuple:
    t = layout.topology
    return (t.tensor, t.context, t.pipeline, t.data, tuple(t.order), layout.ranks, layout.layer_counts(model),
            layout.mesh_sizes(True), t.expert_layout if t.expert_enabled else None, layout.vocab_multiple) + (
                ("isp", t.weight) if layout.isp else ())


def plan_digest(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec,
                hosts: Optional[Sequence[str]] = None) -> int:
    """A 64-bit hash (returned as a signed int64, ready for a torch.int64 tensor) of everything a
    plan is a function of: the rule's version, both layouts (sizes, order, ranks, layers per
    stage, expert sizes), every tensor spec, and the hosts. Equal inputs give an equal digest on
    every rank and process (blake2b; no Python ``hash``); O(world + tensors)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in (PLAN_RULE_VERSION, _layout_key(src, model), _layout_key(dst, model), model.num_layers,
                 model.tensors, None if hosts is None else tuple(hosts)):
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return int.from_bytes(digest.digest(), "little", signed=True)
