"""Resharding: move model state between two parallel layouts at the minimum traffic.

    from pgroups import gpc
    from pgroups.reshard import ParallelLayout, llama_like, plan_share, execute_plan

    train = ParallelLayout.create(gpc.config.topology(8))                 # e.g. tensor 4 x pipeline 2
    infer = load_layout("infer.yaml", world_size=8)                        # e.g. tensor 2, data 4
    share = plan_share(train, infer, model_spec, gpc.get_global_rank(), gpc.get_hostnames())  # pure
    stats = execute_plan(share, my_train_shards, my_infer_shards)          # every rank of the plan

- :mod:`.spec`: what the tensors are (shapes, TP dim, layer, fused sub-blocks), from YAML or a module;
- :mod:`.layout`: a Topology placed on global ranks, with a layer-to-stage policy;
- :mod:`.planner`: the pure planner — one rank's share or the whole plan, its 64-bit digest, and
  its report (bytes vs the lower bound, sender loads, steps);
- :mod:`.names`: after a reshard, a rank's shards split from fused QKV / gate-up and renamed
  (HF names: the shipped ``llama`` map), locally; before one, separate (HF-named) shards fused
  into the model's layouts (``fuse_shards``); or either conversion inside the transfer
  (``sub_block_model`` / ``sub_block_views``);
- :mod:`.executor`: batched point-to-point execution with staging, timeouts and checksums;
- :mod:`.plan`: the schedule without processes — every rank's rounds as the executor posts them, a
  network model (hosts, NICs with rank affinity, intra-host ports, latency), its lower bound, and a
  discrete-event simulation of the sync (``simulate``: makespan, NIC utilisation);
- :mod:`.collectives`: the old import path of :mod:`pgroups.comm` (activation collectives with
  autograd: Ulysses all-to-all, gather / split / reduce-scatter along a dim, async weight all-gather);
- :mod:`.verl`: the verl pattern — micro-data-parallel batches and inference-shard weight gathers;
- ``pgroups reshard-plan SRC.yaml DST.yaml --world-size N`` (:mod:`.cli`) prints a plan offline.
"""
from ..comm import (WeightGatherHandle, all_gather_weight, all_to_all, gather_along, head_to_seq,
                    reduce_scatter_along, seq_to_head, split_along, start_weight_gather)
from .executor import DEFAULT_BUCKET_BYTES, Resharder, ReshardError, ReshardStats, execute_plan, reshard
from .layout import (STAGE_POLICIES, ParallelLayout, balanced_stages, cut_shards, empty_shards, even_stages,
                     held_tensors, load_layout, local_shapes, parse_ranks)
from .names import (LLAMA, NameMap, convert_shards, fuse_shards, load_name_map, separate_model, sub_block_model,
                    sub_block_views)
from .planner import (Plan, PlanShare, ReceiverReport, Transfer, ZeroFill, describe_plan, describe_share,
                      plan_digest, plan_reshard, plan_share)
from .spec import (Block, Experts, Heads, ModelSpec, Rule, TensorSpec, attention_heads, head_blocks, llama_like,
                   load_model_spec, parts_blocks, qkv_blocks, qkv_interleaved_blocks, spec_from_module)
from .verl import MicroDataSharding

__all__ = [
    "Block", "DEFAULT_BUCKET_BYTES", "Experts", "Heads", "ModelSpec", "ParallelLayout", "Plan", "PlanShare",
    "ReceiverReport", "ReshardError", "ReshardStats", "Resharder", "Rule", "STAGE_POLICIES", "TensorSpec", "Transfer",
    "attention_heads", "balanced_stages", "cut_shards", "describe_plan", "describe_share", "empty_shards", "even_stages",
    "execute_plan", "head_blocks", "held_tensors", "llama_like", "load_layout", "load_model_spec", "local_shapes",
    "parse_ranks", "parts_blocks", "plan_digest", "plan_reshard", "plan_share", "qkv_blocks",
    "qkv_interleaved_blocks", "reshard", "ZeroFill", "LLAMA", "NameMap", "convert_shards", "load_name_map",
    "fuse_shards", "separate_model", "sub_block_model", "sub_block_views",
    "spec_from_module", "WeightGatherHandle", "all_gather_weight", "all_to_all", "gather_along", "head_to_seq",
    "reduce_scatter_along", "seq_to_head", "split_along", "start_weight_gather", "MicroDataSharding",
]
