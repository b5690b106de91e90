"""Block-scaled fp8, the format of DeepSeek-V3's and Qwen3's FP8 checkpoints (``fp8_scales="block"``):
one float32 ``<name>_scale_inv`` per 128 x 128 block of the last two dims of the destination shard
(per expert of a grouped weight), ``w ≈ q.float() * scale_inv[i // 128, j // 128]``.

- the quantizer equals the rule written here from the format's definition (amax per block / 448,
  1 where it is 0; q = clamp(w / scale, ±448) in e4m3), for partial edge blocks, strided regions,
  grouped experts and any scratch size the executor gives it; dequantized values are within
  e4m3's rounding of the weights;
- scale tensors have the format's names, shapes ``[..., ceil(out / 128), ceil(in / 128)]`` and
  float32; bytes on the wire are the fp8 values plus one float32 per block, counted independently;
- a transfer that would split a block is refused, naming the tensor and ranks (CLI: exit 2);
- on gloo ranks the executor delivers the rule's bytes, slices messages on block edges, and a
  destination that stores another scale format fails every rank before any byte moves.
"""
from __future__ import annotations

import json
import math
import types
from typing import Dict, List, Tuple

import pytest
import torch

from pgroups.cli import main
from pgroups.errors import ReshardError
from pgroups.reshard import ModelSpec, Resharder, TensorSpec, cut_shards, plan_reshard
from pgroups.reshard.convert import Quantizer, ScaleLayout, scale_dims, scale_name, scale_shape
from pgroups.reshard.spec import Experts, head_blocks, parts_blocks, qkv_blocks
from pgroups.reshard.wire import Shapes, first_scale_cut, messages
from pgroups.spawn import run_local
from test_reshard_executor import SENTINEL, _init, layout, same_bytes
from test_reshard_pipeline import E4M3_MAX, _values, smooth_full

B = 128


