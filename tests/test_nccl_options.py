"""Per-mode NCCL options (Megatron-Core's ``nccl_comm_cfgs``): validation, the
``ProcessGroupNCCL.Options`` built from them, and their pass-through to group creation.

This CPU torch build has no ``ProcessGroupNCCL``: the options object is built here with a
stand-in class that has the same attributes (``config.<field>``, ``is_high_priority_stream``,
``_timeout``), and the construction with torch's own class is skipped. Nothing NCCL ran here.
"""
from __future__ import annotations

import datetime
import types
from typing import Any, Dict, List

import pytest
import torch.distributed as dist

from pgroups import ConfigError, LaunchError, ParallelContext, load_config
from pgroups import backend as backend_module
from pgroups import deadlines
from pgroups.backend import GroupBackend, nccl_process_group_options

from conftest import fake_world


class StandInOptions:
    """Mimics torch's ProcessGroupNCCL.Options: a constructor taking is_high_priority_stream and a
    ``config`` holding the NCCL communicator fields."""

    def __init__(self, is_high_priority_stream: bool = False) -> None:
        self.is_high_priority_stream = is_high_priority_stream
        self.config = types.SimpleNamespace()
        self._timeout = None


# ---- config -------------------------------------------------------------------------------------
def test_valid_options_are_kept_and_net_name_spelled_as_nccl_does():
    cfg = load_config({"parallel": {"tensor": 2}, "nccl_options": {
        "tensor": {"max_ctas": 8, "min_ctas": 2, "cga_cluster_size": 0},
        "data": {"net_name": "ib", "is_high_priority_stream": True}, "pipe": None}})
    assert cfg.nccl_options == {"tensor": {"max_ctas": 8, "min_ctas": 2, "cga_cluster_size": 0},
                                "data": {"net_name": "IB", "is_high_priority_stream": True}, "pipe": {}}
    assert load_config({}).nccl_options == {}


@pytest.mark.parametrize("value, needle", [
    ({"tensor": {"max_cta": 8}}, "nccl_options.tensor.max_cta: unknown NCCL option (did you mean 'max_ctas'?); "
                                 "allowed: 'cga_cluster_size', 'is_high_priority_stream', 'max_ctas', "
                                 "'min_ctas', 'net_name'"),
    ({"tensor": {"max_ctas": 0}}, "nccl_options.tensor.max_ctas must be an integer from 1 to 64, got 0"),
    ({"tensor": {"max_ctas": 65}}, "from 1 to 64, got 65"),
    ({"tensor": {"min_ctas": "8"}}, "nccl_options.tensor.min_ctas must be an integer from 1 to 64, got '8'"),
    ({"tensor": {"min_ctas": True}}, "got True"),
    ({"tensor": {"cga_cluster_size": 9}}, "cga_cluster_size must be an integer from 0 to 8, got 9"),
    ({"tensor": {"net_name": "roce"}}, "nccl_options.tensor.net_name: 'roce' is not allowed; allowed: 'IB', 'Socket'"),
    ({"tensor": {"is_high_priority_stream": "yes"}}, "is_high_priority_stream must be true or false, got 'yes'"),
    ({"tensor": {"min_ctas": 9, "max_ctas": 8}}, "nccl_options.tensor: min_ctas(9) must not exceed max_ctas(8)"),
    ({"tensor": 8}, "nccl_options.tensor must be a mapping of"),
    ([8], "nccl_options must map mode names to option mappings"),
])
def test_bad_options_are_config_errors_naming_the_key(value, needle):
    with pytest.raises(ConfigError) as info:
        load_config({"nccl_options": value})
    assert needle in str(info.value)


def test_unknown_mode_is_a_config_error_before_any_communication():
    cfg = load_config({"parallel": {"tensor": 2}, "nccl_options": {"tensr": {"max_ctas": 8}}})
    with fake_world(4, 0):
        with pytest.raises(ConfigError, match=r"nccl_options.tensr: no such mode \(did you mean 'tensor'\?\); "
                                              r"modes this config builds: 'dp', 'global'"):
            ParallelContext().init_from_config(cfg)


