"""ISP weight parallelism on local gloo ranks: step time with overlap on / off against FSDP2 and no weight
parallelism (DDP), bytes moved against the analytic count, and full-weight memory.

    python bench/bench_isp.py                      # world 4, weight 4, a ~14 MiB fp32 llama-like model
    python bench/bench_isp.py --steps 8 --layers 6
    python bench/bench_isp.py --vocab 1002         # uneven table rows: 1/weight plus padding
    python bench/bench_isp.py --steps 10 --markdown docs/benchmarks.md   # and rewrite its section there

Methods, in one run on the same ranks and data (median of ``--steps`` timed steps after
``--warmup`` untimed ones, slowest rank; methods interleaved step by step):
- ``WeightParallel, overlap on``: prefetching gathers, asynchronous reduce-scatters;
- ``WeightParallel, overlap off``: every collective waited for at once;
- ``WeightParallel, embedding + head sharded``: overlap on, the embedding and the head passed as
  blocks of their own (their tables sharded by rows and gathered like the linears);
- ``FSDP2``: torch's ``fully_shard`` on every block and on the root (embedding, norm, head
  sharded too), its defaults (reshard after forward, implicit backward prefetch): what a user
  would pick for sharded weights;
- ``no weight parallelism (DDP)``: the unsharded model under torch DDP (bucketed, overlapped
  gradient all-reduce): the baseline.

Per step and rank it reports the bytes of the weight all-gathers' outputs and of the gradient
reduce-scatters' inputs against the analytic count (2 all-gathers + 1 reduce-scatter of every
sharded tensor, less one all-gather of the last block with overlap: its weights are kept from
its forward for its backward), the pool's peak full-weight bytes against the unsharded model's
block weights, the bytes of the embedding and head tables on rank 0 (the largest shard:
``tensor_split`` gives the first ranks the extra rows) against the unsharded tables, and the
pool's allocations after warm-up (0 expected). For FSDP2 the bytes are
counted by wrapping ``torch.distributed``'s ``all_gather_single`` / ``reduce_scatter_single`` /
``all_reduce`` (what its collectives call) during its steps, and its full-weight bytes are the
storages of the blocks' unsharded parameters, sampled at every block's forward (as its MLP
starts) and at every block's backward (its ``w2``): a sampled lower bound (an all-gather still
in flight, a prefetched block, holds a buffer not counted there), where the pool's is exact.
"""
from __future__ import annotations

import argparse
import contextlib
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

from _report import Report, add_markdown_argument, markdown_path  # noqa: E402  (bench/ is the script's directory)

MiB = 1 << 20
ENDS = "WeightParallel, embedding + head sharded"


def _slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


class Fsdp2Probe:
    """Bytes FSDP2's collectives move (all-gather outputs, reduce-scatter inputs, all-reduce
    buffers) while :meth:`counting`, and the blocks' unsharded parameter bytes sampled inside
    every block's forward and backward."""

    # collective -> (counter, position and keyword of the tensor whose bytes count)
    NAMES = {"all_gather_single": ("all_gather_bytes", 0, "output_tensor"),
             "reduce_scatter_single": ("reduce_scatter_bytes", 1, "input"),
             "all_reduce": ("all_reduce_bytes", 0, "tensor")}

    def __init__(self, model: torch.nn.Module) -> None:
        self.comm_counts = {key: 0 for key, _, _ in self.NAMES.values()}
        self.peak_weight = 0
        self._groups = [block._get_fsdp_state()._fsdp_param_group for block in model.layers]
        for block in model.layers:
            block.mlp.register_forward_pre_hook(lambda *_: self._sample())
            block.mlp.w2.register_full_backward_hook(lambda *_: self._sample())

    def _sample(self) -> None:
        held = sum(output.untyped_storage().nbytes() for group in self._groups for param in group.fsdp_params
                   for output in param.all_gather_outputs)
        self.peak_weight = max(self.peak_weight, held)

    @contextlib.contextmanager
    def counting(self):
        originals = {name: getattr(dist, name) for name in self.NAMES}

        def counted(name):
            key, position, keyword = self.NAMES[name]

            def call(*args, **kwargs):
                tensor = args[position] if len(args) > position else kwargs[keyword]
                self.comm_counts[key] += tensor.numel() * tensor.element_size()
                return originals[name](*args, **kwargs)
            return call

        for name in self.NAMES:
            setattr(dist, name, counted(name))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)


