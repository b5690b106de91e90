"""Activation resharding collectives, forward and backward, against single-process references.

One spawn of 4 real gloo ranks (tensor 2 x pipeline 2) runs every check on several groups:
``tensor`` (pairs), the ``pipe`` group passed as an explicit ProcessGroup, ``global`` (4 ranks,
with uneven sizes) and ``data`` (a group of one). Each rank knows every member's input (seeded by
global rank), so it rebuilds the whole computation in one process with plain torch ops and
compares its own output and its input's gradient with that reference. Tensors are float64:
gathers, splits and all-to-alls must match bit for bit; sums over ranks to 1e-12.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence

import pytest
import torch

from conftest import run_ranks

CONFIG = {"parallel": {"tensor": 2, "pipeline": 2}, "backend": "gloo", "timeout_s": 20}
TIMEOUT_CONFIG = {"parallel": {"tensor": 2, "pipeline": 2}, "backend": "gloo", "timeout_s": 2,
                  "groups": "lazy"}
EXACT = dict(rtol=0, atol=0)
SUMMED = dict(rtol=1e-12, atol=1e-12)


# ---- reference data ----------------------------------------------------------------------------
def data(seed: int, shape: Sequence[int], dtype=torch.float64) -> torch.Tensor:
    """The same tensor on every rank for the same seed and shape."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    return values.to(dtype) if dtype.is_floating_point else (values * 100).to(dtype)


def with_size(shape, dim, size):
    shape = list(shape)
    shape[dim] = size
    return tuple(shape)


class Group:
    """What a check needs about the group it runs on: the argument to pass, members, my place."""

    def __init__(self, ctx, mode: str, explicit: bool = False) -> None:
        self.arg = ctx.get_group(mode) if explicit else mode
        self.members: List[int] = ctx.get_ranks_in_group(mode)
        self.me = ctx.get_local_rank(mode)
        self.size = len(self.members)
        self.ctx = ctx


def leaves(tensors):
    return [t.clone().requires_grad_() for t in tensors]


class Expect:
    """Collects a check's failed comparisons instead of raising at the first one, so that a rank
    whose result is wrong still enters every later collective of the check with its peers (a
    rank that stopped early would leave the others waiting until the group's timeout)."""

    def __init__(self) -> None:
        self.failures: List[str] = []

    def close(self, actual, expected, tol, what: str) -> None:
        try:
            torch.testing.assert_close(actual, expected, **tol)
        except AssertionError as exc:
            self.failures.append(f"{what}: {exc}")

    def true(self, condition: bool, what: str) -> None:
        if not condition:
            self.failures.append(what)


def run_checks(checks: Dict[str, Callable[[Expect], None]]) -> Dict[str, str]:
    """Run every check on this rank; report "ok" or its failures, per check. A check that
    raises is reported too, and the next one still runs."""
    results = {}
    for name, check in checks.items():
        expect = Expect()
        try:
            check(expect)
            results[name] = "; ".join(expect.failures) or "ok"
        except Exception as exc:  # reported per check to the parent
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


def assert_ok(results: List[Dict[str, str]], prefix: str) -> None:
    """Every rank reported "ok" for every check whose name starts with ``prefix``."""
    names = [name for name in results[0] if name.startswith(prefix)]
    assert names, f"no check named {prefix}*"
    failures = [f"rank {rank} {name}: {outcome}" for rank, per_rank in enumerate(results)
                for name, outcome in per_rank.items() if name in names and outcome != "ok"]
    assert not failures, "\n".join(failures)


