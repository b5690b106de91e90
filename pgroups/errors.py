"""Exception types: one per kind of failure a user can act on.

Every message names what was involved (key, mode, group, ranks) and what is allowed.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping, Sequence, Tuple


class PGroupsError(Exception):
    """Base class of every error pgroups raises on purpose."""


class ConfigError(PGroupsError, ValueError):
    """An invalid configuration; raised before any communication happens."""


class UsageError(PGroupsError, ValueError):
    """A command-line argument is invalid (the CLI prints one line and exits 2)."""


class LaunchError(PGroupsError, RuntimeError):
    """The launch environment (torchrun, SLURM, explicit arguments) is incomplete or inconsistent."""


class UnknownModeError(PGroupsError, KeyError):
    """A mode has no registered initializer."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RegistrationError(PGroupsError, ValueError):
    """An initializer was registered twice under one mode, or is not a valid initializer."""


class ModeNotInitializedError(PGroupsError, RuntimeError):
    """A query about a mode (or a context) that was never built."""


class ReshardError(PGroupsError, RuntimeError):
    """A reshard cannot be planned or run: a layout whose shards cannot compute, a broken plan
    invariant, plans that differ between ranks, a failed peer, a checksum mismatch. Raised before
    any communication when the plan is at fault; the destination tensors were not written."""


class GroupTimeoutError(PGroupsError, TimeoutError):
    """A group operation did not finish in time, or lost a peer that died mid-operation (it would
    never finish): names the group, its ranks and (if known) hosts."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""`` if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def allowed(choices: Iterable[str]) -> str:
    """Format a list of allowed values for a message: ``'a', 'b', 'c'``."""
    return ", ".join(repr(c) for c in sorted(choices))


def reject_unknown_keys(data: "Mapping[str, Any]", known: "Sequence[str]", prefix: str = "", where: str = "",
                        nested: "Tuple[str, Sequence[str]]" = ("", ())) -> None:
    """Raise ConfigError for the first key of ``data`` not in ``known``, one line naming it (with
    ``where`` — the file — and ``prefix`` — its path, e.g. ``"parallel."``), a did-you-mean and
    the allowed keys. The one unknown-key rule of every YAML pgroups reads.

    ``nested = (block, its keys)``: a key that belongs inside that block (a top-level
    ``nettest:``, or a near miss of one such as ``tensr``) is pointed there
    (``did you mean 'parallel.nettest'?``) unless it is closer to one of ``known``."""
    block, inner = nested
    for key in data:
        if key not in known:
            hint = did_you_mean(str(key), known)
            inside = difflib.get_close_matches(str(key), list(inner), n=1, cutoff=0.8)
            if inside and (inside[0] == key or not hint):
                hint = f" (did you mean {prefix + block + '.' + inside[0]!r}? it belongs under {block}:)"
            raise ConfigError(f"{where}{prefix}{key}: unknown key{hint}; allowed: {allowed(known)}")
