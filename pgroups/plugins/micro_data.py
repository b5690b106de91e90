"""verl's "micro data parallel" groups (mode ``micro_data``), the groups
:class:`pgroups.reshard.verl.MicroDataSharding` gathers batches and weights over.

When a trainer with tensor parallelism ``t`` serves an inference engine with tensor
parallelism ``i`` (``i`` divides ``t``), each training TP group holds ``t / i`` inference
replicas; the ranks that hold the same inference shard — ``t / i`` consecutive ranks —
form a micro-data-parallel group. Turn it on in a config with::

    plugins: [pgroups.plugins.micro_data]  # importing the module registers the mode
    extra_modes:
      micro_data: {inference_tensor: 1}

and query it with ``gpc.get_group("micro_data")``. It is also the reference for writing a mode
of your own: a ProcessGroupInitializer subclass registered under a new name, nothing in
pgroups edited (config_examples/micro_data_plugin.py loads it from a file path).
"""
from typing import List

from pgroups import ConfigError, ProcessGroupInitializer, register_initializer
from pgroups.topology import RankGroups, Topology


@register_initializer("micro_data")
class MicroDataInitializer(ProcessGroupInitializer):
    """Groups of ``tensor // inference_tensor`` consecutive ranks."""

    def __init__(self, inference_tensor: int = 1) -> None:
        if isinstance(inference_tensor, bool) or not isinstance(inference_tensor, int) or inference_tensor < 1:
            raise ConfigError(f"inference_tensor must be a positive integer, got {inference_tensor!r}")
        self.inference_tensor = inference_tensor

    def validate(self, topology: Topology) -> None:
        if topology.tensor % self.inference_tensor:
            raise ConfigError(
                f"extra_modes.micro_data.inference_tensor({self.inference_tensor}) must divide "
                f"parallel.tensor({topology.tensor})")
        if topology.order[0] != "tp":
            raise ConfigError("micro_data needs tensor-parallel ranks to be consecutive "
                              f"(parallel.order must start with tp, got {'-'.join(topology.order)!r})")

    def size(self, topology: Topology) -> int:
        return topology.tensor // self.inference_tensor

    def rank_groups(self, topology: Topology) -> RankGroups:
        return topology.block_groups(self.size(topology))

    def group_of(self, topology: Topology, rank: int) -> List[int]:
        return topology.block_group(rank, self.size(topology))
