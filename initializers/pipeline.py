"""The pipeline mode: pipeline-parallel: ranks that differ only in their pp coordinate (one per stage)."""
from pgroups.initializer import builtin_initializer
from pgroups.modes import ParallelMode

from .axis import AxisInitializer


@builtin_initializer(ParallelMode.PIPELINE)
class PipelineInitializer(AxisInitializer):
    axes = ("pp",)
