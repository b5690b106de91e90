"""Figures as nccl-tests defines them, and the message-size sweep (pure: no torch, no processes).

For a collective over ``n`` ranks that moved a message of ``S`` bytes in ``t`` seconds:

- ``algbw = S / t``;
- ``busbw = algbw * factor(n)``, the bandwidth each rank's link must carry, comparable across
  collectives and group sizes (nccl-tests' PERFORMANCE.md):

  ============================================  =============
  collective                                    factor
  ============================================  =============
  all_reduce                                    2 (n - 1) / n
  all_gather, reduce_scatter, all_to_all        (n - 1) / n
  broadcast, sendrecv                           1
  ============================================  =============

``S`` is nccl-tests' "size": the whole buffer (all_gather: the gathered output;
reduce_scatter: the input before scattering; all_to_all: one rank's whole send buffer).
Bandwidths are reported in GB/s with 1 GB = 1e9 bytes, as nccl-tests does.
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

import attrs

#: Collectives the tool measures, in the order it runs them.
COLLECTIVES: Tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "broadcast",
                                "all_to_all", "sendrecv")
ALIASES: Dict[str, str] = {"allreduce": "all_reduce", "allgather": "all_gather",
                           "reducescatter": "reduce_scatter", "alltoall": "all_to_all",
                           "send_recv": "sendrecv", "p2p": "sendrecv", "bcast": "broadcast"}
#: Collectives whose buffer is split into one chunk per rank (the size must be a multiple of n).
CHUNKED = frozenset({"all_gather", "reduce_scatter", "all_to_all"})
ELEMENT_BYTES = 4  # float32, nccl-tests' default type
GB = 1e9

DEFAULT_MIN_BYTES = 8
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def bus_factor(collective: str, group_size: int) -> float:
    """busbw / algbw for ``collective`` over ``group_size`` ranks (nccl-tests' factors).

    Raises ValueError for an unknown collective or a group size below 1.
    """
    if group_size < 1:
        raise ValueError(f"group size must be at least 1, got {group_size}")
    n = group_size
    if collective == "all_reduce":
        return 2.0 * (n - 1) / n
    if collective in CHUNKED:
        return (n - 1) / n
    if collective in ("broadcast", "sendrecv"):
        return 1.0
    raise ValueError(f"unknown collective {collective!r}; allowed: {', '.join(COLLECTIVES)}")


def algbw(size_bytes: int, seconds: float) -> float:
    """Algorithm bandwidth in GB/s (0.0 when ``seconds`` is not positive)."""
    return size_bytes / seconds / GB if seconds > 0 else 0.0


def busbw(collective: str, group_size: int, size_bytes: int, seconds: float) -> float:
    """Bus bandwidth in GB/s: ``algbw * bus_factor(collective, group_size)``."""
    return algbw(size_bytes, seconds) * bus_factor(collective, group_size)


@attrs.frozen
class MessageShape:
    """How one requested size maps onto buffers for a collective over ``group_size`` ranks.

    ``in_count`` / ``out_count`` are element counts of one rank's input and output buffers;
    ``size_bytes`` is the size nccl-tests reports (rounded down to whole elements, and for the
    chunked collectives to a whole number of elements per rank, at least one).
    """

    collective: str
    group_size: int
    in_count: int
    out_count: int
    size_bytes: int


def message_shape(collective: str, requested_bytes: int, group_size: int) -> MessageShape:
    """Buffer element counts for a requested message size (nccl-tests' rounding)."""
    bus_factor(collective, group_size)  # validates both
    elements = max(1, requested_bytes // ELEMENT_BYTES)
    if collective in CHUNKED:
        chunk = max(1, elements // group_size)
        total = chunk * group_size
        in_count, out_count = {"all_gather": (chunk, total), "reduce_scatter": (total, chunk),
                               "all_to_all": (total, total)}[collective]
        return MessageShape(collective, group_size, in_count, out_count, total * ELEMENT_BYTES)
    return MessageShape(collective, group_size, elements, elements, elements * ELEMENT_BYTES)


def size_sweep(min_bytes: int = DEFAULT_MIN_BYTES, max_bytes: int = DEFAULT_MAX_BYTES,
               factor: int = 2) -> List[int]:
    """Requested sizes ``min, min*factor, …`` up to and including ``max_bytes`` (nccl-tests -b -e -f).

    ``max_bytes`` itself is always the last size. Raises ValueError when ``min_bytes`` < 1,
    ``max_bytes`` < ``min_bytes`` or ``factor`` < 2.
    """
    if min_bytes < 1:
        raise ValueError(f"--min-bytes must be at least 1, got {min_bytes}")
    if max_bytes < min_bytes:
        raise ValueError(f"--max-bytes ({max_bytes}) must be at least --min-bytes ({min_bytes})")
    if factor < 2:
        raise ValueError(f"--step-factor must be at least 2, got {factor}")
    sizes = []
    size = min_bytes
    while size < max_bytes:
        sizes.append(size)
        size *= factor
    sizes.append(max_bytes)
    return sizes


def shapes_for_sweep(collective: str, sizes: Sequence[int], group_size: int) -> List[MessageShape]:
    """The distinct message shapes of a sweep (small sizes that round to the same buffer merge)."""
    shapes: Dict[int, MessageShape] = {}
    for size in sizes:
        shape = message_shape(collective, size, group_size)
        shapes.setdefault(shape.size_bytes, shape)
    return [shapes[k] for k in sorted(shapes)]


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


def parse_size(text: str) -> int:
    """``"8"``, ``"64K"``, ``"64M"``, ``"1G"``, ``"16MiB"`` → bytes (binary units, like nccl-tests).

    Raises ValueError naming the text and the accepted forms.
    """
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"bad size {text!r}: expected a number of bytes with an optional K/M/G "
                         "suffix (e.g. 8, 64K, 64M, 1G)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value != int(value):
        raise ValueError(f"bad size {text!r}: not a whole number of bytes")
    return int(value)


def parse_collectives(text: str) -> Tuple[str, ...]:
    """``"all_reduce,all_gather"`` or ``"all"`` → collective names in the tool's run order.

    Raises ValueError naming an unknown collective and the allowed ones.
    """
    names = [part.strip().lower().replace("-", "_") for part in str(text).split(",") if part.strip()]
    if not names:
        raise ValueError(f"--collectives is empty; allowed: all, {', '.join(COLLECTIVES)}")
    if names == ["all"]:
        return COLLECTIVES
    chosen = set()
    for name in names:
        name = ALIASES.get(name.replace("_", ""), ALIASES.get(name, name))
        if name not in COLLECTIVES:
            raise ValueError(f"unknown collective {name!r}; allowed: all, {', '.join(COLLECTIVES)}")
        chosen.add(name)
    return tuple(c for c in COLLECTIVES if c in chosen)
