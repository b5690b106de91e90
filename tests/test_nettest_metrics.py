"""nettest figures as nccl-tests defines them, the size sweep, and verification data (pure)."""
from __future__ import annotations

import pytest
import torch

from pgroups.nettest import metrics
from pgroups.nettest.bench import count_wrong, corrupt_tensor, make_buffers


# ---- bus bandwidth factors (nccl-tests PERFORMANCE.md) -------------------------------------
@pytest.mark.parametrize("n, factor", [(1, 0.0), (2, 1.0), (4, 1.5), (8, 1.75), (16, 1.875)])
def test_all_reduce_factor_is_2_n_minus_1_over_n(n, factor):
    assert metrics.bus_factor("all_reduce", n) == pytest.approx(factor)


@pytest.mark.parametrize("collective", ["all_gather", "reduce_scatter", "all_to_all"])
@pytest.mark.parametrize("n, factor", [(2, 0.5), (4, 0.75), (8, 0.875)])
def test_gather_scatter_alltoall_factor_is_n_minus_1_over_n(collective, n, factor):
    assert metrics.bus_factor(collective, n) == pytest.approx(factor)


@pytest.mark.parametrize("collective", ["broadcast", "sendrecv"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_broadcast_and_sendrecv_factor_is_one(collective, n):
    assert metrics.bus_factor(collective, n) == 1.0


def test_algbw_is_bytes_over_time_in_gb_per_second():
    assert metrics.algbw(1_000_000_000, 2.0) == pytest.approx(0.5)
    assert metrics.algbw(64 * 1024 * 1024, 0.001) == pytest.approx(67.108864)
    assert metrics.algbw(8, 0.0) == 0.0


def test_busbw_is_algbw_times_factor():
    # 1 GB all-reduced over 8 ranks in 1 s: algbw 1 GB/s, busbw 1.75 GB/s
    assert metrics.busbw("all_reduce", 8, 10 ** 9, 1.0) == pytest.approx(1.75)
    assert metrics.busbw("all_gather", 4, 10 ** 9, 0.5) == pytest.approx(1.5)
    assert metrics.busbw("sendrecv", 2, 10 ** 9, 0.5) == pytest.approx(2.0)


def test_unknown_collective_and_bad_group_size_are_refused():
    with pytest.raises(ValueError, match="unknown collective 'allreduce_x'; allowed: all_reduce"):
        metrics.bus_factor("allreduce_x", 4)
    with pytest.raises(ValueError, match="group size must be at least 1"):
        metrics.bus_factor("all_reduce", 0)


# ---- sizes ----------------------------------------------------------------------------------
def test_default_sweep_is_8_bytes_to_64_mib_doubling():
    sizes = metrics.size_sweep()
    assert sizes[0] == 8 and sizes[-1] == 64 * 1024 * 1024
    assert len(sizes) == 24
    assert all(b == 2 * a for a, b in zip(sizes, sizes[1:]))


def test_sweep_always_ends_at_max_bytes():
    assert metrics.size_sweep(8, 100, 2) == [8, 16, 32, 64, 100]
    assert metrics.size_sweep(64, 64) == [64]
    assert metrics.size_sweep(1, 1024, 4) == [1, 4, 16, 64, 256, 1024]


@pytest.mark.parametrize("args, message", [((0, 8, 2), "--min-bytes must be at least 1"),
                                           ((64, 8, 2), "--max-bytes \\(8\\) must be at least --min-bytes"),
                                           ((8, 64, 1), "--step-factor must be at least 2")])
def test_bad_sweeps_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        metrics.size_sweep(*args)


@pytest.mark.parametrize("text, value", [("8", 8), ("64K", 65536), ("64M", 64 << 20), ("1G", 1 << 30),
                                         ("16MiB", 16 << 20), ("4kb", 4096), ("0.5K", 512)])
def test_parse_size_uses_binary_units(text, value):
    assert metrics.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "64X", "-8", "0.3"])
def test_parse_size_refuses_junk(text):
    with pytest.raises(ValueError, match="size"):
        metrics.parse_size(text)


def test_format_bytes_is_whole_where_the_unit_divides_else_one_decimal():
    from pgroups.units import format_bytes

    assert format_bytes(8) == "8 B" and format_bytes(1000) == "1000 B" and format_bytes(1023) == "1023 B"
    assert format_bytes(65536) == "64 KiB" and format_bytes(64 << 20) == "64 MiB" and format_bytes(3 << 40) == "3 TiB"
    assert format_bytes(1536) == "1.5 KiB" and format_bytes((1 << 30) + (1 << 29)) == "1.5 GiB"
    for exponent, unit in ((10, "KiB"), (20, "MiB"), (30, "GiB")):
        for n in range(1 << exponent, 1 << (exponent + 10), 977 << (exponent - 10)):
            value, shown_unit = format_bytes(n).split()
            assert shown_unit == unit and abs(float(value) - n / (1 << exponent)) <= 0.05 + 1e-9, n


