"""Real gloo processes (world 4 and 8): every mode's device and CPU group runs a collective.

Each spawned run batches several checks (process start-up is the expensive part): a first
context built eagerly, checked with all_reduce on every mode, destroyed; then a second context
with another layout and lazy groups in the same processes (destroy then init works).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any, Dict

import pytest
import torch
import torch.distributed as dist

from pgroups import GroupTimeoutError, ParallelContext, default_registry, load_config
from pgroups.cli import default_config_path
from pgroups.context import BUILTIN_MODES

from conftest import run_ranks, run_ranks_outcomes


def probe_context(ctx: ParallelContext) -> Dict[str, Any]:
    """What one rank sees: per mode its ranks and the all_reduce sums over device and CPU groups."""
    modes = {}
    for mode in ctx.modes:  # every rank requests the modes in the same order (lazy groups)
        sums, torch_ranks = [], []
        for group in (ctx.get_group(mode), ctx.get_cpu_group(mode)):
            value = torch.tensor([ctx.get_global_rank()], dtype=torch.int64)
            dist.all_reduce(value, group=group)
            sums.append(int(value))
            torch_ranks.append(dist.get_process_group_ranks(group))
        modes[mode] = {"ranks": ctx.get_ranks_in_group(mode), "local": ctx.get_local_rank(mode),
                       "sums": sums, "torch_ranks": torch_ranks}
    return {
        "modes": modes,
        "next": ctx.get_next_global_rank(), "prev": ctx.get_prev_global_rank(),
        "first_stage": ctx.is_pipeline_first_stage(), "last_stage": ctx.is_pipeline_last_stage(),
        "model_is_tensor": ctx.get_group("model") is ctx.get_group("tensor"),
        "zero1_is_data": ctx.get_group("zero1") is ctx.get_group("data"),
        "device_backend": ctx.backend.device_backend, "strategy": ctx.backend.strategy,
    }


def two_contexts_worker(first_config: dict, second_config: dict) -> Dict[str, Any]:
    """A context built eagerly, checked, destroyed (with the default group it started), then
    initialized again with another layout and lazy groups — like ``gpc`` in one job."""
    ctx = ParallelContext()
    ctx.init_from_config(first_config)
    try:
        first = probe_context(ctx)
    finally:
        ctx.destroy()
    first["initialized_after_destroy"] = dist.is_initialized()

    ctx.init_from_config(second_config)
    try:
        calls_after_init = ctx.backend.calls
        second = probe_context(ctx)
        second["calls_after_init"] = calls_after_init
        second["calls_after_use"] = ctx.backend.calls
    finally:
        ctx.destroy()
    return {"first": first, "second": second}


def expected_groups(config: dict, world: int, rank: int) -> Dict[str, list]:
    topology = load_config(config).topology(world)
    return {m: default_registry.create(m).group_of(topology, rank) for m in BUILTIN_MODES}


def assert_probe(probe: Dict[str, Any], config: dict, world: int, rank: int) -> None:
    expected = expected_groups(config, world, rank)
    assert list(probe["modes"]) == list(expected)
    for mode, ranks in expected.items():
        seen = probe["modes"][mode]
        assert seen["ranks"] == ranks, (mode, rank)
        assert seen["local"] == ranks.index(rank)
        assert seen["torch_ranks"] == [ranks, ranks], (mode, rank)
        assert seen["sums"] == [sum(ranks), sum(ranks)], (mode, rank)  # device and CPU all_reduce
    pipe = expected["pp"]
    stage = pipe.index(rank)
    assert probe["next"] == pipe[(stage + 1) % len(pipe)]
    assert probe["prev"] == pipe[(stage - 1) % len(pipe)]
    assert probe["first_stage"] == (stage == 0)
    assert probe["last_stage"] == (stage == len(pipe) - 1)
    assert probe["device_backend"] == "gloo"


WORLD4_EAGER = {"parallel": {"pipeline": 2, "nettest": 3}, "strategy": "all", "timeout_s": 60}
WORLD4_LAZY = {"parallel": {"tensor": 2, "zero1": 1, "order": "tp-dp-pp"}, "groups": "lazy",
               "strategy": "local", "timeout_s": 60}


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_world4_every_mode_all_reduces_on_device_and_cpu_groups():
    results = run_ranks(4, two_contexts_worker, WORLD4_EAGER, WORLD4_LAZY, timeout_s=75)
    for rank, result in enumerate(results):
        first, second = result["first"], result["second"]
        assert_probe(first, WORLD4_EAGER, 4, rank)
        assert first["strategy"] == "all"
        assert first["model_is_tensor"] is False  # tensor 1, pipeline 2: model == pipe, not tensor
        assert first["zero1_is_data"] is True     # zero1 defaults to data
        assert first["initialized_after_destroy"] is False
        assert_probe(second, WORLD4_LAZY, 4, rank)
        assert second["strategy"] == "local"
        assert second["calls_after_init"] == 0   # lazy: nothing built at init
        assert second["calls_after_use"] > 0
        assert second["model_is_tensor"] is True  # pipeline 1
        assert second["zero1_is_data"] is False
    # pipeline ring at world 4, pipeline 2 (order tp-pp-dp, tensor 1): stages [0,1] and [2,3]
    assert [r["first"]["next"] for r in results] == [1, 0, 3, 2]
    assert [r["first"]["first_stage"] for r in results] == [True, False, True, False]
    assert results[2]["first"]["modes"]["nettest"]["ranks"] == [0, 1, 2]
    assert results[3]["first"]["modes"]["nettest"]["ranks"] == [3]


WORLD8_LAZY = {"parallel": {"tensor": 2, "pipeline": 4, "zero1": 1, "nettest": 5, "order": "pp-tp-dp"},
               "groups": "lazy", "timeout_s": 60}


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_world8_bundled_default_then_a_four_stage_pipeline():
    default = load_config(default_config_path())
    results = run_ranks(8, two_contexts_worker, default_config_path(), WORLD8_LAZY, timeout_s=100)
    default_dict = {"parallel": {"tensor": default.parallel.tensor, "pipeline": default.parallel.pipeline,
                                 "zero1": default.parallel.zero1, "nettest": default.parallel.nettest}}
    for rank, result in enumerate(results):
        assert_probe(result["first"], default_dict, 8, rank)
        assert_probe(result["second"], WORLD8_LAZY, 8, rank)
        assert result["second"]["calls_after_init"] == 0
    # order pp-tp-dp: pp fastest, so pipeline stages are consecutive ranks [0,1,2,3], [4,5,6,7]
    assert [r["second"]["next"] for r in results] == [1, 2, 3, 0, 5, 6, 7, 4]
    assert [r["second"]["prev"] for r in results] == [3, 0, 1, 2, 7, 4, 5, 6]
    assert [r["second"]["last_stage"] for r in results] == [False, False, False, True] * 2
    assert results[0]["second"]["modes"]["tp"]["ranks"] == [0, 4]
    assert results[7]["second"]["modes"]["nettest"]["ranks"] == [5, 6, 7]


# ---- the CLI's main job ------------------------------------------------------------------------

@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_pgroups_run_nproc_4_on_the_bundled_default():
    proc = subprocess.run([sys.executable, "-m", "pgroups", "run", "--nproc", "4", "--timeout", "90"],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == ("pgroups run: world 4 = tensor 2 x pipeline 2 x data 1 (order tp-pp-dp), "
                        "zero1 1, nettest 4")
    rows = {line.split()[0]: line.split() for line in lines[3:-1]}
    assert set(rows) == {"global", "tp", "pp", "dp", "tp-pp", "zero1", "nettest"}
    for mode, row in rows.items():
        assert row[3:5] == ["ok", "ok"], row  # device and CPU all_reduce
    assert rows["tp"][1:3] == ["2", "2"]   # 2 groups of 2 ranks
    assert rows["dp"][1:3] == ["4", "1"]
    assert rows["tp-pp"][-1] == "global"       # data 1: one model replica is the whole world
    assert lines[-1] == "all groups passed (7 modes, world 4)"
    # progress on stderr: the command's first line, then rank 0's phases, on one clock; between
    # them (every 5 s in a log) the command's heartbeat while it waits for the ranks
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[pgroups run ")]
    texts = [line.split("] ", 1)[1] for line in progress]
    heartbeat = re.compile(r"waiting: [0-4] of 4 ranks finished \(all are killed at --timeout 90s\)")
    assert [t for t in texts if not heartbeat.fullmatch(t)] == [
        "starting 4 local processes",
        "rank 0: joining the rendezvous of 4 ranks, building the groups",
        next(t for t in texts if t.startswith("groups built in ")),
        "checked; destroying the groups"], proc.stderr
    seconds = [float(line.split()[2].rstrip("s]")) for line, t in zip(progress, texts) if not heartbeat.fullmatch(t)]
    assert seconds == sorted(seconds)   # rank 0 continues the command's clock


def test_pgroups_run_rejects_a_layout_that_does_not_fit_before_starting(tmp_path, capsys):
    from pgroups.cli import main

    config = tmp_path / "three.yaml"
    config.write_text("parallel: {tensor: 2}\n")
    assert main(["run", "--nproc", "3", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "world_size(3) is not divisible by tensor(2)" in err


# ---- a peer that never enters group creation ----------------------------------------------------

TIMEOUT_S = 8.0  # generous: the world rendezvous itself runs under this timeout on a loaded 2-core CI box


def absent_peer_worker(config: dict, signals: str) -> Any:
    """Rank 3 joins the world but never builds groups; the others must time out, not hang.

    Rank 3 stays alive (not crashed: a crashed peer is another failure) until every other rank
    has reported its timeout through a file in ``signals`` — however slowly a loaded machine
    gets there — or until a generous bound."""
    ctx = ParallelContext()
    rank = int(os.environ["RANK"])
    if rank == 3:
        ctx.init_from_config(dict(config, groups="lazy"))  # joins the world, creates no group
        _wait_for_files(signals, 3, limit_s=45)
        return None
    start = time.monotonic()
    try:
        ctx.init_from_config(config)
    except GroupTimeoutError as exc:
        elapsed = time.monotonic() - start
        ctx.destroy()
        return {"message": str(exc), "elapsed": elapsed, "initialized": ctx.is_initialized()}
    finally:
        open(os.path.join(signals, f"rank{rank}"), "w").close()
    return {"message": None}


def _wait_for_files(folder: str, count: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while len(os.listdir(folder)) < count and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_absent_peer_is_a_group_timeout_naming_mode_and_ranks(tmp_path):
    config = {"parallel": {"tensor": 2}, "timeout_s": TIMEOUT_S, "backend": "gloo"}
    outcomes = run_ranks_outcomes(4, absent_peer_worker, config, str(tmp_path), timeout_s=80)
    expected = {0: ("dp", "[0, 2]"), 1: ("dp", "[1, 3]"), 2: ("tp", "[2, 3]")}
    for rank, (mode, ranks) in expected.items():
        outcome = outcomes[rank]
        assert outcome.ok, outcome.error
        message = outcome.value["message"]
        assert message is not None, f"rank {rank} built its groups without rank 3"
        assert f"mode {mode!r} with ranks {ranks}" in message, message
        assert f"timed out after {TIMEOUT_S:g}s (creation_timeout_s) on rank {rank}" in message
        # who stood at the creation and who never came: rank 2 waits in its tensor group for 3
        absent = {0: 2, 1: 3, 2: 3}[rank]
        assert f"ranks [{rank}] entered, ranks [{absent}] never did" in message, message
        # it waited the configured timeout (no upper bound: the test's own timeout rules out a hang)
        assert outcome.value["elapsed"] >= TIMEOUT_S - 0.5
        assert outcome.value["initialized"] is False


# ---- hostnames ---------------------------------------------------------------------------------

def hostnames_worker(config: dict, signals: str) -> Any:
    """Every rank but the last gathers hostnames; the last joins, never gathers, stays alive."""
    ctx = ParallelContext().init_from_config(config)
    rank, world = ctx.get_global_rank(), ctx.topology.world_size
    try:
        if rank == world - 1:
            _wait_for_files(signals, world - 1, limit_s=45)
            return None
        try:
            return {"hosts": ctx.get_hostnames()}
        except GroupTimeoutError as exc:
            return {"error": str(exc)}
        finally:
            open(os.path.join(signals, f"rank{rank}"), "w").close()
    finally:
        ctx.destroy()


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_a_peer_missing_from_the_hostname_gather_is_a_group_timeout(tmp_path):
    config = {"parallel": {"tensor": 1}, "timeout_s": TIMEOUT_S, "backend": "gloo"}
    outcomes = run_ranks_outcomes(3, hostnames_worker, config, str(tmp_path), timeout_s=80)
    for outcome in outcomes[:2]:
        assert outcome.ok, outcome.error
        message = outcome.value.get("error")
        assert message is not None, outcome.value
        assert message.startswith("gathering every rank's hostname over the world group (ranks [0, 1, 2]) "
                                  f"timed out after {TIMEOUT_S:g}s on rank {outcome.rank}"), message


def test_hostnames_with_cpu_groups_off_use_the_device_world_group():
    """cpu_groups: off under a backend that needs CPU twins (fake here, NCCL on GPUs) must not
    take get_hostnames() — and so nettest and reshard — down."""
    from conftest import fake_world

    with fake_world(64, 5):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 8}, "cpu_groups": "off"})
        try:
            assert len(ctx.get_hostnames()) == 64
        finally:
            ctx.destroy()


# ---- waiting for a collective with a deadline --------------------------------------------------

def wait_within_worker(signals: str) -> Any:
    """Rank 0 all-reduces over the world; rank 1 never joins. The world's own timeout is long
    (60 s): the 3 s deadline that raises is wait_within's."""
    import datetime

    from pgroups.deadlines import wait_within

    ctx = ParallelContext().init_from_config({"parallel": {"tensor": 1}, "timeout_s": 60, "backend": "gloo"})
    try:
        if ctx.get_global_rank() == 1:
            _wait_for_files(signals, 1, limit_s=45)
            return None
        work = dist.all_reduce(torch.ones(1), async_op=True)
        try:
            wait_within(work, datetime.timedelta(seconds=3), lambda exc: "all_reduce over the world: rank 1 missing")
        except GroupTimeoutError as exc:
            return str(exc)
        finally:
            open(os.path.join(signals, "rank0"), "w").close()
        return None
    finally:
        ctx.destroy()


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_wait_within_turns_a_missing_peer_into_a_group_timeout(tmp_path):
    outcomes = run_ranks_outcomes(2, wait_within_worker, str(tmp_path), timeout_s=80)
    assert outcomes[0].ok, outcomes[0].error
    assert outcomes[0].value == "all_reduce over the world: rank 1 missing"


