"""The dependency direction, as a test: the pure core never reaches torch.distributed nor a
subsystem, through any chain of imports inside the package.

Read from the sources (AST), not by importing: one process sees every module, whatever an
earlier import loaded. A module's closure is every ``pgroups`` module its imports reach,
transitively (the package ``__init__`` files excluded: they only re-export). The CLI's offline
commands are checked by running them: they must not import torch at all.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pgroups"

#: Rank math, layouts, configs, initializers, the creation checker, the planners and diagnosis:
#: pure decisions, testable without processes at full scale.
PURE_CORE = ["mesh", "topology", "modes", "config", "initializer", "ranks", "errors", "creation", "models",
             "mode_plan", "nccl_options", "virtual_pipeline", "reshard.plan.sim", "reshard.plan.network",
             "reshard.plan.schedule", "reshard.plan.scenarios", "reshard.plan.baselines", "reshard.planner", "reshard.plan.types", "reshard.plan.geometry",
             "reshard.plan.rule", "reshard.plan.assembly", "reshard.plan.digest", "reshard.plan.report",
             "reshard.spec.model", "reshard.spec.from_yaml", "reshard.spec.from_module", "reshard.spec.synthetic",
             "comm.isp.schedule", "nettest.diagnosis", "nettest.linkscan", "nettest.verdict", "nettest.judging",
             "nettest.preflight", "nettest.pacing"]
SUBSYSTEMS = ("comm", "reshard", "nettest")


def module_path(name: str) -> Path:
    path = PACKAGE.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(name: str) -> Set[str]:
    """Absolute names imported by module ``name`` (relative to the package: ``"topology"``, or
    ``"torch.distributed"`` for outside ones, marked with a leading ``!``)."""
    package = name.split(".")[:-1] if not module_path(name).name == "__init__.py" else name.split(".")
    found: Set[str] = set()
    for node in ast.walk(ast.parse(module_path(name).read_text())):
        if isinstance(node, ast.Import):
            found.update("!" + alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add("!" + (node.module or ""))
                continue
            base = package[:len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` / `from .plan import sim`: a module
                child = f"{target}.{alias.name}" if target else alias.name
                found.add(child if module_path(child).exists() else target)
    return {f for f in found if f}


def closure(name: str) -> Dict[str, str]:
    """Every module reachable from ``name`` → the module that imported it first."""
    seen: Dict[str, str] = {name: ""}
    stack = [name]
    while stack:
        current = stack.pop()
        for target in imports_of(current):
            if target.startswith("!") or target in seen or not module_path(target).exists():
                if target.startswith("!") and target not in seen:
                    seen[target] = current
                continue
            seen[target] = current
            stack.append(target)
    return seen


@pytest.mark.parametrize("name", PURE_CORE)
def test_the_pure_core_reaches_no_torch_distributed_and_no_subsystem(name):
    reached = closure(name)
    distributed = [f"{m[1:]} (imported by {by})" for m, by in reached.items() if m.startswith("!torch.distributed")]
    assert not distributed, f"{name} reaches {distributed}"
    if name.split(".")[0] not in SUBSYSTEMS:
        subsystem = [f"{m} (imported by {by})" for m, by in reached.items() if m.split(".")[0] in SUBSYSTEMS]
        assert not subsystem, f"{name} reaches {subsystem}"


def test_the_checker_sees_an_import_chain():
    """The closure follows chains: the context reaches torch.distributed through the backend."""
    assert "!torch.distributed" in closure("context") and "backend" in closure("context")


#: Private torch APIs still used outside pgroups/torch_private.py (each one moves behind it when
#: its module is next changed): none left.
NOT_YET_BEHIND_THE_COMPAT_MODULE: set = set()


def test_private_torch_apis_live_behind_one_module():
    private = ("distributed_c10d._", "torch._C._", "._version")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "torch_private.py" or relative in NOT_YET_BEHIND_THE_COMPAT_MODULE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(marker in code for marker in private) and "``" not in code:
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_test_hooks_are_imported_only_by_the_hook_switch_and_only_inside_it():
    """pgroups.testing (fault injection, the synthetic network) never loads in a plain run: no
    product module imports it at module level, and the one that imports it at all —
    nettest/hooks.py — does so inside the functions that run when PGROUPS_NETTEST_FAULT is set."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("testing/"):
            continue
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [(node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            depth = relative.count("/") + 1   # how many dots reach the package root
            for name in names:
                absolute = name if isinstance(node, ast.Import) or node.level == 0 else (
                    "pgroups." + name if node.level == depth else f"~{name}")
                if absolute.startswith("pgroups.testing") or (isinstance(node, ast.ImportFrom)
                                                             and node.level == depth and name.startswith("testing")):
                    found.append((relative, id(node) in top_level))
    assert found and all(relative == "nettest/hooks.py" and not top for relative, top in found), found


#: Run in a fresh interpreter: each command through pgroups.cli.main, then whether torch was loaded.
OFFLINE_COMMANDS = """
import sys
from pgroups.cli import main
for argv in ([], ["--version"], ["--help"], ["show", "--help"], ["validate", "--help"],
             ["show", "config_examples/parallel.yaml", "--world-size", "16"],
             ["show", "config_examples/rlhf.yaml", "--world-size", "24", "--json"],
             ["validate", "config_examples/parallel.yaml", "--world-size", "16"],
             ["validate", "config_examples/micro_data.yaml", "--world-size", "8"]):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    print(" ".join(argv) or "(none)", code, file=sys.stderr)
print("torch" in sys.modules, "pgroups.context" in sys.modules)
"""


def test_offline_commands_do_not_import_torch():
    """``pgroups`` with no command, ``--version``, ``--help``, ``show`` and ``validate`` (a plain
    config, one with several models, one with a plugin) run without importing torch, nor
    pgroups.context: ``import pgroups`` resolves ``gpc`` / ``ParallelContext`` on first use, and the
    CLI imports an extension (nettest, reshard-plan) only to run its own command."""
    done = subprocess.run([sys.executable, "-c", OFFLINE_COMMANDS], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
    codes = dict(line.rsplit(" ", 1) for line in done.stderr.splitlines() if line.rsplit(" ", 1)[-1].isdigit())
    assert done.returncode == 0 and len(codes) == 9, done.stderr[-2000:]
    assert codes == {**{argv: "0" for argv in codes}, "(none)": "2"}, codes  # no command: usage, exit 2
    assert done.stdout.splitlines()[-1] == "False False", "torch or pgroups.context was imported"


def test_the_lazy_names_are_the_context_and_one_global_context():
    """``from pgroups import gpc, ParallelContext`` load the context on first use; every import of
    ``gpc`` gets the same object; ``dir(pgroups)`` and ``__all__`` list them; an unknown name is
    an AttributeError naming it."""
    script = """
import sys
import pgroups
assert "torch" not in sys.modules
assert {"gpc", "ParallelContext"} <= set(dir(pgroups)) and set(pgroups.__all__) <= set(dir(pgroups))
from pgroups import gpc, ParallelMode
from pgroups.context import ParallelContext
import pgroups as again
assert type(gpc) is ParallelContext and again.gpc is gpc and pgroups.ParallelContext is ParallelContext
assert all(getattr(pgroups, name) is not None for name in pgroups.__all__)
try:
    pgroups.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc), exc
else:
    raise AssertionError("no AttributeError")
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
