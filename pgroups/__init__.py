"""pgroups — process-group topology manager for PyTorch distributed training.

    from pgroups import gpc
    gpc.init_from_config("parallel.yaml")
    tp = gpc.group("tp")    # the tp group's handle: group, CPU group, ranks, rank, size, device

Modes are named by Megatron-Core's tokens (``"tp"``, ``"dp-cp"``, ``"tp-ep-pp"``); InternEvo's
names and ``ParallelMode`` are accepted aliases (``"tensor"``, ``ParallelMode.TENSOR``): the
table is :data:`pgroups.modes.VOCABULARY`.

``import pgroups`` does not import torch: the pure names (config, layout, modes, errors,
initializers) are imported here, and the two that need torch — :class:`ParallelContext` and the
global context ``gpc`` — are resolved on first use (PEP 562 ``__getattr__``), so ``pgroups show``,
``validate``, ``--version`` and ``--help`` start without it (``reshard-plan`` does import torch:
the planner's dtypes are torch dtypes).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, List

from .config import Config, ParallelConfig, load_config
from .errors import (ConfigError, GroupTimeoutError, LaunchError, ModeNotInitializedError,
                     PGroupsError, RegistrationError, UnknownModeError)
from .initializer import (InitializerRegistry, ProcessGroupInitializer, default_registry,
                          register_initializer)
from .launch import LaunchInfo
from .modes import ParallelMode
from .topology import Topology

from .initializer import alias_checkout_initializers

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .context import ParallelContext

    gpc: ParallelContext

alias_checkout_initializers()  # a plain checkout on PYTHONPATH: initializers/ is pgroups.initializers

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "GroupTimeoutError", "InitializerRegistry", "LaunchError", "LaunchInfo",
    "ModeNotInitializedError", "PGroupsError", "ParallelConfig", "ParallelContext", "ParallelMode",
    "ProcessGroupInitializer", "RegistrationError", "Topology", "UnknownModeError", "default_registry",
    "gpc", "load_config", "register_initializer",
]

_LAZY = ("ParallelContext", "gpc")
_lazy_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """``ParallelContext`` and ``gpc`` (the convenience global context: the only module-level
    mutable state in the package, created once, on first use) import :mod:`pgroups.context`, and
    with it torch, when first asked for; they are module globals from then on."""
    if name not in _LAZY:
        raise AttributeError(f"module 'pgroups' has no attribute {name!r}")
    with _lazy_lock:
        if name not in globals():
            from .context import ParallelContext as context_class

            globals().setdefault("ParallelContext", context_class)
            if name == "gpc":
                globals()["gpc"] = context_class()
    return globals()[name]


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