# ---- the options object -----------------------------------------------------------------------
def test_options_object_sets_only_the_given_fields():
    built = nccl_process_group_options({"max_ctas": 8, "cga_cluster_size": 2, "net_name": "Socket",
                                        "is_high_priority_stream": True}, StandInOptions)
    assert built.is_high_priority_stream is True
    assert vars(built.config) == {"cga_cluster_size": 2, "max_ctas": 8, "net_name": "Socket"}
    default = nccl_process_group_options({"min_ctas": 4}, StandInOptions)
    assert default.is_high_priority_stream is False and vars(default.config) == {"min_ctas": 4}


@pytest.mark.skipif(not hasattr(dist, "ProcessGroupNCCL"),
                    reason="this torch build has no NCCL (torch.distributed.ProcessGroupNCCL is missing)")
def test_torchs_own_options_class_takes_the_fields():
    built = nccl_process_group_options({"max_ctas": 8, "min_ctas": 2, "cga_cluster_size": 2,
                                        "is_high_priority_stream": True})
    assert isinstance(built, dist.ProcessGroupNCCL.Options)
    assert (built.config.max_ctas, built.config.min_ctas, built.config.cga_cluster_size) == (8, 2, 2)
    assert built.is_high_priority_stream is True


@pytest.mark.skipif(hasattr(dist, "ProcessGroupNCCL"), reason="this torch build has NCCL")
def test_without_nccl_the_error_says_so():
    with pytest.raises(LaunchError, match="nccl_options need torch.distributed.ProcessGroupNCCL"):
        nccl_process_group_options({"max_ctas": 8})


# ---- pass-through to group creation -------------------------------------------------------------
@pytest.fixture
def recorded_calls(monkeypatch):
    """Record new_group / split_group calls of the backend (returning dummy groups) and build
    options with the stand-in class."""
    calls: List[Dict[str, Any]] = []

    def fake_new_group(ranks, **kwargs):
        calls.append({"how": "new_group", "ranks": list(ranks), **kwargs})
        return object()

    def fake_split_group(**kwargs):
        calls.append({"how": "split_group", **kwargs})
        return object()

    monkeypatch.setattr(backend_module.dist, "new_group", fake_new_group)
    monkeypatch.setattr(backend_module.dist, "split_group", fake_split_group, raising=False)
    monkeypatch.setattr(backend_module, "nccl_process_group_options",
                        lambda options: nccl_process_group_options(options, StandInOptions))
    return calls


def test_nccl_groups_get_their_modes_options(recorded_calls):
    options = {"tensor": {"max_ctas": 8, "net_name": "IB"}}
    with fake_world(8, 3):
        for strategy in ("local", "all", "split"):
            recorded_calls.clear()
            backend = GroupBackend("nccl", strategy, 30.0, nccl_options=options)
            backend.build("tensor", [2, 3], lambda: [[0, 1], [2, 3], [4, 5], [6, 7]])
            backend.build("data", [3, 7], lambda: [[0, 4], [1, 5], [2, 6], [3, 7]])
            backend.build("tensor", [2, 3], lambda: [[0, 1], [2, 3], [4, 5], [6, 7]], cpu=True)
            tensor_calls = [c for c in recorded_calls if c.get("group_desc") == "pgroups:tensor"]
            data_calls = [c for c in recorded_calls if c.get("group_desc") == "pgroups:data"]
            device = [c for c in tensor_calls if c.get("backend") != "gloo"]
            assert device and all(vars(c["pg_options"].config) == {"max_ctas": 8, "net_name": "IB"}
                                  for c in device), strategy
            assert all(c["pg_options"]._timeout == datetime.timedelta(seconds=30 + deadlines.NCCL_WATCHDOG_MARGIN_S) for c in device)
            assert all(c["pg_options"] is None for c in data_calls), strategy
            twins = [c for c in tensor_calls if c.get("backend") == "gloo"]
            assert twins and all(c["pg_options"] is None for c in twins), strategy  # gloo takes no NCCL options


