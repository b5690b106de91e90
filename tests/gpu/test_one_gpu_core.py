"""NCCL on one GPU (world 1): what a single-GPU machine can show of pgroups' NCCL paths.

- init: ``init_from_config`` binds the default group (``cpu:gloo,cuda:nccl``) to ``cuda:0``,
  picks strategy ``split``, and every mode's device and CPU group all-reduces;
- every creation path makes a communicator of its own: a mode with ``nccl_options`` is never the
  world group, so at world 1 it goes through ``split_group`` (auto, split), ``new_group`` (all)
  or a members-only ``new_group`` on a default group the user started without a device
  (local); ``local`` and lazy device groups are refused on a bound default group;
- the watchdog margin: the default group and every NCCL group pgroups creates carry
  ``timeout_s + NCCL_WATCHDOG_MARGIN_S`` (read back from the communicator's options), a group
  the user made keeps the user's timeout;
- ``deadlines.wait_within`` on a collective stalled behind a GPU kernel raises GroupTimeoutError at
  the Python deadline, and the process survives it (neither ``WorkNCCL::wait`` nor the
  watchdog tears it down).

Each scenario that leaves the process usable runs in one spawned world of 1; the stalled
collective (its communicator is aborted) runs in a process of its own. Written from torch
2.13's distributed_c10d.py and ProcessGroupNCCL (see the README for what ran where).
"""
from __future__ import annotations

import datetime
import threading
import time
from typing import Any, Callable, Dict

import pytest
import torch
import torch.distributed as dist

from pgroups import ConfigError, GroupTimeoutError, LaunchError, ParallelContext
from pgroups.deadlines import NCCL_WATCHDOG_MARGIN_S, classify, wait_within
from .cuda_support import CUDA, communicator, one_rank, sleep_cycles_per_second, timeout_of

pytestmark = [pytest.mark.gpus(1), pytest.mark.multiprocess]

TIMEOUT_S = 30.0
#: a mode with NCCL options always gets a communicator of its own (never the world group)
OPTIONS = {"tensor": {"max_ctas": 4, "min_ctas": 2}}


def all_reduce_within(group: Any, timeout_s: float) -> list:
    """An all_reduce of [1, 2, 3] on the GPU over ``group``, waited for with the package's rule."""
    value = torch.tensor([1.0, 2.0, 3.0], device=CUDA)
    wait_within(dist.all_reduce(value, group=group, async_op=True), datetime.timedelta(seconds=timeout_s),
                lambda exc: f"all_reduce timed out ({exc})", group)
    return value.tolist()


# ---- scenarios (run in one spawned process of world 1) -----------------------------------------

def init_on_one_gpu() -> Dict[str, Any]:
    from pgroups import torch_private
    from pgroups.selfcheck import all_reduce_every_mode

    ctx = ParallelContext().init_from_config({"parallel": {}, "timeout_s": TIMEOUT_S})
    try:
        figures = all_reduce_every_mode(ctx)
        return {"backend": ctx.backend.device_backend, "strategy": ctx.backend.strategy,
                "calls": ctx.backend.calls, "default": str(dist.get_backend()),
                "bound": str(torch_private.default_group_bound_device()),
                "world_timeout_s": timeout_of(dist.group.WORLD),
                "failures": sum(f["device_failures"] + f["cpu_failures"] for f in figures.values()),
                "modes": len(figures), "hosts": ctx.get_hostnames()}
    finally:
        ctx.destroy()


def create_with(strategy: str) -> Callable[[], Dict[str, Any]]:
    def scenario() -> Dict[str, Any]:
        ctx = ParallelContext().init_from_config({"parallel": {}, "timeout_s": TIMEOUT_S, "strategy": strategy,
                                                  "nccl_options": OPTIONS})
        try:
            group = ctx.get_group("tensor")
            config = communicator(group).options.config
            return {"strategy": ctx.backend.strategy, "calls": ctx.backend.calls,
                    "own": group is not dist.group.WORLD, "desc": group.group_desc,
                    "config": [config.max_ctas, config.min_ctas], "timeout_s": timeout_of(group),
                    "data_is_world": ctx.get_group("data") is dist.group.WORLD,
                    "sum": all_reduce_within(group, TIMEOUT_S)}
        finally:
            ctx.destroy()
    return scenario


