"""The GPU tests' one skip rule. Every test here says how many GPUs it needs with
``@pytest.mark.gpus(N)`` (one rank per GPU): ``gpus(1)`` tests run on any machine with one CUDA
GPU and NCCL (the machines this project borrows have one); ``gpus(2)`` tests run with 2-8 and are
also marked ``multi_gpu``. Elsewhere each skips with one reason naming what it needs and what
was found (:func:`.runner.skip_reason`). A test without the marker is a collection error.

``tests/gpu/run.sh`` runs the subset under a time budget and prints a summary table.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .runner import skip_reason

HERE = Path(__file__).resolve().parent


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 without CUDA). Does not create a CUDA context,
    so spawned children can still take their own devices."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def reason_for(needed: int) -> str:
    """Why a test needing ``needed`` GPUs cannot run on this machine, or ``""``."""
    return skip_reason(needed, visible_gpus(), dist.is_available() and dist.is_nccl_available(),
                       torch.version.cuda is not None, torch.__version__, os.environ.get("CUDA_VISIBLE_DEVICES"))


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue
        marker = item.get_closest_marker("gpus")
        if marker is None or not marker.args or not isinstance(marker.args[0], int):
            raise pytest.UsageError(f"{item.nodeid}: every test in tests/gpu says how many GPUs it needs "
                                    "with @pytest.mark.gpus(N)")
        needed = marker.args[0]
        item.add_marker(pytest.mark.gpu)
        if needed > 1:
            item.add_marker(pytest.mark.multi_gpu)
        reason = reason_for(needed)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
