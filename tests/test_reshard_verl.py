"""The verl hand-off helper, end to end on 4 gloo ranks with the micro_data plugin.

Layout A is ``config_examples/micro_data.yaml`` itself (training TP 4, inference TP 2: micro
groups [0, 1], [2, 3]; inference TP groups [0, 2], [1, 3]). Layout B is TP 2 x PP 2 with
inference TP 1, where pipeline stages generate as data-parallel ranks. Every result is compared
with what one process computes from the full batch or the full weight.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch

from conftest import fake_world, run_ranks
from test_reshard_collectives import Expect, assert_ok, run_checks

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config_examples" / "micro_data.yaml"
PLUGIN = str(REPO / "config_examples" / "micro_data_plugin.py")
CONFIG_B = {"parallel": {"tensor": 2, "pipeline": 2}, "backend": "gloo", "timeout_s": 20,
            "plugins": [PLUGIN], "extra_modes": {"micro_data": {"inference_tensor": 1}}}
EXACT = dict(rtol=0, atol=0)


def prompts(seed: int, rows: int) -> Dict[str, torch.Tensor]:
    """A batch with several dtypes sharing the batch dim."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (rows, 6), generator=gen)
    return {"input_ids": ids, "attention_mask": ids % 3 != 0, "position_ids": ids.cumsum(1).to(torch.int32),
            "scores": torch.randn(rows, generator=gen, dtype=torch.float64),
            "pixels": torch.randn(rows, 2, 2, generator=gen).to(torch.bfloat16)}


