"""What every benchmark script prints, and how it writes its section of ``docs/benchmarks.md``.

One :class:`Report` per run: its :meth:`Report.table` / :meth:`Report.note` print to stdout as
they come (aligned text tables) and are kept; :meth:`Report.finish` writes them as markdown
(a header line with the command, date, machine, torch version and load average, then the notes
and tables) between the script's markers in the file given with ``--markdown FILE``::

    <!-- bench:NAME -->
    ... replaced by every run with --markdown ...
    <!-- /bench:NAME -->

The hand-written prose outside the markers stays. A file without the markers gets the section
appended at its end. Usage::

    parser = argparse.ArgumentParser(...)
    add_markdown_argument(parser)
    args = parser.parse_args(argv)
    report = Report("reshard-plan", argv, markdown=markdown_path(parser, args))
    table = report.table("title", ["world", "seconds"])
    table.add(1024, 0.5)
    report.finish()

Only the standard library: a script's own imports decide whether torch is loaded.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence, TextIO, Union

__all__ = ["Report", "Table", "add_markdown_argument", "markdown_path", "machine", "torch_version",
           "replace_section", "section_markers", "format_cell", "command_line"]


def format_cell(value: object) -> str:
    """A cell as text: a float with 3 decimals, ``None`` as ``-``, anything else ``str()``
    (format a cell yourself for other precisions)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


class Table:
    """Rows under named columns, printed aligned to stdout and kept for markdown.

    ``align`` is one letter per column, ``l`` or ``r`` (default: the first column left, the
    others right). ``stream=True`` prints the heading at once and every row as it is added
    (columns as wide as their heading): for long runs whose rows come minutes apart.
    """

    def __init__(self, title: str, columns: Sequence[str], align: Optional[str] = None,
                 stream: bool = False, out: Optional[TextIO] = None) -> None:
        if align is not None and len(align) != len(columns) or align and set(align) - {"l", "r"}:
            raise ValueError(f"align {align!r}: one of 'l'/'r' per column ({len(columns)} columns)")
        self.title, self.columns = title, [str(c) for c in columns]
        self.align = align or "l" + "r" * (len(columns) - 1)
        self.rows: List[List[str]] = []
        self.stream, self._out = stream, out
        if stream and out is not None:
            print(self._line(self.columns, [len(c) for c in self.columns]) if not title else
                  f"{title}\n{self._line(self.columns, [len(c) for c in self.columns])}", file=out, flush=True)

    def add(self, *cells: object) -> None:
        """One row, one cell per column (see :func:`format_cell`)."""
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells, table {self.title!r} has {len(self.columns)} columns")
        row = [format_cell(c) for c in cells]
        self.rows.append(row)
        if self.stream and self._out is not None:
            print(self._line(row, [len(c) for c in self.columns]), file=self._out, flush=True)

    def _line(self, cells: Sequence[str], widths: Sequence[int]) -> str:
        return " ".join(c.ljust(w) if a == "l" else c.rjust(w)
                        for c, w, a in zip(cells, widths, self.align)).rstrip()

    def text(self) -> str:
        """The title, then the aligned columns (each as wide as its widest cell)."""
        widths = [max([len(h)] + [len(r[i]) for r in self.rows]) for i, h in enumerate(self.columns)]
        lines = [self.title] if self.title else []
        lines += [self._line(self.columns, widths)] + [self._line(r, widths) for r in self.rows]
        return "\n".join(lines)

    def markdown(self) -> str:
        """The title as a paragraph, then a markdown table (``|`` in a cell escaped)."""
        def cells(row: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
        rule = "|" + "|".join("---" if a == "l" else "---:" for a in self.align) + "|"
        lines = [self.title, ""] if self.title else []
        return "\n".join(lines + [cells(self.columns), rule] + [cells(r) for r in self.rows])


def machine() -> str:
    """``CPU model, N cores`` of this machine (``/proc/cpuinfo``'s model name where there is one)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def torch_version() -> str:
    """The installed torch's version, without importing torch when the script has not."""
    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)
    try:
        from importlib.metadata import version
        return version("torch")
    except Exception:  # not installed: the header says so rather than failing the run
        return "not installed"


