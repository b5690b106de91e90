"""The base class of every mode's initializer, and the registry that maps modes to them.

An initializer is pure: it says *which ranks* form its mode's groups and never calls
torch.distributed (group creation lives in :mod:`pgroups.backend`). Built-ins live in
``pgroups.initializers`` (the repository's ``initializers/`` folder): one initializer serves
every built-in mode and every axis combination (``"tp-cp"`` …), reading what the mode is from
:mod:`pgroups.modes`. Third-party packages register theirs with the decorator or through the
``pgroups.initializers`` entry-point group; an initializer may also declare axes of its own
(:class:`pgroups.initializers.AxisInitializer` over a :class:`pgroups.mesh.Mesh` it builds)::

    @register_initializer("micro_data")
    class MicroData(ProcessGroupInitializer):
        def __init__(self, inference_tensor: int = 1): ...
        def rank_groups(self, topology): ...
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from importlib import metadata
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from .errors import ConfigError, RegistrationError, UnknownModeError, allowed, did_you_mean
from .modes import (BUILTIN_MODE_NAMES, BUILTIN_SPELLINGS, COMBINATION_HELP, ModeLike, axis_mode, canonical_name,
                    is_builtin, mode_name, with_aliases)
from .topology import RankGroups, Topology

ENTRY_POINT_GROUP = "pgroups.initializers"
BUILTIN_PACKAGE = "pgroups.initializers"


class ProcessGroupInitializer:
    """Says which rank groups one parallel mode has.

    Subclasses implement :meth:`rank_groups`; they override :meth:`group_of` when a rank's
    group can be found without listing the world (the built-ins all do). Options come from
    the config's ``extra_modes: {mode: {option: value}}`` as keyword arguments of
    ``__init__``. The ``mode`` attribute is set by the registry.

    Groups must be sorted lists of global ranks inside the world, each rank in at most one
    group: the context checks a user initializer's groups before any communication
    (:func:`checked_rank_groups`) and raises ConfigError naming it and the first bad group.
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


class BuiltinInitializer(ProcessGroupInitializer):
    """Every built-in mode and axis combination: the rank math is the topology's
    (:meth:`Topology.groups`, :meth:`Topology.group_of`), what the mode is comes from
    :mod:`pgroups.modes` — no class per mode."""

    def rank_groups(self, topology: Topology) -> RankGroups:
        return topology.groups(self.mode)

    def group_of(self, topology: Topology, rank: int) -> Optional[List[int]]:
        return topology.group_of(rank, self.mode)

    def layout_key(self, topology: Topology) -> Hashable:
        return topology.layout_key(self.mode)

    def validate(self, topology: Topology) -> None:
        topology.resolve(self.mode)

    @property
    def axes(self) -> Optional[Tuple[str, ...]]:
        """The mesh axes the mode runs along (``("tp", "pp")`` for model), None for the
        special modes (global, zero1, nettest, embedding)."""
        spec = axis_mode(self.mode)
        return None if spec is None else spec.ordered_axes()

    def __repr__(self) -> str:
        return f"<BuiltinInitializer {self.mode!r}>"


InitT = TypeVar("InitT", bound=Type[ProcessGroupInitializer])


