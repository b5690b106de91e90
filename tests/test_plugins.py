"""Plugins: what a user initializer returns is checked before any communication, a plugin that
breaks is one line naming it (``pgroups validate`` exit 2) and leaves the registry as it was,
and an initializer can declare axes of its own."""
from __future__ import annotations

import textwrap

import pytest
import torch.distributed as dist

from pgroups import ConfigError, ParallelContext, Topology, load_config
from pgroups.cli import main, offline_layout
from pgroups.initializer import ProcessGroupInitializer, default_registry
from initializers import AxisInitializer

from conftest import fake_world


def write_plugin(tmp_path, name: str, body: str, parallel: str = "{tensor: 2}", options: str = "{}",
                 mode: str = "custom") -> str:
    (tmp_path / f"{name}.py").write_text(HEADER + textwrap.dedent(body))
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"plugins: [{name}.py]\nparallel: {parallel}\nextra_modes: {{{mode}: {options}}}\n")
    return str(config)


HEADER = """
from pgroups import ProcessGroupInitializer, register_initializer
"""


@pytest.fixture(autouse=True)
def restore_default_registry():
    """Plugins register into the default registry: put it back after each test."""
    snapshot = default_registry.snapshot()
    yield
    default_registry.restore(snapshot)


@pytest.mark.parametrize("groups, needle", [
    ("[[1, 0], [3, 2], [5, 4], [7, 6]]", "returned a bad group [1, 0]: not sorted"),
    ("[[0, 1, 2], [2, 3], [4, 5, 6, 7]]", "returned a bad group [2, 3]: rank 2 is also in group [0, 1, 2]"),
    ("[[0, 1], [2, 8]]", "returned a bad group [2, 8]: rank 8 is outside the world 0..7"),
    ("[[0, 0, 1]]", "returned a bad group [0, 0, 1]: rank 0 repeats"),
    ("[[]]", "returned a bad group []: not a non-empty list of ranks"),
    ("[[0, 'a']]", "returned a bad group [0, 'a']: 'a' is not an integer rank"),
])
def test_bad_groups_are_one_config_error_naming_the_initializer(tmp_path, capsys, groups, needle):
    path = write_plugin(tmp_path, "badgroups", f"""
        @register_initializer("custom")
        class Reversed(ProcessGroupInitializer):
            def rank_groups(self, topology):
                return {groups}
        """)
    with pytest.raises(ConfigError) as info:
        offline_layout(load_config(path), 8)
    message = str(info.value)
    assert message.startswith(f"{path}: initializer badgroups.Reversed (badgroups.py) of mode 'custom'")
    assert needle in message
    assert main(["validate", path, "--world-size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_a_reversed_group_of_is_caught_when_a_context_builds_it(tmp_path):
    """group_of answers for this rank only (no listing at scale): checked as the context builds."""
    path = write_plugin(tmp_path, "badgroupof", """
        @register_initializer("custom")
        class Fine(ProcessGroupInitializer):
            def rank_groups(self, topology):
                return [[0, 1], [2, 3]]
            def group_of(self, topology, rank):
                return [rank + 1, rank] if rank % 2 == 0 else [rank, rank - 1]
        """)
    with fake_world(4, 2):
        ctx = ParallelContext()
        with pytest.raises(ConfigError, match=r"returned a bad group \[3, 2\] for rank 2: not sorted"):
            ctx.init_from_config(path)
        assert not ctx.is_initialized()


def test_a_plugin_raising_while_building_is_one_line_naming_it(tmp_path, capsys):
    path = write_plugin(tmp_path, "raises", """
        @register_initializer("custom")
        class Broken(ProcessGroupInitializer):
            def rank_groups(self, topology):
                return {}[topology.world_size]
        """)
    assert main(["validate", path, "--world-size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    # shown by the file's module name and the path the config gave, not the unique import name
    assert "initializer raises.Broken (raises.py) of mode 'custom' failed while listing its groups: KeyError: 8" in err
    assert "pgroups_plugin_" not in err


def test_a_plugin_failing_to_load_is_one_line_and_leaves_the_registry_as_it_was(tmp_path, capsys):
    """The module registers one mode, then raises: the registration is undone, so a retry gives
    the same message (not "already registered"), and nothing half-registered stays behind."""
    path = write_plugin(tmp_path, "halfway", """
        @register_initializer("custom")
        class First(ProcessGroupInitializer):
            def rank_groups(self, topology):
                return [[r] for r in range(topology.world_size)]

        raise RuntimeError("cannot find my weights")
        """)
    before = default_registry.snapshot()
    for _ in range(2):
        assert main(["validate", path, "--world-size", "8"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "plugins: 'halfway.py' failed while loading: RuntimeError: cannot find my weights" in err
        assert default_registry.snapshot() == before and "custom" not in default_registry


def test_a_missing_plugin_module_is_one_line(tmp_path, capsys):
    config = tmp_path / "missing.yaml"
    config.write_text("plugins: [no_such_plugin_module_xyz]\n")
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot import 'no_such_plugin_module_xyz'" in err


# ---- declaring axes ------------------------------------------------------------------------------

class HeadContext(AxisInitializer):
    """InternEvo-style 2D sequence parallel: each context group split into head × context."""

    def __init__(self, head: int = 2, axes: str = "hcp") -> None:
        self.head = head
        self.axes = axes

    def mesh(self, topology: Topology):
        return topology.split_mesh("cp2d", over=("cp",),
                                   inner=[("hcp", self.head), ("icp", topology.context // self.head)])


def head_context_by_hand(world: int, tensor: int, context: int, head: int, axis: str):
    """Order tp-cp-dp-pp: a context group is ranks r0 + tensor*c; hcp = c % head, icp = c // head."""
    groups = []
    for base in range(world):
        if (base // tensor) % context:
            continue  # not the first of its context group
        members = [base + tensor * c for c in range(context)]
        for fixed in range(context // head if axis == "hcp" else head):
            if axis == "hcp":
                groups.append([members[fixed * head + h] for h in range(head)])
            else:
                groups.append([members[i * head + fixed] for i in range(context // head)])
    return sorted(groups)


@pytest.mark.parametrize("axis", ["hcp", "icp"])
def test_an_initializer_declares_new_axes(axis, fresh_registry):
    fresh_registry.register("head_context", HeadContext)
    topology = load_config({"parallel": {"tensor": 2, "context": 8, "order": "tp-cp-dp-pp"}}).topology(32)
    init = fresh_registry.create("head_context", {"head": 4, "axes": axis})
    assert sorted(init.rank_groups(topology)) == head_context_by_hand(32, 2, 8, 4, axis)
    for rank in (0, 5, 31):
        assert init.group_of(topology, rank) == next(g for g in init.rank_groups(topology) if rank in g)


def test_a_declared_axis_equal_to_a_builtin_mode_shares_its_communicator(fresh_registry):
    fresh_registry.register("head_context", HeadContext)
    topology = load_config({"parallel": {"tensor": 2, "context": 4, "order": "tp-cp-dp-pp"}}).topology(16)
    whole = fresh_registry.create("head_context", {"head": 4, "axes": "hcp"})
    assert whole.layout_key(topology) == topology.layout_key("context")
    with fake_world(16, 5):
        ctx = ParallelContext(registry=fresh_registry).init_from_config(
            {"parallel": {"tensor": 2, "context": 4, "order": "tp-cp-dp-pp"},
             "extra_modes": {"head_context": {"head": 4, "axes": "hcp"}}})
        try:
            assert ctx.get_group("head_context") is ctx.get_group("context")
            assert dist.get_process_group_ranks(ctx.get_group("head_context")) == [1, 3, 5, 7]
            assert ctx.get_ranks_in_group("head_context") == ctx.get_ranks_in_group("context") == [1, 3, 5, 7]
        finally:
            ctx.destroy()


def test_a_declared_mesh_that_does_not_fit_is_a_config_error_naming_the_plugin(fresh_registry):
    fresh_registry.register("head_context", HeadContext)
    cfg = load_config({"parallel": {"tensor": 2, "context": 4, "order": "tp-cp-dp-pp"},
                       "extra_modes": {"head_context": {"head": 3}}})
    from pgroups.context import make_initializers

    with pytest.raises(ConfigError, match=r"HeadContext of mode 'head_context' failed while validating: "
                                          r"ValueError: mesh 'cp2d': inner sizes"):
        make_initializers(fresh_registry, cfg, cfg.topology(16))


def test_axis_initializer_over_a_builtin_combination(fresh_registry):
    class TensorContext(AxisInitializer):
        axes = "cp-tp"

    fresh_registry.register("my_tp_cp", TensorContext)
    topology = load_config({"parallel": {"tensor": 2, "context": 2, "order": "tp-cp-dp-pp"}}).topology(8)
    init = fresh_registry.create("my_tp_cp")
    assert init.rank_groups(topology) == topology.groups("tp-cp")
    assert init.layout_key(topology) == topology.layout_key("tp-cp")


def test_registering_a_builtin_or_combination_name_is_refused(fresh_registry):
    from pgroups import RegistrationError

    class Mine(ProcessGroupInitializer):
        pass

    for name in ("context", "tp-cp", "expert_data"):
        with pytest.raises(RegistrationError, match=f"mode {name!r} is already registered to pgroups' built-in"):
            fresh_registry.register(name, Mine)
        assert fresh_registry.get(name) is not Mine
