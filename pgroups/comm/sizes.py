"""Pure size arithmetic of sharded dims: how a dim of size ``n`` splits over ``p`` ranks.

Slices follow ``torch.tensor_split``: the first ``n % p`` ranks get one element more. Size
lists that cannot be right raise ValueError naming the dim, the sizes and the group size.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from .groups import GroupHandle

Sizes = Tuple[int, ...]


def even_split_sizes(total: int, parts: int) -> Sizes:
    """Sizes of ``torch.tensor_split(x, parts)`` along a dim of size ``total``: the first
    ``total % parts`` parts get one element more. Raises ValueError for negative input."""
    if total < 0 or parts < 1:
        raise ValueError(f"cannot split a size of {total} into {parts} parts")
    base, extra = divmod(total, parts)
    return tuple(base + 1 if i < extra else base for i in range(parts))


def offsets_of(sizes: Sequence[int]) -> Sizes:
    """Start offset of each piece when pieces of ``sizes`` are laid end to end."""
    result, start = [], 0
    for size in sizes:
        result.append(start)
        start += size
    return tuple(result)


def normalize_dim(dim: int, ndim: int, what: str = "tensor") -> int:
    """``dim`` as a non-negative index into an ``ndim``-d tensor, or ValueError naming both."""
    if ndim == 0:
        raise ValueError(f"the {what} is 0-d (a scalar): it has no dim {dim!r} to split or gather")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim!r} is out of range for the {ndim}-d {what} "
                         f"(allowed {-ndim}..{ndim - 1})")
    return dim % ndim


def _all_sizes(sizes: Sequence[int]) -> bool:
    return all(not isinstance(s, bool) and isinstance(s, int) and s >= 0 for s in sizes)


def check_sizes(sizes: Sequence[int], info: GroupHandle, dim: int, local_size: int, what: str) -> Sizes:
    """Validate a per-rank size list: one non-negative int per rank, this rank's entry equal to
    ``local_size``. Returns it as a tuple; ValueError names the dim, sizes and group size."""
    sizes = tuple(sizes)
    if len(sizes) != info.size or not _all_sizes(sizes):
        raise ValueError(f"{what} must list one non-negative size per rank along dim {dim}: got "
                         f"{list(sizes)} for {info.label}, which has {info.size} ranks")
    if sizes[info.rank] != local_size:
        raise ValueError(f"this rank's tensor has size {local_size} along dim {dim}, but {what}"
                         f"[{info.rank}] = {sizes[info.rank]} ({info.label}, {info.size} ranks)")
    return sizes


def check_split_sizes(sizes: Sequence[int], info: GroupHandle, dim: int, total: int, what: str) -> Sizes:
    """Validate sizes that split a dim of size ``total`` over the group (one per rank, summing
    to ``total``). ValueError names the dim, the size and the group size."""
    sizes = tuple(sizes)
    if len(sizes) != info.size or not _all_sizes(sizes) or sum(sizes) != total:
        raise ValueError(f"{what} must split dim {dim} of size {total} into one non-negative size per "
                         f"rank of {info.label} ({info.size} ranks): got {list(sizes)}")
    return sizes


def piece_sizes(sizes: Optional[Sequence[int]], info: GroupHandle, dim: int, local: int, what: str) -> Sizes:
    """Every rank's piece size along ``dim``: ``sizes`` validated, or (None) all equal to ``local``."""
    if sizes is None:
        return (local,) * info.size
    return check_sizes(sizes, info, dim, local, what)


def split_sizes(sizes: Optional[Sequence[int]], info: GroupHandle, dim: int, total: int, what: str) -> Sizes:
    """How ``total`` splits over the group: ``sizes`` validated, or (None) ``tensor_split``'s."""
    if sizes is None:
        return even_split_sizes(total, info.size)
    return check_split_sizes(sizes, info, dim, total, what)


def with_size(shape: Sequence[int], dim: int, size: int) -> Tuple[int, ...]:
    """``shape`` with entry ``dim`` replaced by ``size``."""
    shape = list(shape)
    shape[dim] = size
    return tuple(shape)
