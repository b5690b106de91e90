"""Per-message checksums (``verify=True``): the sender sums what it put on the wire, the receiver
what it got, and the sums travel in the step's checksum round after its data."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist

from ...errors import ReshardError
from ..wire import Chunk, Round

#: weights of the position-sensitive checksum cycle with this period (a prime)
_CHECKSUM_PERIOD = 65521
_CHECKSUM_CHUNK = 1 << 22


def _checksum(data: torch.Tensor, position: int) -> torch.Tensor:
    """``[sum of bytes, sum of byte * weight(position)]`` (int64, wrapping): cheap, position
    sensitive, identical on every device."""
    total = torch.zeros(2, dtype=torch.int64, device=data.device)
    for start in range(0, data.numel(), _CHECKSUM_CHUNK):
        chunk = data[start:start + _CHECKSUM_CHUNK].to(torch.int64)
        weights = (torch.arange(chunk.numel(), device=data.device, dtype=torch.int64)
                   + position + start) % _CHECKSUM_PERIOD + 1
        total[0] += chunk.sum()
        total[1] += (chunk * weights).sum()
    return total


class _Checksums:
    """The checksum side of a run (:class:`.transfer._Run` mixes it in): ``self._checksums``
    holds ``("out" | "in" | "theirs", step)`` → int64[2]."""

    owner: Any
    device: torch.device
    group: Any
    verified: int
    _checksums: Dict[Tuple[str, int], torch.Tensor]

    def _sum(self, key: Tuple[str, int], data: torch.Tensor, position: int) -> None:
        if key not in self._checksums:
            self._checksums[key] = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._checksums[key] += _checksum(data, position)

    def _post_checksums(self, current: Round, ops: List[Any], items: List[Tuple[str, Chunk, torch.Tensor, bool]]) -> None:
        """The step's checksum exchange (posted after all its data): send the sum of what this
        rank sent; receive the peer's sum of what it sent (compared once it arrived)."""
        step = current.step
        if current.recv is not None:
            theirs = self._checksums[("theirs", step)] = torch.empty(2, dtype=torch.int64, device=self.device)
            ops.append(dist.P2POp(dist.irecv, theirs, current.recv.peer, self.group))
            items.append(("checksum.recv", current.recv, theirs, False))
        if current.send is not None:
            ours = self._checksums[("out", step)]
            ops.append(dist.P2POp(dist.isend, ours, current.send.peer, self.group))
            items.append(("checksum.send", current.send, ours, False))

    def _check_sum(self, step: int) -> None:
        """Every chunk of ``step``'s message arrived (waited in order) and so did the sender's sum."""
        self.verified += 1
        if torch.equal(self._checksums[("in", step)], self._checksums[("theirs", step)]):
            return
        inc, owner = self.owner.recv_messages[step], self.owner
        names = sorted({p.transfer.tensor for p in inc.pieces})
        raise ReshardError(f"reshard step {step + 1}/{owner.plan.num_steps} on rank {owner.rank}: checksum "
                           f"mismatch on {inc.wire_bytes} bytes from rank {inc.peer} (tensors {names[:4]}"
                           f"{' …' if len(names) > 4 else ''}); "
                           + ("destination tensors untouched" if owner.atomic else
                              "destination tensors may be partly written (atomic=False)"))