def block_reference(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The format's rule, from its definition: zero-pad the last two dims to multiples of 128, take
    each block's amax, scale_inv = amax / 448 (1 where it is 0), q = clamp(x / scale_inv, ±448)."""
    x = x.to(torch.float32)
    rows, cols = x.shape[-2:]
    lead = x.reshape(-1, rows, cols)
    nr, nc = -(-rows // B), -(-cols // B)
    padded = torch.zeros(lead.shape[0], nr * B, nc * B)
    padded[:, :rows, :cols] = lead
    amax = padded.abs().view(-1, nr, B, nc, B).amax(dim=(2, 4))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    every = scale.repeat_interleave(B, 1).repeat_interleave(B, 2)[:, :rows, :cols]
    q = torch.clamp(lead / every, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(x.shape), scale.view(*x.shape[:-2], nr, nc)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape[-2:]
    every = scale.repeat_interleave(B, -2).repeat_interleave(B, -1)[..., :rows, :cols]
    return q.to(torch.float32) * every


# ---- the quantizer -------------------------------------------------------------------------------------------
QUANTIZE_CASES = [
    ((300, 200), None),                                  # partial edge blocks on both dims
    ((256, 384), ((128, 256), (0, 384))),                # a row band of a column-parallel shard
    ((200, 512), ((0, 200), (128, 384))),                # a strided column slice (row-parallel)
    ((3, 256, 130), ((1, 3), (0, 256), (0, 130))),       # grouped experts: blocks per expert
]


@pytest.mark.parametrize("scratch", ["region", 2 * B * B, 16 * B * B])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, box", QUANTIZE_CASES)
def test_block_quantizer_equals_the_format_rule_and_dequantizes_within_rounding(shape, box, dtype, scratch):
    generator = torch.Generator().manual_seed(len(shape) + shape[-1])
    full = (torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator) * 300).to(dtype)
    full[..., :B, :B] = 0                                  # a zero block: scale 1
    region = full
    for dim, (start, stop) in enumerate(box or ()):
        region = region.narrow(dim, start, stop - start)
    layout = scale_dims(types.SimpleNamespace(shape=shape, axis=0), "block")
    keep = scale_shape(region.shape, layout)
    assert keep == (*region.shape[:-2], -(-region.shape[-2] // B), -(-region.shape[-1] // B))
    q = torch.empty(region.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(keep, dtype=torch.float32)
    size = region.numel() if scratch == "region" else scratch
    quantizer = Quantizer(torch.empty(size), torch.empty(4 * math.prod(keep)),
                          torch.empty(math.prod(keep), dtype=torch.bool))
    quantizer.quantize(region, layout, q, scale)
    want_q, want_scale = block_reference(region)
    assert same_bytes(scale, want_scale) and same_bytes(q, want_q)
    # e4m3 keeps 3 mantissa bits: every value within 2^-4 of itself, relative, or a subnormal step
    error = (dequantize(q, scale) - region.float()).abs()
    bound = region.float().abs() / 16 + scale.repeat_interleave(B, -2).repeat_interleave(B, -1)[
        ..., :region.shape[-2], :region.shape[-1]] * 2.0 ** -9
    assert bool((error <= bound).all())


# ---- a model whose shards hold whole blocks ------------------------------------------------------------------
def block_model(dtype: str = "bfloat16") -> ModelSpec:
    """One decoder layer with 128-wide heads and a 256-wide MLP (TP 1-2 shards start on block
    edges); hidden 200 makes the last column / row block of each weight partial; two grouped experts."""
    hidden, ffn = 200, 256
    qkv = qkv_blocks(2, 1, B)
    return ModelSpec.create([
        TensorSpec.create("embed", (50, hidden), dtype, 0, "embedding", vocab=True),
        TensorSpec.create("layers.0.norm", (hidden,), dtype, None, 0),
        TensorSpec.create("layers.0.qkv", (4 * B, hidden), dtype, 0, 0, qkv),
        TensorSpec.create("layers.0.o", (hidden, 2 * B), dtype, 1, 0, head_blocks(2, 1, B)),
        TensorSpec.create("layers.0.gate_up", (2 * ffn, hidden), dtype, 0, 0, parts_blocks((ffn, ffn), 1, ("gate", "up"))),
        TensorSpec.create("layers.0.down", (hidden, ffn), dtype, 1, 0),
        TensorSpec.create("layers.0.experts.up", (2, ffn, hidden), dtype, 1, 0, experts=Experts(2, dim=0)),
        TensorSpec.create("head", (50, hidden), dtype, 0, "head", vocab=True),
    ], 1, "blocks")


def fp8_of(model: ModelSpec) -> Dict[str, torch.dtype]:
    """fp8 for the >= 2-D tensors of the layers (as FP8 checkpoints: embedding and head stay)."""
    return {t.name: torch.float8_e4m3fn for t in model.tensors if len(t.shape) >= 2 and isinstance(t.layer, int)}


ONE_RANK = types.SimpleNamespace(get_global_rank=lambda: 1, config=None)


def test_destination_scale_tensors_have_the_formats_names_shapes_and_dtype():
    model = block_model()
    plan = plan_reshard(layout(2, 2, 1), layout(2, 2, 1), model)
    shards = Resharder(plan, context=ONE_RANK, dst_dtypes=fp8_of(model), fp8_scales="block").destination_shards()
    # TP rank 1 of 2: qkv rows [q1; k0; v0] = 384, o columns 128, gate_up 256, down 128, expert rows 128
    want = {"layers.0.qkv": (3, 2), "layers.0.o": (2, 1), "layers.0.gate_up": (2, 2), "layers.0.down": (2, 1),
            "layers.0.experts.up": (2, 1, 2)}
    for name, shape in want.items():
        scale = shards[name + "_scale_inv"]
        assert tuple(scale.shape) == shape and scale.dtype == torch.float32, name
        assert shards[name].dtype == torch.float8_e4m3fn and name + "_scale" not in shards
    assert shards["embed"].dtype == torch.bfloat16 and "embed_scale_inv" not in shards
    rows = Resharder(plan, context=ONE_RANK, dst_dtypes=fp8_of(model)).destination_shards()
    assert tuple(rows["layers.0.qkv_scale"].shape) == (384, 1) and "layers.0.qkv_scale_inv" not in rows


def test_messages_are_sliced_on_block_edges_and_count_one_float32_per_block():
    model = block_model()
    plan = plan_reshard(layout(3, 2, 1, [0, 1]), layout(3, 1, 1, [2]), model)
    dtypes = {**{t.name: t.dtype for t in model.tensors}, **fp8_of(model)}
    shapes = Shapes(plan, "block")
    for bucket in (20_000, 1 << 20):
        for rank in (0, 1):
            sends = plan.transfers_of(rank)[0]
            for message in messages(sends, lambda t: t.dst, shapes, dtypes, bucket).values():
                for piece in message.pieces:
                    t = piece.transfer
                    lengths = [b - a for a, b in t.dst_box]
                    if dtypes[t.tensor] != torch.float8_e4m3fn:
                        assert piece.nbytes == math.prod(lengths) * 2
                        continue
                    start = t.dst_box[t.axis][0]
                    assert start % B == 0, (t.tensor, t.dst_box)           # a slice starts on a block edge
                    blocks = math.prod(lengths[:-2]) * -(-lengths[-2] // B) * -(-lengths[-1] // B)
                    assert piece.nbytes == -(-math.prod(lengths) // 4) * 4 + 4 * blocks


def test_a_transfer_that_would_split_a_block_is_refused_naming_it(capsys, tmp_path):
    # ffn 192 over TP 2: gate rows 96 per rank, so the gate/up boundary of a TP 1 shard (row 192) and
    # the TP 2 shards' edges (96) fall inside blocks
    model = ModelSpec.create([TensorSpec.create("layers.0.gate_up", (384, 256), "bfloat16", 0, 0,
                                                parts_blocks((192, 192), 1, ("gate", "up")))], 1)
    plan = plan_reshard(layout(2, 2, 1), layout(2, 1, 1, [1]), model)
    problem = first_scale_cut(plan.transfers, Shapes(plan, "block"), fp8_of(model))
    assert problem is not None and "tensor 'layers.0.gate_up'" in problem and "splits a 128 x 128 block" in problem
    assert "rank 0 -> rank 1" in problem or "rank 1 -> rank 1" in problem
    assert first_scale_cut(plan.transfers, Shapes(plan, "row"), fp8_of(model)) is None
    resharder = Resharder(plan, context=ONE_RANK, dst_dtypes=fp8_of(model), fp8_scales="block")
    assert "splits a 128 x 128 block" in str(resharder._budget_problem)
    (tmp_path / "model.yaml").write_text("num_layers: 1\ntensors: [{name: 'layers.{layer}.gate_up', shape: [384, 256], "
                                         "tp_dim: 0, fused: {parts: [192, 192]}}]\n")
    (tmp_path / "tp2.yaml").write_text("parallel: {tensor: 2}\n")
    (tmp_path / "tp1.yaml").write_text("parallel: {tensor: 1}\nplacement: {ranks: '1'}\n")
    args = ["reshard-plan", str(tmp_path / "tp2.yaml"), str(tmp_path / "tp1.yaml"), "-n", "2",
            "--model", str(tmp_path / "model.yaml"), "--dst-dtype", "fp8-block"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dst-dtype fp8-block: rank" in err and "splits a 128 x 128 block" in err


def test_cli_fp8_block_counts_one_float32_per_block_on_the_wire(capsys):
    args = ["reshard-plan", "config_examples/reshard_train.yaml", "config_examples/reshard_infer.yaml",
            "--world-size", "16", "--model", "config_examples/reshard_model.yaml", "--json", "--transfers"]
    assert main(args + ["--dst-dtype", "fp8-block"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert main(args + ["--dst-dtype", "fp8"]) == 0
    rows = json.loads(capsys.readouterr().out)
    wire: Dict[int, int] = {}
    for t in data["transfers"]:
        if t["src"] == t["dst"]:
            continue
        lengths = [b - a for a, b in t["dst_local"]]
        layer_weight = t["tensor"].startswith("layers.") and len(lengths) >= 2   # embedding and head stay bf16
        nbytes = math.prod(lengths) * 2
        if layer_weight:
            nbytes = -(-math.prod(lengths) // 4) * 4 + 4 * -(-lengths[-2] // B) * -(-lengths[-1] // B)
        wire[t["dst"]] = wire.get(t["dst"], 0) + nbytes
    assert {r["rank"]: r["wire_received"] for r in data["receivers"]} == {r: wire.get(r, 0) for r in range(16)}
    assert data["fp8_scales"] == "block" and data["agreement_hash"] != rows["agreement_hash"]
    assert data["plan_hash"] == rows["plan_hash"]


# ---- on gloo ranks --------------------------------------------------------------------------------------------
BLOCK_CASES = [
    # (source layout, destination layout, Resharder options)
    ((2, 1), (1, 1, [1]), {"bucket_bytes": 20_000, "atomic": False}),   # TP 2 -> 1, slices of whole blocks
    ((1, 1, [0]), (2, 1), {"bucket_bytes": 1 << 20}),                      # TP 1 -> 2, local copies quantized too
]


def block_worker(world: int) -> List[str]:
    gpc = _init(world)
    rank, problems = gpc.get_global_rank(), []
    model = block_model()
    fp8 = fp8_of(model)
    for index, (src_shape, dst_shape, options) in enumerate(BLOCK_CASES):
        src, dst = layout(world, *src_shape), layout(world, *dst_shape)
        full = lambda name: smooth_full(model, name, index)  # noqa: E731
        plan = plan_reshard(src, dst, model, gpc.get_hostnames())
        resharder = Resharder(plan, dst_dtypes=fp8, fp8_scales="block", timeout_s=60, **options)
        out = resharder.destination_shards()
        stats = resharder.run(cut_shards(src, model, rank, full), out)
        where = f"case {index} rank {rank}"
        expected = 0
        for name, shard in cut_shards(dst, model, rank, full).items():
            if name not in fp8:
                if not same_bytes(out[name], shard):
                    problems.append(f"{where}: {name} differs")
                continue
            q, scale = block_reference(shard)
            if not same_bytes(out[name], q) or not same_bytes(out[scale_name(name, ScaleLayout((), B, 2))], scale):
                problems.append(f"{where}: block fp8 of {name} differs from the rule")
        for t in plan.transfers_of(rank)[1]:
            lengths = [b - a for a, b in t.dst_box]
            if t.tensor in fp8:
                expected += -(-math.prod(lengths) // 4) * 4 + 4 * math.prod(lengths[:-2]) * -(-lengths[-2] // B) * -(
                    -lengths[-1] // B)
            else:
                expected += t.nbytes
        if stats.bytes_received != expected:
            problems.append(f"{where}: received {stats.bytes_received} bytes, expected {expected}")
    # the destination (rank 1) stores per-row scales; the plan's wire format is block-scaled
    src, dst = layout(world, 1, 1, [0]), layout(world, 1, 1, [1])
    plan = plan_reshard(src, dst, model, gpc.get_hostnames())
    out = Resharder(plan, context=gpc, dst_dtypes=fp8).destination_shards() if rank == 1 else {}
    for tensor in out.values():
        tensor.reshape(-1).view(torch.uint8).fill_(SENTINEL)
    try:
        Resharder(plan, dst_dtypes=fp8, fp8_scales="block", timeout_s=60).run(
            cut_shards(src, model, rank, lambda n: smooth_full(model, n, 9)), out)
        problems.append(f"rank {rank}: a destination storing another scale format ran")
    except ReshardError as exc:
        want = ("the destination's storage format and the wire format differ" if rank == 1
                else "rank 1 refused to run the plan")
        if want not in str(exc):
            problems.append(f"rank {rank}: {exc}")
    if not all(bool((t.reshape(-1).view(torch.uint8) == SENTINEL).all()) for t in out.values()):
        problems.append(f"rank {rank}: the destination was written")
    gpc.destroy()
    return problems


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_executor_delivers_block_scaled_fp8_and_refuses_another_storage_format():
    problems = [p for value in _values(run_local(2, block_worker, (2,), timeout_s=140,
                                                 env={"OMP_NUM_THREADS": "1"})) for p in value]
    assert not problems, "\n".join(problems[:20])
