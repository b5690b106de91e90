"""The one rank-list formatter every message, summary and table uses."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from pgroups.ranks import format_ranks


def test_short_lists_are_written_in_full():
    assert format_ranks([0, 4, 8, 12]) == "[0, 4, 8, 12]"
    assert format_ranks([2, 3]) == "[2, 3]"
    assert format_ranks([0, 1, 2, 3]) == "[0, 1, 2, 3]"  # a run of four is still short enough
    assert format_ranks(None) == "[]" and format_ranks([]) == "[]"


def test_consecutive_runs_are_written_by_their_ends():
    assert format_ranks(range(16384)) == "[0..16383]"
    assert format_ranks([8, 9, 10, 11, 12]) == "[8..12]"


def test_long_irregular_lists_are_cut_with_the_count():
    ranks = list(range(0, 4096, 2))
    text = format_ranks(ranks, limit=4)
    assert text == "[0, 2, 4, 6, …] (2048 ranks)"


def test_compact_form_for_table_cells():
    assert format_ranks([0, 2], compact=True) == "[0,2]"
    assert format_ranks(list(range(0, 64, 4)), limit=2, compact=True) == "[0,4,…] (16 ranks)"


@settings(deadline=None)  # no wall-clock bound: CI machines are loaded
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=40, unique=True))
def test_every_written_rank_is_a_real_rank_in_order(ranks):
    """Whatever the shape, the numbers printed are ranks of the list, in its order."""
    ranks = sorted(ranks)
    text = format_ranks(ranks, limit=8)
    body = text.split("]")[0].strip("[")
    if ".." in body:
        first, last = map(int, body.split(".."))
        assert (first, last) == (ranks[0], ranks[-1]) and last - first + 1 == len(ranks)
    else:
        shown = [int(x) for x in body.replace("…", "").split(",") if x.strip()]
        assert shown == ranks[:len(shown)] and (len(shown) == len(ranks) or f"({len(ranks)} ranks)" in text)