# ---- checks (each runs on every rank of the group) -----------------------------------------------
def check_gather(expect: Expect, g: Group, dim: int, sizes, seed: int) -> None:
    from pgroups.comm import exchange_sizes, gather_along

    base = (3, 4, 2)
    sizes = sizes or (base[dim],) * g.size
    learned = exchange_sizes(sizes[g.me], g.arg, ctx=g.ctx)
    expect.true(learned == tuple(sizes), f"exchange_sizes gave {learned}, not {tuple(sizes)}")
    inputs = [data(seed + r, with_size(base, dim, s)) for r, s in zip(g.members, sizes)]
    x = inputs[g.me].clone().requires_grad_()
    out = gather_along(x, dim, g.arg, sizes=sizes, ctx=g.ctx)
    ref_x = leaves(inputs)
    ref = torch.cat(ref_x, dim)
    expect.close(out, ref.detach(), EXACT, "gather forward")
    downstream = data(seed + 1000, ref.shape)   # identical on every rank: the contract of gather
    (out * downstream).sum().backward()
    (ref * downstream).sum().backward()
    expect.close(x.grad, ref_x[g.me].grad, EXACT, "gather backward (split)")


def check_split(expect: Expect, g: Group, dim: int, total: int, seed: int) -> None:
    from pgroups.comm import split_along

    full = data(seed, with_size((2, 3, 4), dim, total))         # replicated input
    x = full.clone().requires_grad_()
    out = split_along(x, dim, g.arg, ctx=g.ctx)
    ref_x = full.clone().requires_grad_()
    pieces = torch.tensor_split(ref_x, g.size, dim)
    expect.close(out, pieces[g.me].detach(), EXACT, "split forward")
    weights = [data(seed + 100 + r, p.shape) for r, p in zip(g.members, pieces)]  # per-rank use
    (out * weights[g.me]).sum().backward()
    sum((p * w).sum() for p, w in zip(pieces, weights)).backward()
    expect.close(x.grad, ref_x.grad, EXACT, "split backward (all-gather)")


def check_reduce_scatter(expect: Expect, g: Group, dim: int, total: int, seed: int) -> None:
    from pgroups.comm import reduce_scatter_along

    shape = with_size((3, 2, 5), dim, total)
    inputs = [data(seed + r, shape) for r in g.members]
    x = inputs[g.me].clone().requires_grad_()
    out = reduce_scatter_along(x, dim, g.arg, ctx=g.ctx)
    ref_x = leaves(inputs)
    pieces = torch.tensor_split(sum(ref_x), g.size, dim)
    expect.close(out, pieces[g.me].detach(), SUMMED, "reduce-scatter forward")
    weights = [data(seed + 100 + r, p.shape) for r, p in zip(g.members, pieces)]
    (out * weights[g.me]).sum().backward()
    sum((p * w).sum() for p, w in zip(pieces, weights)).backward()
    expect.close(x.grad, ref_x[g.me].grad, EXACT, "reduce-scatter backward (all-gather)")


def ulysses_reference(qkv_by_rank, size: int, seq_dim: int, head_dim: int):
    """Every rank's head-sharded outputs, computed in one process from every rank's inputs."""
    return [[torch.cat([torch.tensor_split(inputs[t], size, head_dim)[dest] for inputs in qkv_by_rank], seq_dim)
             for t in range(len(qkv_by_rank[0]))] for dest in range(size)]


