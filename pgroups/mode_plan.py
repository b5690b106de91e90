"""Which groups a config builds, decided before any communication: the initializer of every
mode (validated against the layout), the plugins a config names, and each model's placed
initializers. Pure: no torch, so the CLI's ``show`` / ``validate`` and the reshard planner use
it without importing torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from .config import Config
from .errors import ConfigError, UnknownModeError
from .initializer import (BuiltinInitializer, InitializerRegistry, ProcessGroupInitializer, check_groups,
                          checked_initializer_call, describe_initializer)
from .initializer import import_plugins as _import_plugins
from .models import PlacedInitializer, check_models, model_as_config
from .modes import canonical_name, is_builtin
from .nccl_options import options_by_mode
from .topology import Topology


def make_initializers(registry: InitializerRegistry, cfg: Config,
                      topology: Topology) -> Dict[str, ProcessGroupInitializer]:
    """The initializers of every mode ``cfg`` builds on ``topology``, in creation order: the
    layout's built-in modes (Topology.default_modes), then ``parallel.modes``, then
    ``extra_modes``; each validated against ``topology``, and a user initializer's groups
    checked (sorted, disjoint, inside the world).

    Pure. Raises ConfigError naming the config's source for an unknown or built-in extra mode,
    bad options, a mode that cannot be built on ``topology``, bad groups, or an initializer
    that raises.
    """
    where = f"{cfg.source}: " if cfg.source else ""
    result: Dict[str, ProcessGroupInitializer] = {}
    seen = set()
    for name in topology.default_modes() + tuple(cfg.parallel.modes):
        if canonical_name(name) not in seen:  # "tensor" after "tp" is the same mode
            seen.add(canonical_name(name))
            result[canonical_name(name)] = registry.create(name)
    for name, options in cfg.extra_modes.items():
        if name in result or is_builtin(name):
            raise ConfigError(f"{where}extra_modes.{name}: built-in modes are always built or listed "
                              "under parallel.modes; extra_modes is for modes of your own")
        try:
            result[name] = registry.create(name, options, source=cfg.source)
        except UnknownModeError as exc:
            raise ConfigError(f"{where}extra_modes.{name}: {exc}"
                              " (register it, or list its module under plugins:)") from None
    for init in result.values():
        try:
            checked_initializer_call(init, "validating", lambda: init.validate(topology))
            if not isinstance(init, BuiltinInitializer):  # built-ins are proven by the test suite
                groups = checked_initializer_call(init, "listing its groups", lambda: init.rank_groups(topology))
                check_groups(groups, topology.world_size, describe_initializer(init))
        except ConfigError as exc:
            if where and str(exc).startswith(where):
                raise
            raise ConfigError(f"{where}{exc}") from None
    options_by_mode(cfg.nccl_options, result, canonical_name, where)  # every entry names a built mode
    return result


def plan_models(registry: InitializerRegistry, cfg: Config, world_size: int) -> Dict[str, Tuple[Any, ...]]:
    """``{model: (global ranks, topology, placed initializers, nccl options by mode)}`` for every
    model of ``cfg``, validated before any communication (ConfigError naming the model)."""
    plans = {}
    for name, (ranks, topology) in check_models(cfg, world_size).items():
        model_cfg = model_as_config(cfg, cfg.models[name])
        try:
            inits = make_initializers(registry, model_cfg, topology)
        except ConfigError as exc:
            raise ConfigError(f"models.{name}: {exc}") from None
        placed = {mode: PlacedInitializer(init, ranks) for mode, init in inits.items()}
        plans[name] = (ranks, topology, placed, options_by_mode(model_cfg.nccl_options, inits, canonical_name))
    return plans


def import_plugins(cfg: Config) -> None:
    """Import the modules a config lists under ``plugins:`` (names, or .py paths relative to it).

    Their import registers initializers. Raises ConfigError naming a plugin that cannot be
    found or raises while loading; the registry is then left as it was.
    """
    base = Path(cfg.source).parent if cfg.source and Path(cfg.source).exists() else Path.cwd()
    _import_plugins(cfg.plugins, base, cfg.source)