class InitializerRegistry:
    """Mode name → initializer class.

    Built-in modes and axis combinations (``"tp-cp"``) are always known; entry points are
    loaded on first lookup. ``register`` raises RegistrationError for a duplicate mode or a
    built-in name; ``get`` raises UnknownModeError listing the known modes. A registration
    or load that fails leaves the registry as it was.
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
        if existing is None and is_builtin(name):
            raise RegistrationError(
                f"mode {name!r} is already registered to pgroups' built-in "
                f"{'mode' if name in BUILTIN_SPELLINGS else 'axis combination'} {canonical_name(name)!r}; "
                "cannot register "
                f"{class_name(cls)} (choose another name)")
        if existing is not None and existing is not cls and not replace:
            raise RegistrationError(
                f"mode {name!r} is already registered to {class_name(existing)}; "
                f"cannot register {class_name(cls)} (pass replace=True to override)")
        cls.mode = name
        self._classes[name] = cls

    def unregister(self, mode: ModeLike) -> None:
        self._classes.pop(mode_name(mode), None)

    def get(self, mode: ModeLike) -> Type[ProcessGroupInitializer]:
        self._ensure_loaded()
        name = mode_name(mode)
        if name in self._classes:
            return self._classes[name]
        if name in BUILTIN_SPELLINGS:
            return BuiltinInitializer
        try:
            found = axis_mode(name)
        except ConfigError as exc:
            raise UnknownModeError(str(exc)) from None
        if found is not None:
            return BuiltinInitializer
        raise UnknownModeError(
            f"no initializer is registered for mode {name!r}{did_you_mean(name, with_aliases(self.modes()))}; "
            f"known modes: {allowed(self.modes())}; {COMBINATION_HELP}")

    def create(self, mode: ModeLike, options: Optional[Mapping[str, Any]] = None,
               source: Optional[str] = None) -> ProcessGroupInitializer:
        """Instantiate ``mode``'s initializer with config ``options``; ConfigError on bad options."""
        name = mode_name(mode)
        cls = self.get(name)
        options = dict(options or {})
        params = inspect.signature(cls.__init__).parameters
        accepted = [p for p in params if p != "self"
                    and params[p].kind in (params[p].POSITIONAL_OR_KEYWORD, params[p].KEYWORD_ONLY)]
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        if cls.__init__ is object.__init__:  # no __init__ of its own: object's (*args, **kwargs) takes none
            accepted, takes_any = [], False
        where = f"{source}: " if source else ""
        for key in options:
            if key not in accepted and not takes_any:
                raise ConfigError(
                    f"{where}extra_modes.{name}.{key}: unknown option{did_you_mean(key, accepted)}; "
                    f"allowed: {allowed(accepted) or 'none'}")
        try:
            init = cls(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}extra_modes.{name}: {exc}") from None
        init.mode = canonical_name(name) if cls is BuiltinInitializer else name
        return init

    def modes(self) -> List[str]:
        """The named modes: built-ins and registered ones (axis combinations are not listed)."""
        self._ensure_loaded()
        return sorted(set(BUILTIN_MODE_NAMES) | set(self._classes))

    def __contains__(self, mode: object) -> bool:
        if not isinstance(mode, str) or not mode:
            return False
        try:
            self.get(mode)
        except UnknownModeError:
            return False
        return True

    def snapshot(self) -> Dict[str, Type[ProcessGroupInitializer]]:
        """The registrations now, for :meth:`restore` after a failed plugin load."""
        self._ensure_loaded()
        return dict(self._classes)

    def restore(self, snapshot: Mapping[str, Type[ProcessGroupInitializer]]) -> None:
        self._classes = dict(snapshot)

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        before = dict(self._classes)
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
            self._classes = before  # never half-loaded: the next lookup reports the same error
            self._loaded = False
            raise


_BUILTINS: Dict[str, Type[ProcessGroupInitializer]] = {}