def teardown_worker() -> Any:
    """destroy() right after a collective: every rank leaves destroy() only after the last rank
    entered it (rank 3 arrives 1 s late). Then a second context whose rank 3 never calls
    destroy(): the others warn, naming it, after the 2 s creation deadline, and tear down anyway.
    Clock readings are CLOCK_MONOTONIC, one clock for every process of this machine."""
    import warnings

    config = {"parallel": {"tensor": 2}, "backend": "gloo", "timeout_s": 30, "creation_timeout_s": 2}
    ctx = ParallelContext().init_from_config(config)
    rank = ctx.get_global_rank()
    dist.all_reduce(torch.ones(1), group=ctx.get_group("tensor"))
    if rank == 3:
        time.sleep(1.0)
    entered = time.monotonic()
    ctx.destroy()
    left = time.monotonic()
    ctx.init_from_config(config)
    if rank == 3:
        return {"entered": entered, "left": left, "warnings": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx.destroy()
    return {"entered": entered, "left": left, "warnings": [str(w.message) for w in caught]}


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_destroy_right_after_a_collective_waits_for_every_rank_and_names_one_that_never_comes():
    results = run_ranks(4, teardown_worker, timeout_s=80)
    last_entry = max(r["entered"] for r in results)
    assert all(r["left"] >= last_entry for r in results), results
    for rank, result in enumerate(results[:3]):
        assert len(result["warnings"]) == 1, (rank, result)
        assert "ranks [0, 1, 2] entered, ranks [3] never did (did they exit" in result["warnings"][0], result["warnings"]
        assert "meeting before the teardown" in result["warnings"][0]
