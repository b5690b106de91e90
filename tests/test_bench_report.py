"""Benchmark scripts write their own sections of docs/benchmarks.md (``bench/_report.py``).

The helper's pure parts (section replacement, tables, the reproducing command) are checked on
hand-written inputs; then every benchmark script runs at its smallest size with ``--markdown``
into a copy of the doc it writes, and the copy must have that section replaced (a header with
the command, date, machine, torch and load; the old figures gone) and nothing else changed.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _report import (Report, Table, command_line, markdown_path, add_markdown_argument,  # noqa: E402
                     replace_section)

# script -> (smallest arguments, the doc it writes, its section). Each run costs a torch import
# plus seconds of work on this 2-core machine.
RUNS = {
    "bench_isp.py": (["--nproc", "2", "--dim", "64", "--ffn", "128", "--layers", "2", "--seq", "16", "--vocab", "64",
                      "--warmup", "1", "--steps", "1"], "docs/benchmarks.md", "isp"),
    "bench_groups.py": (["--fake-only", "--worlds", "128", "--repeats", "1", "--layouts", "classic"],
                        "docs/benchmarks.md", "groups"),
    "bench_models.py": (["--world", "64", "--repeats", "1"], "docs/models.md", "models"),
    "bench_creation_meeting.py": (["--worlds", "8", "--steps", "1", "--procs", "2"], "docs/benchmarks.md",
                                  "creation-meeting"),
    "bench_nettest.py": (["--scale", "--hosts", "8"], "docs/benchmarks.md", "nettest-scale"),
    "bench_reshard_plan.py": (["--worlds", "32", "--ranks", "2", "--full-max", "32"], "docs/benchmarks.md",
                              "reshard-plan"),
    "bench_reshard_sim.py": (["--worlds", "64", "--layers-per-stage", "1", "--pairs", "dense-tp4", "--compare"],
                             "docs/benchmarks.md", "reshard-sim"),
}
# script -> why the test does not run it
NOT_RUN = {
    "bench_reshard.py": "its layouts (tensor 4 x pipeline 2) need 8 gloo ranks: 8 torch imports, about 15 CPU-s "
                        "on this machine at its smallest model",
    "bench_nettest_control.py": "every emulated rank measures for 0.5-2.5 s and rank 0 thinks for 1 s, in worker "
                                "processes of a forkserver: 49 s wall for 64 ranks in 4 processes at load 44",
}

HEADER = re.compile(r"^`\.venv/bin/python bench/(?P<script>\S+)[^`]*` · \d{4}-\d\d-\d\d \d\d:\d\d(–\d\d:\d\d)? UTC"
                    r" · .+, \d+ cores · torch \S+ · load average \d+\.\d at the start, \d+\.\d at the end$",
                    re.MULTILINE)


def test_replace_section_replaces_only_between_the_markers():
    text = "intro\n<!-- bench:a -->\nold a\n<!-- /bench:a -->\nmiddle\n<!-- bench:b -->\nold b\n<!-- /bench:b -->\nend\n"
    assert replace_section(text, "a", "new a") == text.replace("old a", "new a")
    assert replace_section(text, "b", "\nnew b\n\n") == text.replace("old b", "new b")


def test_replace_section_appends_a_missing_section():
    assert replace_section("intro\n\n", "c", "body") == "intro\n\n<!-- bench:c -->\nbody\n<!-- /bench:c -->\n"


@pytest.mark.parametrize("text, found", [
    ("<!-- bench:a -->\nx\n<!-- /bench:a -->\n<!-- bench:a -->\n<!-- /bench:a -->", "found 2 and 2"),
    ("<!-- /bench:a -->\nx\n<!-- bench:a -->", "closing first"),
    ("<!-- bench:a -->\nx\n", "found 1 and 0"),
])
def test_replace_section_refuses_ambiguous_markers(text, found):
    with pytest.raises(ValueError, match=found):
        replace_section(text, "a", "new")


def test_table_prints_aligned_text_and_a_markdown_table():
    table = Table("title", ["name", "seconds"])
    table.add("long name", 1.5)
    table.add("x", None)
    assert table.text() == "title\nname      seconds\nlong name   1.500\nx               -"
    assert table.markdown() == ("title\n\n| name | seconds |\n|---|---:|\n| long name | 1.500 |\n| x | - |")
    with pytest.raises(ValueError, match="3 cells.*2 columns"):
        table.add(1, 2, 3)


def test_cells_with_a_pipe_are_escaped_in_markdown():
    table = Table("", ["a"])
    table.add("x | y")
    assert table.markdown().splitlines()[-1] == "| x \\| y |"


def test_the_command_leaves_out_the_markdown_file():
    assert command_line("b.py", ["--worlds", "8", "--markdown", "docs/x.md", "-n", "2"]) == \
        ".venv/bin/python bench/b.py --worlds 8 -n 2"
    assert command_line("b.py", ["--markdown=docs/x.md"]) == ".venv/bin/python bench/b.py"


def test_report_writes_header_notes_and_tables_in_order(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("# t\n\n<!-- bench:demo -->\nold\n<!-- /bench:demo -->\n\nprose\n")
    report = Report("demo", ["--n", "1"], doc, script="bench_demo.py")
    report.note("a note")
    report.table("rows", ["k", "v"]).add("a", 2)
    report.note("after")
    report.finish()
    text = doc.read_text()
    body = text.split("<!-- bench:demo -->\n")[1].split("\n<!-- /bench:demo -->")[0]
    header, *parts = body.split("\n\n")
    assert HEADER.match(header) and "bench_demo.py --n 1`" in header
    assert parts == ["a note", "rows", "| k | v |\n|---|---:|\n| a | 2 |", "after"]
    assert text.endswith("\n\nprose\n") and "old" not in text
    assert capsys.readouterr().out == "a note\nrows\nk v\na 2\n\nafter\n"  # in the order they were added


def test_a_missing_markdown_file_is_a_usage_error(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="bench_x.py")
    add_markdown_argument(parser)
    with pytest.raises(SystemExit) as exited:
        markdown_path(parser, parser.parse_args(["--markdown", str(tmp_path / "none.md")]))
    assert exited.value.code == 2
    assert "--markdown" in capsys.readouterr().err.splitlines()[-1]


def _outside(text: str, section: str) -> str:
    opening, closing = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    return text[:text.index(opening)] + text[text.index(closing):]


def _inside(text: str, section: str) -> str:
    opening, closing = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    return text[text.index(opening) + len(opening):text.index(closing)]


@pytest.mark.parametrize("script", sorted(RUNS))
def test_every_bench_script_writes_its_section(script, tmp_path):
    args, doc, section = RUNS[script]
    copy = tmp_path / Path(doc).name
    shutil.copy(ROOT / doc, copy)
    before = copy.read_text()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--markdown", str(copy)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    after = copy.read_text()
    assert _outside(after, section) == _outside(before, section), "text outside the section changed"
    body = _inside(after, section)
    found = HEADER.search(body)
    assert found and found.group("script") == script, body[:300]
    assert " ".join(args) in found.group(0)
    assert body != _inside(before, section) and "|---" in body


def test_every_bench_script_is_run_or_says_why_not():
    scripts = {p.name for p in (ROOT / "bench").glob("bench_*.py")}
    assert scripts <= set(RUNS) | set(NOT_RUN), sorted(scripts - set(RUNS) - set(NOT_RUN))
