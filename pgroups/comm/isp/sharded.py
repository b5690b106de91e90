"""What the ISP runtime knows of one sharded parameter and one sharded linear (values, no
communication): full shape, rows per rank, the pool key shared by blocks of one structure."""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import nn

from ..sizes import Sizes, offsets_of


class Sharded:
    """A parameter sharded along dim 0: its qualified ``name``, pool ``key`` (its place in its
    block, ``"attn.wq.weight"``), the shard ``param``, the ``full_shape``, the rows per rank
    (``sizes``, ``tensor_split`` convention) and its ``block``."""

    def __init__(self, name: str, key: str, param: nn.Parameter, full_shape: Tuple[int, ...], sizes: Sizes,
                 block: int) -> None:
        self.name, self.key, self.param, self.full_shape, self.sizes, self.block = \
            name, key, param, full_shape, sizes, block
        self.row_numel = 1
        for size in full_shape[1:]:
            self.row_numel *= size
        self.max_rows = max(sizes)
        self.even = len(set(sizes)) == 1

    def full_numel(self) -> int:
        return self.full_shape[0] * self.row_numel

    def pieces(self) -> List[Tuple[int, int, int]]:
        """``(rank, offset in the flat full tensor, element count)`` of every rank's rows."""
        return [(rank, start * self.row_numel, rows * self.row_numel)
                for rank, (rows, start) in enumerate(zip(self.sizes, offsets_of(self.sizes)))]


class ShardedLinear:
    """A sharded nn.Linear: its module, its block, and its weight / bias shards."""

    def __init__(self, module: nn.Linear, block: int, weight: Sharded, bias: Optional[Sharded]) -> None:
        self.module, self.block, self.weight, self.bias = module, block, weight, bias
