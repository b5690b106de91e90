"""The dependency direction, as a test: the pure core never reaches torch.distributed nor a
subsystem, through any chain of imports inside the package.

Read from the sources (AST), not by importing: importing any ``pgroups`` module runs the
package's ``__init__``, which loads the context. A module's closure is every ``pgroups`` module
its imports reach, transitively (the package ``__init__`` files excluded: they only re-export).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pgroups"

#: Rank math, layouts, configs, initializers, the creation checker, the planners and diagnosis:
#: pure decisions, testable without processes at full scale.
PURE_CORE = ["mesh", "topology", "modes", "config", "initializer", "ranks", "errors", "creation", "models",
             "nccl_options", "virtual_pipeline", "reshard.plan.sim", "reshard.plan.network",
             "reshard.plan.schedule", "reshard.plan.scenarios", "reshard.plan.baselines", "reshard.planner", "reshard.plan.types", "reshard.plan.geometry",
             "reshard.plan.rule", "reshard.plan.assembly", "reshard.plan.digest", "reshard.plan.report",
             "reshard.spec.model", "reshard.spec.from_yaml", "reshard.spec.from_module", "reshard.spec.synthetic",
             "comm.isp.schedule", "nettest.diagnosis", "nettest.linkscan", "nettest.verdict", "nettest.judging",
             "nettest.preflight"]
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
