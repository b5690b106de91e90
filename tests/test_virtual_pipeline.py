"""Virtual (interleaved) pipeline: the chunk → layer map against Megatron-Core's own rules.

The references below are Megatron-Core's layer-offset arithmetic
(``get_transformer_layer_offset`` in ``megatron/core/transformer/transformer_layer.py``) and its
``is_pipeline_first_stage`` / ``is_pipeline_last_stage(ignore_virtual=False, vp_stage=…)``,
rewritten here independently of ``pgroups.virtual_pipeline``.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgroups import ConfigError, ParallelContext, load_config
from pgroups.virtual_pipeline import (chunk_layers, is_first_stage, is_last_stage, layer_map,
                                      layers_per_chunk, model_chunk_index)

from conftest import fake_world


# ---- Megatron-Core's rules, rewritten --------------------------------------------------------
def megatron_offset_even(num_layers, pp, vp, pp_rank, vp_stage):
    per_rank = num_layers // pp
    per_virtual_rank = per_rank // vp
    return vp_stage * (num_layers // vp) + pp_rank * per_virtual_rank, per_virtual_rank


def megatron_offset_uneven(num_layers, pp, vp, pp_rank, vp_stage, first, last):
    """Megatron's interleaved-uneven branch; as there, ``first`` is given (the branch offsets
    every rank but 0 by the first stage's chunk)."""
    middle_stages = pp - sum(x is not None for x in (first, last))
    middle = num_layers - (first or 0) - (last or 0)
    first_chunk = (first or 0) // vp
    last_chunk = 0 if last is None else last // vp
    middle_chunk = middle // vp
    per_middle_stage = middle_chunk // middle_stages if middle_stages else 0  # pp 2, both ends given
    total = first_chunk + middle_chunk + last_chunk
    if pp_rank == 0:
        offset = vp_stage * total
    else:
        offset = vp_stage * total + first_chunk + (pp_rank - 1) * per_middle_stage
    if pp_rank == 0:
        count = first_chunk
    elif pp_rank == pp - 1 and last is not None:
        count = last_chunk
    else:
        count = per_middle_stage
    return offset, count


def megatron_is_first(pp_rank, pp, vp, vp_stage):
    if vp > 1 and vp_stage is not None and vp_stage != 0:
        return False
    return pp_rank == 0


def megatron_is_last(pp_rank, pp, vp, vp_stage):
    if vp > 1 and vp_stage is not None and vp_stage != vp - 1:
        return False
    return pp_rank == pp - 1


# ---- the map ----------------------------------------------------------------------------------
def test_example_from_the_docstring():
    assert layer_map(16, 4, 2) == [[range(0, 2), range(8, 10)], [range(2, 4), range(10, 12)],
                                   [range(4, 6), range(12, 14)], [range(6, 8), range(14, 16)]]


@settings(max_examples=300, deadline=None)
@given(pp=st.integers(1, 8), vp=st.integers(1, 6), per_chunk=st.integers(1, 5), data=st.data())
def test_even_split_is_megatrons(pp, vp, per_chunk, data):
    num_layers = pp * vp * per_chunk
    p = data.draw(st.integers(0, pp - 1))
    c = data.draw(st.integers(0, vp - 1))
    offset, count = megatron_offset_even(num_layers, pp, vp, p, c)
    assert chunk_layers(num_layers, pp, vp, p, c) == range(offset, offset + count)
    assert model_chunk_index(p, c, pp, vp) == c * pp + p


@settings(max_examples=300, deadline=None)
@given(pp=st.integers(2, 8), vp=st.integers(1, 4), first=st.integers(0, 4), last=st.one_of(st.none(), st.integers(0, 4)),
       middle=st.integers(0, 4), data=st.data())
def test_uneven_first_and_last_stage_is_megatrons(pp, vp, first, last, middle, data):
    middle_stages = pp - 1 - (last is not None)
    if middle_stages == 0:
        middle = 0
    num_layers = vp * (first + (last or 0) + middle * middle_stages)
    if num_layers == 0:
        return
    first_l, last_l = first * vp, None if last is None else last * vp
    p = data.draw(st.integers(0, pp - 1))
    c = data.draw(st.integers(0, vp - 1))
    offset, count = megatron_offset_uneven(num_layers, pp, vp, p, c, first_l, last_l)
    assert chunk_layers(num_layers, pp, vp, p, c, first_l, last_l) == range(offset, offset + count)