def check_ulysses(expect: Expect, g: Group, seq_sizes, seed: int) -> None:
    """q, k, v (GQA: fewer k/v heads) sequence-sharded -> head-sharded in one call, and back."""
    from pgroups.comm import head_to_seq, seq_to_head

    batch, heads_q, heads_kv, head_dim_size = 2, 4 * g.size, 2 * g.size, 3
    seq_sizes = seq_sizes or (3,) * g.size
    inputs = [[data(seed + 10 * r + t, (batch, s, h, head_dim_size)) for t, h in
               enumerate((heads_q, heads_kv, heads_kv))] for r, s in zip(g.members, seq_sizes)]
    mine = leaves(inputs[g.me])
    outs = seq_to_head(mine, g.arg, seq_dim=1, head_dim=2, seq_sizes=seq_sizes, ctx=g.ctx)
    ref_inputs = [leaves(per_rank) for per_rank in inputs]
    ref_outs = ulysses_reference(ref_inputs, g.size, seq_dim=1, head_dim=2)
    for t in range(3):
        expect.close(outs[t], ref_outs[g.me][t].detach(), EXACT, f"seq_to_head forward, tensor {t}")
    weights = [[data(seed + 500 + 10 * r + t, o.shape) for t, o in enumerate(ref_outs[i])]
               for i, r in enumerate(g.members)]
    sum((o * w).sum() for o, w in zip(outs, weights[g.me])).backward()
    sum((o * w).sum() for per_rank, ws in zip(ref_outs, weights) for o, w in zip(per_rank, ws)).backward()
    for t in range(3):
        expect.close(mine[t].grad, ref_inputs[g.me][t].grad, EXACT, f"seq_to_head backward, tensor {t}")

    # head-sharded -> sequence-sharded is the inverse, gradients included
    heads = [o.detach().clone().requires_grad_() for o in outs]
    back = head_to_seq(heads, g.arg, seq_dim=1, head_dim=2, seq_sizes=seq_sizes, ctx=g.ctx)
    for t in range(3):
        expect.close(back[t], inputs[g.me][t], EXACT, f"head_to_seq(seq_to_head(x)), tensor {t}")
    sum((b * data(seed + 900 + t, b.shape)).sum() for t, b in enumerate(back)).backward()
    # reference: the gradient w.r.t. each head-sharded piece is the seq_to_head of the weights
    grad_in = [[data(seed + 900 + t, with_size(inputs[i][t].shape, 1, s)) for t in range(3)]
               for i, s in enumerate(seq_sizes)]
    expected = ulysses_reference(grad_in, g.size, seq_dim=1, head_dim=2)[g.me]
    for t in range(3):
        expect.close(heads[t].grad, expected[t], EXACT, f"head_to_seq backward, tensor {t}")


def check_all_to_all_dtypes(expect: Expect, g: Group, seed: int) -> None:
    """Tensors of three dtypes travel in one call; a single tensor comes back as a tensor."""
    from pgroups.comm import all_to_all

    dtypes = (torch.float64, torch.float32, torch.int64)
    inputs = [[data(seed + 10 * r + i, (2 * g.size + i, 5), dtype) for i, dtype in enumerate(dtypes)]
              for r in g.members]
    outs = all_to_all(inputs[g.me], g.arg, scatter_dim=0, gather_dim=1, ctx=g.ctx)
    for i, dtype in enumerate(dtypes):
        expected = torch.cat([torch.tensor_split(per_rank[i], g.size, 0)[g.me] for per_rank in inputs], 1)
        expect.true(outs[i].dtype == dtype, f"all_to_all output {i} is {outs[i].dtype}, not {dtype}")
        expect.close(outs[i], expected, EXACT, f"all_to_all {dtype}")
    single = all_to_all(inputs[g.me][0], g.arg, scatter_dim=0, gather_dim=1, ctx=g.ctx)
    expect.true(isinstance(single, torch.Tensor), "a single tensor comes back as a tensor")
    expect.close(single, outs[0], EXACT, "all_to_all of a single tensor")


