"""The network a reshard schedule is simulated on (pure): hosts of ranks, NICs with rank affinity,
an intra-host fabric, a per-message latency — and the lower bound any schedule of given messages
obeys on it.

Model (the contract the simulator and the bound share):

- rank ``r`` is on host ``r // ranks_per_host``, local rank ``r % ranks_per_host``;
- a host has ``nics_per_host`` NICs; local rank ``l`` uses NIC ``l * nics_per_host //
  ranks_per_host`` (contiguous blocks of ranks per NIC, as ``NCCL_IB_HCA`` affinity on a DGX-like
  host: 8 ranks, 8 NICs → one each; 4 NICs → ranks 0-1 share NIC 0, …);
- every NIC has ``nic_bw`` bytes/s out and, separately, ``nic_bw`` in (full duplex); a message
  between two hosts uses its sender's NIC out *port* and its receiver's NIC in port;
- a message inside a host uses its sender's ``out`` port and its receiver's ``in`` port, each of
  ``intra_bw`` bytes/s (NVLink-like: every GPU its own link to the switch), and, when
  ``host_fabric_bw`` is set, the host's one shared ``fabric`` port (a machine whose copies share
  memory bandwidth or cores, as loopback gloo does);
- every message also costs ``latency_s`` before its first byte moves (no bandwidth used then).

Ports are hashable tuples: ``("nic_out", host, nic)``, ``("nic_in", host, nic)``, ``("out", rank)``,
``("in", rank)``, ``("fabric", host)``.

The lower bound of a set of messages: for every port, the bytes that must cross it divided by its
capacity; the largest over the NIC ports is the *NIC bound*, over the intra-host ports the *intra
bound*. No schedule on this network finishes sooner (a port moves at most its capacity), and one
message alone takes exactly ``latency_s + nbytes / (smallest capacity on its path)``.
"""
from __future__ import annotations

from typing import Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import attrs

from ...errors import ConfigError

Port = Tuple[Hashable, ...]
NIC_PORTS = ("nic_out", "nic_in")


def _positive(instance: object, attribute: "attrs.Attribute", value: Optional[float]) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"network {attribute.name} must be positive, got {value}")


@attrs.frozen
class Network:
    """Hosts of ``ranks_per_host`` ranks with ``nics_per_host`` NICs of ``nic_bw`` bytes/s each way,
    intra-host ports of ``intra_bw`` bytes/s per rank each way, an optional shared host fabric
    of ``host_fabric_bw`` bytes/s, and ``latency_s`` per message (see the module docstring).
    Raises ConfigError for a non-positive size or bandwidth, a negative latency, or more NICs than
    ranks per host."""

    ranks_per_host: int = attrs.field(default=8, validator=_positive)
    nics_per_host: int = attrs.field(default=8, validator=_positive)
    nic_bw: float = attrs.field(default=50e9, validator=_positive)          # 400 Gb/s
    intra_bw: float = attrs.field(default=450e9, validator=_positive)       # NVLink-4-like, per direction
    host_fabric_bw: Optional[float] = attrs.field(default=None, validator=_positive)
    latency_s: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.latency_s < 0:
            raise ConfigError(f"network latency_s must be >= 0, got {self.latency_s}")
        if self.nics_per_host > self.ranks_per_host:
            raise ConfigError(f"network nics_per_host ({self.nics_per_host}) > ranks_per_host "
                              f"({self.ranks_per_host}): every NIC needs a rank to use it")

    def host(self, rank: int) -> int:
        return rank // self.ranks_per_host

    def nic(self, rank: int) -> int:
        """The NIC (index within its host) ``rank`` sends and receives through."""
        return (rank % self.ranks_per_host) * self.nics_per_host // self.ranks_per_host

    def ports(self, src: int, dst: int) -> Tuple[Port, ...]:
        """The ports a message from ``src`` to ``dst`` (two different ranks) crosses."""
        host_s, host_d = self.host(src), self.host(dst)
        if host_s != host_d:
            return ("nic_out", host_s, self.nic(src)), ("nic_in", host_d, self.nic(dst))
        ports: Tuple[Port, ...] = (("out", src), ("in", dst))
        if self.host_fabric_bw is not None:
            ports += (("fabric", host_s),)
        return ports

    def capacity(self, port: Port) -> float:
        kind = port[0]
        if kind in NIC_PORTS:
            return self.nic_bw
        if kind == "fabric":
            assert self.host_fabric_bw is not None
            return self.host_fabric_bw
        return self.intra_bw


@attrs.frozen
class Bound:
    """The lower bound of a set of messages on a network: ``nic_s`` (busiest NIC port's bytes /
    ``nic_bw``), ``intra_s`` (busiest intra-host port's bytes / its capacity), and the bytes each
    port must carry."""

    nic_s: float
    intra_s: float
    port_bytes: Dict[Port, int] = attrs.field(repr=False)

    @property
    def seconds(self) -> float:
        return max(self.nic_s, self.intra_s)


def lower_bound(network: Network, messages: Iterable[Tuple[int, int, int]]) -> Bound:
    """The :class:`Bound` of ``messages`` — ``(src, dst, nbytes)`` — on ``network``, computed from
    the bytes alone (no schedule)."""
    port_bytes: Dict[Port, int] = {}
    for src, dst, nbytes in messages:
        for port in network.ports(src, dst):
            port_bytes[port] = port_bytes.get(port, 0) + nbytes
    nic = max((b / network.capacity(p) for p, b in port_bytes.items() if p[0] in NIC_PORTS), default=0.0)
    intra = max((b / network.capacity(p) for p, b in port_bytes.items() if p[0] not in NIC_PORTS), default=0.0)
    return Bound(nic, intra, port_bytes)


def host_bytes(messages: Iterable[Tuple[int, int, int]], hosts: Sequence[str]) -> Dict[str, Tuple[int, int]]:
    """``{host: (bytes its ranks send to other hosts, bytes they receive from other hosts)}`` of
    ``messages`` — ``(src, dst, nbytes)`` —, ``hosts[r]`` naming rank r's host; hosts that neither
    send nor receive between hosts are left out."""
    out: Dict[str, List[int]] = {}
    for src, dst, nbytes in messages:
        a, b = hosts[src], hosts[dst]
        if a != b:
            out.setdefault(a, [0, 0])[0] += nbytes
            out.setdefault(b, [0, 0])[1] += nbytes
    return {h: (v[0], v[1]) for h, v in out.items()}


def max_over_mean(values: Iterable[int]) -> float:
    """max / mean of the non-zero ``values`` (1.0 when there are none)."""
    nonzero = [v for v in values if v]
    return max(nonzero) * len(nonzero) / sum(nonzero) if nonzero else 1.0
