"""The model mode: tensor x pipeline — the ranks that together hold one model replica."""
from pgroups.initializer import builtin_initializer
from pgroups.modes import ParallelMode

from .axis import AxisInitializer


@builtin_initializer(ParallelMode.MODEL)
class ModelInitializer(AxisInitializer):
    axes = ("tp", "pp")
