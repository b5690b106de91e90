"""How rank lists are written in messages, summaries and tables — one formatter for all of them.

A user reading an error at 16K ranks needs the group's shape, not 16K numbers: a run of
consecutive ranks is written as its ends, a long irregular list is cut after ``limit`` ranks
with the total count.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import ConfigError

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


def format_rank_spec(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 8, 9]`` → ``"0-3,8-9"``: ranks as configs write them (the inverse of
    :func:`parse_ranks` for a sorted list). :func:`format_ranks` writes them for messages."""
    parts, i = [], 0
    ranks = list(ranks)
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(parts)


def parse_ranks(value: Any, key: str = "ranks") -> Tuple[int, ...]:
    """``"0-3,8-11"`` / ``[0, 1, 2]`` / ``5`` → a tuple of ranks, as configs write them. ``key``
    (with any file prefix) names the value in the ConfigError raised for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    if isinstance(value, str):
        ranks: List[int] = []
        for part in value.replace(" ", "").split(","):
            bounds = part.split("-")
            if len(bounds) == 1 and bounds[0].isdigit():
                ranks.append(int(bounds[0]))
            elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
                ranks.extend(range(int(bounds[0]), int(bounds[1]) + 1))
            else:
                raise ConfigError(f"{key}: bad range {part!r} in {value!r} "
                                  "(expected N or N-M with N <= M, comma separated)")
        return tuple(ranks)
    raise ConfigError(f"{key} must be a range string such as '4-7' or '0-3,8-11' or a "
                      f"list of ranks, got {value!r}")


def ranks_by_host(hostnames: List[str]) -> Dict[str, List[int]]:
    """``{host: [ranks]}`` in order of first appearance (pure)."""
    hosts: Dict[str, List[int]] = {}
    for rank, host in enumerate(hostnames):
        hosts.setdefault(host, []).append(rank)
    return hosts
