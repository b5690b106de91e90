"""The data mode: data-parallel: ranks that hold the same model shard (differ only in dp)."""
from pgroups.initializer import builtin_initializer
from pgroups.modes import ParallelMode

from .axis import AxisInitializer


@builtin_initializer(ParallelMode.DATA)
class DataInitializer(AxisInitializer):
    axes = ("dp",)