def check_weight_gather(expect: Expect, g: Group, dim: int, sizes, seed: int) -> None:
    """Two gathers in flight at once, waited in reverse order; backward sums over ranks."""
    from pgroups.comm import WeightGatherHandle, start_weight_gather

    base = (4, 3)
    sizes = sizes or (base[dim],) * g.size
    shards = {name: [data(seed + off + r, with_size(base, dim, s)) for r, s in zip(g.members, sizes)]
              for name, off in (("w1", 0), ("w2", 50))}
    mine = {name: s[g.me].clone().requires_grad_() for name, s in shards.items()}
    handles = {name: start_weight_gather(mine[name], dim, g.arg, sizes=sizes, ctx=g.ctx) for name in ("w1", "w2")}
    expect.true(all(isinstance(h, WeightGatherHandle) for h in handles.values()), "handles")
    full2 = handles["w2"].wait()
    full1 = handles["w1"].wait()
    expect.true(handles["w1"].wait() is full1 and handles["w1"].is_completed(), "wait() again: same tensor")
    ref_shards = {name: leaves(s) for name, s in shards.items()}
    ref_full = {name: torch.cat(s, dim) for name, s in ref_shards.items()}
    expect.close(full1, ref_full["w1"].detach(), EXACT, "weight gather forward w1")
    expect.close(full2, ref_full["w2"].detach(), EXACT, "weight gather forward w2")
    shape = ref_full["w1"].shape
    uses = {r: (data(seed + 300 + r, shape), data(seed + 400 + r, shape)) for r in g.members}

    def loss(r, w1, w2):  # every rank uses the full weights in its own way
        a, b = uses[r]
        return (w1 * w2 * a).sum() + (w1 * b).sum()

    loss(g.members[g.me], full1, full2).backward()
    sum(loss(r, ref_full["w1"], ref_full["w2"]) for r in g.members).backward()
    for name in ("w1", "w2"):
        expect.close(mine[name].grad, ref_shards[name][g.me].grad, SUMMED, f"weight gather backward {name}")


def check_errors(expect: Expect, g: Group) -> None:
    """Bad arguments raise one clear ValueError before any communication."""
    from pgroups import ModeNotInitializedError
    from pgroups.comm import all_to_all, gather_along, split_along, start_weight_gather

    x = torch.zeros(4, 6)
    cases = [
        (lambda: gather_along(x, 2, g.arg, ctx=g.ctx), "dim 2 is out of range for the 2-d tensor"),
        (lambda: gather_along(x, 0, g.arg, sizes=[4] * (g.size + 1), ctx=g.ctx), f"which has {g.size} ranks"),
        (lambda: gather_along(x, 1, g.arg, sizes=[5] * g.size, ctx=g.ctx),
         f"this rank's tensor has size 6 along dim 1, but sizes[{g.me}] = 5"),
        (lambda: split_along(x, 0, g.arg, sizes=[1] * g.size, ctx=g.ctx), "must split dim 0 of size 4"),
        (lambda: all_to_all([x], g.arg, scatter_dim=1, gather_dim=-1, ctx=g.ctx), "name the same dim"),
        (lambda: all_to_all([], g.arg, scatter_dim=0, gather_dim=1, ctx=g.ctx), "non-empty sequence"),
        (lambda: all_to_all([x, torch.zeros(4)], g.arg, scatter_dim=0, gather_dim=1, ctx=g.ctx),
         "tensor 1 is 1-d but tensor 0 is 2-d"),
        (lambda: start_weight_gather(torch.tensor(1.0), 0, g.arg, ctx=g.ctx), "0-d"),
    ]
    for call, expected in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert expected in str(info.value), (expected, str(info.value))
    with pytest.raises(ModeNotInitializedError, match="mode 'sequence' was not built"):
        gather_along(x, 0, "sequence", ctx=g.ctx)


def check_default_context(expect: Expect) -> None:
    """Without ctx=, modes resolve through pgroups.gpc (initialized by the worker)."""
    import pgroups
    from pgroups.comm import gather_along, resolve_group

    info = resolve_group("tensor")
    expect.true((info.size, info.rank) == (2, pgroups.gpc.get_local_rank("tensor")), f"resolved {info}")
    out = gather_along(torch.full((1,), float(pgroups.gpc.get_global_rank())), 0, "tensor")
    expect.close(out, torch.tensor([float(r) for r in pgroups.gpc.get_ranks_in_group("tensor")]), EXACT, "default ctx")


