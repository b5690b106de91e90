"""Initializers shipped with pgroups (installed as ``pgroups.initializers``).

The built-in modes need no class each: they are data (:mod:`pgroups.modes`) served by
:class:`pgroups.initializer.BuiltinInitializer`. This package holds the base a plugin uses to
run groups along axes — of a built-in mesh, or of a mesh the plugin declares (new axes).
"""
from .axis import AxisInitializer

__all__ = ["AxisInitializer"]
