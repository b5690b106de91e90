"""Helpers of the one-GPU tests: the device, a communicator's options, a GPU stall of known length."""
from __future__ import annotations

from typing import Any, Callable

import torch

from pgroups.spawn import run_local

CUDA = torch.device("cuda", 0)


def communicator(group: Any) -> Any:
    """The NCCL backend of ``group`` (its options hold the communicator's timeout and config)."""
    return group._get_backend(CUDA)


def timeout_of(group: Any) -> float:
    """The timeout, in seconds, ``group``'s NCCL communicator was created with."""
    return communicator(group).options._timeout.total_seconds()


def sleep_cycles_per_second() -> float:
    """How many ``torch.cuda._sleep`` cycles the GPU spins per second (timed with CUDA events)."""
    cycles = 100_000_000
    for _ in range(2):  # the first launch pays for loading the kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def one_rank(target: Callable[..., Any], *args: Any, timeout_s: float = 240.0) -> Any:
    """Run ``target(*args)`` as the one rank of a spawned world (its own process, so CUDA and
    NCCL start fresh); fail the test with the rank's error, else return its value."""
    outcome = run_local(1, target, args, timeout_s=timeout_s)[0]
    assert outcome.ok, outcome.error
    return outcome.value
