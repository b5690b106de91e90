"""The pure parts of the ISP runtime: prefetch order, KV-head repetition, the buffer pool."""
from __future__ import annotations

import pytest
import torch

from pgroups.comm import BufferPool, kv_repeats, prefetch_blocks


def test_prefetch_blocks_look_ahead_in_the_direction_of_the_pass():
    assert prefetch_blocks(0, 1, 4, forward=True) == (1,)
    assert prefetch_blocks(2, 2, 4, forward=True) == (3,)
    assert prefetch_blocks(3, 1, 4, forward=True) == ()
    assert prefetch_blocks(3, 2, 4, forward=False) == (2, 1)
    assert prefetch_blocks(0, 3, 4, forward=False) == ()
    for depth in range(1, 4):
        for index in range(5):
            ahead = prefetch_blocks(index, depth, 5, forward=True)
            assert ahead == tuple(range(index + 1, min(index + depth, 4) + 1))


def test_kv_repeats_give_every_rank_the_kv_heads_of_its_query_heads():
    """Re-derive GQA's rule: query head h uses KV head h // (heads / kv_heads). After repeating
    each KV head r times (adjacent copies) and splitting both over p ranks, rank j's query heads
    must all map to the KV heads rank j holds."""
    for heads, kv_heads, group in [(8, 2, 4), (8, 1, 4), (8, 8, 4), (8, 4, 4), (4, 2, 2), (16, 4, 8), (8, 2, 8)]:
        r = kv_repeats(heads, kv_heads, group)
        repeated = [kv for kv in range(kv_heads) for _ in range(r)]          # repeat_interleave
        q_per, kv_per = heads // group, len(repeated) // group
        for rank in range(group):
            held = set(repeated[rank * kv_per:(rank + 1) * kv_per])
            needed = {h // (heads // kv_heads) for h in range(rank * q_per, (rank + 1) * q_per)}
            assert needed <= held, (heads, kv_heads, group, rank)


@pytest.mark.parametrize("heads,kv_heads,group,message", [
    (6, 2, 4, "query heads (6) must be divisible by the group size (4)"),
    (8, 3, 4, "must be a positive multiple of key/value heads (3)"),
    (12, 6, 4, "key/value heads (6) must be divisible by the group size (4)"),
    (24, 3, 8, "key/value heads (3) fewer than the group size (8) must divide it"),
])
def test_kv_repeats_refuse_layouts_that_cannot_split(heads, kv_heads, group, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kv_repeats(heads, kv_heads, group)


def test_pool_reuses_released_buffers_per_key_and_size_and_counts():
    pool = BufferPool()
    a = pool.acquire("w", 64, torch.device("cpu"), "weight")
    b = pool.acquire("w", 64, torch.device("cpu"), "weight")
    assert a.data_ptr() != b.data_ptr()
    pool.release(a)
    assert pool.acquire("w", 64, torch.device("cpu"), "weight") is a       # same key and size: reused
    c = pool.acquire("w", 32, torch.device("cpu"), "weight")               # another size: new
    d = pool.acquire("g", 64, torch.device("cpu"), "grad", zero=True)      # another key: new, zeroed
    assert bool((d == 0).all())
    stats = pool.stats()
    assert (stats.allocations, stats.reuses, stats.buffers) == (4, 1, 4)
    assert stats.in_use_bytes == 64 + 64 + 32 + 64 and stats.bytes_held == 224
    assert stats.peak_for("weight") == 160 and stats.peak_for("grad") == 64 and stats.peak_for("x") == 0
    for buffer in (a, b, c, d):
        pool.release(buffer)
    assert pool.stats().in_use_bytes == 0 and pool.stats().bytes_held == 224
    with pytest.raises(ValueError, match="did not hand out"):
        pool.release(a)
    pool.clear()
    assert pool.stats().bytes_held == 0 and pool.stats().buffers == 0


def test_disabled_pool_allocates_every_time_but_still_counts():
    pool = BufferPool(enabled=False)
    a = pool.acquire("w", 16, torch.device("cpu"))
    pool.release(a)
    b = pool.acquire("w", 16, torch.device("cpu"))
    stats = pool.stats()
    assert b is not a and (stats.allocations, stats.reuses) == (2, 0)
    assert stats.bytes_held == 16 and stats.peak_in_use_bytes == 16


def test_a_lost_peer_or_a_timeout_becomes_group_timeout_naming_operation_and_group():
    from pgroups import GroupTimeoutError
    import torch
    from pgroups.comm import comm_errors
    from pgroups.handle import GroupHandle

    info = GroupHandle("wp", None, None, (0, 1, 2, 3), 1, torch.device("cpu"))
    gloo_text = ("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:48017. This is "
                 "typically caused by a remote worker crashing.")
    for raised, outcome in [(RuntimeError(gloo_text), "failed on local rank 1: a peer left"),
                            (RuntimeError("Timed out waiting 2000ms for recv operation"), "timed out on local rank 1")]:
        with pytest.raises(GroupTimeoutError) as caught:
            with comm_errors(info, "weight all-gather of layers.0.wq.weight"):
                raise raised
        message = str(caught.value)
        assert message.startswith("weight all-gather of layers.0.wq.weight over mode 'wp' (ranks [0, 1, 2, 3]) "
                                  + outcome), message
        assert caught.value.__cause__ is raised
    with pytest.raises(RuntimeError, match="shapes do not match"):  # other errors pass through unchanged
        with comm_errors(info, "all-gather"):
            raise RuntimeError("shapes do not match")
