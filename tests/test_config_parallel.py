"""The N-axis ``parallel:`` keys: context, expert, expert_tensor, expert_layout, weight,
virtual_pipeline, modes, ``data: auto`` — parsed, validated with the arithmetic shown and the key
named, and turned into the modes a context builds."""
from __future__ import annotations

import pytest

from pgroups import ConfigError, Topology, load_config
from pgroups.cli import main
from pgroups.context import make_initializers
from pgroups.initializer import default_registry

ISSUE_YAML = """
parallel:
  tensor: 2
  context: 2
  pipeline: 2
  data: auto
  expert: 4
  expert_tensor: 1
  weight: 4
  virtual_pipeline: 2
  zero1: 2
  nettest: 8
  order: tp-cp-ep-dp-pp
  modes: [dp-cp, tp-cp]
"""


def test_the_issue_example_loads_and_builds_every_mode():
    cfg = load_config(ISSUE_YAML)
    par = cfg.parallel
    assert (par.context, par.expert, par.expert_tensor, par.weight, par.virtual_pipeline, par.data) == (
        2, 4, 1, 4, 2, None)
    assert par.modes == ("dp-cp", "tp-cp") and par.expert_layout == "megatron"
    topology = cfg.topology(32)
    assert (topology.data, topology.expert_data, topology.weight_data, topology.stage_size) == (4, 4, 4, 16)
    names = list(make_initializers(default_registry, cfg, topology))
    assert names == ["global", "tp", "pp", "dp", "tp-pp", "zero1", "nettest", "cp", "ep",
                     "etp", "edp", "wp", "wdp", "dp-cp", "tp-cp"]


def test_defaults_build_the_classic_modes_only():
    cfg = load_config({"parallel": {"tensor": 2, "pipeline": 2}})
    assert list(make_initializers(default_registry, cfg, cfg.topology(16))) == [
        "global", "tp", "pp", "dp", "tp-pp", "zero1", "nettest"]
    assert cfg.topology(16) == Topology.create(16, tensor=2, pipeline=2)


def test_modes_listed_twice_or_under_another_name_are_built_once():
    cfg = load_config({"parallel": {"tensor": 2, "modes": ["tp", "cp-dp", "dp-cp", "embedding"]}})
    assert list(make_initializers(default_registry, cfg, cfg.topology(8)))[-2:] == ["dp-cp", "embedding"]


@pytest.mark.parametrize("parallel, world, message", [
    ({"tensor": 2, "context": 2, "expert": 3, "expert_tensor": 1, "order": "tp-cp-ep-dp-pp"}, 16,
     "parallel.expert: tensor(2)*context(2)*data(4)=16 ranks per stage are not divisible by "
     "expert_tensor(1)*expert(3)"),
    ({"tensor": 2, "context": 2, "pipeline": 2, "expert": 3, "expert_tensor": 1, "order": "tp-cp-ep-dp-pp"}, 16,
     "parallel.expert: tensor(2)*context(2)*data(2)=8 ranks per stage are not divisible by "
     "expert_tensor(1)*expert(3)"),
    ({"tensor": 2, "expert_tensor": 3}, 8,
     "parallel.expert_tensor: tensor(2)*data(4)=8 ranks per stage are not divisible by "
     "expert_tensor(3)*expert(1)"),
    ({"tensor": 2, "weight": 3}, 8,
     "parallel.weight: tensor(2)*data(4)=8 ranks per stage are not divisible by weight(3)"),
    ({"tensor": 2, "context": 2, "order": "tp-cp-dp-pp"}, 10,
     "world_size(10) is not divisible by tensor(2) * context(2) * pipeline(1) = 4"),
    ({"tensor": 2, "context": 2, "data": 3, "order": "tp-cp-dp-pp"}, 16,
     "parallel.data: tensor(2) * context(2) * pipeline(1) * data(3) = 12 != world_size(16)"),
    ({"tensor": 2, "context": 2, "zero1": 3, "order": "tp-cp-dp-pp"}, 16,
     "parallel.zero1(3) must divide data(4)*context(2)=8; allowed: 1, 2, 4, 8"),
    ({"tensor": 2, "weight": 2, "zero1": 3}, 16,
     "parallel.zero1(3) must divide weight_data(8); allowed: 1, 2, 4, 8"),
    ({"context": 2}, 8, "parallel.order 'tp-pp-dp' has no cp but context(2) > 1; put cp in the order, "
                        "e.g. 'tp-cp-pp-dp'"),
])
def test_errors_show_the_arithmetic_and_name_the_key(parallel, world, message):
    cfg = load_config({"parallel": parallel}, source="job.yaml")
    with pytest.raises(ConfigError) as info:
        cfg.topology(world)
    assert str(info.value).startswith("job.yaml: ") and message in str(info.value)


