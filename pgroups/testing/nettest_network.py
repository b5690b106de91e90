"""A synthetic network (pure), to test and benchmark the link scan at any scale without processes.

Every host has a bandwidth factor (its NIC: slows its inter-host links), every host pair a link
factor, every pair of *local* ranks a topology factor (the same on every host: PCIe pairs that
cross the CPU socket), every rank a factor (a slow process slows everything it does: bandwidth and latency,
inside its host and across). A measurement is the base figure times the smallest factor on
its way, times lognormal noise; now and then a *transient* hiccup (a descheduled process)
makes one measurement several times slower. Used by ``tests/test_nettest_linkscan.py`` and
``bench/bench_nettest.py --scale``.
"""
from __future__ import annotations

import math
import random
from typing import Dict, List, Sequence, Tuple

import attrs

from ..nettest.linkscan import INTER, PairSample, ScanRound


@attrs.define
class SyntheticNetwork:
    """``hostnames`` per rank; factors default to 1 (healthy)."""

    hostnames: List[str]
    seed: int = 0
    inter_gbps: float = 0.7
    intra_gbps: float = 4.0
    inter_latency_us: float = 60.0
    intra_latency_us: float = 15.0
    noise_sigma: float = 0.15
    transient_p: float = 0.002
    transient_factor: float = 3.0
    host_factor: Dict[str, float] = attrs.Factory(dict)
    link_factor: Dict[Tuple[str, str], float] = attrs.Factory(dict)
    rank_factor: Dict[int, float] = attrs.Factory(dict)
    local_pair_factor: Dict[Tuple[int, int], float] = attrs.Factory(dict)   # (local i < local j) -> factor
    _rng: random.Random = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def slow_link(self, a: str, b: str, factor: float) -> None:
        self.link_factor[(min(a, b), max(a, b))] = factor

    def _noise(self) -> float:
        value = math.exp(self._rng.gauss(0.0, self.noise_sigma))
        if self._rng.random() < self.transient_p:
            value *= self.transient_factor
        return value

    def measure(self, round_: ScanRound) -> List[PairSample]:
        """The samples of one round (every rank pair of it)."""
        out = []
        for a, b in round_.rank_pairs:
            rank_f = min(self.rank_factor.get(a, 1.0), self.rank_factor.get(b, 1.0))
            if round_.kind == INTER:
                ha, hb = self.hostnames[a], self.hostnames[b]
                bw_f = min(rank_f, self.host_factor.get(ha, 1.0), self.host_factor.get(hb, 1.0),
                           self.link_factor.get((min(ha, hb), max(ha, hb)), 1.0))
                bw, lat = self.inter_gbps, self.inter_latency_us
            else:
                local = tuple(sorted((self._local(a), self._local(b))))
                bw_f, bw, lat = min(rank_f, self.local_pair_factor.get(local, 1.0)), self.intra_gbps, self.intra_latency_us
            out.append(PairSample(round_.index, round_.kind, a, b, bw * bw_f / self._noise(),
                                  lat / rank_f * self._noise()))
        return out

    def _local(self, rank: int) -> int:
        """The rank's position among its host's ranks (hosts are contiguous blocks)."""
        return rank - self.hostnames.index(self.hostnames[rank])


def host_names(hosts: int, ranks_per_host: int) -> List[str]:
    """``node0000 … `` per rank, contiguous blocks of ``ranks_per_host``."""
    return [f"node{r // ranks_per_host:04d}" for r in range(hosts * ranks_per_host)]


def ranks_of(hostnames: Sequence[str], host: str) -> List[int]:
    return [r for r, h in enumerate(hostnames) if h == host]
