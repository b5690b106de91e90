"""Where a process learns its rank: torchrun's environment, SLURM's, or explicit arguments.

Parsing is pure (it takes the environment as a mapping); :func:`init_distributed` is the one
call that starts torch.distributed's default group from a :class:`LaunchInfo`.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from typing import List, Mapping, Optional

import attrs

from .errors import LaunchError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS")
DEFAULT_PORT = 29500


@attrs.frozen
class LaunchInfo:
    """This process's place in the job, and where the rendezvous store lives."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str = "explicit"  # torchrun | slurm | explicit
    #: the launcher already serves the rendezvous store at master_addr:master_port (torchrun's
    #: agent, TORCHELASTIC_USE_AGENT_STORE=True): every rank connects as a client, none serves
    agent_store: bool = False

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise LaunchError(f"{self.source}: rank {self.rank} is outside 0..{self.world_size - 1} "
                              f"(world size {self.world_size})")
        if not 0 < self.master_port < 65536:
            raise LaunchError(f"{self.source}: master port {self.master_port} is outside 1..65535")


def parse_nodelist(nodelist: str) -> List[str]:
    """Expand a SLURM compressed node list: ``"gpu[01-04,07],cpu3"`` → gpu01…gpu04, gpu07, cpu3.

    Zero padding is kept; several bracket groups in one name (``a[1-2]b[3-4]``) expand as a
    product. Raises LaunchError for unbalanced brackets, a bad range or a list naming no host.
    """
    names: List[str] = []
    for item in _split_top_level(nodelist):
        names.extend(_expand_host(item, nodelist))
    if not names:
        raise LaunchError(f"node list {nodelist!r} names no host")
    return names