def check_timeout(expect: Expect, rank: int) -> None:
    """Rank 3 never joins its tensor pair's gather: rank 2 gets a GroupTimeoutError naming the
    group (ranks [2, 3]) within the group's 2 s timeout; the other pair is unaffected. Rank 3
    stays alive, waiting in a world barrier that rank 2 reaches after its timeout."""
    import torch.distributed as dist

    from pgroups import GroupTimeoutError, ParallelContext
    from pgroups.comm import gather_along

    ctx = ParallelContext().init_from_config(TIMEOUT_CONFIG)
    expect.true(ctx.get_group("tensor") is not None, "tensor group built")  # lazy: built here, by both members
    x = torch.ones(2)
    if rank == 2:
        started = time.monotonic()
        with pytest.raises(GroupTimeoutError) as info:
            gather_along(x, 0, "tensor", ctx=ctx)
        expect.true("all-gather over mode 'tp' (ranks [2, 3]) timed out" in str(info.value), str(info.value))
        expect.true(time.monotonic() - started < 15, "the timeout came late")
    elif rank != 3:
        expect.close(gather_along(x, 0, "tensor", ctx=ctx), torch.ones(4), EXACT, "healthy pair")
    dist.barrier()


# ---- the worker: one spawn, every check --------------------------------------------------------
def _checks(ctx) -> Dict[str, Callable[[Expect], None]]:
    tensor, pipe = Group(ctx, "tensor"), Group(ctx, "pipe", explicit=True)
    world, single = Group(ctx, "global"), Group(ctx, "data")
    return {
        "gather/tensor": lambda e: check_gather(e, tensor, 1, None, 10),
        "gather/pipe-group": lambda e: check_gather(e, pipe, 0, None, 20),
        "gather/global-uneven": lambda e: check_gather(e, world, 2, (1, 3, 0, 2), 30),
        "gather/size-1": lambda e: check_gather(e, single, 0, None, 40),
        "split/tensor": lambda e: check_split(e, tensor, 2, 8, 50),
        "split/pipe-group": lambda e: check_split(e, pipe, 0, 4, 60),
        "split/global-uneven": lambda e: check_split(e, world, 1, 6, 70),
        "split/size-1": lambda e: check_split(e, single, 1, 3, 75),
        "reduce_scatter/tensor": lambda e: check_reduce_scatter(e, tensor, 0, 4, 80),
        "reduce_scatter/pipe-group": lambda e: check_reduce_scatter(e, pipe, 2, 6, 90),
        "reduce_scatter/global-uneven": lambda e: check_reduce_scatter(e, world, 1, 7, 100),
        "reduce_scatter/size-1": lambda e: check_reduce_scatter(e, single, 0, 3, 105),
        "ulysses/tensor": lambda e: check_ulysses(e, tensor, None, 110),
        "ulysses/pipe-group-uneven": lambda e: check_ulysses(e, pipe, (4, 1), 120),
        "ulysses/global-uneven": lambda e: check_ulysses(e, world, (2, 3, 1, 2), 130),
        "ulysses/size-1": lambda e: check_ulysses(e, single, None, 135),
        "all_to_all/dtypes": lambda e: check_all_to_all_dtypes(e, world, 140),
        "weight_gather/tensor": lambda e: check_weight_gather(e, tensor, 0, None, 150),
        "weight_gather/pipe-group-dim1": lambda e: check_weight_gather(e, pipe, 1, None, 160),
        "weight_gather/global-uneven": lambda e: check_weight_gather(e, world, 0, (1, 2, 0, 3), 170),
        "weight_gather/size-1": lambda e: check_weight_gather(e, single, 1, None, 175),
        "errors/tensor": lambda e: check_errors(e, tensor),
        "errors/pipe-group": lambda e: check_errors(e, pipe),
        "default_context": check_default_context,
        "timeout": lambda e: check_timeout(e, ctx.get_global_rank()),
    }


def collectives_worker() -> Dict[str, str]:
    import pgroups

    ctx = pgroups.gpc.init_from_config(CONFIG)
    return run_checks(_checks(ctx))


