"""Progress lines for commands that run longer than a few seconds (on stderr; ``-q`` silences them).

One helper for every command: ``pgroups run``, ``pgroups validate``, ``pgroups nettest``. A line
reads ``[LABEL  12.3s] what is happening``, the seconds counted from when the command started
(``started``, a :func:`time.monotonic` reading: on Linux it is system-wide, so a child process
continues its parent's clock). On a terminal it is one line rewritten in place; elsewhere (a log,
a pipe) a new line at most every ``interval_s`` seconds, so logs stay short.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO, Union


class Progress:
    """A command's progress display on ``stream`` (default: stderr at the time of each write)."""

    def __init__(self, label: str = "pgroups", stream: Optional[TextIO] = None, interval_s: float = 5.0,
                 started: Optional[float] = None) -> None:
        self.label = label
        self._stream = stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if not self.tty else 0.1
        self.started = time.monotonic() if started is None else started
        self._last = -1e9
        self._width = 0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def update(self, text: str, force: bool = False) -> None:
        """Show ``text`` — unless the last line is younger than ``interval_s`` and not ``force``
        (a phase change worth a line of its own)."""
        now = time.monotonic()
        if now - self._last < self.interval_s and not force:
            return
        self._last = now
        line = f"[{self.label} {now - self.started:6.1f}s] {text}"
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        """Clear a terminal's rewritten line (a log keeps its lines)."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class NullProgress:
    """The display of a quiet command (``-q``) or of a rank that does not report: says nothing."""

    def update(self, text: str, force: bool = False) -> None:
        pass

    def done(self) -> None:
        pass


AnyProgress = Union[Progress, NullProgress]


def progress_for(label: str, quiet: bool, started: Optional[float] = None) -> AnyProgress:
    """The display a command uses: silent when ``quiet``, else lines on stderr labelled ``label``."""
    return NullProgress() if quiet else Progress(label, started=started)
