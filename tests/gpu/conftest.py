"""The GPU tests' one skip rule: they run where at least two CUDA GPUs and NCCL are visible, and
skip otherwise with one reason that says what was found.

Every test here starts its ranks with :func:`pgroups.spawn.run_local` (spawned children, one GPU
each by LOCAL_RANK) and is marked ``gpu``; ``pytest -m gpu`` selects them on a GPU machine.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

MIN_GPUS = 2
HERE = Path(__file__).resolve().parent


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 without CUDA). Does not create a CUDA context,
    so spawned children can still take their own devices."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def skip_reason() -> str:
    """Why the GPU tests cannot run here, or ``""`` if they can."""
    count = visible_gpus()
    if count >= MIN_GPUS and dist.is_nccl_available():
        return ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    nccl = "" if dist.is_nccl_available() else ", torch built without NCCL"
    return f"needs >= {MIN_GPUS} CUDA GPUs and NCCL; this machine has {count} visible{shown}{nccl}"


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    reason = skip_reason()
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