@pytest.mark.parametrize("parallel, message", [
    ({"context": 0}, "parallel.context must be a positive integer, got 0"),
    ({"expert": "4"}, "parallel.expert must be a positive integer, got '4'"),
    ({"expert_tensor": True}, "parallel.expert_tensor must be a positive integer, got True"),
    ({"weight": -2}, "parallel.weight must be a positive integer, got -2"),
    ({"virtual_pipeline": 0}, "parallel.virtual_pipeline must be a positive integer, got 0"),
    ({"tensor": 2, "virtual_pipeline": 2}, "parallel.virtual_pipeline(2) needs pipeline > 1"),
    ({"data": "all"}, "parallel.data must be a positive integer, got 'all'"),
    ({"expert_layout": "deepspeed"}, "parallel.expert_layout: 'deepspeed' is not allowed; allowed: "
                                     "'internevo', 'megatron'"),
    ({"order": "tp-cp-cp-dp-pp"}, "must list each of tp, pp, dp exactly once, and may add cp and ep"),
    ({"order": "tp-sp-dp-pp"}, "must list each of tp, pp, dp exactly once"),
    ({"modes": ["tp-wp"]}, "parallel.modes: mode 'tp-wp' mixes axes of different meshes"),
    ({"modes": ["micro_data"]}, "parallel.modes: 'micro_data' is not a built-in mode"),
    ({"modes": ["contxt"]}, "(did you mean 'context'?)"),
    ({"modes": "tp-cp, dp-cp"}, "'tp-cp, dp-cp' is not a built-in mode"),
    ({"modes": {"tp": 1}}, "parallel.modes must be a list of mode names"),
    ({"contxt": 2}, "parallel.contxt: unknown key (did you mean 'context'?)"),
])
def test_bad_values_are_one_config_error(parallel, message):
    with pytest.raises(ConfigError) as info:
        load_config({"parallel": parallel})
    assert message in str(info.value)


def test_validate_cli_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "moe.yaml"
    path.write_text("parallel: {tensor: 2, context: 2, pipeline: 2, expert: 3, expert_tensor: 1, "
                    "order: tp-cp-ep-dp-pp}\n")
    assert main(["validate", str(path), "--world-size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensor(2)*context(2)*data(2)=8 ranks per stage" in err


# ---- pgroups show ----------------------------------------------------------------------------------

def issue_config(tmp_path) -> str:
    path = tmp_path / "moe.yaml"
    path.write_text(ISSUE_YAML)
    return str(path)


def test_show_json_prints_every_built_mode_and_the_meshes(tmp_path, capsys):
    import json

    path = issue_config(tmp_path)
    assert main(["show", path, "--world-size", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = load_config(path)
    topology = cfg.topology(32)
    built = list(make_initializers(default_registry, cfg, topology))
    assert list(out["modes"]) == built
    for mode in built:
        assert out["modes"][mode] == topology.groups(mode), mode
    assert out["order"] == "tp-cp-ep-dp-pp"
    assert out["meshes"]["dense"] == {"axes": ["tp", "cp", "dp", "pp"], "sizes": [2, 2, 4, 2]}
    assert out["meshes"]["expert"] == {"axes": ["etp", "ep", "edp", "pp"], "sizes": [1, 4, 4, 2]}
    assert out["meshes"]["weight"] == {"axes": ["wp", "wdp", "pp"], "sizes": [4, 4, 2]}


@pytest.mark.parametrize("mode, shown_as", [("tp-cp", "tp-cp"), ("cp-tp", "tp-cp"), ("tp-ep-pp", "tp-ep-pp"),
                                            ("embedding", "embedding"), ("context", "cp")])
def test_show_one_mode_built_or_not(tmp_path, capsys, mode, shown_as):
    import json

    path = issue_config(tmp_path)
    assert main(["show", path, "--world-size", "32", "--mode", mode, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["modes"] == {shown_as: load_config(path).topology(32).groups(mode)}
    assert main(["show", path, "--world-size", "32", "--mode", mode, "--rank", "5"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert len(text) == 2 and text[1].split()[0] == shown_as


@pytest.mark.parametrize("mode, needle", [
    ("micro_data", "--mode 'micro_data' is not built by"),
    ("tp-wp", "mixes axes of different meshes"),
])
def test_show_unknown_mode_is_one_line(tmp_path, capsys, mode, needle):
    path = issue_config(tmp_path)
    assert main(["show", path, "--world-size", "32", "--mode", mode]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
