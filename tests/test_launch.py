"""Launch: a process learns its rank from torchrun's environment, SLURM's, or explicit arguments.

Parsing is pure (it takes the environment as a mapping); the last tests start real one-rank
gloo worlds in this process through each path.
"""
from __future__ import annotations

import pytest
import torch.distributed as dist

from pgroups import LaunchError, LaunchInfo, ParallelContext
from pgroups.launch import (device_index, free_port, from_environment, from_slurm, from_torchrun,
                            parse_nodelist)

from conftest import fake_world

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node07",
            "MASTER_PORT": "29511"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
         "SLURM_JOB_NODELIST": "gpu[01-04,07],cpu3", "SLURM_JOB_ID": "123456"}


# ---- torchrun -----------------------------------------------------------------------------------

def test_torchrun_environment():
    assert from_torchrun(TORCHRUN) == LaunchInfo(rank=3, world_size=8, local_rank=1, master_addr="node07",
                                                 master_port=29511, source="torchrun")
    # torchrun's agent serves the store: every rank is a client (torch reads exactly "True")
    assert from_torchrun(dict(TORCHRUN, TORCHELASTIC_USE_AGENT_STORE="True")).agent_store
    assert not from_torchrun(dict(TORCHRUN, TORCHELASTIC_USE_AGENT_STORE="False")).agent_store
    assert not from_torchrun(dict(TORCHRUN, TORCHELASTIC_USE_AGENT_STORE="1")).agent_store
    without_local = {k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}
    assert from_torchrun(without_local).local_rank == 0


def test_torchrun_missing_variables_are_named():
    with pytest.raises(LaunchError, match=r"torchrun environment incomplete: missing MASTER_ADDR, MASTER_PORT$"):
        from_torchrun({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="missing RANK$"):
        from_torchrun({k: v for k, v in TORCHRUN.items() if k != "RANK"})


@pytest.mark.parametrize("changes, needle", [
    ({"RANK": "three"}, "RANK='three' is not an integer"),
    ({"WORLD_SIZE": ""}, "WORLD_SIZE='' is not an integer"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
    ({"RANK": "8"}, "rank 8 is outside 0..7"),
    ({"RANK": "-1"}, "rank -1 is outside 0..7"),
    ({"MASTER_PORT": "70000"}, "master port 70000 is outside 1..65535"),
    ({"MASTER_PORT": "0"}, "master port 0 is outside 1..65535"),
])
def test_torchrun_bad_values(changes, needle):
    with pytest.raises(LaunchError) as info:
        from_torchrun(dict(TORCHRUN, **changes))
    assert needle in str(info.value)
    assert "torchrun" in str(info.value)


# ---- SLURM ------------------------------------------------------------------------------------

def test_slurm_environment_master_is_first_host_of_compressed_list():
    info = from_slurm(SLURM)
    assert info == LaunchInfo(rank=5, world_size=16, local_rank=1, master_addr="gpu01",
                              master_port=20000 + 123456 % 10000, source="slurm")


def test_slurm_overrides_and_fallbacks():
    assert from_slurm(dict(SLURM, MASTER_ADDR="10.0.0.9", MASTER_PORT="4000")).master_addr == "10.0.0.9"
    assert from_slurm(dict(SLURM, MASTER_PORT="4000")).master_port == 4000
    step_list = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    assert from_slurm(dict(step_list, SLURM_NODELIST="cpu[3-4]")).master_addr == "cpu3"
    no_job = {k: v for k, v in SLURM.items() if k not in ("SLURM_JOB_ID", "SLURM_LOCALID")}
    info = from_slurm(no_job)
    assert (info.master_port, info.local_rank) == (29500, 0)
    # different jobs on one node get different default ports
    assert from_slurm(dict(SLURM, SLURM_JOB_ID="1")).master_port != from_slurm(
        dict(SLURM, SLURM_JOB_ID="2")).master_port


def test_slurm_step_node_list_comes_before_the_job_s():
    # srun on part of the allocation: the step's first node (where its rank 0 runs) is node03
    step = dict(SLURM, SLURM_JOB_NODELIST="node[01-04]", SLURM_STEP_NODELIST="node[03-04]")
    assert from_slurm(step).master_addr == "node03"
    assert from_slurm(dict(step, SLURM_NODELIST="node[01-04]")).master_addr == "node03"


def test_slurm_missing_variables_are_named():
    with pytest.raises(LaunchError, match=r"SLURM environment incomplete: missing SLURM_NTASKS$"):
        from_slurm({k: v for k, v in SLURM.items() if k != "SLURM_NTASKS"})
    with pytest.raises(LaunchError) as info:
        from_slurm({"SLURM_PROCID": "0"})
    assert "missing SLURM_NTASKS, SLURM_JOB_NODELIST (or MASTER_ADDR)" in str(info.value)


def test_slurm_bad_values():
    with pytest.raises(LaunchError, match="SLURM_PROCID='x' is not an integer"):
        from_slurm(dict(SLURM, SLURM_PROCID="x"))
    with pytest.raises(LaunchError, match="rank 16 is outside 0..15"):
        from_slurm(dict(SLURM, SLURM_PROCID="16"))
    with pytest.raises(LaunchError, match="bad range '04-01'"):
        from_slurm(dict(SLURM, SLURM_JOB_NODELIST="gpu[04-01]"))
    with pytest.raises(LaunchError, match="names no host"):
        from_slurm(dict(SLURM, SLURM_JOB_NODELIST=","))


# ---- compressed node lists ----------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
    ("cpu3", ["cpu3"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[7]", ["n7"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),            # zero padding kept across a carry
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[8-10]", ["n8", "n9", "n10"]),                       # no padding when the bound has none
    ("n[1-2],m[5,3]", ["n1", "n2", "m5", "m3"]),            # listed order is kept
    # several bracket groups in one name expand as a product, the first one outermost (as SLURM)
    ("node[1-2]-ib[3-4]", ["node1-ib3", "node1-ib4", "node2-ib3", "node2-ib4"]),
    ("rack[1-2]n[01]", ["rack1n01", "rack2n01"]),
    ("10.0.0.1", ["10.0.0.1"]),
    ("gpu-a100-[1-2].cluster", ["gpu-a100-1.cluster", "gpu-a100-2.cluster"]),
])
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, needle", [
    ("n[3-1]", "bad range '3-1'"),
    ("n[a-c]", "bad range 'a-c'"),
    ("n[1-2-3]", "bad range '1-2-3'"),
    ("n[-3]", "bad range '-3'"),
    ("n[]", "bad range ''"),
    ("n[1,,2]", "bad range ''"),
    ("n[1-2", "unbalanced '['"),
    ("n1-2],m", "unbalanced ']'"),
    ("", "names no host"),
    (",", "names no host"),
])
def test_parse_nodelist_errors(nodelist, needle):
    with pytest.raises(LaunchError) as info:
        parse_nodelist(nodelist)
    assert needle in str(info.value)
    assert repr(nodelist) in str(info.value)


