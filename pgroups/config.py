"""Configuration: attrs classes loaded from a YAML file, a YAML string or a dict.

Only ``yaml.safe_load`` is used: a config is data, never code. Every invalid input raises one
:class:`~pgroups.errors.ConfigError` naming the source, the key, the bad value and what is
allowed (with a did-you-mean for unknown keys) — before any communication happens::

    parallel:
      tensor: 2          # default 1
      pipeline: 2        # default 1
      context: 2         # cp, default 1 (needs cp in the order)
      data: 4            # optional (or auto): world / (tensor*context*pipeline)
      expert: 4          # ep, default 1: MoE expert parallel on the expert mesh
      expert_tensor: 1   # etp, default: tensor
      expert_layout: megatron   # megatron | internevo
      weight: 4          # wp: InternEvo ISP weight parallel (unset: ISP off)
      virtual_pipeline: 2       # model chunks per pipeline rank (no groups of its own)
      zero1: 2           # default: data*context (weight_data under ISP); must divide it
      nettest: 8         # default 32; larger than the world means one group
      order: tp-cp-ep-dp-pp     # fastest- to slowest-varying axis (default tp-pp-dp)
      modes: [dp-cp, tp-cp]     # more built-in modes / axis combinations to build
    backend: auto        # auto | nccl | gloo
    timeout_s: 1800      # collectives (and the groups' own watchdog)
    creation_timeout_s: 300   # members meeting to create a group (default: min(300, timeout_s))
    groups: eager        # eager | lazy   (device groups)
    cpu_groups: lazy     # lazy | eager | off
    strategy: auto       # auto | all | local | split
    extra_modes:         # user modes to build, with their initializer's options
      micro_data: {inference_tensor: 1}
    plugins: [my_package.modes]   # modules (or .py files beside the config) to import first
    nccl_options:        # per-mode NCCL communicator options (see pgroups.nccl_options)
      tensor: {max_ctas: 8}
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import attrs
import yaml

from .errors import ConfigError, allowed, did_you_mean, reject_unknown_keys
from .modes import BUILTIN_MODE_NAMES, COMBINATION_HELP, axis_mode, is_builtin, with_aliases
from .nccl_options import validate_nccl_options
from .ranks import format_ranks, parse_ranks
from .topology import DEFAULT_ORDER, EXPERT_LAYOUTS, Topology, check_virtual_pipeline, parse_order

BACKENDS = ("auto", "nccl", "gloo")
GROUP_TIMING = ("eager", "lazy")
CPU_GROUP_TIMING = ("lazy", "eager", "off")
STRATEGIES = ("auto", "all", "local", "split")
#: The default deadline for a group's members to meet at its creation. Creating a communicator
#: takes seconds to a few minutes at thousands of ranks (NCCL's unique-id exchange and bootstrap
#: ring, gloo's full mesh over the store); a peer that has not arrived after five minutes is
#: not coming, and the job should fail then — not after the 30-minute collective timeout.
DEFAULT_CREATION_TIMEOUT_S = 300.0
#: ~31 years: beyond this datetime.timedelta (what torch takes) overflows
MAX_TIMEOUT_S = 1e9


@attrs.frozen
class ParallelConfig:
    """Sizes of the parallel axes; None means "derive" (data, zero1, expert_tensor) or "off"
    (weight). ``modes`` lists extra built-in modes to build."""

    tensor: int = 1
    pipeline: int = 1
    data: Optional[int] = None
    zero1: Optional[int] = None
    nettest: int = 32
    order: str = DEFAULT_ORDER
    virtual_pipeline: int = 1
    context: int = 1
    expert: int = 1
    expert_tensor: Optional[int] = None
    expert_layout: str = "megatron"
    weight: Optional[int] = None
    modes: Tuple[str, ...] = ()

    def topology(self, world_size: int, source: Optional[str] = None) -> Topology:
        """Validate against ``world_size`` and return the pure layout (ConfigError if inconsistent)."""
        return Topology.create(world_size, self.tensor, self.pipeline, self.data, self.zero1,
                               self.nettest, self.order, source=source, context=self.context,
                               expert=self.expert, expert_tensor=self.expert_tensor, weight=self.weight,
                               virtual_pipeline=self.virtual_pipeline, expert_layout=self.expert_layout)


@attrs.frozen
class Config:
    """A whole, validated configuration. ``source`` names where it came from, for messages."""

    parallel: ParallelConfig = attrs.field(factory=ParallelConfig)
    backend: str = "auto"
    timeout_s: float = 1800.0
    creation_timeout_s: Optional[float] = None
    groups: str = "eager"
    cpu_groups: str = "lazy"
    strategy: str = "auto"
    extra_modes: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    plugins: Tuple[str, ...] = ()
    nccl_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    models: Mapping[str, "ModelConfig"] = attrs.field(factory=dict)
    source: Optional[str] = attrs.field(default=None, eq=False)

    def topology(self, world_size: int) -> Topology:
        return self.parallel.topology(world_size, source=self.source)

    @property
    def creation_deadline_s(self) -> float:
        """How long the members of a group wait for each other to create it: ``creation_timeout_s``,
        else the smaller of :data:`DEFAULT_CREATION_TIMEOUT_S` and ``timeout_s``."""
        if self.creation_timeout_s is not None:
            return self.creation_timeout_s
        return min(DEFAULT_CREATION_TIMEOUT_S, self.timeout_s)


ConfigLike = Union[Config, Mapping[str, Any], str, "os.PathLike[str]"]

_PARALLEL_KEYS = tuple(f.name for f in attrs.fields(ParallelConfig))
_TOP_KEYS = tuple(f.name for f in attrs.fields(Config) if f.name != "source")


def load_config(obj: ConfigLike, source: Optional[str] = None) -> Config:
    """Return a validated Config from a Config, a mapping, a YAML file path or a YAML string.

    A str is read as a path when it names an existing file or ends in .yaml/.yml, otherwise as
    YAML text. Raises ConfigError (never KeyError/TypeError/yaml errors) for any bad input.
    """
    if isinstance(obj, Config):
        return obj
    if isinstance(obj, Mapping):
        return config_from_dict(obj, source)
    if isinstance(obj, (str, os.PathLike)):
        data, where = read_yaml(obj, "config", source, text_name="<yaml string>")
        return config_from_dict(data, where)
    raise ConfigError(f"a config must be a path, a YAML string, a mapping or a Config, got {type(obj).__name__}")


def load_config_file(path: Union[str, "os.PathLike[str]"]) -> Config:
    """Read and validate the YAML file at ``path``."""
    data, source = read_yaml(os.fspath(path), "config")
    return config_from_dict(data, source)


def config_from_dict(data: Any, source: Optional[str] = None) -> Config:
    """Validate a plain mapping (as YAML gives it) into a Config."""
    where = f"{source}: " if source else ""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}the config must be a mapping of keys such as 'parallel:', "
                          f"got {type(data).__name__}")
    reject_unknown_keys(data, _TOP_KEYS, "", where, ("parallel", _PARALLEL_KEYS))
    if data.get("models") is not None and data.get("parallel") is not None:
        raise ConfigError(f"{where}give either parallel: (one model over the whole world) or models: "
                          "(each with its own parallel: and ranks:), not both")
    parallel = parallel_config(data.get("parallel"), where)
    kwargs: Dict[str, Any] = {"parallel": parallel, "source": source}
    for key, choices in (("backend", BACKENDS), ("groups", GROUP_TIMING),
                         ("cpu_groups", CPU_GROUP_TIMING), ("strategy", STRATEGIES)):
        if key in data:
            value = data[key]
            if key == "cpu_groups" and value is False:  # YAML 1.1 reads a bare `off` as false
                value = "off"
            if value not in choices:
                raise ConfigError(f"{where}{key}: {value!r} is not allowed; allowed: {allowed(choices)}")
            kwargs[key] = value
    for key in ("timeout_s", "creation_timeout_s"):
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT_S:
                raise ConfigError(f"{where}{key} must be a positive number of seconds up to "
                                  f"{MAX_TIMEOUT_S:g}, got {value!r}")
            kwargs[key] = float(value)
    kwargs["extra_modes"] = _extra_modes(data.get("extra_modes"), where)
    kwargs["plugins"] = _plugins(data.get("plugins"), where)
    kwargs["nccl_options"] = validate_nccl_options(data.get("nccl_options"), where)
    kwargs["models"] = _models(data.get("models"), where)
    return Config(**kwargs)


@attrs.frozen
class ModelConfig:
    """One named model of a several-model config: its own ``parallel:`` layout, the global ranks it
    runs on (``ranks: 0-15``; None: the whole world), and its own ``nccl_options:``."""

    name: str
    parallel: ParallelConfig
    ranks: Optional[Tuple[int, ...]] = None
    nccl_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)

    def placement(self, world_size: int, where: str = "") -> Tuple[int, ...]:
        """The model's global ranks in ``world_size`` (sorted). Raises ConfigError naming the model
        for ranks outside the world."""
        if self.ranks is None:
            return tuple(range(world_size))
        outside = [r for r in self.ranks if not 0 <= r < world_size]
        if outside:
            raise ConfigError(f"{where}models.{self.name}.ranks: rank {outside[0]} is outside the world "
                              f"0..{world_size - 1} (world_size {world_size})")
        return self.ranks

    def topology(self, world_size: int, source: Optional[str] = None) -> Topology:
        """The model's layout over its own ranks (model-local numbering 0..n-1). ConfigError names
        the model and the arithmetic that failed."""
        where = f"{source}: " if source else ""
        ranks = self.placement(world_size, where)
        return self.parallel.topology(len(ranks), source=f"{source or '<config>'}: models.{self.name} "
                                                         f"(ranks {format_ranks(ranks, limit=8)})")


_MODEL_KEYS = ("parallel", "ranks", "nccl_options")


def _models(value: Any, where: str) -> Dict[str, ModelConfig]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where}models must be a mapping of model names to {{parallel: ..., ranks: ...}}, "
                          f"got {value!r}")
    models = {}
    for name, block in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{where}models: {name!r} is not a valid model name (letters, digits, _)")
        block = {} if block is None else block
        if not isinstance(block, Mapping):
            raise ConfigError(f"{where}models.{name} must be a mapping of {allowed(_MODEL_KEYS)}, got {block!r}")
        reject_unknown_keys(block, _MODEL_KEYS, f"models.{name}.", where, ("parallel", _PARALLEL_KEYS))
        ranks = None
        if block.get("ranks") is not None:
            ranks = tuple(sorted(parse_ranks(block["ranks"], f"{where}models.{name}.ranks")))
            if len(set(ranks)) != len(ranks):
                raise ConfigError(f"{where}models.{name}.ranks: rank {_first_repeat(ranks)} is listed twice")
        models[name] = ModelConfig(name, parallel_config(block.get("parallel"), f"{where}models.{name}: "), ranks,
                                   validate_nccl_options(block.get("nccl_options"), f"{where}models.{name}: "))
    return models


def _first_repeat(ranks: Sequence[int]) -> int:
    seen = set()
    for rank in ranks:
        if rank in seen:
            return rank
        seen.add(rank)
    raise ValueError("no repeat")



def parallel_config(par: Any, where: str = "") -> ParallelConfig:
    """Validate one ``parallel:`` block (a mapping, or None for the defaults). Raises ConfigError."""
    if par is None:  # "parallel:" with nothing under it
        par = {}
    if not isinstance(par, Mapping):
        raise ConfigError(f"{where}parallel must be a mapping of {allowed(_PARALLEL_KEYS)}, got {par!r}")
    reject_unknown_keys(par, _PARALLEL_KEYS, "parallel.", where)
    par = dict(par)
    if par.get("data") == "auto":
        par["data"] = None
    for key in ("tensor", "pipeline", "nettest", "virtual_pipeline", "context", "expert"):
        _positive_int(par, key, where)
    for key in ("data", "zero1", "expert_tensor", "weight"):
        if par.get(key) is not None:
            _positive_int(par, key, where)
    order = par.get("order", DEFAULT_ORDER)
    try:
        parse_order(order)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    if "expert_layout" in par and par["expert_layout"] not in EXPERT_LAYOUTS:
        raise ConfigError(f"{where}parallel.expert_layout: {par['expert_layout']!r} is not allowed; "
                          f"allowed: {allowed(EXPERT_LAYOUTS)}")
    if "modes" in par:
        par["modes"] = _builtin_modes(par["modes"], where)
    parallel = ParallelConfig(**{k: par[k] for k in _PARALLEL_KEYS if k in par})
    data_size, zero1 = parallel.data, parallel.zero1
    if data_size is not None and zero1 is not None and parallel.weight is None:  # zero1 shards dp-cp
        shard = data_size * parallel.context
        if shard % zero1:
            what = f"data({data_size})*context({parallel.context})" if parallel.context > 1 else f"data({data_size})"
            raise ConfigError(f"{where}parallel.zero1({zero1}) must divide {what}")
    check_virtual_pipeline(parallel.virtual_pipeline, parallel.pipeline, where)

    return parallel


def read_yaml(obj: Union[str, "os.PathLike[str]"], what: str = "config",
              source: Optional[str] = None, text_name: Optional[str] = None) -> Tuple[Any, str]:
    """Parse ``obj`` — a YAML file path or YAML text — with ``yaml.safe_load``.

    Returns ``(data, source)``, where source names the file (or ``source``, else ``text_name``
    or ``<what>`` for YAML text).
    A str is a path when it names an existing file, ends in .yaml/.yml, or has no ':' and no
    newline. Raises ConfigError for an unreadable file or malformed YAML (with line, column).
    """
    text = os.fspath(obj)
    if isinstance(obj, os.PathLike) or _looks_like_path(text):
        try:
            content = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{text}: cannot read {what} file: {reason}") from None
        source = source or text
    else:
        content, source = text, source or text_name or f"<{what}>"
    return _parse_yaml(content, source), source


def _looks_like_path(text: str) -> bool:
    if "\n" in text:
        return False
    return text.endswith((".yaml", ".yml")) or os.path.isfile(text) or ":" not in text


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(key, first_line, line)
        self.key, self.first_line, self.line = key, first_line, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping: YAML requires unique
    keys, and PyYAML would silently keep the last one. Merge keys (``<<``) may still be
    overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: dict = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not key_node:
                raise _DuplicateKey(key, first.start_mark.line + 1, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: data only, never code
    except _DuplicateKey as dup:
        raise ConfigError(f"{source}: duplicate key {dup.key!r} at line {dup.line} (first given at "
                          f"line {dup.first_line}); each key may appear once in a mapping") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: malformed YAML{at}: {problem}") from None


def _positive_int(data: Mapping[str, Any], key: str, where: str) -> None:
    if key in data:
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}parallel.{key} must be a positive integer, got {value!r}")


def _builtin_modes(value: Any, where: str) -> Tuple[str, ...]:
    """``parallel.modes``: built-in mode names or axis combinations, each once."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}parallel.modes must be a list of mode names such as [dp-cp, tp-cp], "
                          f"got {value!r}")
    for name in value:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}parallel.modes: mode names must be non-empty strings, got {name!r}")
        try:
            axis_mode(name)
        except ConfigError as exc:
            raise ConfigError(f"{where}parallel.modes: {exc}") from None
        if not is_builtin(name):
            raise ConfigError(
                f"{where}parallel.modes: {name!r} is not a built-in mode{did_you_mean(name, with_aliases(BUILTIN_MODE_NAMES))}; "
                f"allowed: {allowed(BUILTIN_MODE_NAMES)}, {COMBINATION_HELP} (your own modes go under "
                "extra_modes:)")
    return tuple(dict.fromkeys(value))


def _extra_modes(value: Any, where: str) -> Dict[str, Dict[str, Any]]:
    if value is None:
        return {}
    if isinstance(value, (list, tuple)):
        value = {name: {} for name in value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}extra_modes must map mode names to option mappings, got {value!r}")
    modes: Dict[str, Dict[str, Any]] = {}
    for name, options in value.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}extra_modes: mode names must be non-empty strings, got {name!r}")
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}extra_modes.{name} must be a mapping of options, got {options!r}")
        modes[name] = dict(options)
    return modes


def _plugins(value: Any, where: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}plugins must be a list of module names or .py paths, got {value!r}")
    return tuple(value)
