"""The pure resharding planner: (src layout, dst layout, model, hosts) → a :class:`Plan`, or one
rank's :class:`PlanShare` of it.

What a destination rank needs is its shard of every tensor of its stage (the spec's TP pieces,
sub-block by sub-block, and for routed experts its EP range; see :mod:`.spec`). Intersected
with what every source shard holds, this gives *units*: maximal regions with one set of source
holders. Any TP / EP / pipeline repartition and any data parallelism work; the shards compute
(see :mod:`.spec` and ``tests/test_reshard_functional.py``).

Who sends a unit is a deterministic rule that both ends evaluate alone:
1. the destination rank itself holds the bytes in the source layout → a local copy;
2. else, with hosts known, a holder on the destination's host if there is one;
3. else a holder anywhere. Holders are the replicas of the source shards that hold the unit,
   numbered replica-major; the receiver at position ``p`` (its shard index times the number of
   its replicas, plus its replica index) takes holder ``p mod #holders`` — so replicas share the
   work round-robin, and a sender finds its own receivers by inverting the rule
   (``p ≡ its index``), without looking at the rest of the world.
One rank's share (:func:`plan_share`) therefore costs O(its transfers + tensors × shards it
overlaps); the whole plan (:func:`plan_reshard`) is the union of every destination's share, each
rank's regions and senders worked out once per tensor kind (O(total transfers)).

Network transfers are grouped into *steps*: the pair (sender ``s``, receiver ``d``) talks in step
``(s + d) mod W`` (``W`` = the largest rank + 1). In step ``c`` a rank ``r`` exchanges with one
peer only, ``(c - r) mod W`` — it sends to it, receives from it, or both (two ranks that feed each
other do it in one step) —, every rank knows the step of each of its pairs locally, and a rank
takes part in as many steps as it has peers. Ranks run their steps in increasing order, so no
cycle of waits can form.

Every rank computes the same :func:`plan_digest` (a 64-bit hash of everything the plan is a
function of), which the executor compares over the world before any byte moves.

The plan reports, per destination rank, the bytes received and the lower bound (bytes it
needs that it does not already hold); by construction they are equal (ratio 1.0).
Pure: no processes; identical inputs give an identical plan on every rank.

The code lives in :mod:`pgroups.reshard.plan`: ``types`` (the plan's values), ``geometry`` (units),
``rule`` (the sender rule and steps), ``assembly`` (a share, the whole plan), ``digest`` (the
hash) and ``report`` (summaries and text); this module keeps the public names in one place.
"""
from __future__ import annotations

from .plan.assembly import plan_reshard, plan_share
from .plan.digest import PLAN_RULE_VERSION, plan_digest
from .plan.report import (describe_plan, describe_share, expert_report, owned_experts, vocab_report,
                          wire_bytes)
from .plan.types import Box, Plan, PlanShare, ReceiverReport, Transfer, ZeroFill

__all__ = ["Box", "PLAN_RULE_VERSION", "Plan", "PlanShare", "ReceiverReport", "Transfer", "ZeroFill",
           "describe_plan", "describe_share", "expert_report", "owned_experts", "plan_digest",
           "plan_reshard", "plan_share", "vocab_report", "wire_bytes"]
