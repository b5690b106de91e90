"""Packaging claims that a user relies on: metadata in pyproject.toml (PEP 621), a real Python
floor that the sources compile on, the Apache-2.0 license text, the `plot` extra, py.typed."""
from __future__ import annotations

import configparser
import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def floor() -> tuple:
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", PROJECT["requires-python"])
    assert match, f"requires-python should be a plain floor, got {PROJECT['requires-python']!r}"
    return int(match.group(1)), int(match.group(2))


def test_metadata_is_in_pyproject_and_setup_cfg_holds_none():
    assert PROJECT["name"] == "pgroups" and "version" in PROJECT["dynamic"]
    assert any(d.startswith("torch") for d in PROJECT["dependencies"])
    assert PROJECT["scripts"]["pgroups"] == "pgroups.cli:main"
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert (ROOT / "setup.cfg").exists() and cfg.sections() == []


def test_python_floor_is_310_and_classifiers_start_there():
    # importlib.metadata.entry_points(group=...), which plugin discovery uses, is new in 3.10.
    assert floor() == (3, 10)
    versions = sorted(tuple(map(int, c.rsplit(":: ", 1)[1].split(".")))
                      for c in PROJECT["classifiers"] if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert versions and versions[0] == floor()
    assert (sys.version_info.major, sys.version_info.minor) in versions  # the tested version is claimed


def _interpreter(version: tuple):
    name = "python%d.%d" % version
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    candidates = [shutil.which(name)] + sorted(p for r in roots if r for p in glob.glob(f"{r}/versions/{version[0]}.{version[1]}.*/bin/{name}"))
    for path in filter(None, candidates):
        done = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == str(version):
            return path
    return None


@pytest.mark.timeout(120)
def test_sources_compile_on_the_floor_interpreter():
    """Syntax newer than the floor (``except*``, PEP 695 generics, …) would break installs there.
    torch has no CPU wheel for the floor on this machine, so the floor runs the compiler only."""
    python = _interpreter(floor())
    if python is None:
        pytest.skip("no Python %d.%d interpreter installed here" % floor())
    script = ("import pathlib, sys\n"
              "bad = []\n"
              "for folder in sys.argv[1:]:\n"
              "    for path in sorted(pathlib.Path(folder).rglob('*.py')):\n"
              "        try: compile(path.read_text(), str(path), 'exec', dont_inherit=True)\n"
              "        except SyntaxError as exc: bad.append(f'{path}:{exc.lineno}: {exc.msg}')\n"
              "print('\\n'.join(bad)); sys.exit(bool(bad))\n")
    done = subprocess.run([python, "-c", script, str(ROOT / "pgroups"), str(ROOT / "initializers")],
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr


def test_license_is_the_apache_2_text():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a one-line notice


def test_plot_extra_and_py_typed_ship():
    assert any(d.startswith("matplotlib") for d in PROJECT["optional-dependencies"]["plot"])
    assert (ROOT / "pgroups" / "py.typed").exists()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["pgroups"]


def test_installed_metadata_says_the_same():
    meta = importlib.metadata.metadata("pgroups")
    assert meta["Requires-Python"] == PROJECT["requires-python"]
    assert meta["License-Expression"] == "Apache-2.0"
    assert "plot" in meta.get_all("Provides-Extra")


def test_every_subpackage_is_listed_for_installation():
    """A sub-package missing from [tool.setuptools] packages works in the editable checkout and
    is absent from the wheel: list them all."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"pgroups." + ".".join(p.parent.relative_to(ROOT / "pgroups").parts)
               for p in (ROOT / "pgroups").rglob("__init__.py") if p.parent != ROOT / "pgroups"}
    on_disk |= {"pgroups", "pgroups.initializers"}
    assert set(setuptools["packages"]) == on_disk


def _setup_copy(tmp_path: Path) -> Path:
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "setup", tmp_path / ".ci" / "setup")
    return tmp_path / ".ci" / "setup"


@pytest.mark.timeout(120)
def test_setup_refuses_a_python_that_cannot_run_the_package(tmp_path):
    """.ci/setup never builds a venv on an interpreter below the floor: one line naming what it
    found, exit 1, no .venv."""
    setup = _setup_copy(tmp_path)
    candidates = [("no-such-python3", "no-such-python3: not runnable")]
    old = _interpreter((3, 9))
    if old is not None:
        candidates.append((old, f"{old}: 3.9."))
    for python, found in candidates:
        done = subprocess.run(["bash", str(setup)], capture_output=True, text=True, timeout=100,
                              env={**os.environ, "PYTHON": python})
        assert done.returncode == 1, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pgroups setup: error: no Python >= 3.10 found ("), lines
        assert found in lines[0]
        assert not (tmp_path / ".venv").exists()


PLAIN_CHECKOUT_SCRIPT = """
import sys
import pgroups, pgroups.initializers
from pgroups import ParallelContext, load_config
from pgroups.context import make_initializers
from pgroups.initializer import default_registry
from pgroups.modes import BUILTIN_MODE_NAMES
assert pgroups.__file__.startswith(sys.argv[1]) and pgroups.initializers.__file__.startswith(sys.argv[1])
modes = [m for m in BUILTIN_MODE_NAMES if m not in ("global", "weight", "weight_data")]
cfg = load_config({"parallel": {"tensor": 2, "pipeline": 2, "context": 2, "expert": 2,
                                "order": "tp-cp-ep-dp-pp", "modes": modes}})
topology = cfg.topology(32)
built = {name: init.rank_groups(topology) for name, init in make_initializers(default_registry, cfg, topology).items()}
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=32)
ctx = ParallelContext().init_from_config(cfg)
print(len(built), ctx.get_ranks_in_group("tensor"))
"""


def test_a_plain_checkout_builds_every_builtin_mode(tmp_path):
    """PYTHONPATH=<checkout> on a node without an install: no site (no editable finder), a copy
    of the tracked files, and only the dependencies' own folders on the path."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name.startswith(("pgroups/", "initializers/")):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, tmp_path / name)
    import attrs, numpy, torch, yaml  # noqa: E401 — where the dependencies live
    deps = {str(Path(m.__file__).resolve().parents[1]) for m in (attrs, numpy, torch, yaml)}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sorted(deps)]))
    result = subprocess.run([sys.executable, "-S", "-c", PLAIN_CHECKOUT_SCRIPT, str(tmp_path)], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    count, ranks = result.stdout.split(maxsplit=1)
    assert int(count) > 10 and ranks.strip() == "[4, 5]"
