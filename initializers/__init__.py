"""The built-in initializers, one module per parallel mode (installed as ``pgroups.initializers``).

Importing this package registers them all; each module only states which ranks form its
mode's groups — group creation lives in :mod:`pgroups.backend`.
"""
from . import data, global_, model, nettest, pipeline, tensor, zero1  # noqa: F401  (register)
from .axis import AxisInitializer

__all__ = ["AxisInitializer"]
