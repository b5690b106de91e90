"""Communication with autograd on any mode's group: activation collectives, weight gathers.

- :mod:`.groups` — resolve a mode (or a ProcessGroup) to the :class:`~pgroups.handle.GroupHandle` a collective runs on;
- :mod:`.sizes` — pure size arithmetic of sharded dims (``tensor_split`` convention);
- :mod:`.packing` — several tensors of any dtypes through one byte buffer;
- :mod:`.raw` — the collectives without autograd (gather, reduce-scatter, all-to-all);
- :mod:`.activations` — gather / split / reduce-scatter along a dim and the Ulysses
  all-to-all (:func:`seq_to_head` / :func:`head_to_seq`), with autograd;
- :mod:`.weights` — asynchronous weight all-gather whose backward reduce-scatters;
- :mod:`.isp` — :class:`WeightParallel`, the ISP weight-parallel runtime (prefetching weight
  all-gathers, asynchronous gradient reduce-scatters, driven by module hooks; its decisions in
  the pure :class:`~.isp.schedule.IspSchedule`);
- :mod:`.pool` — :class:`BufferPool`, the reusable communication buffers and their counters;
- :mod:`.ulysses` — :class:`UlyssesAttention`, sequence-parallel attention (GQA included).

Example (a ``sequence`` mode, weights sharded over ``wp``)::

    q, k, v = seq_to_head([q, k, v], "sequence")     # [b, s/p, h, d] -> [b, s, h/p, d], one exchange
    out = head_to_seq(attention(q, k, v), "sequence")
    handle = start_weight_gather(w_shard, 0, "wp")  # in flight while other work runs
    y = out @ handle.wait().t()

Every rank of the group must call the same function in the same order, and every rank must
run the backward pass (the backward is a collective too). A peer that never arrives raises
:class:`~pgroups.errors.GroupTimeoutError` naming the group and its ranks after the group's
timeout, and so does a peer whose process died (at once, when the transport reports it); that
is gloo's behaviour, for NCCL see docs/isp.md. Gathers and all-to-alls move raw bytes, so any
dtype works; reduce-scatter sums in the tensor's own dtype.
"""
from .activations import (TensorOrTensors, all_to_all, gather_along, head_to_seq, reduce_scatter_along,
                          seq_to_head, split_along)
from .groups import GroupInfo, GroupLike, comm_errors, resolve_group
from .packing import SEGMENT_ALIGN, aligned_nbytes, pack_tensors, packed_nbytes, tensor_nbytes, unpack_tensors
from .raw import all_to_all_raw, exchange_sizes, gather_raw, reduce_scatter_raw, split_raw
from .sizes import (Sizes, check_sizes, check_split_sizes, even_split_sizes, normalize_dim, offsets_of,
                    with_size)
from .isp import WeightParallel, WeightParallelSchedulerHook, prefetch_blocks
from .pool import BufferPool, PoolStats
from .ulysses import UlyssesAttention, kv_repeats
from .weights import WeightGatherHandle, all_gather_weight, start_weight_gather

__all__ = [
    "BufferPool", "PoolStats", "UlyssesAttention", "WeightParallel", "WeightParallelSchedulerHook", "kv_repeats",
    "prefetch_blocks", "GroupInfo", "GroupLike", "SEGMENT_ALIGN", "Sizes", "TensorOrTensors", "WeightGatherHandle",
    "aligned_nbytes", "all_gather_weight", "all_to_all", "all_to_all_raw", "check_sizes", "check_split_sizes",
    "comm_errors", "even_split_sizes", "exchange_sizes", "gather_along", "gather_raw", "head_to_seq",
    "normalize_dim", "offsets_of", "pack_tensors", "packed_nbytes", "reduce_scatter_along",
    "reduce_scatter_raw", "resolve_group", "seq_to_head", "split_along", "split_raw", "start_weight_gather",
    "tensor_nbytes", "unpack_tensors", "with_size",
]