def section_markers(name: str) -> tuple:
    """The opening and closing markers of section ``name``."""
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with everything between section ``name``'s markers replaced by ``body`` (the
    markers kept); without the markers, the section appended at the end. Raises ``ValueError``
    if a marker appears twice or the closing one before the opening one."""
    opening, closing = section_markers(name)
    counts = text.count(opening), text.count(closing)
    block = f"{opening}\n{body.strip()}\n{closing}"
    if counts == (0, 0):
        return text.rstrip("\n") + "\n\n" + block + "\n"
    start, end = text.find(opening), text.find(closing)
    if counts != (1, 1) or end < start:
        raise ValueError(f"section {name!r}: expected one {opening} before one {closing}, found {counts[0]} "
                         f"and {counts[1]}{' (closing first)' if counts == (1, 1) else ''}")
    return text[:start] + block + text[end + len(closing):]


def add_markdown_argument(parser: argparse.ArgumentParser) -> None:
    """``--markdown FILE``: write this run's section of FILE (usually docs/benchmarks.md)."""
    parser.add_argument("--markdown", metavar="FILE",
                        help="also write this run's tables, with a header (command, date, machine, torch, "
                             "load), between the script's <!-- bench:NAME --> markers of FILE "
                             "(e.g. docs/benchmarks.md); the rest of FILE stays")


def markdown_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[Path]:
    """``--markdown``'s file, checked before the benchmark runs: an existing writable file
    (exit 2 with one line otherwise, through ``parser.error``)."""
    if not getattr(args, "markdown", None):
        return None
    path = Path(args.markdown)
    if not path.is_file():
        parser.error(f"--markdown {args.markdown}: no such file (give an existing markdown file, "
                     "e.g. docs/benchmarks.md)")
    if not os.access(path, os.W_OK):
        parser.error(f"--markdown {args.markdown}: not writable")
    return path


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that reproduces a run of ``bench/<script>`` with ``argv``, less ``--markdown FILE``."""
    kept: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--markdown":
            skip = True
        elif not arg.startswith("--markdown="):
            kept.append(arg)
    return shlex.join([".venv/bin/python", f"bench/{script}", *kept])


class Report:
    """One benchmark run: what it prints, and its markdown section ``name``.

    ``script`` names the file for the header's command (default: ``sys.argv[0]``); ``argv`` are
    the arguments the run was given (default ``sys.argv[1:]``). The start time and load average
    are taken at construction, the end ones by :meth:`finish`.
    """

    def __init__(self, name: str, argv: Optional[Sequence[str]] = None, markdown: Optional[Path] = None,
                 script: Optional[str] = None, out: Optional[TextIO] = None) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
            raise ValueError(f"section name {name!r}: lower-case letters, digits and '-'")
        self.name, self.markdown_file = name, markdown
        self.command = command_line(script or Path(sys.argv[0]).name, sys.argv[1:] if argv is None else argv)
        self.out = out if out is not None else sys.stdout
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.load_start = os.getloadavg()[0]
        self.parts: List[Union[str, Table]] = []

    def note(self, text: str) -> None:
        """A line or paragraph: printed now (after the table before it), a paragraph in the markdown."""
        self._flush()
        print(text, file=self.out, flush=True)
        self.parts.append(text)

    def table(self, title: str, columns: Sequence[str], align: Optional[str] = None,
              stream: bool = False) -> Table:
        """A new table, kept in order with the notes; printed when the next part starts or at
        :meth:`finish` (``stream=True``: row by row, see :class:`Table`)."""
        self._flush()
        table = Table(title, columns, align, stream, self.out if stream else None)
        self.parts.append(table)
        self._pending = None if stream else table
        return table

    _pending: Optional[Table] = None

    def _flush(self) -> None:
        if self._pending is not None:
            print(self._pending.text() + "\n", file=self.out, flush=True)
            self._pending = None

    def header(self, ended: Optional[datetime.datetime] = None, load_end: Optional[float] = None) -> str:
        """The section's first line: the command, the date and time span (UTC), the machine,
        torch, and the load average (1-minute) at the start and at the end."""
        ended = ended or datetime.datetime.now(datetime.timezone.utc)
        load_end = os.getloadavg()[0] if load_end is None else load_end
        span = f"{self.started:%Y-%m-%d %H:%M}" + (f"–{ended:%H:%M}" if f"{ended:%H:%M}" != f"{self.started:%H:%M}"
                                                   or ended.date() != self.started.date() else "") + " UTC"
        return (f"`{self.command}` · {span} · {machine()} · torch {torch_version()} · "
                f"load average {self.load_start:.1f} at the start, {load_end:.1f} at the end")

    def markdown(self, header: Optional[str] = None) -> str:
        """The section's body: the header, then every note and table in order."""
        blocks = [header or self.header()]
        blocks += [part.markdown() if isinstance(part, Table) else part for part in self.parts]
        return "\n\n".join(blocks)

    def finish(self) -> None:
        """Print what is left; with a markdown file, replace this report's section in it."""
        self._flush()
        if self.markdown_file is None:
            return
        path = Path(self.markdown_file)
        path.write_text(replace_section(path.read_text(), self.name, self.markdown()))
        print(f"wrote section bench:{self.name} of {path}", file=sys.stderr)
