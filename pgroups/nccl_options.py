"""Per-mode NCCL communicator options (Megatron-Core's ``nccl_comm_cfgs``), validated as data.

A config tunes the NCCL communicator of any mode::

    nccl_options:
      tensor: {max_ctas: 8, min_ctas: 2, cga_cluster_size: 2}
      data:   {net_name: Socket, is_high_priority_stream: true}

Each key becomes a field of torch's ``ProcessGroupNCCL.Options`` (``config.<key>`` for the NCCL
communicator config, ``is_high_priority_stream`` on the options themselves); a key left out
keeps NCCL's own default. :mod:`pgroups.backend` builds the object when it creates that mode's
NCCL group. This module is pure: it never imports torch.distributed.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Iterable, Mapping, Optional

from .errors import ConfigError, allowed, did_you_mean
from .modes import with_aliases

#: NCCL's ``ncclConfig_t`` limits (nccl.h): CGA cluster size 0..8; CTA counts 1..64.
CGA_CLUSTER_SIZES = range(0, 9)
CTA_COUNTS = range(1, 65)
#: The network plugins Megatron-Core accepts for ``net_name`` (compared case-insensitively).
NET_NAMES = ("IB", "Socket")
#: Keys set on ``ProcessGroupNCCL.Options.config`` (NCCL's communicator config).
CONFIG_KEYS = ("cga_cluster_size", "max_ctas", "min_ctas", "net_name")
#: Every key a mode's options may hold.
OPTION_KEYS = CONFIG_KEYS + ("is_high_priority_stream",)

NcclOptions = Mapping[str, Any]


def validate_nccl_options(value: Any, where: str = "") -> Dict[str, Dict[str, Any]]:
    """Validate the ``nccl_options`` config value: ``{mode: {key: value}}``.

    Returns a plain dict with ``net_name`` spelled as NCCL names it (``IB`` / ``Socket``).
    Mode names are checked later, against the modes a context builds
    (:func:`options_by_mode`). Raises ConfigError naming the key, the value and what is allowed.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}nccl_options must map mode names to option mappings "
                          f"(e.g. {{tensor: {{max_ctas: 8}}}}), got {value!r}")
    result: Dict[str, Dict[str, Any]] = {}
    for mode, options in value.items():
        if not isinstance(mode, str) or not mode:
            raise ConfigError(f"{where}nccl_options: mode names must be non-empty strings, got {mode!r}")
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}nccl_options.{mode} must be a mapping of "
                              f"{allowed(OPTION_KEYS)}, got {options!r}")
        result[mode] = {key: _checked(f"{where}nccl_options.{mode}.", key, v) for key, v in options.items()}
        _check_cta_bounds(f"{where}nccl_options.{mode}", result[mode])
    return result


def _checked(prefix: str, key: Any, value: Any) -> Any:
    if key not in OPTION_KEYS:
        raise ConfigError(f"{prefix}{key}: unknown NCCL option{did_you_mean(str(key), OPTION_KEYS)}; "
                          f"allowed: {allowed(OPTION_KEYS)}")
    if key == "is_high_priority_stream":
        if not isinstance(value, bool):
            raise ConfigError(f"{prefix}{key} must be true or false, got {value!r}")
        return value
    if key == "net_name":
        names = {n.lower(): n for n in NET_NAMES}
        if not isinstance(value, str) or value.lower() not in names:
            raise ConfigError(f"{prefix}{key}: {value!r} is not allowed; allowed: {allowed(NET_NAMES)}")
        return names[value.lower()]
    bounds = CGA_CLUSTER_SIZES if key == "cga_cluster_size" else CTA_COUNTS
    if isinstance(value, bool) or not isinstance(value, int) or value not in bounds:
        raise ConfigError(f"{prefix}{key} must be an integer from {bounds.start} to {bounds.stop - 1}, "
                          f"got {value!r}")
    return value


def _check_cta_bounds(prefix: str, options: Mapping[str, Any]) -> None:
    low, high = options.get("min_ctas"), options.get("max_ctas")
    if low is not None and high is not None and low > high:
        raise ConfigError(f"{prefix}: min_ctas({low}) must not exceed max_ctas({high})")


def options_by_mode(nccl_options: Mapping[str, NcclOptions], modes: Iterable[str],
                    identity: Callable[[str], Hashable] = lambda name: name,
                    where: str = "") -> Dict[str, NcclOptions]:
    """``nccl_options`` keyed by the built mode each entry names (``identity`` says when two
    spellings are one mode: ``tp`` is ``tensor``). Raises ConfigError for an entry that names
    no built mode, or two entries that name one."""
    modes = list(modes)
    by_identity = {identity(m): m for m in modes}
    result: Dict[str, NcclOptions] = {}
    for name, options in nccl_options.items():
        built = by_identity.get(identity(name))
        if built is None:
            raise ConfigError(f"{where}nccl_options.{name}: no such mode{did_you_mean(name, with_aliases(modes))}; "
                              f"modes this config builds: {allowed(modes)}")
        if built in result:
            raise ConfigError(f"{where}nccl_options.{name}: mode {built!r} already has options")
        result[built] = options
    return result


def config_fields(options: NcclOptions) -> Dict[str, Any]:
    """The ``ProcessGroupNCCL.Options.config`` attributes to set for one mode's options."""
    return {key: options[key] for key in CONFIG_KEYS if key in options}


def options_key(options: Optional[NcclOptions]) -> Optional[Hashable]:
    """A hashable description of one mode's options (None when it has none): two modes with
    identical groups share one communicator only when their keys are equal."""
    if not options:
        return None
    return tuple(sorted(options.items()))