def generate(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A stand-in for the inference engine: row-wise, deterministic, adds entries."""
    return dict(batch, responses=batch["input_ids"].flip(1) * 3 + 1,
                log_probs=batch["input_ids"].to(torch.float64).sin())


def same_batch(expect: Expect, actual, expected, what: str) -> None:
    expect.true(list(actual) == list(expected), f"{what}: entries {list(actual)} != {list(expected)}")
    for name in expected:
        if name in actual:
            expect.true(actual[name].dtype == expected[name].dtype, f"{what} [{name}]: dtype {actual[name].dtype}")
            expect.close(actual[name], expected[name], EXACT, f"{what} [{name}]")


# ---- layout A: the example config, TP 4 -> inference TP 2 ------------------------------------------
def check_layout_a(expect: Expect, sharding, rank: int) -> None:
    assert sharding.micro_dp_size == 2 and sharding.micro_dp_rank == rank % 2
    assert sharding.training_tensor_size == 4 and sharding.inference_tensor_size == 2
    assert sharding.inference_tensor_rank == rank // 2
    assert sharding.inference_tensor_ranks == [rank % 2, rank % 2 + 2]   # verl's strided groups


def check_batches_a(expect: Expect, sharding, rank: int) -> None:
    full = prompts(1, 5)                                     # 5 rows over 2 micro ranks: 3 + 2
    given = {0: full, 1: None, 2: None, 3: prompts(99, 2)}[rank]  # rank 3 holds a stale batch
    mine = sharding.preprocess(given)
    rows = slice(0, 3) if rank % 2 == 0 else slice(3, 5)
    same_batch(expect, mine, {k: v[rows] for k, v in full.items()}, "preprocess")
    result = sharding.postprocess(generate(mine))
    same_batch(expect, result, generate(full), "postprocess")


def check_single_tensor_batches(expect: Expect, ctx, rank: int) -> None:
    from pgroups.reshard.verl import all_gather_batch, broadcast_batch

    full = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    got = broadcast_batch(full if rank == 1 else None, "tensor", src=1, ctx=ctx)
    expect.true(isinstance(got, torch.Tensor), "a tensor comes back as a tensor")
    expect.close(got, full, EXACT, "broadcast of a tensor from local rank 1")
    piece = torch.full((rank, 2), float(rank))               # 0, 1, 2, 3 rows: uneven
    gathered = all_gather_batch(piece, "tensor", ctx=ctx, cpu=True)
    expect.close(gathered, torch.cat([torch.full((r, 2), float(r)) for r in range(4)]), EXACT, "uneven all-gather")
    rows_dim1 = all_gather_batch({"x": torch.full((2, 1), float(rank))}, "micro_data", dim=1, ctx=ctx)
    pair = [rank - rank % 2, rank - rank % 2 + 1]
    expect.close(rows_dim1["x"], torch.tensor([[float(pair[0]), float(pair[1])]] * 2), EXACT, "all-gather along dim 1")


def full_weights() -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    return {"q": rand(16, 3), "k": rand(8, 3), "v": rand(8, 3), "gate": rand(8, 3), "up": rand(8, 3),
            "o": rand(3, 16), "norm": rand(3)}


def training_shards(full, tp_rank: int, tp: int) -> Dict[str, torch.Tensor]:
    """Megatron-style shards: fused QKV (GQA 2:1) and gate/up split per sub-block."""
    part = lambda name, dim=0: torch.tensor_split(full[name], tp, dim)[tp_rank]  # noqa: E731
    return {"qkv": torch.cat([part("q"), part("k"), part("v")]), "gate_up": torch.cat([part("gate"), part("up")]),
            "o": part("o", 1), "norm": full["norm"]}


def check_weights_a(expect: Expect, sharding, rank: int) -> None:
    full = full_weights()
    mine = training_shards(full, rank, 4)
    tp_dims = {"qkv": 0, "gate_up": 0, "o": 1}
    sub_blocks = {"qkv": (4, 2, 2), "gate_up": (2, 2)}
    expected = training_shards(full, sharding.inference_tensor_rank, 2)   # cut from the full weights
    one_bucket = sharding.gather_inference_params(mine, tp_dims, sub_blocks)
    tiny_buckets = dict(sharding.iter_inference_params(mine, tp_dims, sub_blocks, bucket_bytes=100))
    for result, what in ((one_bucket, "one bucket"), (tiny_buckets, "one tensor per bucket")):
        expect.true(sorted(result) == sorted(expected), f"{what}: names {sorted(result)}")
        for name in set(expected) & set(result):
            expect.close(result[name], expected[name], EXACT, f"inference shard {name} ({what})")
    expect.true(one_bucket["norm"] is mine["norm"], "replicated parameters pass through, unsent")
    plain = sharding.gather_inference_shard(mine["o"], dim=1)
    expected_o = torch.tensor_split(full["o"], 2, 1)[sharding.inference_tensor_rank]
    expect.close(plain, expected_o, EXACT, "gather_inference_shard")


def check_errors_a(expect: Expect, sharding, ctx, rank: int) -> None:
    from pgroups.reshard.verl import all_gather_batch

    batch = {"x": torch.zeros(2, 3)}
    if rank == 2:
        batch["extra"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"local rank 2 holds entries \['extra', 'x'\].*differing: \['extra'\]"):
        all_gather_batch(batch, "tensor", ctx=ctx)           # every rank raises, none hangs
    wide = {"x": torch.zeros(2, 3 + (rank == 1))}
    with pytest.raises(ValueError, match=r"entry 'x' is torch.float32 \(2, 3\) on local rank 0 but .*\(2, 4\)"):
        all_gather_batch(wide, "tensor", ctx=ctx)
    ragged = {"a": torch.zeros(4, 2), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match="disagree on the size of dim 0: a=4, b=3"):
        sharding.preprocess(ragged if rank == 0 else None)
    with pytest.raises(ValueError, match=r"not in params"):
        sharding.gather_inference_params({"w": torch.zeros(2)}, {"v": 0})


# ---- layout B: TP 2 x PP 2, inference TP 1: pipeline stages generate as data parallel ----------------
def check_batches_b(expect: Expect, sharding, rank: int) -> None:
    expect.true((sharding.micro_dp_size, sharding.inference_tensor_size) == (2, 1), "layout B sizes")
    per_stage = {0: prompts(10, 6), 2: prompts(20, 4)}         # each stage's TP source got its own batch
    mine = sharding.preprocess(per_stage.get(rank))
    source = per_stage[rank - rank % 2]
    half = source["input_ids"].shape[0] // 2
    rows = slice(0, half) if rank % 2 == 0 else slice(half, None)
    same_batch(expect, mine, {k: v[rows] for k, v in source.items()}, "preprocess (pp as dp)")
    out = generate(mine)
    same_batch(expect, sharding.postprocess(out, gather_pipeline=False), generate(source), "postprocess, micro only")
    both = {k: torch.cat([per_stage[0][k], per_stage[2][k]]) for k in per_stage[0]}
    same_batch(expect, sharding.postprocess(out), generate(both), "postprocess, micro then pipeline")


def verl_worker() -> Dict[str, str]:
    from pgroups import ParallelContext
    from pgroups.reshard.verl import MicroDataSharding

    ctx_a = ParallelContext().init_from_config(str(EXAMPLE))
    ctx_b = ParallelContext().init_from_config(CONFIG_B)      # a second context on the same ranks
    rank = ctx_a.get_global_rank()
    a, b = MicroDataSharding(ctx_a), MicroDataSharding(ctx_b)
    b_cpu = MicroDataSharding(ctx_b, cpu=True)
    checks: Dict[str, Callable[[Expect], None]] = {
        "a/layout": lambda e: check_layout_a(e, a, rank),
        "a/batches": lambda e: check_batches_a(e, a, rank),
        "a/single-tensor": lambda e: check_single_tensor_batches(e, ctx_a, rank),
        "a/weights": lambda e: check_weights_a(e, a, rank),
        "a/errors": lambda e: check_errors_a(e, a, ctx_a, rank),
        "b/batches": lambda e: check_batches_b(e, b, rank),
        "b/batches-cpu-groups": lambda e: check_batches_b(e, b_cpu, rank),
    }
    return run_checks(checks)


@pytest.fixture(scope="module")
def results() -> List[Dict[str, str]]:
    return run_ranks(4, verl_worker, timeout_s=120)


@pytest.mark.timeout(150)
def test_layout_queries_match_verls_micro_and_inference_groups(results):
    assert_ok(results, "a/layout")


@pytest.mark.timeout(150)
def test_preprocess_broadcasts_and_chunks_postprocess_gathers_back(results):
    assert_ok(results, "a/batches")
    assert_ok(results, "a/single-tensor")


@pytest.mark.timeout(150)
def test_pipeline_stages_generate_as_data_parallel_and_are_gathered(results):
    assert_ok(results, "b/")


@pytest.mark.timeout(150)
def test_inference_shards_equal_the_cut_of_the_full_weights_fused_layouts_included(results):
    assert_ok(results, "a/weights")


@pytest.mark.timeout(150)
def test_mismatched_batches_raise_the_same_error_on_every_rank(results):
    assert_ok(results, "a/errors")


# ---- pure parts, in this process ---------------------------------------------------------------------
def test_batch_header_round_trips():
    from pgroups.reshard.verl import decode_header, encode_header

    entries = [("input_ids", torch.int64, (4, 7)), ("μ-score", torch.bfloat16, ()), ("", torch.bool, (0, 3))]
    assert decode_header(encode_header(entries, single=True)) == (entries, True)
    with pytest.raises(ValueError, match="dtype torch.uint16"):
        encode_header([("x", torch.uint16, (1,))])


def test_chunk_batch_follows_tensor_split():
    from pgroups.reshard.verl import chunk_batch

    batch = {"a": torch.arange(5), "b": torch.arange(10).reshape(5, 2)}
    assert chunk_batch(batch, 2, 0)["a"].tolist() == [0, 1, 2]
    assert chunk_batch(batch, 2, 1)["b"].tolist() == [[6, 7], [8, 9]]
    assert chunk_batch(torch.arange(4), 4, 3).tolist() == [3]
    with pytest.raises(ValueError, match="chunk index 2 is outside 0..1"):
        chunk_batch(batch, 2, 2)


def test_assemble_inference_shard_regroups_sub_blocks():
    from pgroups.reshard.verl import assemble_inference_shard

    # two training shards of a fused [q(2 rows) | k(1) | v(1)] -> q0 q1 | k0 k1 | v0 v1
    pieces = [torch.tensor([[1.], [2.], [3.], [4.]]), torch.tensor([[5.], [6.], [7.], [8.]])]
    assert assemble_inference_shard(pieces, 0, (2, 1, 1)).flatten().tolist() == [1, 2, 5, 6, 3, 7, 4, 8]
    assert assemble_inference_shard(pieces, 0).flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match=r"sub_blocks \[2, 1\] must tile dim 0 of the training shard \(size 4\)"):
        assemble_inference_shard(pieces, 0, (2, 1))


def test_layout_at_world_16_under_the_fake_backend():
    """Training TP 8 -> inference TP 2: micro groups of 4; rank 5's inference group is [1, 5]."""
    from pgroups import ParallelContext
    from pgroups.reshard.verl import MicroDataSharding

    config = {"parallel": {"tensor": 8}, "plugins": [PLUGIN], "extra_modes": {"micro_data": {"inference_tensor": 2}}}
    with fake_world(16, 5):
        ctx = ParallelContext().init_from_config(config)
        try:
            sharding = MicroDataSharding(ctx)
            assert sharding.micro_ranks == [4, 5, 6, 7] and sharding.micro_dp_rank == 1
            assert (sharding.inference_tensor_size, sharding.inference_tensor_rank) == (2, 1)
            assert sharding.inference_tensor_ranks == [1, 5]
        finally:
            ctx.destroy()


def test_missing_micro_data_mode_names_the_plugin_and_bad_groups_are_refused():
    from pgroups import ConfigError, ModeNotInitializedError, ParallelContext
    from pgroups.reshard.verl import MicroDataSharding

    with fake_world(4, 0):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 2, "pipeline": 2}})
        try:
            with pytest.raises(ModeNotInitializedError, match=r"pgroups\.plugins\.micro_data"):
                MicroDataSharding(ctx)
            with pytest.raises(ConfigError, match=r"mode 'pp' group \[0, 2\] is not a block of consecutive ranks"):
                MicroDataSharding(ctx, micro_data_mode="pipe")
        finally:
            ctx.destroy()