def refused(config: Dict[str, Any]) -> Callable[[], str]:
    def scenario() -> str:
        ctx = ParallelContext()
        try:
            ctx.init_from_config({"parallel": {}, "timeout_s": TIMEOUT_S, **config})
        except (ConfigError, LaunchError) as exc:
            return f"{type(exc).__name__}: {exc} (torch.distributed left running: {dist.is_initialized()})"
        ctx.destroy()
        return "no error"
    return scenario


def local_on_a_default_group_without_device() -> Dict[str, Any]:
    """The user started plain ``nccl`` without ``device_id``: NCCL groups are not splits of the
    world, so ``auto`` is members-only creation (``new_group(use_local_synchronization=True)``)."""
    from pgroups import torch_private

    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        ctx = ParallelContext().init_from_config({"parallel": {}, "timeout_s": TIMEOUT_S, "nccl_options": OPTIONS})
        try:
            group = ctx.get_group("tensor")
            return {"bound": torch_private.default_group_bound_device(), "strategy": ctx.backend.strategy,
                    "own": group is not dist.group.WORLD, "timeout_s": timeout_of(group),
                    "user_timeout_s": timeout_of(dist.group.WORLD),
                    "sum": all_reduce_within(group, TIMEOUT_S), "hosts": ctx.get_hostnames()}
        finally:
            ctx.destroy()
    finally:
        dist.destroy_process_group()


def hostnames_without_cpu_groups() -> Dict[str, Any]:
    """``cpu_groups: off``: get_hostnames() exchanges over the NCCL world group (CUDA tensors,
    waited for with wait_within)."""
    ctx = ParallelContext().init_from_config({"parallel": {}, "timeout_s": TIMEOUT_S, "cpu_groups": "off"})
    try:
        return {"device": str(ctx.backend.device_for_tensors()), "hosts": ctx.get_hostnames()}
    finally:
        ctx.destroy()


SCENARIOS: Dict[str, Callable[[], Any]] = {
    "init": init_on_one_gpu,
    "hosts:cpu_groups_off": hostnames_without_cpu_groups,
    **{f"create:{s}": create_with(s) for s in ("auto", "split", "all")},
    "refuse:local": refused({"strategy": "local"}),
    "refuse:lazy": refused({"groups": "lazy"}),
    "unbound:local": local_on_a_default_group_without_device,
}


def run_scenarios() -> Dict[str, Any]:
    """Every scenario in order; each one's value, or ``{"error": ...}`` (the next still runs on a
    clean slate: no default group left behind)."""
    results: Dict[str, Any] = {}
    for name, scenario in SCENARIOS.items():
        try:
            results[name] = scenario()
        except Exception as exc:  # reported per scenario: one failure does not hide the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def world_of_one() -> Dict[str, Any]:
    return one_rank(run_scenarios, timeout_s=300)


def ok(results: Dict[str, Any], name: str) -> Any:
    value = results[name]
    assert not (isinstance(value, dict) and "error" in value), f"{name}: {value}"
    return value


# ---- tests --------------------------------------------------------------------------------------

@pytest.mark.timeout(360)
def test_init_binds_the_default_group_to_the_gpu_and_every_mode_all_reduces(world_of_one):
    result = ok(world_of_one, "init")
    assert result["backend"] == "nccl" and result["strategy"] == "split"
    assert result["default"] == "cpu:gloo,cuda:nccl" and result["bound"] == "cuda:0"
    assert result["modes"] >= 5 and result["failures"] == 0
    assert result["calls"] == 0  # at world 1 every mode without options is the default group itself
    assert len(result["hosts"]) == 1  # one rank, one host name


@pytest.mark.timeout(360)
def test_hostnames_are_exchanged_on_the_gpu_when_cpu_groups_are_off(world_of_one):
    result = ok(world_of_one, "hosts:cpu_groups_off")
    assert result["device"] == "cuda:0"
    assert result["hosts"] == ok(world_of_one, "init")["hosts"]  # the same name the gloo exchange gave


@pytest.mark.timeout(360)
@pytest.mark.parametrize("strategy, chosen", [("auto", "split"), ("split", "split"), ("all", "all")])
def test_every_strategy_creates_a_communicator_with_the_modes_nccl_options(world_of_one, strategy, chosen):
    result = ok(world_of_one, f"create:{strategy}")
    assert result["strategy"] == chosen and result["calls"] == 1  # the tensor mode's group, nothing else
    assert result["own"] and result["desc"] == "pgroups:tensor" and result["data_is_world"]
    assert result["config"] == [4, 2]
    assert result["sum"] == [1.0, 2.0, 3.0]


