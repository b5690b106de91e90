"""The base class of every mode's initializer, and the registry that maps modes to them.

An initializer is pure: it says *which ranks* form its mode's groups and never calls
torch.distributed (group creation lives in :mod:`pgroups.backend`). Built-ins live in
``pgroups.initializers`` (the repository's ``initializers/`` folder); third-party packages
register theirs with the decorator or through the ``pgroups.initializers`` entry-point group::

    @register_initializer("micro_data")
    class MicroData(ProcessGroupInitializer):
        def __init__(self, inference_tensor: int = 1): ...
        def rank_groups(self, topology): ...
"""
from __future__ import annotations

import importlib
import inspect
from importlib import metadata
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Type, TypeVar

from .errors import ConfigError, RegistrationError, UnknownModeError, allowed, did_you_mean
from .modes import ModeLike, mode_name
from .topology import RankGroups, Topology

ENTRY_POINT_GROUP = "pgroups.initializers"
BUILTIN_PACKAGE = "pgroups.initializers"


class ProcessGroupInitializer:
    """Says which rank groups one parallel mode has.

    Subclasses implement :meth:`rank_groups`; they override :meth:`group_of` when a rank's
    group can be found without listing the world (the built-ins all do). Options come from
    the config's ``extra_modes: {mode: {option: value}}`` as keyword arguments of
    ``__init__``. The ``mode`` attribute is set by the registry.
    """

    mode: str = ""

    def rank_groups(self, topology: Topology) -> RankGroups:
        """Every group of this mode as sorted global ranks. A rank may be in at most one group."""
        raise NotImplementedError

    def group_of(self, topology: Topology, rank: int) -> Optional[List[int]]:
        """The group holding ``rank``, or None if it is in none. Default: scan rank_groups."""
        for ranks in self.rank_groups(topology):
            if rank in ranks:
                return list(ranks)
        return None

    def layout_key(self, topology: Topology) -> Optional[Hashable]:
        """A canonical description of this mode's group list, or None if unknown.

        Two modes with equal non-None keys have identical groups on every rank and share one
        communicator (model == tensor when pipeline is 1). Computed without listing the world.
        """
        return None

    def validate(self, topology: Topology) -> None:
        """Raise ConfigError if this mode cannot be built on ``topology``. Default: accept."""


InitT = TypeVar("InitT", bound=Type[ProcessGroupInitializer])


class InitializerRegistry:
    """Mode name → initializer class.

    Built-ins and entry points are loaded on first lookup. ``register`` raises
    RegistrationError for a duplicate mode; ``get`` raises UnknownModeError listing the known
    modes.
    """

    def __init__(self, load_builtins: bool = True) -> None:
        self._classes: Dict[str, Type[ProcessGroupInitializer]] = {}
        self._loaded = not load_builtins

    def register(self, mode: ModeLike, cls: Type[ProcessGroupInitializer],
                 replace: bool = False) -> None:
        name = mode_name(mode)
        self._ensure_loaded()  # so that a clash with a built-in or entry point is seen now
        if not (inspect.isclass(cls) and issubclass(cls, ProcessGroupInitializer)):
            raise RegistrationError(
                f"initializer for mode {name!r} must subclass ProcessGroupInitializer, got {cls!r}")
        existing = self._classes.get(name)
        if existing is not None and existing is not cls and not replace:
            raise RegistrationError(
                f"mode {name!r} is already registered to {existing.__module__}.{existing.__qualname__}; "
                f"cannot register {cls.__module__}.{cls.__qualname__} (pass replace=True to override)")
        cls.mode = name
        self._classes[name] = cls

    def unregister(self, mode: ModeLike) -> None:
        self._classes.pop(mode_name(mode), None)

    def get(self, mode: ModeLike) -> Type[ProcessGroupInitializer]:
        self._ensure_loaded()
        name = mode_name(mode)
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownModeError(
                f"no initializer is registered for mode {name!r}{did_you_mean(name, self._classes)}; "
                f"known modes: {allowed(self._classes)}") from None

    def create(self, mode: ModeLike, options: Optional[Mapping[str, Any]] = None,
               source: Optional[str] = None) -> ProcessGroupInitializer:
        """Instantiate ``mode``'s initializer with config ``options``; ConfigError on bad options."""
        cls = self.get(mode)
        options = dict(options or {})
        params = inspect.signature(cls.__init__).parameters
        accepted = [p for p in params if p != "self"
                    and params[p].kind in (params[p].POSITIONAL_OR_KEYWORD, params[p].KEYWORD_ONLY)]
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        if cls.__init__ is object.__init__:  # no __init__ of its own: object's (*args, **kwargs) takes none
            accepted, takes_any = [], False
        for key in options:
            if key not in accepted and not takes_any:
                where = f"{source}: " if source else ""
                raise ConfigError(
                    f"{where}extra_modes.{cls.mode}.{key}: unknown option{did_you_mean(key, accepted)}; "
                    f"allowed: {allowed(accepted) or 'none'}")
        try:
            return cls(**options)
        except (TypeError, ValueError) as exc:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}extra_modes.{cls.mode}: {exc}") from None

    def modes(self) -> List[str]:
        self._ensure_loaded()
        return sorted(self._classes)

    def __contains__(self, mode: object) -> bool:
        self._ensure_loaded()
        return isinstance(mode, str) and mode_name(mode) in self._classes

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: entry points may register through this registry
        try:
            importlib.import_module(BUILTIN_PACKAGE)  # its modules fill _BUILTINS on import
            for name, cls in _BUILTINS.items():
                self._classes.setdefault(name, cls)
            for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
                try:
                    cls = entry.load()
                except Exception as exc:
                    raise RegistrationError(
                        f"entry point {entry.name!r} = {entry.value!r} (group {ENTRY_POINT_GROUP!r}) "
                        f"failed to load: {type(exc).__name__}: {exc}") from exc
                if entry.name not in self._classes or self._classes[entry.name] is not cls:
                    self.register(entry.name, cls)
        except BaseException:
            self._loaded = False  # report the same error on the next lookup, never half-load silently
            raise


_BUILTINS: Dict[str, Type[ProcessGroupInitializer]] = {}


def builtin_initializer(mode: ModeLike) -> Callable[[InitT], InitT]:
    """Class decorator for the package's own initializers: every registry starts with them."""

    def decorate(cls: InitT) -> InitT:
        cls.mode = mode_name(mode)
        _BUILTINS[cls.mode] = cls
        return cls

    return decorate


#: The default registry used by ``gpc`` and the CLI.
default_registry = InitializerRegistry()


def register_initializer(mode: ModeLike, registry: Optional[InitializerRegistry] = None,
                         replace: bool = False) -> Callable[[InitT], InitT]:
    """Class decorator registering an initializer for ``mode`` (in the default registry)."""

    def decorate(cls: InitT) -> InitT:
        (registry or default_registry).register(mode, cls, replace=replace)
        return cls

    return decorate
