"""The initializer registry, and a user-defined mode end to end.

The user-defined mode is verl's "micro data parallel" groups from config_examples/: loaded as a
plugin named in the YAML, built by the context like any built-in mode, and queried with
``gpc.get_group("micro_data")`` on real gloo ranks.
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pgroups import (ConfigError, ParallelContext, ProcessGroupInitializer, RegistrationError, Topology,
                     UnknownModeError, load_config, register_initializer)
from pgroups.cli import main, offline_layout
from pgroups.initializer import ENTRY_POINT_GROUP, InitializerRegistry

from conftest import fake_world, run_ranks

REPO = Path(__file__).resolve().parents[1]
MICRO_DATA_YAML = REPO / "config_examples" / "micro_data.yaml"
MICRO_DATA_PLUGIN = REPO / "config_examples" / "micro_data_plugin.py"
BUILTINS = ["cp", "dp", "edp", "embedding", "ep", "etp", "global", "nettest", "pp", "tp", "tp-pp", "wdp", "wp",
            "zero1"]


class ExpertInitializer(ProcessGroupInitializer):
    """Expert-parallel groups: ``size`` consecutive ranks (a test-only user mode)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size

    def rank_groups(self, topology: Topology):
        return topology.block_groups(self.size)


class OtherExpertInitializer(ExpertInitializer):
    pass


@pytest.fixture(autouse=True)
def _registration_does_not_leak():
    """Registering a class sets its ``mode`` attribute; put the test classes back as they were
    after every test, so one test's registration cannot change what the next one sees."""
    classes = (ExpertInitializer, OtherExpertInitializer)
    saved = {cls: cls.__dict__.get("mode", _ABSENT) for cls in classes}
    yield
    for cls, value in saved.items():
        if value is _ABSENT:
            if "mode" in cls.__dict__:
                delattr(cls, "mode")
        else:
            cls.mode = value


_ABSENT = object()


# ---- registration ---------------------------------------------------------------------------

def test_register_and_get(fresh_registry):
    fresh_registry.register("blocks", ExpertInitializer)
    assert fresh_registry.get("blocks") is ExpertInitializer
    assert ExpertInitializer.mode == "blocks"
    assert "blocks" in fresh_registry and "tensor" in fresh_registry and "nope" not in fresh_registry
    assert fresh_registry.modes() == sorted(BUILTINS + ["blocks"])
    fresh_registry.register("blocks", ExpertInitializer)  # the same class again is harmless


def test_an_earlier_test_s_registration_is_not_seen_here():
    # test_register_and_get (above) registered ExpertInitializer as 'expert'
    assert "mode" not in ExpertInitializer.__dict__ and "mode" not in OtherExpertInitializer.__dict__


def test_duplicate_registration_is_an_error_naming_both(fresh_registry):
    fresh_registry.register("blocks", ExpertInitializer)
    with pytest.raises(RegistrationError) as info:
        fresh_registry.register("blocks", OtherExpertInitializer)
    message = str(info.value)
    assert "'blocks'" in message and "ExpertInitializer" in message and "OtherExpertInitializer" in message
    assert fresh_registry.get("blocks") is ExpertInitializer
    fresh_registry.register("blocks", OtherExpertInitializer, replace=True)
    assert fresh_registry.get("blocks") is OtherExpertInitializer


def test_registering_over_a_builtin_is_an_error_even_before_any_lookup():
    registry = InitializerRegistry()  # nothing looked up yet
    with pytest.raises(RegistrationError, match="mode 'tensor' is already registered"):
        registry.register("tensor", ExpertInitializer)
    assert registry.get("tensor") is not ExpertInitializer


def test_decorator_registers_into_a_given_registry(fresh_registry):
    @register_initializer("blocks", registry=fresh_registry)
    class Decorated(ExpertInitializer):
        pass

    assert fresh_registry.get("blocks") is Decorated
    with pytest.raises(RegistrationError, match="already registered"):
        register_initializer("blocks", registry=fresh_registry)(OtherExpertInitializer)


def test_only_initializer_classes_can_register(fresh_registry):
    for bad in (object, ExpertInitializer(), lambda topology: []):
        with pytest.raises(RegistrationError, match="must subclass ProcessGroupInitializer"):
            fresh_registry.register("blocks", bad)


def test_unknown_mode_lists_the_known_ones(fresh_registry):
    with pytest.raises(UnknownModeError) as info:
        fresh_registry.get("blocks")
    message = str(info.value)
    assert "no initializer is registered for mode 'blocks'" in message
    assert "known modes: " + ", ".join(repr(m) for m in BUILTINS) in message
    with pytest.raises(UnknownModeError, match="did you mean 'tensor'"):
        fresh_registry.get("tensr")
    with pytest.raises(TypeError, match="non-empty str"):
        fresh_registry.get(3)


# ---- entry points -----------------------------------------------------------------------------

def _entry_points(*entries):
    def fake(group=None, **kwargs):
        assert group == ENTRY_POINT_GROUP
        return [metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP) for name, value in entries]

    return fake


def test_entry_point_group_is_loaded(monkeypatch):
    monkeypatch.setattr(metadata, "entry_points", _entry_points(("blocks", "test_registry:ExpertInitializer")))
    registry = InitializerRegistry()
    assert registry.get("blocks").__qualname__ == "ExpertInitializer"
    assert registry.modes() == sorted(BUILTINS + ["blocks"])