# ---- choosing the source --------------------------------------------------------------------------

def test_from_environment_prefers_torchrun_then_slurm():
    assert from_environment(dict(SLURM, **TORCHRUN)).source == "torchrun"
    assert from_environment(SLURM).source == "slurm"
    with pytest.raises(LaunchError) as info:
        from_environment({"PATH": "/bin"})
    message = str(info.value)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "pgroups launch"):
        assert name in message


def test_explicit_launch_info_is_validated():
    with pytest.raises(LaunchError, match="rank 2 is outside 0..1"):
        LaunchInfo(rank=2, world_size=2, local_rank=0, master_addr="h", master_port=1234)


# ---- real one-rank worlds through each path --------------------------------------------------------

def _clear_launch_env(monkeypatch):
    for name in list(TORCHRUN) + list(SLURM) + ["SLURM_NODELIST", "SLURM_STEP_NODELIST", "TORCHELASTIC_USE_AGENT_STORE"]:
        monkeypatch.delenv(name, raising=False)


def _check_one_rank_world(ctx: ParallelContext) -> None:
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert ctx.get_ranks_in_group("tensor") == [0]
        assert ctx.backend.device_backend == "gloo"
    finally:
        ctx.destroy()
    assert not dist.is_initialized()  # the context started the default group, so it ends it


@pytest.mark.timeout(60)
def test_init_from_explicit_launch_info(monkeypatch):
    _clear_launch_env(monkeypatch)
    launch = LaunchInfo(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port())
    ctx = ParallelContext().init_from_config({"backend": "gloo", "timeout_s": 30}, launch=launch)
    assert ctx.launch == launch
    _check_one_rank_world(ctx)
    # destroy then init again, in the same process and on the same port
    ctx.init_from_config({"backend": "gloo", "timeout_s": 30, "parallel": {"nettest": 1}}, launch=launch)
    _check_one_rank_world(ctx)


@pytest.mark.timeout(60)
def test_init_from_torchrun_environment(monkeypatch):
    _clear_launch_env(monkeypatch)
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    ctx = ParallelContext().init_from_config({"backend": "gloo", "timeout_s": 30})
    assert ctx.launch.source == "torchrun"
    _check_one_rank_world(ctx)