def test_all_strategy_does_not_share_a_communicator_across_different_options(recorded_calls):
    """Identical rank lists share one communicator only when their options agree."""
    with fake_world(4, 0):
        backend = GroupBackend("nccl", "all", 30.0, nccl_options={"model": {"max_ctas": 4}})
        groups = [[0, 1], [2, 3]]
        tensor = backend.build("tensor", [0, 1], lambda: groups)
        model = backend.build("model", [0, 1], lambda: groups)
        again = backend.build("pipe_like", [0, 1], lambda: groups)
        assert model is not tensor and again is tensor
        assert backend.calls == 4


def test_a_mode_with_options_gets_its_own_communicator_in_the_context():
    """pipeline 1: model's groups equal tensor's, so they share one communicator — unless model
    has NCCL options of its own (fake backend: it simulates what an NCCL job creates)."""
    config = {"parallel": {"tensor": 2}, "groups": "eager", "cpu_groups": "off"}
    with fake_world(8, 5):
        plain = ParallelContext().init_from_config(config)
        try:
            assert plain.get_group("model") is plain.get_group("tensor")
            plain_calls = plain.backend.calls
        finally:
            plain.destroy()
    with fake_world(8, 5):
        tuned = ParallelContext().init_from_config({**config, "nccl_options": {"model": {"max_ctas": 4}}})
        try:
            assert tuned.get_group("model") is not tuned.get_group("tensor")
            assert dist.get_process_group_ranks(tuned.get_group("model")) == [4, 5]
            assert tuned.backend.calls == plain_calls + 1
        finally:
            tuned.destroy()


def test_options_follow_the_mode_under_any_spelling():
    """'tp' is 'tensor' and 'cp-dp' is 'dp-cp': the options reach the built mode; naming one
    mode twice is an error."""
    with fake_world(16, 0):
        ctx = ParallelContext().init_from_config({
            "parallel": {"tensor": 2, "context": 2, "order": "tp-cp-dp-pp", "modes": ["dp-cp"]},
            "nccl_options": {"tp": {"max_ctas": 4}, "cp-dp": {"min_ctas": 2}}})
        try:
            assert ctx.backend.nccl_options == {"tp": {"max_ctas": 4}, "dp-cp": {"min_ctas": 2}}
        finally:
            ctx.destroy()
        with pytest.raises(ConfigError, match=r"nccl_options.tp: mode 'tp' already has options"):
            ParallelContext().init_from_config({"parallel": {"tensor": 2},
                                                "nccl_options": {"tensor": {"max_ctas": 4}, "tp": {"max_ctas": 8}}})


def test_nccl_groups_outlive_pgroups_own_deadline(recorded_calls):
    """Every Python-side wait ends at timeout_s (wait_within); NCCL's watchdog, which tears the
    process down, must fire later: NCCL groups (and their options) get timeout_s plus the margin,
    gloo groups (CPU twins, placeholders) exactly timeout_s."""
    margin = datetime.timedelta(seconds=deadlines.NCCL_WATCHDOG_MARGIN_S)
    with fake_world(8, 3):
        for strategy in ("local", "all", "split"):
            recorded_calls.clear()
            backend = GroupBackend("nccl", strategy, 30.0, nccl_options={"tensor": {"max_ctas": 8}})
            backend.build("tensor", [2, 3], lambda: [[0, 1], [2, 3], [4, 5], [6, 7]])
            backend.build("tensor", [2, 3], lambda: [[0, 1], [2, 3], [4, 5], [6, 7]], cpu=True)
            device = [c for c in recorded_calls if c.get("backend") != "gloo"]
            cpu = [c for c in recorded_calls if c.get("backend") == "gloo"]
            assert device and cpu, strategy
            assert all(c["timeout"] == datetime.timedelta(seconds=30) + margin for c in device), strategy
            assert all(c["pg_options"]._timeout == datetime.timedelta(seconds=30) + margin for c in device)
            assert all(c["timeout"] == datetime.timedelta(seconds=30) for c in cpu), strategy
    assert deadlines.NCCL_WATCHDOG_MARGIN_S > 0