@pytest.mark.timeout(360)
def test_members_only_and_lazy_device_groups_are_refused_on_a_bound_default_group(world_of_one):
    local, lazy = ok(world_of_one, "refuse:local"), ok(world_of_one, "refuse:lazy")
    assert local.startswith("LaunchError: ") and "would deadlock" in local, local
    assert lazy.startswith("ConfigError: groups: lazy cannot work with strategy 'split' here"), lazy
    assert local.endswith("(torch.distributed left running: False)") and lazy.endswith("left running: False)")


@pytest.mark.timeout(360)
def test_members_only_creation_on_a_default_group_the_user_started_without_a_device(world_of_one):
    result = ok(world_of_one, "unbound:local")
    assert result["bound"] is None and result["strategy"] == "local" and result["own"]
    assert result["sum"] == [1.0, 2.0, 3.0] and len(result["hosts"]) == 1


@pytest.mark.timeout(360)
def test_nccl_communicators_carry_the_watchdog_margin_over_timeout_s(world_of_one):
    assert NCCL_WATCHDOG_MARGIN_S > 0
    expected = TIMEOUT_S + NCCL_WATCHDOG_MARGIN_S
    assert ok(world_of_one, "init")["world_timeout_s"] == expected
    for strategy in ("auto", "split", "all"):
        assert ok(world_of_one, f"create:{strategy}")["timeout_s"] == expected, strategy
    unbound = ok(world_of_one, "unbound:local")
    assert unbound["timeout_s"] == expected
    assert unbound["user_timeout_s"] == TIMEOUT_S  # the user's own default group is left as made


# ---- a collective stalled behind a GPU kernel (its own process: the communicator is aborted) -----

def stalled_collective(deadline_s: float, stall_s: float) -> Dict[str, Any]:
    """All-reduce over the tensor mode's own communicator while the current stream is busy for
    ``stall_s`` (NCCL's stream waits for it); wait for it with ``wait_within`` at
    ``deadline_s``. Then wait out the stall and check that the process and its CPU group still work."""
    ctx = ParallelContext().init_from_config({"parallel": {}, "timeout_s": deadline_s, "nccl_options": OPTIONS})
    group = ctx.get_group("tensor")
    result: Dict[str, Any] = {"communicator_timeout_s": timeout_of(group)}
    all_reduce_within(group, deadline_s)  # the communicator exists and works
    torch.cuda.synchronize()
    torch.cuda._sleep(int(stall_s * sleep_cycles_per_second()))
    work = dist.all_reduce(torch.ones(4, device=CUDA), group=group, async_op=True)
    start = time.monotonic()
    try:
        wait_within(work, ctx.backend.timeout, lambda exc: f"tensor all_reduce stalled: {classify(exc)}", group)
        result["error"] = None
    except GroupTimeoutError as exc:
        result["error"] = str(exc)
        result["cause"] = str(exc.__cause__).splitlines()[0] if exc.__cause__ else None
    result["waited_s"] = time.monotonic() - start
    torch.cuda.synchronize()  # the stall is over (NCCL's single-rank all_reduce launches no kernel)
    result["alive_after_s"] = time.monotonic() - start
    check = torch.tensor([7])
    dist.all_reduce(check, group=ctx.get_cpu_group("global"))
    result["cpu_group_works"] = int(check) == 7
    done = threading.Event()

    def destroy() -> None:
        ctx.destroy(sync=False)
        done.set()

    threading.Thread(target=destroy, daemon=True).start()
    result["destroyed"] = done.wait(30)
    return result


@pytest.mark.timeout(300)
def test_a_stalled_collective_ends_at_the_python_deadline_and_the_process_survives():
    deadline_s, stall_s = 3.0, 10.0
    result = one_rank(stalled_collective, deadline_s, stall_s)
    assert result["communicator_timeout_s"] == deadline_s + NCCL_WATCHDOG_MARGIN_S
    assert result["error"] == "tensor all_reduce stalled: timeout", result
    assert deadline_s <= result["waited_s"] < deadline_s + 5, result  # the Python deadline, not the stall
    assert result["alive_after_s"] >= stall_s * 0.9 and result["cpu_group_works"], result
    assert result["destroyed"], result