@settings(max_examples=200, deadline=None)
@given(pp=st.integers(2, 6), vp=st.integers(1, 4), last=st.integers(0, 3), middle=st.integers(1, 3))
def test_last_stage_only_tiles_the_layers_in_model_chunk_order(pp, vp, last, middle):
    """Only the last stage given: every layer lies in exactly one chunk, model chunks in order."""
    num_layers = vp * (last + middle * (pp - 1))
    ranges = layer_map(num_layers, pp, vp, last_stage_layers=last * vp)
    in_order = [ranges[i % pp][i // pp] for i in range(pp * vp)]  # model chunk i = c * pp + p
    assert [layer for r in in_order for layer in r] == list(range(num_layers))
    assert all(len(ranges[pp - 1][c]) == last for c in range(vp))
    assert all(len(ranges[p][c]) == middle for p in range(pp - 1) for c in range(vp))


@pytest.mark.parametrize("args, needle", [
    ((30, 4, 2), "num_layers(30) is not divisible by pipeline(4) * virtual_pipeline(2) = 8"),
    ((16, 4, 2, 3, None), "first_stage_layers(3) must be a non-negative multiple of virtual_pipeline(2)"),
    ((16, 4, 2, None, 5), "last_stage_layers(5) must be a non-negative multiple of virtual_pipeline(2)"),
    ((18, 4, 2, 2, 2), "= 14 layers do not split evenly over the other 2 stage(s)"),
    ((6, 2, 2, 2, 2), "= 2 layers do not split evenly over the other 0 stage(s)"),
    ((4, 1, 1, 2, None), "need pipeline >= 2"),
    ((0, 2, 1), "num_layers must be an integer >= 1"),
])
def test_uneven_counts_raise_with_the_arithmetic(args, needle):
    with pytest.raises(ConfigError) as info:
        layers_per_chunk(*args)
    assert needle in str(info.value)


def test_positions_outside_the_layout_raise():
    with pytest.raises(ValueError, match="chunk 2 is outside 0..1"):
        chunk_layers(16, 4, 2, 0, 2)
    with pytest.raises(ValueError, match="pipeline rank 4 is outside 0..3"):
        is_first_stage(4, 4, 2)


@pytest.mark.parametrize("pp, vp", [(1, 1), (2, 1), (4, 2), (3, 3)])
def test_first_and_last_stage_with_chunks_are_megatrons(pp, vp):
    for p in range(pp):
        for c in [None, *range(vp)]:
            assert is_first_stage(p, pp, vp, c) == megatron_is_first(p, pp, vp, c), (p, c)
            assert is_last_stage(p, pp, vp, c) == megatron_is_last(p, pp, vp, c), (p, c)


# ---- config and context ---------------------------------------------------------------------
def test_config_key_and_its_errors():
    assert load_config({"parallel": {"pipeline": 4, "virtual_pipeline": 2}}).topology(8).virtual_pipeline == 2
    with pytest.raises(ConfigError, match=r"parallel.virtual_pipeline\(2\) needs pipeline > 1"):
        load_config({"parallel": {"virtual_pipeline": 2}}).topology(8)
    with pytest.raises(ConfigError, match="parallel.virtual_pipeline must be a positive integer, got 0"):
        load_config({"parallel": {"pipeline": 2, "virtual_pipeline": 0}})


def test_without_the_key_there_is_one_chunk():
    with fake_world(4, 3):
        ctx = ParallelContext().init_from_config({"parallel": {"pipeline": 2}})
        try:
            assert ctx.get_virtual_pipeline_size() == 1
            assert ctx.get_virtual_pipeline_layers(8) == [range(4, 8)]  # rank 3 is stage 1 (order tp-pp-dp)
            assert ctx.is_pipeline_last_stage(chunk=0) and not ctx.is_pipeline_first_stage(chunk=0)
        finally:
            ctx.destroy()


@pytest.mark.parametrize("rank", [0, 2, 5, 7])
def test_context_queries(rank):
    """World 8, tensor 2 x pipeline 4 (order tp-pp-dp: stage = rank // 2), virtual 2, 16 layers."""
    with fake_world(8, rank):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 2, "pipeline": 4, "virtual_pipeline": 2}})
        try:
            stage = rank // 2
            assert ctx.get_virtual_pipeline_size() == 2
            per_chunk = 16 // 8
            assert ctx.get_virtual_pipeline_layers(16) == [
                range((c * 4 + stage) * per_chunk, (c * 4 + stage + 1) * per_chunk) for c in range(2)]
            assert ctx.is_pipeline_first_stage() == (stage == 0)
            assert ctx.is_pipeline_last_stage() == (stage == 3)
            assert ctx.is_pipeline_first_stage(chunk=0) == (stage == 0)
            assert ctx.is_pipeline_first_stage(chunk=1) is False
            assert ctx.is_pipeline_last_stage(chunk=1) == (stage == 3)
            assert ctx.is_pipeline_last_stage(chunk=0) is False
            with pytest.raises(ValueError, match="chunk 2 is outside 0..1"):
                ctx.is_pipeline_first_stage(chunk=2)
            with pytest.raises(ConfigError, match="num_layers"):
                ctx.get_virtual_pipeline_layers(15)
        finally:
            ctx.destroy()
