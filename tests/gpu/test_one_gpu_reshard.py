"""The reshard executor on CUDA tensors in an NCCL job of one GPU (world 1).

At world 1 every transfer of a plan is a local copy: the executor's plan agreement (an
all_gather over the NCCL global group), the copies cut by ``bucket_bytes``, the casts to fp16
and the fp8 (e4m3) quantization with per-row scales all run on the GPU, and are checked
byte for byte against a reference computed on the CPU by the documented rule
(``tests/test_reshard_pipeline.py::fp8_reference``), in both receive modes, over repeated syncs
of one kept Resharder that allocates nothing after its first; and block-scaled fp8 (128 x 128
blocks, ``fp8_scales="block"``) on CUDA against the format's rule computed on the CPU
(``tests/test_reshard_fp8_block.py::block_reference``). Wire packing (chunks sent to and
unpacked from another rank) needs two ranks: ``test_gpu_reshard.py`` (2 GPUs).
"""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch

from .cuda_support import CUDA, one_rank

pytestmark = [pytest.mark.gpus(1), pytest.mark.multiprocess]

SYNCS = 3


def converted_as_documented(out: Dict[str, torch.Tensor], model: Any, name: str, shard: torch.Tensor,
                            dtype: torch.dtype) -> bool:
    """Whether destination ``out[name]`` (on any device) holds ``shard`` (the source values, on
    the CPU) converted to ``dtype`` byte for byte: a cast, or for fp8 the documented rule's values
    and scales (``tests/test_reshard_pipeline.py::fp8_reference``)."""
    from pgroups.reshard.convert import scale_name
    from test_reshard_executor import same_bytes
    from test_reshard_pipeline import fp8_reference

    if dtype == torch.float8_e4m3fn:
        q, scale = fp8_reference(shard, model[name].axis)
        return same_bytes(out[name].cpu(), q) and same_bytes(out[scale_name(name)].cpu(), scale)
    return same_bytes(out[name].cpu(), shard.to(dtype))


def reshard_on_one_gpu() -> Dict[str, Any]:
    from pgroups import ParallelContext
    from pgroups.reshard import Resharder, cut_shards, plan_reshard
    from test_reshard_executor import layout, tiny_model
    from test_reshard_pipeline import smooth_full

    ctx = ParallelContext().init_from_config({"parallel": {}, "timeout_s": 60})
    model, problems, figures = tiny_model(), [], {}
    try:
        src = dst = layout(1, 1, 1)
        plan = plan_reshard(src, dst, model, ctx.get_hostnames())
        dtypes = {s.name: (torch.float8_e4m3fn if len(s.shape) >= 2 else torch.float16)
                  for s in model.tensors if s.dtype.is_floating_point}
        for atomic in (True, False):
            resharder = Resharder(plan, context=ctx, bucket_bytes=512, dst_dtypes=dtypes, atomic=atomic)
            out = resharder.destination_shards(CUDA)
            allocations: List[int] = []
            for sync in range(SYNCS):
                full = {s.name: smooth_full(model, s.name, sync) for s in model.tensors}
                src_shards = {n: t.to(CUDA) for n, t in cut_shards(src, model, 0, full.__getitem__).items()}
                stats = resharder.run(src_shards, out)
                allocations.append(resharder.buffer_allocations)
                figures[(atomic, sync)] = (stats.bytes_copied, stats.bytes_received, stats.bytes_sent)
                for name, shard in cut_shards(dst, model, 0, full.__getitem__).items():
                    if not converted_as_documented(out, model, name, shard, dtypes.get(name, shard.dtype)):
                        problems.append(f"atomic={atomic} sync {sync}: {name} differs")
            if len(set(allocations)) != 1:
                problems.append(f"atomic={atomic}: buffer allocations per sync {allocations}")
        figures["converted"] = sorted(str(d) for d in set(dtypes.values()))
        return {"problems": problems, "figures": figures, "tensors": len(model.tensors)}
    finally:
        ctx.destroy()


@pytest.mark.timeout(300)
def test_casts_and_fp8_quantization_on_cuda_are_bit_exact_and_repeated_syncs_allocate_nothing():
    result = one_rank(reshard_on_one_gpu)
    assert result["problems"] == [], result["problems"][:20]
    assert result["figures"]["converted"] == ["torch.float16", "torch.float8_e4m3fn"]
    for atomic in (True, False):
        for sync in range(SYNCS):
            copied, received, sent = result["figures"][(atomic, sync)]
            assert copied > 0 and received == sent == 0  # world 1: every byte is a local copy


def block_fp8_on_one_gpu() -> List[str]:
    from pgroups import ParallelContext
    from pgroups.reshard import Resharder, cut_shards, plan_reshard
    from test_reshard_executor import layout, same_bytes
    from test_reshard_fp8_block import block_model, block_reference, fp8_of
    from test_reshard_pipeline import smooth_full

    ctx = ParallelContext().init_from_config({"parallel": {}, "timeout_s": 60})
    model, problems = block_model(), []
    try:
        src = dst = layout(1, 1, 1)
        plan = plan_reshard(src, dst, model, ctx.get_hostnames())
        fp8 = fp8_of(model)
        for atomic in (True, False):
            resharder = Resharder(plan, context=ctx, bucket_bytes=1 << 16, dst_dtypes=fp8, fp8_scales="block",
                                  atomic=atomic)
            out = resharder.destination_shards(CUDA)
            for sync in range(2):
                full = {s.name: smooth_full(model, s.name, sync) for s in model.tensors}
                resharder.run({n: t.to(CUDA) for n, t in cut_shards(src, model, 0, full.__getitem__).items()}, out)
                for name, shard in cut_shards(dst, model, 0, full.__getitem__).items():
                    if name in fp8:
                        q, scale = block_reference(shard)
                        ok = same_bytes(out[name].cpu(), q) and same_bytes(out[name + "_scale_inv"].cpu(), scale)
                    else:
                        ok = same_bytes(out[name].cpu(), shard)
                    if not ok:
                        problems.append(f"atomic={atomic} sync {sync}: {name} differs")
        return problems
    finally:
        ctx.destroy()


@pytest.mark.timeout(300)
def test_block_scaled_fp8_on_cuda_equals_the_format_rule():
    problems = one_rank(block_fp8_on_one_gpu)
    assert problems == [], problems[:20]
