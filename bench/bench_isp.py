"""ISP weight parallelism on local gloo ranks: step time with overlap on / off against no weight
parallelism (DDP), bytes moved against the analytic count, and full-weight memory.

    python bench/bench_isp.py                      # world 4, weight 4, a ~14 MiB fp32 llama-like model
    python bench/bench_isp.py --steps 8 --layers 6

Methods, in one run on the same ranks and data (median of ``--steps`` timed steps after
``--warmup`` untimed ones, slowest rank; methods interleaved step by step):
- ``WeightParallel, overlap on``: prefetching gathers, asynchronous reduce-scatters;
- ``WeightParallel, overlap off``: every collective waited for at once;
- ``no weight parallelism (DDP)``: the unsharded model under torch DDP (bucketed, overlapped
  gradient all-reduce): the baseline.

Per step and rank it reports the bytes of the weight all-gathers' outputs and of the gradient
reduce-scatters' inputs against the analytic count (2 all-gathers + 1 reduce-scatter of every
sharded tensor, less one all-gather of the last block with overlap: its weights are kept from
its forward for its backward), the pool's peak full-weight bytes against the unsharded model's
block weights, and the pool's allocations after warm-up (0 expected).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from isp_model import TinyConfig, TinyLlama, batch, loss_of  # noqa: E402  (the tests' model)
from pgroups.spawn import run_local  # noqa: E402

MiB = 1 << 20


def _slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def bench_worker(cfg: TinyConfig, seq: int, samples: int, warmup: int, steps: int) -> Dict[str, Any]:
    from isp_support import isp_context
    from pgroups.comm import WeightParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    ctx = isp_context(world, timeout_s=300)
    tokens, targets = batch(dist.get_rank(), cfg, samples, seq)

    def make_wp(overlap: bool):
        model = TinyLlama(cfg, seed=1)
        wp = WeightParallel(model, blocks=model.layers, overlap=overlap, ctx=ctx)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        wp.attach_optimizer(opt)
        return model, opt, wp

    ddp_model = torch.nn.parallel.DistributedDataParallel(TinyLlama(cfg, seed=1))
    ddp_opt = torch.optim.AdamW(ddp_model.parameters(), lr=1e-4)
    methods = {"WeightParallel, overlap on": make_wp(True), "WeightParallel, overlap off": make_wp(False),
               "no weight parallelism (DDP)": (ddp_model, ddp_opt, None)}
    times: Dict[str, List[float]] = {name: [] for name in methods}
    counts_before: Dict[str, Dict[str, int]] = {}
    allocations_before: Dict[str, int] = {}
    for step in range(warmup + steps):
        if step == warmup:
            for name, (_, _, wp) in methods.items():
                if wp is not None:
                    counts_before[name] = dict(wp.comm_counts)
                    allocations_before[name] = wp.stats().allocations
        for name, (model, opt, _) in methods.items():
            dist.barrier()
            started = time.perf_counter()
            loss_of(model(tokens), targets).backward()
            opt.step()
            opt.zero_grad()
            elapsed = _slowest(time.perf_counter() - started)
            if step >= warmup:
                times[name].append(elapsed)
    unsharded = TinyLlama(cfg)
    block_weight_bytes = sum(p.numel() * p.element_size() for block in unsharded.layers
                             for m in block.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in unsharded.parameters())
    result: Dict[str, Any] = {"world": world, "model_bytes": model_bytes, "block_weight_bytes": block_weight_bytes,
                              "rows": {}}
    for name, (model, _, wp) in methods.items():
        row: Dict[str, Any] = {"ms": statistics.median(times[name]) * 1e3,
                               "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
        if wp is not None:
            counts = wp.comm_counts
            row["gathered"] = (counts["all_gather_bytes"] - counts_before[name]["all_gather_bytes"]) / steps
            row["reduced"] = (counts["reduce_scatter_bytes"] - counts_before[name]["reduce_scatter_bytes"]) / steps
            row["peak_weight"] = wp.stats().peak_for("weight")
            row["steady_allocations"] = wp.stats().allocations - allocations_before[name]
        result["rows"][name] = row
    ctx.destroy()
    dist.destroy_process_group()
    return result


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=704)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--samples", type=int, default=2, help="samples per rank per step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    cfg = TinyConfig(vocab=1000, dim=args.dim, heads=8, kv_heads=2, ffn=args.ffn, layers=args.layers,
                     qkv_bias=False)
    outcomes = run_local(args.nproc, bench_worker, (cfg, args.seq, args.samples, args.warmup, args.steps),
                         timeout_s=1800, env={"OMP_NUM_THREADS": "1"})
    if not all(o.ok for o in outcomes):
        for o in outcomes:
            if not o.ok:
                print(f"rank {o.rank}: {o.error}", file=sys.stderr)
        return 1
    r = outcomes[0].value
    last_block = r["block_weight_bytes"] // args.layers  # every block has the same linears
    analytic_gathers = {"WeightParallel, overlap on": 2 * r["block_weight_bytes"] - last_block,
                        "WeightParallel, overlap off": 2 * r["block_weight_bytes"]}
    analytic_reduce = r["block_weight_bytes"]
    base = r["rows"]["no weight parallelism (DDP)"]
    print(f"world {r['world']} gloo (weight {r['world']}), {os.cpu_count()} CPU cores, model "
          f"{r['model_bytes'] / MiB:.1f} MiB fp32 ({args.layers} blocks, dim {args.dim}, ffn {args.ffn}; "
          f"{r['block_weight_bytes'] / MiB:.1f} MiB in block linears), {args.samples} x {args.seq} tokens per rank; "
          f"median of {args.steps} steps after {args.warmup} warm-up, slowest rank\n")
    print("| method | step ms | vs DDP | gathered MiB/step (analytic) | reduce-scattered MiB/step (analytic) "
          "| peak full-weight MiB (unsharded) | params MiB/rank | pool allocations after warm-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in r["rows"].items():
        if "gathered" in row:
            comm = (f"{row['gathered'] / MiB:.2f} ({analytic_gathers[name] / MiB:.2f}) | {row['reduced'] / MiB:.2f} "
                    f"({analytic_reduce / MiB:.2f}) | {row['peak_weight'] / MiB:.2f} "
                    f"({r['block_weight_bytes'] / MiB:.2f})")
            allocations = str(row["steady_allocations"])
        else:
            comm, allocations = "– | – | (all weights resident)", "–"
        print(f"| {name} | {row['ms']:.1f} | {row['ms'] / base['ms']:.2f}x | {comm} | "
              f"{row['param_bytes'] / MiB:.2f} | {allocations} |")
    on, off = r["rows"]["WeightParallel, overlap on"], r["rows"]["WeightParallel, overlap off"]
    analytic_on = analytic_gathers["WeightParallel, overlap on"]
    print(f"\noverlap on / off: {on['ms'] / off['ms']:.2f}x; gathered / analytic: {on['gathered'] / analytic_on:.3f}; "
          f"reduce-scattered / analytic: {on['reduced'] / analytic_reduce:.3f}; peak full weights / unsharded: "
          f"{on['peak_weight'] / r['block_weight_bytes']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
