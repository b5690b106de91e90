"""What one rank reports for the pre-flight check (impure; judged by :mod:`.preflight`): its
configuration facts and a fixed-size matmul (best time, checksum of the result)."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Tuple

import torch

from .preflight import env_facts

MATMUL_N_CUDA = 4096
MATMUL_N_CPU = 256
MATMUL_REPEATS = 10
MATMUL_VALUES = 7      # inputs are integers in [-3, 3]: every product sum is exact in float32


def facts(device: torch.device, environ: Any = None) -> Dict[str, Any]:
    """torch, NCCL and CUDA versions, driver, GPU model and count, NIC names, and the
    ``NCCL_*`` / ``TORCH_NCCL_*`` / ``GLOO_*`` environment of this process ("-": not there)."""
    environ = os.environ if environ is None else environ
    cuda = device.type == "cuda"
    return {"torch": torch.__version__,
            "nccl": nccl_version() if cuda else "-",
            "cuda": torch.version.cuda or "-",
            "driver": _driver_version(),
            "gpu_model": torch.cuda.get_device_name(device) if cuda else "-",
            "gpu_count": torch.cuda.device_count() if cuda else 0,
            "nics": _nics(),
            "env": env_facts(environ)}


def matmul_inputs(n: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two n x n float32 matrices of small integers (a fixed pattern, the same on every rank)."""
    index = torch.arange(n * n, device=device, dtype=torch.int64).view(n, n)
    a = ((index * 31 + 7) % MATMUL_VALUES - MATMUL_VALUES // 2).to(torch.float32)
    b = ((index * 17 + 3) % MATMUL_VALUES - MATMUL_VALUES // 2).to(torch.float32)
    return a, b


def timed_matmul(device: torch.device, before_each: Any = None, corrupt: bool = False) -> Tuple[float, float]:
    """(best seconds of MATMUL_REPEATS matmuls, checksum of the result) on ``device``.

    On a GPU the seconds are wall time around a synchronized matmul; on CPU they are this
    process's processor time (``time.process_time``, every thread of it): a rank descheduled
    by its neighbours on a shared machine is not a slow processor.

    The checksum is the float64 sum of the result's elements weighted by their position mod 5
    (so a swapped pair of elements changes it too): exact, the same on every healthy rank.
    ``before_each`` (test hook) runs inside each timed matmul; ``corrupt`` (test hook) adds 1
    to one element of the result, as a faulty unit would."""
    n = MATMUL_N_CUDA if device.type == "cuda" else MATMUL_N_CPU
    a, b = matmul_inputs(n, device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best, result = float("inf"), a
    for _ in range(MATMUL_REPEATS):
        _synchronize(device)
        begin = clock()
        if before_each is not None:
            before_each()
        result = a @ b
        _synchronize(device)
        best = min(best, clock() - begin)
    if corrupt:
        result.view(-1)[n + 1] += 1.0
    weights = (torch.arange(n * n, device=device, dtype=torch.int64) % 5 + 1).to(torch.float64)
    checksum = float((result.to(torch.float64).view(-1) * weights).sum().item())
    return best, checksum


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nccl_version() -> str:
    """The NCCL version torch was built with ("2.27.3"), "-" when torch has none."""
    try:
        version = torch.cuda.nccl.version()
    except (RuntimeError, AttributeError):
        return "-"
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _driver_version() -> str:
    """The NVIDIA kernel driver's version (``/proc/driver/nvidia/version``), "-" without one."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as handle:
            words = handle.readline().split()
    except OSError:
        return "-"
    numbers = [w for w in words if w[:1].isdigit() and "." in w]
    return numbers[0] if numbers else "-"


def _nics() -> List[str]:
    """The network interfaces of this host's namespace backed by a device (``/sys/class/net/
    NAME/device``): NICs, not the virtual ones (loopback, veth, bridges) that come and go."""
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return []
    return sorted(n for n in names if os.path.exists(os.path.join("/sys/class/net", n, "device")))