def bench_worker(cfg: TinyConfig, seq: int, samples: int, warmup: int, steps: int) -> Dict[str, Any]:
    from isp_support import isp_context
    from pgroups.comm import WeightParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    ctx = isp_context(world, timeout_s=300)
    tokens, targets = batch(dist.get_rank(), cfg, samples, seq)

    def make_wp(overlap: bool, ends: bool = False):
        model = TinyLlama(cfg, seed=1)
        blocks = [model.embed, *model.layers, model.head] if ends else model.layers
        wp = WeightParallel(model, blocks=blocks, overlap=overlap, ctx=ctx)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        wp.attach_optimizer(opt)
        return model, opt, wp

    def make_fsdp2():
        from torch.distributed.fsdp import fully_shard

        model = TinyLlama(cfg, seed=1)
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4), Fsdp2Probe(model)

    ddp_model = torch.nn.parallel.DistributedDataParallel(TinyLlama(cfg, seed=1))
    ddp_opt = torch.optim.AdamW(ddp_model.parameters(), lr=1e-4)
    methods = {"WeightParallel, overlap on": make_wp(True), "WeightParallel, overlap off": make_wp(False),
               ENDS: make_wp(True, ends=True), "FSDP2": make_fsdp2(),
               "no weight parallelism (DDP)": (ddp_model, ddp_opt, None)}
    times: Dict[str, List[float]] = {name: [] for name in methods}
    counts_before: Dict[str, Dict[str, int]] = {}
    allocations_before: Dict[str, int] = {}
    for step in range(warmup + steps):
        if step == warmup:
            for name, (_, _, meter) in methods.items():
                if meter is not None:
                    counts_before[name] = dict(meter.comm_counts)
                if isinstance(meter, WeightParallel):
                    allocations_before[name] = meter.stats().allocations
        for name, (model, opt, meter) in methods.items():
            dist.barrier()
            counting = meter.counting() if isinstance(meter, Fsdp2Probe) else contextlib.nullcontext()
            started = time.perf_counter()
            with counting:
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
    block_bytes = sum(p.numel() * p.element_size() for p in unsharded.layers.parameters())
    table_bytes = sum(p.numel() * p.element_size() for p in (unsharded.embed.weight, unsharded.head.weight))
    result: Dict[str, Any] = {"world": world, "model_bytes": model_bytes, "block_weight_bytes": block_weight_bytes,
                              "block_bytes": block_bytes, "table_bytes": table_bytes, "rows": {}}
    for name, (model, _, meter) in methods.items():
        local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # FSDP2: DTensors
        core = model.module if hasattr(model, "module") else model  # DDP wraps
        tables = {id(p): p.to_local() if hasattr(p, "to_local") else p for p in (core.embed.weight, core.head.weight)}
        row: Dict[str, Any] = {"ms": statistics.median(times[name]) * 1e3,
                               "param_bytes": sum(p.numel() * p.element_size() for p in local),
                               "table_bytes": sum(p.numel() * p.element_size() for p in tables.values())}
        if meter is not None:
            counts = meter.comm_counts
            for key, column in (("all_gather_bytes", "gathered"), ("reduce_scatter_bytes", "reduced"),
                                ("all_reduce_bytes", "all_reduced")):
                row[column] = (counts[key] - counts_before[name][key]) / steps
        if isinstance(meter, Fsdp2Probe):
            row["peak_weight"] = meter.peak_weight
        elif meter is not None:
            row["peak_weight"] = meter.stats().peak_for("weight")
            row["steady_allocations"] = meter.stats().allocations - allocations_before[name]
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
    parser.add_argument("--vocab", type=int, default=1000, help="vocabulary (rows of the embedding and head)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    add_markdown_argument(parser)
    args = parser.parse_args(argv)
    report = Report("isp", argv, markdown_path(parser, args), script=Path(__file__).name)
    cfg = TinyConfig(vocab=args.vocab, dim=args.dim, heads=8, kv_heads=2, ffn=args.ffn, layers=args.layers,
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
    root = r["model_bytes"] - r["block_bytes"]             # embedding, final norm, head
    # analytic bytes per step and rank: (gathered, reduce-scattered, unsharded full weights)
    analytic = {"WeightParallel, overlap on": (2 * r["block_weight_bytes"] - last_block, r["block_weight_bytes"],
                                               r["block_weight_bytes"]),
                "WeightParallel, overlap off": (2 * r["block_weight_bytes"], r["block_weight_bytes"],
                                                r["block_weight_bytes"]),
                "FSDP2": (2 * r["block_bytes"] + root, r["model_bytes"], r["block_bytes"])}
    tables = r["table_bytes"]  # the embedding's and the head's: sharded blocks of their own in ENDS
    analytic[ENDS] = (2 * (r["block_weight_bytes"] + tables) - tables // 2, r["block_weight_bytes"] + tables,
                      r["block_weight_bytes"] + tables)
    base = r["rows"]["no weight parallelism (DDP)"]
    report.note(f"world {r['world']} gloo (weight {r['world']}), model {r['model_bytes'] / MiB:.1f} MiB fp32 "
                f"({args.layers} blocks, dim {args.dim}, ffn {args.ffn}, vocabulary {args.vocab}; "
                f"{r['block_weight_bytes'] / MiB:.1f} MiB in block linears), {args.samples} x {args.seq} tokens per "
                f"rank; median of {args.steps} steps after {args.warmup} warm-up, slowest rank")
    table = report.table("", ["method", "step ms", "vs DDP", "gathered MiB/step (analytic)",
                              "reduce-scattered MiB/step (analytic)", "all-reduced MiB/step",
                              "peak full-weight MiB (unsharded)", "params MiB/rank",
                              "embedding + head KiB on rank 0 (of unsharded)", "pool allocations after warm-up"])
    for name, row in r["rows"].items():
        if name in analytic:
            gathered, reduced, full = analytic[name]
            comm = [f"{row['gathered'] / MiB:.2f} ({gathered / MiB:.2f})", f"{row['reduced'] / MiB:.2f} ({reduced / MiB:.2f})",
                    f"{row['all_reduced'] / MiB:.2f}", f"{row['peak_weight'] / MiB:.2f} ({full / MiB:.2f})"]
        else:
            comm = ["–", "–", "(gradient buckets, not counted)", "(all weights resident)"]
        table.add(name, f"{row['ms']:.1f}", f"{row['ms'] / base['ms']:.2f}x", *comm, f"{row['param_bytes'] / MiB:.2f}",
                  f"{row['table_bytes'] / 1024:.1f} ({row['table_bytes'] / r['table_bytes']:.4f})",
                  row.get("steady_allocations", "–"))
    on, off = r["rows"]["WeightParallel, overlap on"], r["rows"]["WeightParallel, overlap off"]
    fsdp = r["rows"]["FSDP2"]
    report.note(f"overlap on / off: {on['ms'] / off['ms']:.2f}x; WeightParallel (overlap on) / FSDP2: "
          f"{on['ms'] / fsdp['ms']:.2f}x; gathered / analytic: "
          f"{on['gathered'] / analytic['WeightParallel, overlap on'][0]:.3f}; "
          f"reduce-scattered / analytic: {on['reduced'] / r['block_weight_bytes']:.3f}; peak full weights / "
          f"unsharded: {on['peak_weight'] / r['block_weight_bytes']:.2f}")
    rows_on_rank0 = -(-args.vocab // r["world"])  # tensor_split: the first ranks hold the extra row
    report.note(f"embedding + head sharded by rows: rank 0 holds {rows_on_rank0} of {args.vocab} rows of each table, "
          f"{rows_on_rank0 / args.vocab:.4f} (1/{r['world']} = {1 / r['world']:.4f}, + padding "
          f"{rows_on_rank0 * r['world'] - args.vocab} rows); measured {r['rows'][ENDS]['table_bytes'] / r['table_bytes']:.4f}")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
