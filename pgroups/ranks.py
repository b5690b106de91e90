"""How rank lists are written in messages, summaries and tables — one formatter for all of them.

A user reading an error at 16K ranks needs the group's shape, not 16K numbers: a run of
consecutive ranks is written as its ends, a long irregular list is cut after ``limit`` ranks
with the total count.
"""
from __future__ import annotations

from typing import Optional, Sequence

#: A consecutive run longer than this is written as ``[first..last]``.
RUN_MIN = 5


def format_ranks(ranks: Optional[Sequence[int]], limit: int = 16, compact: bool = False) -> str:
    """Write ``ranks`` for a human: ``[0, 4, 8, 12]``; a consecutive run of more than four as
    ``[0..4095]``; a longer irregular list as ``[0, 2, 4, …] (2048 ranks)`` (the first
    ``limit`` ranks, then the count). ``compact`` drops the spaces (table cells: ``[0,4,8]``).
    ``None`` (no group) is written ``[]``. Pure; never raises for a sequence of ints.
    """
    ranks = list(ranks or ())
    if len(ranks) >= RUN_MIN and ranks == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"[{ranks[0]}..{ranks[-1]}]"
    sep = "," if compact else ", "
    if len(ranks) <= limit:
        return "[" + sep.join(map(str, ranks)) + "]"
    return "[" + sep.join(map(str, ranks[:limit])) + f"{sep}…] ({len(ranks)} ranks)"