@pytest.mark.timeout(60)
def test_init_from_slurm_environment(monkeypatch):
    _clear_launch_env(monkeypatch)
    for name, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    ctx = ParallelContext().init_from_config({"backend": "gloo", "timeout_s": 30})
    assert (ctx.launch.source, ctx.launch.master_addr) == ("slurm", "127.0.0.1")
    _check_one_rank_world(ctx)


def test_no_launch_environment_fails_before_any_communication(monkeypatch):
    _clear_launch_env(monkeypatch)
    with pytest.raises(LaunchError, match="no launch environment found") as error:
        ParallelContext().init_from_config({})
    # `python my_script.py`: the error says how to run one's own script locally
    assert "`pgroups launch --nproc N your_script.py [args]`" in str(error.value)
    assert "`torchrun --nproc-per-node N your_script.py [args]`" in str(error.value)
    assert not dist.is_initialized()


def test_config_error_comes_before_the_rendezvous(monkeypatch):
    """An inconsistent layout is reported without contacting the (unreachable) master."""
    _clear_launch_env(monkeypatch)
    from pgroups import ConfigError

    launch = LaunchInfo(rank=1, world_size=6, local_rank=1, master_addr="192.0.2.1", master_port=1)
    with pytest.raises(ConfigError, match=r"world_size\(6\) is not divisible by tensor\(4\)"):
        ParallelContext().init_from_config({"parallel": {"tensor": 4}}, launch=launch)
    assert not dist.is_initialized()


@pytest.mark.timeout(60)
def test_unreachable_rendezvous_is_a_launch_error_naming_the_master(monkeypatch):
    _clear_launch_env(monkeypatch)
    launch = LaunchInfo(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1", master_port=free_port())
    with pytest.raises(LaunchError) as info:
        ParallelContext().init_from_config({"backend": "gloo", "timeout_s": 2}, launch=launch)
    assert f"127.0.0.1:{launch.master_port}" in str(info.value)
    assert "rank 1/2" in str(info.value)
    assert not dist.is_initialized()


# ---- a launch handed to a job that already runs ----------------------------------------------

def test_launch_for_an_already_running_job_is_checked_not_ignored():
    config = {"parallel": {"tensor": 2}}
    with fake_world(16, 3):
        ctx = ParallelContext()
        with pytest.raises(LaunchError, match=r"says rank 0 of 8, but torch.distributed is already "
                                              r"running as rank 3 of 16"):
            ctx.init_from_config(config, launch=LaunchInfo(0, 8, 0, "127.0.0.1", 29500))
        assert not ctx.is_initialized()
        with pytest.warns(UserWarning, match=r"already initialized \(rank 3 of 16\): launch=.* is not used"):
            ctx.init_from_config(config, launch=LaunchInfo(3, 16, 3, "10.0.0.1", 29500))
        try:
            assert ctx.get_ranks_in_group("tensor") == [2, 3]
        finally:
            ctx.destroy()


# ---- which GPU a rank takes ------------------------------------------------------------------

def _info(rank, local_rank):
    return LaunchInfo(rank, 64, local_rank, "127.0.0.1", 29500)


def test_each_local_rank_takes_its_own_gpu():
    assert [device_index(_info(8 + r, r), 8, None) for r in range(8)] == list(range(8))
    assert device_index(_info(9, 1), 8, "0,1,2,3,4,5,6,7") == 1


def test_a_gpu_bound_per_process_is_device_zero():
    # srun --gpus-per-task=1 / --gpu-bind: each process sees only its own GPU
    assert device_index(_info(13, 5), 1, "5") == 0


def test_fewer_gpus_than_local_ranks_fails_naming_ranks_and_visible_devices():
    with pytest.raises(LaunchError) as info:
        device_index(_info(13, 5), 4, "0,1,2,3")
    message = str(info.value)
    for needle in ("rank 13 (local rank 5", "sees 4 GPUs", "CUDA_VISIBLE_DEVICES='0,1,2,3'",
                   "local ranks 4..5 would share GPUs", "Duplicate GPU detected"):
        assert needle in message, (needle, message)
    with pytest.raises(LaunchError, match=r"sees 1 GPU \(CUDA_VISIBLE_DEVICES=None\)"):
        device_index(_info(1, 1), 1, None)  # one GPU for all local ranks, not a per-process binding
    with pytest.raises(LaunchError, match="sees none"):
        device_index(_info(0, 0), 0, "")
