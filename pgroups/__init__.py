"""pgroups — process-group topology manager for PyTorch distributed training.

    from pgroups import gpc, ParallelMode
    gpc.init_from_config("parallel.yaml")
    tp = gpc.get_group(ParallelMode.TENSOR)
"""
from .config import Config, ParallelConfig, load_config
from .context import ParallelContext
from .errors import (ConfigError, GroupTimeoutError, LaunchError, ModeNotInitializedError,
                     PGroupsError, RegistrationError, UnknownModeError)
from .initializer import (InitializerRegistry, ProcessGroupInitializer, default_registry,
                          register_initializer)
from .launch import LaunchInfo
from .modes import ParallelMode
from .topology import Topology

from .initializer import alias_checkout_initializers

alias_checkout_initializers()  # a plain checkout on PYTHONPATH: initializers/ is pgroups.initializers

__version__ = "0.1.0"

#: The convenience global context (the only module-level mutable state in the package).
gpc = ParallelContext()

__all__ = [
    "Config", "ConfigError", "GroupTimeoutError", "InitializerRegistry", "LaunchError", "LaunchInfo",
    "ModeNotInitializedError", "PGroupsError", "ParallelConfig", "ParallelContext", "ParallelMode",
    "ProcessGroupInitializer", "RegistrationError", "Topology", "UnknownModeError", "default_registry",
    "gpc", "load_config", "register_initializer",
]
