"""The tensor mode: tensor-parallel: ranks that differ only in their tp coordinate."""
from pgroups.initializer import builtin_initializer
from pgroups.modes import ParallelMode

from .axis import AxisInitializer


@builtin_initializer(ParallelMode.TENSOR)
class TensorInitializer(AxisInitializer):
    axes = ("tp",)