def _split_top_level(text: str) -> List[str]:
    items, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"node list {text!r} has an unbalanced ']'")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise LaunchError(f"node list {text!r} has an unbalanced '['")
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def _expand_host(item: str, whole: str) -> List[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        return [item]
    prefix, suffix = item[:match.start()], item[match.end():]
    expanded: List[str] = []
    for part in match.group(1).split(","):
        bounds = part.strip().split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values = [bounds[0]]
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            values = [str(v).zfill(width) for v in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise LaunchError(f"node list {whole!r}: bad range {part!r} (expected N or N-M with N <= M)")
        for value in values:
            expanded.extend(_expand_host(prefix + value + suffix, whole))
    return expanded


def _int_var(env: Mapping[str, str], name: str, source: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{source}: environment variable {name}={env[name]!r} is not an integer") from None


#: torchrun (torch/distributed/elastic/agent/server/local_elastic_agent.py) sets this to "True"
#: when its agent serves the store at MASTER_ADDR:MASTER_PORT; torch's own ``env://`` rendezvous
#: (torch/distributed/rendezvous.py, ``_create_c10d_store``) then makes every rank a client.
AGENT_STORE_VAR = "TORCHELASTIC_USE_AGENT_STORE"


def from_torchrun(env: Mapping[str, str]) -> LaunchInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; ``agent_store`` from
    TORCHELASTIC_USE_AGENT_STORE (exactly "True", as torch reads it)."""
    missing = [v for v in TORCHRUN_VARS if v not in env]
    if missing:
        raise LaunchError(f"torchrun environment incomplete: missing {', '.join(missing)}")
    return LaunchInfo(
        rank=_int_var(env, "RANK", "torchrun"), world_size=_int_var(env, "WORLD_SIZE", "torchrun"),
        local_rank=_int_var(env, "LOCAL_RANK", "torchrun") if "LOCAL_RANK" in env else 0,
        master_addr=env["MASTER_ADDR"], master_port=_int_var(env, "MASTER_PORT", "torchrun"),
        source="torchrun", agent_store=env.get(AGENT_STORE_VAR) == str(True))


def from_slurm(env: Mapping[str, str]) -> LaunchInfo:
    """SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; master = first host of the node list.

    The node list is the step's (``SLURM_STEP_NODELIST``, set by srun) before the job's: a step
    that runs on part of the allocation has its own first node, where its rank 0 runs.

    MASTER_ADDR / MASTER_PORT override; the default port is derived from SLURM_JOB_ID so two
    jobs on one node do not collide.
    """
    missing = [v for v in SLURM_VARS if v not in env]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist and "MASTER_ADDR" not in env:
        missing.append("SLURM_JOB_NODELIST (or MASTER_ADDR)")
    if missing:
        raise LaunchError(f"SLURM environment incomplete: missing {', '.join(missing)}")
    master = env.get("MASTER_ADDR") or parse_nodelist(nodelist or "")[0]
    if "MASTER_PORT" in env:
        port = _int_var(env, "MASTER_PORT", "slurm")
    elif "SLURM_JOB_ID" in env and env["SLURM_JOB_ID"].isdigit():
        port = 20000 + int(env["SLURM_JOB_ID"]) % 10000
    else:
        port = DEFAULT_PORT
    return LaunchInfo(
        rank=_int_var(env, "SLURM_PROCID", "slurm"), world_size=_int_var(env, "SLURM_NTASKS", "slurm"),
        local_rank=_int_var(env, "SLURM_LOCALID", "slurm") if "SLURM_LOCALID" in env else 0,
        master_addr=master, master_port=port, source="slurm")


def from_environment(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """torchrun's variables if RANK is set, else SLURM's if SLURM_PROCID is set, else LaunchError."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return from_torchrun(env)
    if "SLURM_PROCID" in env:
        return from_slurm(env)
    raise LaunchError(
        "no launch environment found: set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torchrun) "
        "or run under SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_JOB_NODELIST); to run your script "
        "in N local processes: `pgroups launch --nproc N your_script.py [args]` "
        "(or `torchrun --nproc-per-node N your_script.py [args]`)")


def create_store(info: LaunchInfo, timeout_s: float = 1800.0):
    """The rendezvous TCP store of ``info``: rank 0 serves it at master_addr:master_port, unless
    the launcher already does (``info.agent_store``: torchrun's agent), where every rank is a
    client of the launcher's store — so no second server tries to bind the same port.

    A context keeps it across destroy() so that a re-init in the same processes reuses the
    running server instead of racing its shutdown and restart on the same port.
    Raises LaunchError naming the master address if it cannot be reached in time.
    """
    import torch.distributed as dist

    try:
        # wait_for_workers=False: the server must outlive a rank that never comes (the default
        # group's own rendezvous waits for the ranks, and the survivors may still need the store)
        if info.agent_store:
            return store_client(info.master_addr, info.master_port, timeout_s)
        return dist.TCPStore(info.master_addr, info.master_port, info.world_size, info.rank == 0,
                             timeout=datetime.timedelta(seconds=timeout_s), multi_tenant=True,
                             wait_for_workers=False)
    except (RuntimeError, dist.DistError) as exc:
        raise _rendezvous_error(info, exc) from exc


def store_client(addr: str, port: int, timeout_s: float):
    """One more client connection to a running rendezvous store (never serves, never waits for
    workers): for threads that must not share the default group's connection. Errors are
    torch's, for the caller to word."""
    import torch.distributed as dist

    return dist.TCPStore(addr, port, None, False, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def init_distributed(info: LaunchInfo, device_backend: str = "auto", timeout_s: float = 1800.0,
                     store=None) -> None:
    """Start torch.distributed's default group for ``info`` (no-op if already started).

    On GPUs the default group is ``cpu:gloo,cuda:nccl`` bound to ``cuda:local_rank`` (so groups
    can be split from it); on CPU it is gloo. ``store`` (e.g. a PrefixStore over
    :func:`create_store`) replaces the ``tcp://`` rendezvous. A rendezvous that times out
    raises LaunchError naming the master address.
    """
    import torch
    import torch.distributed as dist

    from .deadlines import communicator_timeout, seconds  # NCCL's watchdog fires after pgroups' own waits

    if dist.is_initialized():
        return
    use_nccl = device_backend in ("auto", "nccl") and torch.cuda.is_available()
    kwargs = {}
    if use_nccl:
        device = torch.device("cuda", device_index(info, torch.cuda.device_count(),
                                                   os.environ.get("CUDA_VISIBLE_DEVICES")))
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = f"tcp://{_bracket(info.master_addr)}:{info.master_port}"
    try:
        dist.init_process_group(
            backend="cpu:gloo,cuda:nccl" if use_nccl else "gloo",
            rank=info.rank, world_size=info.world_size,
            timeout=communicator_timeout("nccl" if use_nccl else "gloo", seconds(timeout_s)),
            **kwargs)
    except (RuntimeError, dist.DistError) as exc:
        raise _rendezvous_error(info, exc) from exc


def device_index(info: LaunchInfo, visible: int, cuda_visible_devices: Optional[str]) -> int:
    """The CUDA device of this process: ``local_rank`` when this process sees one GPU per local
    rank; device 0 when it sees exactly one GPU that ``CUDA_VISIBLE_DEVICES`` picked for it (the
    launcher bound one GPU per process, as ``srun --gpus-per-task=1`` does).

    Pure. Raises LaunchError — naming the rank, the local rank, the visible count and
    ``CUDA_VISIBLE_DEVICES`` — when two local ranks would share a GPU (NCCL would fail later with
    "Duplicate GPU detected"), instead of wrapping ``local_rank % visible``.
    """
    if visible < 1:
        raise LaunchError(f"rank {info.rank}: the nccl backend needs a GPU and this process sees none "
                          f"(CUDA_VISIBLE_DEVICES={cuda_visible_devices!r})")
    if info.local_rank < visible:
        return info.local_rank
    bound_to_one = visible == 1 and cuda_visible_devices is not None and "," not in cuda_visible_devices.strip(", ")
    if bound_to_one:
        return 0
    raise LaunchError(
        f"rank {info.rank} (local rank {info.local_rank} on this host) has no GPU of its own: this process "
        f"sees {visible} GPU{'s' if visible != 1 else ''} (CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}), so "
        f"local ranks {visible}..{info.local_rank} would share GPUs with local ranks 0..{visible - 1} and NCCL "
        "would fail with 'Duplicate GPU detected'; start at most one process per visible GPU on each host "
        "(torchrun --nproc-per-node), or give each process its own GPU through CUDA_VISIBLE_DEVICES")


def _rendezvous_error(info: LaunchInfo, exc: BaseException) -> LaunchError:
    return LaunchError(
        f"rank {info.rank}/{info.world_size} could not join the rendezvous at "
        f"{info.master_addr}:{info.master_port} ({info.source}): {str(exc).splitlines()[0]} "
        "(check the address and port; across hosts set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def free_port() -> int:
    """A TCP port free on this host right now (for local launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