def test_entry_point_clashing_with_a_builtin_is_an_error(monkeypatch):
    monkeypatch.setattr(metadata, "entry_points", _entry_points(("tensor", "test_registry:ExpertInitializer")))
    with pytest.raises(RegistrationError, match="mode 'tensor' is already registered"):
        InitializerRegistry().get("data")


def test_broken_entry_point_is_a_registration_error_naming_it(monkeypatch):
    monkeypatch.setattr(metadata, "entry_points", _entry_points(("blocks", "no_such_package_xyz:Thing")))
    registry = InitializerRegistry()
    for _ in range(2):  # reported on every lookup, not once and then silently half-loaded
        with pytest.raises(RegistrationError) as info:
            registry.get("data")
        assert "'blocks'" in str(info.value) and "no_such_package_xyz:Thing" in str(info.value)


# ---- options from extra_modes -------------------------------------------------------------------

def test_options_are_passed_and_checked(fresh_registry):
    fresh_registry.register("blocks", ExpertInitializer)
    assert fresh_registry.create("blocks", {"size": 4}).size == 4
    with pytest.raises(ConfigError) as info:
        fresh_registry.create("blocks", {"sise": 4}, source="job.yaml")
    assert str(info.value) == ("job.yaml: extra_modes.blocks.sise: unknown option (did you mean 'size'?); "
                               "allowed: 'size'")
    with pytest.raises(ConfigError, match="extra_modes.tensor.size: unknown option; allowed: none"):
        fresh_registry.create("tensor", {"size": 2})


def _micro_data_config(tmp_path, body: str) -> str:
    path = tmp_path / "micro.yaml"
    path.write_text(f"plugins: [{MICRO_DATA_PLUGIN}]\n{body}")
    return str(path)


@pytest.mark.parametrize("body, world, needle", [
    ("parallel: {tensor: 4}\nextra_modes: {micro_data: {inference_tensr: 2}}\n", 8,
     "extra_modes.micro_data.inference_tensr: unknown option (did you mean 'inference_tensor'?); "
     "allowed: 'inference_tensor'"),
    ("parallel: {tensor: 4}\nextra_modes: {micro_data: {inference_tensor: 0}}\n", 8,
     "extra_modes.micro_data: inference_tensor must be a positive integer, got 0"),
    ("parallel: {tensor: 4}\nextra_modes: {micro_data: {inference_tensor: 3}}\n", 8,
     "extra_modes.micro_data.inference_tensor(3) must divide parallel.tensor(4)"),
    ("parallel: {tensor: 4, order: dp-tp-pp}\nextra_modes: {micro_data: {inference_tensor: 2}}\n", 8,
     "parallel.order must start with tp"),
])
def test_micro_data_option_errors_name_the_file(tmp_path, capsys, body, world, needle):
    path = _micro_data_config(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        offline_layout(load_config(path), world)
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value)
    assert main(["validate", path, "--world-size", str(world)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_micro_data_ships_with_the_package():
    """verl's helper needs micro_data: it is importable from the installed package, no example
    file needed."""
    config = load_config({"parallel": {"tensor": 4}, "plugins": ["pgroups.plugins.micro_data"],
                          "extra_modes": {"micro_data": {"inference_tensor": 2}}})
    assert offline_layout(config, 8)["micro_data"] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_micro_data_layout_offline(capsys):
    assert main(["show", str(MICRO_DATA_YAML), "--world-size", "8", "--json"]) == 0
    modes = json.loads(capsys.readouterr().out)["modes"]
    assert modes["micro_data"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # tensor 4 / inference tensor 2
    assert modes["tp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_user_mode_in_a_context_under_the_fake_backend(fresh_registry):
    fresh_registry.register("blocks", ExpertInitializer)
    with fake_world(16, 6):
        ctx = ParallelContext(registry=fresh_registry).init_from_config(
            {"parallel": {"tensor": 2}, "extra_modes": {"blocks": {"size": 4}}})
        try:
            assert ctx.modes[-1] == "blocks"
            assert dist.get_process_group_ranks(ctx.get_group("blocks")) == [4, 5, 6, 7]
            assert ctx.get_local_rank("blocks") == 2
            assert ctx.get_rank_groups("blocks") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
        finally:
            ctx.destroy()


# ---- the custom initializer end to end on real gloo ranks ------------------------------------------

def micro_data_worker(config_path: str):
    """One rank: gpc from the example YAML, then collectives over the user mode's groups."""
    from pgroups import gpc

    gpc.init_from_config(config_path)
    try:
        group, cpu_group = gpc.get_group("micro_data"), gpc.get_cpu_group("micro_data")
        sums = []
        for g in (group, cpu_group):
            value = torch.tensor([gpc.get_global_rank()], dtype=torch.int64)
            dist.all_reduce(value, group=g)
            sums.append(int(value))
        return {"ranks": gpc.get_ranks_in_group("micro_data"), "local": gpc.get_local_rank("micro_data"),
                "torch_ranks": dist.get_process_group_ranks(group), "sums": sums,
                "all": gpc.get_rank_groups("micro_data"), "modes": gpc.modes}
    finally:
        gpc.destroy()


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_micro_data_end_to_end_on_four_gloo_ranks():
    results = run_ranks(4, micro_data_worker, str(MICRO_DATA_YAML), timeout_s=75)
    for rank, result in enumerate(results):
        pair = [rank // 2 * 2, rank // 2 * 2 + 1]
        assert result["ranks"] == result["torch_ranks"] == pair
        assert result["local"] == rank % 2
        assert result["sums"] == [sum(pair), sum(pair)]
        assert result["all"] == [[0, 1], [2, 3]]
        assert result["modes"][-1] == "micro_data"
