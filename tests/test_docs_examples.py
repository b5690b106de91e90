"""Every example marked runnable in README.md and docs/ runs as written, and what the docs
point to exists.

A fenced block preceded by an HTML comment ``<!-- example: KIND -->`` is run:

- ``python``: the block as a script, from the repository root;
- ``torchrun N``: the block as a script under ``torch.distributed.run`` with N local gloo ranks;
- ``shell``: each command line of the block with bash, ``.venv/bin`` first on PATH (as after
  ``source .venv/bin/activate``), from the repository root.

Blocks without the comment are illustrations (a cluster launch, a fragment of a config).
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

from pgroups.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE = re.compile(r"<!-- example: ([a-z]+)(?: (\d+))? -->\n```[a-z]*\n(.*?)```", re.S)


def examples() -> List[Tuple[str, str, int, str]]:
    """(page, kind, ranks, code) of every runnable example."""
    found = []
    for page in PAGES:
        for match in EXAMPLE.finditer(page.read_text()):
            found.append((page.relative_to(ROOT).as_posix(), match.group(1), int(match.group(2) or 0), match.group(3)))
    return found


def example_id(example) -> str:
    page, kind, _, code = example
    return f"{page}:{kind}:{code.strip().splitlines()[0][:40]}"


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_the_pages_hold_runnable_examples_of_every_kind():
    kinds = {kind for _, kind, _, _ in examples()}
    assert {"torchrun", "shell"} <= kinds, kinds


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("example", examples(), ids=example_id)
def test_example_runs_as_written(example, tmp_path):
    page, kind, ranks, code = example
    script = tmp_path / "example.py"
    script.write_text(code)
    if kind == "python":
        command = [sys.executable, str(script)]
    elif kind == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node-rank", "0",
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--nproc-per-node", str(ranks),
                   str(script)]
    elif kind == "shell":
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        pytest.fail(f"{page}: unknown example kind {kind!r} (python, torchrun N, shell)")
    run = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, f"{page} example exits {run.returncode}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"


def test_the_quick_start_is_the_shipped_script():
    quick = [code for page, kind, _, code in examples() if page == "README.md" and code.startswith("# quickstart.py")]
    assert quick == [(ROOT / "config_examples" / "quickstart.py").read_text()]


def test_every_shipped_file_the_pages_name_exists():
    named = {m for page in PAGES for m in re.findall(r"\b((?:config_examples|bench|tests|docs)/[\w./-]+\.(?:py|yaml|md|sh))",
                                                      page.read_text())}
    assert named, "the pages name no shipped file"
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"the pages name files that are not shipped: {missing}"


def test_every_test_the_guarantee_table_names_exists():
    table = ROOT.joinpath("README.md").read_text().split("## Guarantees and what guards them", 1)[1].split("\n## ", 1)[0]
    cited = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", table)
    assert len(cited) >= 15, cited
    missing = []
    for path, name in cited:
        source = ROOT / path
        if not source.exists():
            missing.append(path)
        elif name and name not in {n.name for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.FunctionDef)}:
            missing.append(f"{path}::{name}")
    assert not missing, f"the guarantee table cites tests that do not exist: {missing}"


def test_the_readme_reads_in_five_minutes_and_links_every_page():
    readme = ROOT.joinpath("README.md").read_text()
    assert len(readme.splitlines()) <= 250, "README.md over 250 lines: move the detail to docs/"
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages and not sorted(p for p in pages if f"docs/{p}" not in readme), "docs pages the README does not link"
