"""Compatibility path: the activation and weight collectives live in :mod:`pgroups.comm`.

Every name this module exported before the move is re-exported here, so
``from pgroups.reshard.collectives import seq_to_head`` keeps working; new code imports from
``pgroups.comm``. ``_pack`` / ``_unpack`` are the old private names of
:func:`pgroups.comm.pack_tensors` / :func:`pgroups.comm.unpack_tensors`.
"""
from ..comm.activations import (TensorOrTensors, all_to_all, gather_along, head_to_seq, reduce_scatter_along,
                                seq_to_head, split_along)
from ..comm.groups import GroupInfo, GroupLike, comm_errors, resolve_group
from ..comm.packing import SEGMENT_ALIGN
from ..comm.packing import pack_tensors as _pack
from ..comm.packing import unpack_tensors as _unpack
from ..comm.raw import all_to_all_raw, exchange_sizes, gather_raw, reduce_scatter_raw, split_raw
from ..comm.sizes import (Sizes, check_sizes, check_split_sizes, even_split_sizes, normalize_dim, offsets_of,
                          with_size)
from ..comm.weights import WeightGatherHandle, all_gather_weight, start_weight_gather

__all__ = [
    "GroupInfo", "GroupLike", "SEGMENT_ALIGN", "Sizes", "TensorOrTensors", "WeightGatherHandle", "all_gather_weight",
    "all_to_all", "all_to_all_raw", "check_sizes", "check_split_sizes", "comm_errors", "even_split_sizes",
    "exchange_sizes", "gather_along", "gather_raw", "head_to_seq", "normalize_dim", "offsets_of",
    "reduce_scatter_along", "reduce_scatter_raw", "resolve_group", "seq_to_head", "split_along", "split_raw",
    "start_weight_gather", "with_size", "_pack", "_unpack",
]
