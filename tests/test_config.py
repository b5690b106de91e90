"""Config: every invalid input is one ConfigError naming source, key, value and what is allowed;
the CLI turns each into exit 2 with one line on stderr, never a traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pgroups import Config, ConfigError, ParallelConfig, load_config
from pgroups.cli import default_config_path, main

REPO = Path(__file__).resolve().parents[1]


# ---- loading -------------------------------------------------------------------------------------

def test_defaults():
    cfg = load_config({})
    assert cfg == Config()
    assert cfg.parallel == ParallelConfig(tensor=1, pipeline=1, data=None, zero1=None, nettest=32,
                                          order="tp-pp-dp")
    assert (cfg.backend, cfg.timeout_s, cfg.groups, cfg.cpu_groups, cfg.strategy) == (
        "auto", 1800.0, "eager", "lazy", "auto")
    topology = cfg.topology(8)
    assert (topology.data, topology.zero1, topology.nettest) == (8, 8, 32)


FULL_YAML = """
parallel:
  tensor: 2
  pipeline: 2
  data: 4
  zero1: 2
  nettest: 8
  order: tp-dp-pp
backend: gloo
timeout_s: 30
groups: lazy
cpu_groups: eager
strategy: all
"""


def test_yaml_string_dict_and_file_load_the_same(tmp_path):
    path = tmp_path / "parallel.yaml"
    path.write_text(FULL_YAML)
    from_string = load_config(FULL_YAML)
    from_file = load_config(str(path))
    from_pathlike = load_config(path)
    import yaml

    from_dict = load_config(yaml.safe_load(FULL_YAML))
    assert from_string == from_file == from_pathlike == from_dict
    assert from_file.source == str(path)
    assert load_config(from_file) is from_file
    assert from_file.parallel == ParallelConfig(2, 2, 4, 2, 8, "tp-dp-pp")
    assert (from_file.backend, from_file.timeout_s, from_file.groups, from_file.cpu_groups,
            from_file.strategy) == ("gloo", 30.0, "lazy", "eager", "all")


def test_single_line_yaml_string():
    assert load_config("{parallel: {tensor: 4}}").parallel.tensor == 4


def test_cpu_groups_off_written_bare_in_yaml():
    """YAML 1.1 reads a bare ``off`` as False; the documented spelling must still work."""
    assert load_config("cpu_groups: off\n").cpu_groups == "off"
    assert load_config("cpu_groups: 'off'\n").cpu_groups == "off"


def test_empty_file_is_the_default_config(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(str(path)) == Config()


def test_bundled_default_config_is_valid():
    cfg = load_config(default_config_path())
    topology = cfg.topology(8)
    assert (topology.tensor, topology.pipeline, topology.data, topology.zero1, topology.nettest) == (
        2, 2, 2, 2, 4)


def test_golden_example_config_shows_the_golden_layout(capsys):
    path = REPO / "config_examples" / "golden16.yaml"
    assert main(["show", str(path), "--world-size", "16", "--json"]) == 0
    modes = json.loads(capsys.readouterr().out)["modes"]
    assert modes["dp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert modes["zero1"] == [[0, 4], [8, 12], [1, 5], [9, 13], [2, 6], [10, 14], [3, 7], [11, 15]]
    assert modes["nettest"] == [list(range(8)), list(range(8, 16))]


# ---- every ConfigError path ---------------------------------------------------------------------

BAD = [
    # (config text, world size or None, substrings the one-line message must contain)
    ("paralel:\n  tensor: 2\n", None, ["paralel: unknown key", "did you mean 'parallel'", "allowed:"]),
    ("parallel:\n  tensr: 2\n", None, ["parallel.tensr: unknown key", "did you mean 'tensor'"]),
    ("timeout: 3\n", None, ["timeout: unknown key", "did you mean 'timeout_s'"]),
    ("parallel:\n  tensor: '2'\n", None, ["parallel.tensor must be a positive integer", "'2'"]),
    ("parallel:\n  tensor: 2.0\n", None, ["parallel.tensor must be a positive integer", "2.0"]),
    ("parallel:\n  pipeline: [2]\n", None, ["parallel.pipeline must be a positive integer", "[2]"]),
    ("parallel:\n  tensor: null\n", None, ["parallel.tensor must be a positive integer", "None"]),
    ("parallel:\n  tensor: true\n", None, ["parallel.tensor must be a positive integer", "True"]),
    ("parallel:\n  zero1: false\n", None, ["parallel.zero1 must be a positive integer", "False"]),
    ("parallel:\n  tensor: 0\n", None, ["parallel.tensor must be a positive integer", "got 0"]),
    ("parallel:\n  pipeline: -2\n", None, ["parallel.pipeline must be a positive integer", "-2"]),
    ("parallel:\n  data: 0\n", None, ["parallel.data must be a positive integer", "got 0"]),
    ("parallel:\n  nettest: 0\n", None, ["parallel.nettest must be a positive integer", "got 0"]),
    ("parallel:\n  data: 4\n  zero1: 3\n", None, ["parallel.zero1(3) must divide data(4)"]),
    ("parallel:\n  tensor: 2\n  zero1: 3\n", 16, ["parallel.zero1(3) must divide data(8)", "allowed: 1, 2, 4, 8"]),
    ("parallel:\n  tensor: 2\n  data: 3\n", 16, ["parallel.data", "tensor(2) * pipeline(1) * data(3) = 6 != world_size(16)"]),
    ("parallel:\n  tensor: 3\n", 16, ["world_size(16) is not divisible by tensor(3) * pipeline(1) = 3"]),
    ("parallel:\n  order: tp-pp\n", None, ["parallel.order 'tp-pp'", "tp, pp, dp exactly once"]),
    ("parallel:\n  order: 3\n", None, ["parallel.order must be a string", "3"]),
    ("parallel: 5\n", None, ["parallel must be a mapping", "5"]),
    ("parallel: []\n", None, ["parallel must be a mapping", "[]"]),
    ("backend: mpi\n", None, ["backend: 'mpi' is not allowed", "'auto', 'gloo', 'nccl'"]),
    ("strategy: fast\n", None, ["strategy: 'fast' is not allowed", "'all', 'auto', 'local', 'split'"]),
    ("cpu_groups: sometimes\n", None, ["cpu_groups: 'sometimes' is not allowed", "'eager', 'lazy', 'off'"]),
    ("cpu_groups: on\n", None, ["cpu_groups: True is not allowed", "'eager', 'lazy', 'off'"]),
    ("groups: now\n", None, ["groups: 'now' is not allowed", "'eager', 'lazy'"]),
    ("timeout_s: 0\n", None, ["timeout_s must be a positive number of seconds", "got 0"]),
    ("timeout_s: -1\n", None, ["timeout_s must be a positive number", "-1"]),
    ("timeout_s: true\n", None, ["timeout_s must be a positive number", "True"]),
    ("timeout_s: soon\n", None, ["timeout_s must be a positive number", "'soon'"]),
    ("timeout_s: .inf\n", None, ["timeout_s", "inf"]),
    ("timeout_s: 1.0e+300\n", None, ["timeout_s", "1e+300"]),
    ("extra_modes: 3\n", None, ["extra_modes must map mode names to option mappings", "3"]),
    ("extra_modes:\n  micro_data: 2\n", None, ["extra_modes.micro_data must be a mapping of options", "2"]),
    ("plugins: [3]\n", None, ["plugins must be a list of module names or .py paths", "[3]"]),
    ("plugins: [no_such_plugin_module]\n", 8, ["plugins: cannot import 'no_such_plugin_module'"]),
    ("plugins: [missing_plugin.py]\n", 8, ["plugins: file", "missing_plugin.py", "not found"]),
    ("- tensor\n- 2\n", None, ["the config must be a mapping", "got list"]),
    ("parallel:\n  tensor: [2\n", None, ["malformed YAML at line 3", "column 1"]),
    ("parallel:\n  tensor: 2\n tensor: 4\n", None, ["malformed YAML at line 3"]),
    ("parallel: !!python/object:os.system {}\n", None, ["malformed YAML at line 1"]),
    ("parallel:\n  tensor: 2\n  pipeline: 2\n  tensor: 4\n", None,
     ["duplicate key 'tensor' at line 4 (first given at line 2)"]),
    ("backend: gloo\nparallel: {tensor: 2}\nbackend: nccl\n", None, ["duplicate key 'backend' at line 3 (first given at line 1)"]),
    ("extra_modes:\n  nosuch: {}\n", 8, ["extra_modes.nosuch", "no initializer is registered for mode 'nosuch'",
                                        "known modes:"]),
    ("extra_modes:\n  tensor: {}\n", 8, ["extra_modes.tensor", "built-in modes are always built"]),
]


def _ids(case):
    return case[0].strip().replace("\n", "|")[:40]


@pytest.mark.parametrize("text, world, needles", BAD, ids=[_ids(c) for c in BAD])
def test_bad_config_file_is_one_config_error_naming_the_file(tmp_path, text, world, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        _load_and_layout(str(path), world)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("text, world, needles", BAD, ids=[_ids(c) for c in BAD])
def test_cli_validate_exits_2_with_one_line(tmp_path, capsys, text, world, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    argv = ["validate", str(path)] + (["--world-size", str(world)] if world else [])
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"pgroups validate: error: {path}: ")
    assert "Traceback" not in err
    assert needles[0] in err


def _load_and_layout(path, world):
    from pgroups.cli import offline_layout

    cfg = load_config(path)
    if world is not None:
        offline_layout(cfg, world)
    return cfg


def test_yaml_string_errors_name_the_string_source():
    with pytest.raises(ConfigError, match=r"^<yaml string>: parallel.tensr: unknown key"):
        load_config("parallel: {tensr: 2}")
    with pytest.raises(ConfigError, match=r"^<yaml string>: malformed YAML at line 3, column 2"):
        load_config("parallel:\n  tensor: 2\n pipeline: 2\n")


def test_yaml_merge_keys_may_still_be_overridden():
    # `<<` merges defaults that the mapping then overrides: not a duplicate key
    cfg = load_config("parallel: {<<: {tensor: 2, pipeline: 2}, tensor: 1}\n")
    assert (cfg.parallel.tensor, cfg.parallel.pipeline) == (1, 2)


def test_dict_errors_name_the_key_and_an_explicit_source():
    with pytest.raises(ConfigError, match=r"^parallel.pipeline must be a positive integer, got 0$"):
        load_config({"parallel": {"pipeline": 0}})
    with pytest.raises(ConfigError, match=r"^job.yaml: backend: 'mpi' is not allowed"):
        load_config({"backend": "mpi"}, source="job.yaml")


def test_not_a_config_at_all():
    with pytest.raises(ConfigError, match="got int"):
        load_config(42)


def test_unreadable_files(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=rf"^{missing}: cannot read config file: No such file"):
        load_config(str(missing))
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot read config file"):
        load_config(tmp_path)  # a directory
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00parallel")
    with pytest.raises(ConfigError, match=rf"^{binary}: cannot read config file"):
        load_config(str(binary))


def test_cli_validate_unreadable_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    _, err = capsys.readouterr()
    assert err == f"pgroups validate: error: {tmp_path / 'nope.yaml'}: cannot read config file: " \
                  "No such file or directory\n"


def test_cli_validate_ok(tmp_path, capsys):
    path = tmp_path / "ok.yaml"
    path.write_text(FULL_YAML)
    assert main(["validate", str(path)]) == 0
    assert main(["validate", str(path), "--world-size", "16"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"{path}: ok" in out and "world 16 = tensor 2 x pipeline 2 x data 4" in out


def test_cli_bad_argument_values_are_usage_errors(tmp_path, capsys):
    path = tmp_path / "golden.yaml"
    path.write_text("parallel: {tensor: 2, pipeline: 2}\n")
    for argv, needle in ((["show", str(path), "-n", "16", "--rank", "-1"], "--rank -1 is outside 0..15"),
                         (["run", "--nproc", "0"], "--nproc must be at least 1, got 0")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


def test_a_bug_inside_a_command_is_not_reported_as_a_usage_error(tmp_path, monkeypatch):
    """A ValueError pgroups did not raise on purpose is a bug: the traceback shows, exit 1."""
    import pgroups.cli

    def broken(config, world_size):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(pgroups.cli, "offline_layout", broken)
    path = tmp_path / "golden.yaml"
    path.write_text("parallel: {tensor: 2}\n")
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["show", str(path), "-n", "4"])
    script = ("import sys, pgroups.cli as cli\n"
              "def broken(*a): raise ValueError('an internal invariant broke')\n"
              "cli.offline_layout = broken\n"
              f"sys.exit(cli.main(['show', {str(path)!r}, '-n', '4']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr and "an internal invariant broke" in done.stderr


def test_cli_usage_errors_are_one_line(capsys):
    for argv in ([], ["validate"], ["show", "x.yaml"], ["show", "x.yaml", "-n", "four"], ["frobnicate"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        _, err = capsys.readouterr()
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, (argv, err)


def test_cli_show_json_format(tmp_path, capsys):
    path = tmp_path / "golden.yaml"
    path.write_text("parallel: {tensor: 2, pipeline: 2, zero1: 2, nettest: 8}\n")
    assert main(["show", str(path), "--world-size", "16", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown) == ["world_size", "order", "meshes", "modes"]
    assert shown["world_size"] == 16 and shown["order"] == "tp-pp-dp"
    assert set(shown["modes"]) == {"global", "tp", "pp", "dp", "tp-pp", "zero1", "nettest"}
    assert shown["modes"]["pp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert shown["modes"]["zero1"] == [[0, 4], [8, 12], [1, 5], [9, 13], [2, 6], [10, 14], [3, 7], [11, 15]]
    assert shown["modes"]["nettest"] == [list(range(8)), list(range(8, 16))]


def test_cli_show_one_rank_and_text(tmp_path, capsys):
    path = tmp_path / "golden.yaml"
    path.write_text("parallel: {tensor: 2, pipeline: 2}\n")
    assert main(["show", str(path), "-n", "16", "--rank", "5", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["modes"]["tp"] == [[4, 5]] and shown["modes"]["dp"] == [[1, 5, 9, 13]]
    assert main(["show", str(path), "-n", "16"]) == 0
    out = capsys.readouterr().out
    assert "world 16 = tensor 2 x pipeline 2 x data 4" in out
    assert "[0,2] [1,3]" in out
    assert main(["show", str(path), "-n", "16", "--rank", "16"]) == 2
    assert "outside 0..15" in capsys.readouterr().err


def test_python_dash_m_validate_one_line_no_traceback(tmp_path):
    """The real console path (a fresh interpreter): exit 2, one stderr line, nothing on stdout."""
    path = tmp_path / "bad.yaml"
    path.write_text("parallel:\n  tensor: [2\n")
    proc = subprocess.run([sys.executable, "-m", "pgroups", "validate", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "malformed YAML at line 3" in proc.stderr
