"""Several models in one job: each named model's layout placed on its own global ranks (pure).

A config's ``models:`` names layouts such as an RLHF actor, its rollout engine and a reward
model, each with its own ``parallel:`` block and ``ranks:`` placement (Megatron-Core's
``HyperCommGrid`` with ``rank_offset``, generalised to any rank list). A model's topology numbers
its ranks 0..n-1 (model-local); :class:`PlacedInitializer` answers every group query in *global*
ranks by mapping model-local rank ``i`` to ``ranks[i]``. Nothing here talks to torch.distributed:
:class:`pgroups.context.ParallelContext` builds the groups, sharing a communicator wherever two
models' groups are identical (equal layout keys over equal placements).
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

from .config import Config, ModelConfig
from .errors import ConfigError
from .initializer import BuiltinInitializer, ProcessGroupInitializer, check_group_of, checked_initializer_call, describe_initializer
from .topology import RankGroups, Topology


def placement_key(ranks: Sequence[int]) -> Hashable:
    """What identifies a placement compactly: ``("run", first, n)`` for consecutive ranks, else the
    ranks themselves."""
    ranks = tuple(ranks)
    if ranks and ranks == tuple(range(ranks[0], ranks[0] + len(ranks))):
        return ("run", ranks[0], len(ranks))
    return ranks


class PlacedInitializer(ProcessGroupInitializer):
    """``inner``'s groups over a model's topology, in global ranks: model-local rank ``i`` is
    global rank ``ranks[i]``. Pure.

    >>> from pgroups import Topology, default_registry
    >>> placed = PlacedInitializer(default_registry.create("tp"), (16, 17, 18, 19))
    >>> placed.rank_groups(Topology.create(4, tensor=2))
    [[16, 17], [18, 19]]
    """

    def __init__(self, inner: ProcessGroupInitializer, ranks: Sequence[int]) -> None:
        self.inner = inner
        self.mode = inner.mode
        self.ranks = tuple(ranks)
        self._local = {rank: index for index, rank in enumerate(self.ranks)}

    def rank_groups(self, topology: Topology) -> RankGroups:
        return [[self.ranks[r] for r in group] for group in self.inner.rank_groups(topology)]

    def group_of(self, topology: Topology, rank: int) -> Optional[List[int]]:
        local = self._local.get(rank)
        if local is None:
            return None
        if isinstance(self.inner, BuiltinInitializer):
            group = self.inner.group_of(topology, local)
        else:
            group = checked_initializer_call(self.inner, f"finding rank {local}'s group",
                                             lambda: self.inner.group_of(topology, local))
            group = check_group_of(group, local, topology.world_size, describe_initializer(self.inner))
        return None if group is None else sorted(self.ranks[r] for r in group)

    def layout_key(self, topology: Topology) -> Optional[Hashable]:
        key = self.inner.layout_key(topology)
        return None if key is None else (key, placement_key(self.ranks))

    def validate(self, topology: Topology) -> None:
        self.inner.validate(topology)

    def __repr__(self) -> str:
        return f"PlacedInitializer({self.inner!r}, ranks={len(self.ranks)})"


def model_as_config(config: Config, model: ModelConfig) -> Config:
    """A single-model Config for ``model``: its ``parallel:`` and ``nccl_options:``, the rest
    (backend, timeouts, strategy, extra modes, plugins) from ``config``."""
    import attrs

    return attrs.evolve(config, parallel=model.parallel, nccl_options=model.nccl_options, models={})


def check_models(config: Config, world_size: int) -> Dict[str, Tuple[Tuple[int, ...], Topology]]:
    """``{model: (global ranks, model topology)}`` for every model of ``config``, validated:
    ranks inside the world, each model's sizes dividing its rank count. Pure; ConfigError
    naming the model, its ranks and the arithmetic."""
    where = f"{config.source}: " if config.source else ""
    result = {}
    for name, model in config.models.items():
        ranks = model.placement(world_size, where)
        result[name] = (ranks, model.topology(world_size, config.source))
    return result


def unknown_model(name: str, models: Mapping[str, object]) -> ConfigError:
    from .errors import allowed, did_you_mean

    return ConfigError(f"model {name!r} is not in this config{did_you_mean(name, models)}; "
                       f"models: {allowed(models)}")
