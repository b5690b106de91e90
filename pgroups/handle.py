"""A group handle: everything about this rank's group of one mode, in one immutable object.

``gpc.group("tp")`` answers what ``get_group``, ``get_cpu_group``, ``get_ranks_in_group``,
``get_group_rank`` and ``get_world_size`` answer separately — as torch's DeviceMesh answers for a
dimension — plus the device its tensors live on and a label for messages.
"""
from __future__ import annotations

from typing import Optional, Tuple

import attrs
import torch

from .ranks import format_ranks


@attrs.frozen(eq=False)
class GroupHandle:
    """This rank's group of ``mode``.

    ``group``: the device group (NCCL on GPUs, gloo on CPU); ``cpu_group``: its gloo twin (the
    device group itself on a CPU job; None with ``cpu_groups: off`` on NCCL); ``ranks``: the
    sorted global ranks; ``rank``: this rank's position in them (torch's group rank); ``device``:
    where tensors for ``group`` live; ``model``: the model it belongs to (None: the job);
    ``kind``: what ``mode`` names in the label (``"mode"``; ``"host group"`` for the network
    test's intra-node / one-rank-per-host groups). ``mode`` is the canonical name, or None for
    a process group given as is (then the label names its ranks only).

    Every collective of :mod:`pgroups.comm` takes one (or a mode, resolved to one).
    """

    mode: Optional[str]
    group: object
    cpu_group: Optional[object]
    ranks: Tuple[int, ...]
    rank: int
    device: torch.device
    model: Optional[str] = None
    kind: str = "mode"

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def label(self) -> str:
        """``"mode 'tp' (ranks [0, 1])"``, ``"mode 'tp' of model 'actor' (ranks [4, 5])"``,
        ``"host group 'intra-node' (ranks [0, 1])"``, ``"group of ranks [0, 1]"``."""
        if self.mode is None:
            return f"group of ranks {format_ranks(self.ranks)}"
        owner = f" of model {self.model!r}" if self.model else ""
        return f"{self.kind} {self.mode!r}{owner} (ranks {format_ranks(self.ranks)})"

    def on_cpu(self) -> "GroupHandle":
        """The same group on its CPU (gloo) twin: ``group`` is ``cpu_group``, tensors on the CPU.

        Raises ValueError naming the group when it has no CPU twin (``cpu_groups: off`` on NCCL).
        """
        if self.cpu_group is None:
            raise ValueError(f"{self.label} has no CPU group (cpu_groups: off on a device backend)")
        return attrs.evolve(self, group=self.cpu_group, device=torch.device("cpu"))

    def __repr__(self) -> str:
        return f"<GroupHandle {self.label}, rank {self.rank} of {self.size}, device {self.device}>"