def test_parse_collectives_keeps_run_order_and_accepts_aliases():
    assert metrics.parse_collectives("sendrecv,all_reduce") == ("all_reduce", "sendrecv")
    assert metrics.parse_collectives("allgather, send_recv") == ("all_gather", "sendrecv")
    assert metrics.parse_collectives("all") == metrics.COLLECTIVES
    with pytest.raises(ValueError, match="unknown collective 'gossip'; allowed: all, all_reduce"):
        metrics.parse_collectives("all_reduce,gossip")


# ---- message shapes (nccl-tests' rounding) ------------------------------------------------
def test_shapes_round_to_whole_elements_and_whole_chunks():
    ar = metrics.message_shape("all_reduce", 10, 4)
    assert (ar.in_count, ar.out_count, ar.size_bytes) == (2, 2, 8)
    ag = metrics.message_shape("all_gather", 100, 4)  # 25 elements -> 6 per rank -> 24 total
    assert (ag.in_count, ag.out_count, ag.size_bytes) == (6, 24, 96)
    rs = metrics.message_shape("reduce_scatter", 100, 4)
    assert (rs.in_count, rs.out_count, rs.size_bytes) == (24, 6, 96)
    a2a = metrics.message_shape("all_to_all", 8, 4)  # at least one element per rank
    assert (a2a.in_count, a2a.out_count, a2a.size_bytes) == (4, 4, 16)


def test_sweep_shapes_merge_sizes_that_round_alike():
    shapes = metrics.shapes_for_sweep("all_gather", [8, 16, 32, 64], 8)
    assert [s.size_bytes for s in shapes] == [32, 64]


# ---- verification data: simulate each collective in one process --------------------------
def _simulate(collective, sends, n):
    """What each rank's output must be, computed from every rank's send buffer."""
    if collective == "all_reduce":
        total = sum(sends)
        return [total.clone() for _ in range(n)]
    if collective == "all_gather":
        return [torch.cat(sends) for _ in range(n)]
    if collective == "reduce_scatter":
        return list(sum(sends).chunk(n))
    if collective == "broadcast":
        return [sends[0].clone() for _ in range(n)]
    if collective == "all_to_all":
        return [torch.cat([s.chunk(n)[i] for s in sends]) for i in range(n)]
    if collective == "sendrecv":
        return [sends[(i - 1) % n].clone() for i in range(n)]
    raise AssertionError(collective)


@pytest.mark.parametrize("collective", metrics.COLLECTIVES)
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("size", [8, 100, 4096])
def test_expected_values_match_what_the_collective_computes(collective, n, size):
    ranks = [10 + 3 * i for i in range(n)]  # global ranks need not be 0..n-1
    shape = metrics.message_shape(collective, size, n)
    buffers = [make_buffers(collective, shape, ranks, r, torch.device("cpu"), corrupt=False) for r in ranks]
    outputs = _simulate(collective, [b.send for b in buffers], n)
    for b, out in zip(buffers, outputs):
        assert count_wrong(out, b.expected, b.sources) == (0, {})


@pytest.mark.parametrize("collective", ["all_gather", "all_to_all", "sendrecv", "broadcast"])
def test_a_corrupting_rank_is_counted_and_named_as_the_source(collective):
    ranks = [0, 1, 2, 3]
    bad = 0 if collective == "broadcast" else 2  # broadcast: only the root contributes
    shape = metrics.message_shape(collective, 4096, 4)
    buffers = [make_buffers(collective, shape, ranks, r, torch.device("cpu"), corrupt=(r == bad)) for r in ranks]
    outputs = _simulate(collective, [b.send for b in buffers], 4)
    receivers = [r for r in ranks if r != bad] if collective != "sendrecv" else [(bad + 1) % 4]
    for r in receivers:
        wrong, wrong_from = count_wrong(outputs[r], buffers[r].expected, buffers[r].sources)
        assert wrong > 0 and set(wrong_from) == {bad}


def test_a_reduction_with_a_corrupt_input_is_wrong_everywhere_but_not_attributed():
    ranks = [0, 1, 2, 3]
    shape = metrics.message_shape("all_reduce", 1024, 4)
    buffers = [make_buffers("all_reduce", shape, ranks, r, torch.device("cpu"), corrupt=(r == 1)) for r in ranks]
    outputs = _simulate("all_reduce", [b.send for b in buffers], 4)
    for b, out in zip(buffers, outputs):
        wrong, wrong_from = count_wrong(out, b.expected, b.sources)
        assert wrong == 8 and wrong_from == {}


def test_corruption_changes_at_least_one_element_of_a_tiny_buffer():
    t = torch.zeros(1)
    corrupt_tensor(t)
    assert t.item() != 0


def test_unwritten_output_counts_as_wrong():
    expected = torch.zeros(4)
    assert count_wrong(torch.full((4,), float("nan")), expected, None) == (4, {})
