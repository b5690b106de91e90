"""A group handle: everything about this rank's group of one mode, in one immutable object.

``gpc.group("tensor")`` answers what ``get_group``, ``get_cpu_group``, ``get_ranks_in_group``,
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
    where tensors for ``group`` live; ``model``: the model it belongs to (None: the job).
    """

    mode: str
    group: object
    cpu_group: Optional[object]
    ranks: Tuple[int, ...]
    rank: int
    device: torch.device
    model: Optional[str] = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def label(self) -> str:
        """``"mode 'tensor' (ranks [0, 1])"``, ``"mode 'tensor' of model 'actor' (ranks [4, 5])"``."""
        owner = f" of model {self.model!r}" if self.model else ""
        return f"mode {self.mode!r}{owner} (ranks {format_ranks(self.ranks)})"

    def __repr__(self) -> str:
        return f"<GroupHandle {self.label}, rank {self.rank} of {self.size}, device {self.device}>"
