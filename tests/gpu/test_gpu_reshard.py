"""The reshard executor on NCCL with CUDA shards (2 to 8 GPUs; skipped with one reason otherwise).

One spawned job of two ranks (one GPU each) runs every case over the NCCL global group: bit-exact
shards in the atomic and streaming modes (streaming receives contiguous chunks straight into
the CUDA destination: fewer bytes unpacked than received), sender-side conversion to bf16 and fp8 against a local
reference, and repeated syncs of a kept Resharder that allocate nothing after the first. Written
from torch's source (ProcessGroupNCCL: ``work.wait(timeout)`` blocks the CPU until the operation
completed; operations are ordered after the current stream's packing) — see the README for what
ran where.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import pytest
import torch

from pgroups.reshard import Resharder, cut_shards, plan_reshard, reshard
from pgroups.spawn import run_local
from test_reshard_executor import layout, reference, same_bytes, sentinel_shards, tiny_model
from test_reshard_pipeline import smooth_full

from .test_one_gpu_reshard import converted_as_documented


CASES = [
    {"src": (2, 1), "dst": (1, 2)},
    {"src": (1, 1, [0]), "dst": (1, 1, [1]), "bucket": 300},
    {"src": (2, 1), "dst": (1, 1, [1]), "bucket": 256, "atomic": False},
    {"src": (1, 1, [1]), "dst": (2, 1), "bucket": 1000, "atomic": False, "staging": 4000, "verify": True},
]


def nccl_worker(cases: List[Dict[str, Any]]) -> List[Tuple[int, str]]:
    from pgroups import gpc

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    gpc.init_from_config({"parallel": {"tensor": 1, "pipeline": 1}, "backend": "nccl", "timeout_s": 120})
    model, device, problems = tiny_model(), torch.device("cuda", rank), []
    full = lambda name: reference(model, name)  # noqa: E731
    for index, case in enumerate(cases):
        src, dst = layout(2, *case["src"]), layout(2, *case["dst"])
        src_shards = {n: t.to(device) for n, t in cut_shards(src, model, rank, full).items()}
        dst_shards = {n: t.to(device) for n, t in sentinel_shards(dst, model, rank).items()}
        _, stats = reshard(src, dst, model, src_shards, dst_shards, bucket_bytes=case.get("bucket", 1 << 20),
                           verify=case.get("verify", False), atomic=case.get("atomic", True),
                           max_staging_bytes=case.get("staging"))
        # atomic: every received byte is staged, then copied once; streaming: contiguous chunks
        # land in the destination (CUDA views as receive buffers), so fewer bytes are unpacked
        atomic = case.get("atomic", True)
        if stats.bytes_received and (stats.bytes_unpacked == stats.bytes_received) != atomic:
            problems.append((index, f"rank {rank}: unpacked {stats.bytes_unpacked} of {stats.bytes_received} "
                                    f"received bytes (atomic={atomic})"))
        for name, tensor in cut_shards(dst, model, rank, full).items():
            if not same_bytes(dst_shards[name].cpu(), tensor):
                problems.append((index, f"rank {rank}: tensor {name} differs"))
    # conversion on the GPU: bf16 source -> fp8 for 2-D tensors, fp16 for the rest (floating)
    src, dst = layout(2, 2, 1), layout(2, 1, 2)
    smooth = lambda name: smooth_full(model, name, 0)  # noqa: E731
    dtypes = {s.name: (torch.float8_e4m3fn if len(s.shape) >= 2 else torch.float16)
              for s in model.tensors if s.dtype.is_floating_point}
    plan = plan_reshard(src, dst, model, gpc.get_hostnames())
    resharder = Resharder(plan, bucket_bytes=512, dst_dtypes=dtypes, atomic=False)
    src_shards = {n: t.to(device) for n, t in cut_shards(src, model, rank, smooth).items()}
    out = resharder.destination_shards(device)
    allocations = None
    for sync in range(5):
        for name, tensor in cut_shards(src, model, rank, lambda n: smooth_full(model, n, sync)).items():
            src_shards[name].copy_(tensor)
        resharder.run(src_shards, out)
        allocations = allocations if allocations is not None else resharder.buffer_allocations
        if resharder.buffer_allocations != allocations:
            problems.append((100, f"rank {rank}: sync {sync} allocated buffers"))
        for name, shard in cut_shards(dst, model, rank, lambda n: smooth_full(model, n, sync)).items():
            if not converted_as_documented(out, model, name, shard, dtypes.get(name, shard.dtype)):
                problems.append((100, f"rank {rank}: sync {sync} converted {name} differs"))
    gpc.destroy()
    return problems


@pytest.mark.gpus(2)
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_reshard_on_nccl_is_bit_exact_and_converts():
    outcomes = run_local(2, nccl_worker, (CASES,), timeout_s=280)
    failures = [f"rank {o.rank}: {o.error}" for o in outcomes if not o.ok]
    assert not failures, "\n".join(failures)
    problems = [p for o in outcomes for p in o.value]
    assert not problems, problems[:20]