@pytest.fixture(scope="module")
def results() -> List[Dict[str, str]]:
    return run_ranks(4, collectives_worker, timeout_s=150)


@pytest.mark.timeout(180)
def test_gather_along_forward_gathers_and_backward_splits(results):
    assert_ok(results, "gather/")


@pytest.mark.timeout(180)
def test_split_along_forward_splits_and_backward_gathers(results):
    assert_ok(results, "split/")


@pytest.mark.timeout(180)
def test_reduce_scatter_forward_sums_a_slice_and_backward_gathers(results):
    assert_ok(results, "reduce_scatter/")


@pytest.mark.timeout(180)
def test_ulysses_qkv_in_one_all_to_all_both_ways_with_gradients(results):
    assert_ok(results, "ulysses/")


@pytest.mark.timeout(180)
def test_all_to_all_moves_mixed_dtypes_in_one_call(results):
    assert_ok(results, "all_to_all/")


@pytest.mark.timeout(180)
def test_async_weight_gather_handles_and_reduce_scattered_gradients(results):
    assert_ok(results, "weight_gather/")


@pytest.mark.timeout(180)
def test_bad_dims_and_sizes_raise_one_clear_value_error(results):
    assert_ok(results, "errors/")


@pytest.mark.timeout(180)
def test_modes_resolve_through_gpc_by_default(results):
    assert_ok(results, "default_context")


@pytest.mark.timeout(180)
def test_absent_peer_raises_group_timeout_naming_the_group(results):
    assert_ok(results, "timeout")


def test_even_split_sizes_match_tensor_split():
    from pgroups.comm import even_split_sizes, offsets_of

    for total in range(0, 12):
        for parts in range(1, 6):
            expected = tuple(p.shape[0] for p in torch.tensor_split(torch.zeros(total), parts))
            assert even_split_sizes(total, parts) == expected
            assert offsets_of(expected)[-1] + expected[-1] == total


def test_old_import_paths_re_export_the_comm_collectives():
    """The collectives moved to pgroups.comm; pgroups.reshard(.collectives) still export them."""
    import pgroups.comm as comm
    import pgroups.reshard as reshard
    import pgroups.reshard.collectives as old

    for name in ("gather_along", "split_along", "reduce_scatter_along", "all_to_all", "seq_to_head", "head_to_seq",
                 "start_weight_gather", "all_gather_weight", "WeightGatherHandle", "resolve_group", "GroupInfo",
                 "comm_errors", "gather_raw", "exchange_sizes", "even_split_sizes", "offsets_of", "normalize_dim"):
        assert getattr(old, name) is getattr(comm, name), name
    for name in ("gather_along", "seq_to_head", "start_weight_gather", "WeightGatherHandle"):
        assert getattr(reshard, name) is getattr(comm, name), name
    assert old._pack is comm.pack_tensors and old._unpack is comm.unpack_tensors


def test_packed_tensors_round_trip_any_dtype_at_aligned_offsets():
    from pgroups.comm import SEGMENT_ALIGN, pack_tensors, packed_nbytes, unpack_tensors

    tensors = [torch.arange(3, dtype=torch.int8), torch.randn(2, 3, dtype=torch.float64),
               torch.tensor([True, False]), torch.randn(5).to(torch.bfloat16), torch.zeros(0, 4)]
    layout = [(tuple(t.shape), t.dtype) for t in tensors]
    buffer = pack_tensors(tensors)
    assert buffer.dtype == torch.uint8 and buffer.numel() == packed_nbytes(layout)
    expected_bytes = sum(-(-t.numel() * t.element_size() // SEGMENT_ALIGN) * SEGMENT_ALIGN for t in tensors)
    assert buffer.numel() == expected_bytes
    for original, unpacked in zip(tensors, unpack_tensors(buffer, layout)):
        assert unpacked.dtype == original.dtype and torch.equal(unpacked, original)