def alias_checkout_initializers() -> None:
    """Make ``pgroups.initializers`` importable from a plain checkout (``PYTHONPATH=<checkout>``).

    An install maps the repository's top-level ``initializers/`` folder to ``pgroups.initializers``
    (pyproject's ``package-dir``); a checkout on ``sys.path`` has no such mapping, so the folder
    beside the ``pgroups`` package is loaded under that name. Does nothing when the package can be
    found (installed, editable or not) or the folder is absent.
    """
    if BUILTIN_PACKAGE in sys.modules or importlib.util.find_spec(BUILTIN_PACKAGE) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "initializers"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(BUILTIN_PACKAGE, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[BUILTIN_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[BUILTIN_PACKAGE]
        raise
    setattr(sys.modules["pgroups"], "initializers", module)  # as an import of the sub-package would


def builtin_initializer(mode: ModeLike) -> Callable[[InitT], InitT]:
    """Class decorator for the package's own special initializers: every registry starts with them."""

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


# ---- checking what user initializers return ----------------------------------------------------

#: attribute set on a plugin module loaded from a file: the name users know it by (the file's stem)
#: and the path the config gave, shown instead of the unique name it is imported under
PLUGIN_SHOWN_AS = "__pgroups_plugin_shown_as__"


def class_name(cls: type) -> str:
    """``MODULE.CLASS``; a class from a plugin file is shown by the file's module name and the
    path the config gave (``raising_plugin.Boom (plugins/raising_plugin.py)``), not by the unique
    name it is imported under."""
    shown = getattr(sys.modules.get(cls.__module__), PLUGIN_SHOWN_AS, None)
    if shown is not None:
        stem, path = shown
        return f"{stem}.{cls.__qualname__} ({path})"
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_initializer(init: ProcessGroupInitializer) -> str:
    """``initializer MODULE.CLASS of mode 'm'`` (the class as :func:`class_name` shows it)."""
    return f"initializer {class_name(type(init))} of mode {init.mode!r}"


def check_groups(groups: object, world_size: int, who: str) -> RankGroups:
    """Return ``groups`` as lists if they are sorted, inside the world and disjoint.

    Raises ConfigError naming ``who`` and the first bad group (a reversed list would make
    pgroups' local rank disagree with torch's, which sorts).
    """
    if not isinstance(groups, (list, tuple)):
        raise ConfigError(f"{who} must return a list of rank lists, got {type(groups).__name__}")
    owner: Dict[int, int] = {}
    result: RankGroups = []
    for index, group in enumerate(groups):
        problem = _group_problem(group, world_size)
        if problem is None:
            for rank in group:
                if rank in owner:
                    problem = f"rank {rank} is also in group {list(groups[owner[rank]])}"
                    break
                owner[rank] = index
        if problem is not None:
            raise ConfigError(f"{who} returned a bad group {_show(group)}: {problem} (groups must be "
                              f"sorted lists of distinct ranks in 0..{world_size - 1}, each rank in at "
                              "most one group)")
        result.append(list(group))
    return result


def check_group_of(group: object, rank: int, world_size: int, who: str) -> Optional[List[int]]:
    """Check one rank's group (as :func:`check_groups`, and that it holds ``rank``)."""
    if group is None:
        return None
    problem = _group_problem(group, world_size)
    if problem is None and rank not in group:
        problem = f"it does not hold rank {rank}"
    if problem is not None:
        raise ConfigError(f"{who} returned a bad group {_show(group)} for rank {rank}: {problem}")
    return list(group)


def _group_problem(group: object, world_size: int) -> Optional[str]:
    if not isinstance(group, (list, tuple)) or not group:
        return "not a non-empty list of ranks"
    for rank in group:
        if isinstance(rank, bool) or not isinstance(rank, int):
            return f"{rank!r} is not an integer rank"
        if not 0 <= rank < world_size:
            return f"rank {rank} is outside the world 0..{world_size - 1}"
    for a, b in zip(group, group[1:]):
        if a >= b:
            return "not sorted" if a > b else f"rank {a} repeats"
    return None


def _show(group: object, limit: int = 12) -> str:
    if isinstance(group, (list, tuple)) and len(group) > limit:
        return f"[{', '.join(map(str, group[:limit]))}, … ({len(group)} ranks)]"
    return repr(list(group)) if isinstance(group, tuple) else repr(group)


def checked_initializer_call(init: ProcessGroupInitializer, what: str, call: Callable[[], Any]) -> Any:
    """Run ``call`` (part of building ``init``'s mode); anything it raises other than
    ConfigError becomes one ConfigError naming the initializer."""
    try:
        return call()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{describe_initializer(init)} failed while {what}: "
                          f"{type(exc).__name__}: {exc}") from exc


# ---- plugins --------------------------------------------------------------------------------------

def import_plugins(plugins: Sequence[str], base: Path, source: Optional[str] = None,
                   registry: Optional[InitializerRegistry] = None) -> None:
    """Import plugin modules (names, or .py paths relative to ``base``); their import registers
    initializers. A plugin that cannot be found or raises while loading gives one ConfigError
    naming it, and leaves ``registry`` (default: the default registry) as it was."""
    registry = registry or default_registry
    where = source or "<config>"
    for plugin in plugins:
        snapshot = registry.snapshot()
        added_module = None
        try:
            if plugin.endswith(".py"):
                path = (base / plugin).resolve()
                # one module per file: two configs' "modes.py" in different folders are two plugins
                name = f"pgroups_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or not path.is_file():
                    raise FileNotFoundError(f"file {str(path)!r} not found")
                module = importlib.util.module_from_spec(spec)
                setattr(module, PLUGIN_SHOWN_AS, (path.stem, plugin))
                sys.modules[name] = added_module = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(plugin)
        except Exception as exc:
            registry.restore(snapshot)
            if added_module is not None:
                sys.modules.pop(added_module.__name__, None)
            if isinstance(exc, FileNotFoundError):
                reason = str(exc)
            elif isinstance(exc, ImportError):
                reason = f"cannot import {plugin!r}: {exc}"
            else:
                reason = f"{plugin!r} failed while loading: {type(exc).__name__}: {exc}"
            raise ConfigError(f"{where}: plugins: {reason}") from None
