"""The ISP weight-parallel runtime, split along its seam:

- :mod:`.schedule` — the gather / release / reduce-scatter decisions, a pure state machine
  (:class:`IspSchedule`) with the memory bound in its docstring;
- :mod:`.runtime` — :class:`WeightParallel`: sharding, module hooks, the all-gathers; a thin
  driver of the schedule;
- :mod:`.autograd` — the sharded linear / embedding functions and the backward announcement;
- :mod:`.sharded` — what is known of one sharded parameter and module (values);
- :mod:`.grads` — gradient reduce-scatters, accumulation (fp32 with ``reduce_dtype``) and the
  all-reduces of ``finish_grads``.
"""
from .runtime import WeightParallel, WeightParallelSchedulerHook
from .schedule import Action, IspSchedule, prefetch_blocks

__all__ = ["Action", "IspSchedule", "WeightParallel", "WeightParallelSchedulerHook", "prefetch_blocks"]
