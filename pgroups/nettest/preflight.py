"""The pre-flight judgement of ``pgroups nettest`` (pure): configuration drift between hosts,
compute against network, silent data corruption, and the lists a scheduler drains.

Every rank reports its *facts* (:mod:`.probe`: torch, NCCL and CUDA versions, driver, GPU
model and count, NIC names, the ``NCCL_*`` / ``TORCH_NCCL_*`` / ``GLOO_*`` environment) and a
fixed-size matmul: its best time and the checksum of its result. The matmul's inputs are small
integers, so its result is exact in float32 whatever the order of the sums: every healthy
rank computes the same checksum, bit for bit.

- **Drift** (:func:`drift_findings`): per fact, the value most hosts hold is the reference;
  a host whose ranks hold another value is the odd host out, named in one line with both
  values. When no value is held by more hosts than every other (two hosts, or an even split),
  no host is blamed: the line lists every value with its hosts. Ranks of one host that
  disagree among themselves are named as ranks.
- **Compute** (:func:`compute_findings`): a rank whose matmul takes more than ``factor``
  times the median over ranks is compute-slow; when every rank of a host is, the host is
  named (its GPUs or CPUs, not its network). A checksum that differs from the one more ranks
  computed than any other is "silent data corruption on rank r (host h)"; when no checksum
  leads (two ranks that disagree), the disagreement is reported and nobody blamed.
"""
from __future__ import annotations

import statistics
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

from .verdict import Culprit

ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_")
UNSET = "(unset)"
COMPUTE_SLOW_FACTOR = 1.5


#: A pre-flight finding has the shape of the link scan's culprits (:class:`.verdict.Culprit`):
#: ``kind`` drift | compute-slow | corruption; whom it blames — ``hosts`` (a whole host) or
#: ``ranks`` (ranks of a host that is otherwise fine), never both, neither when nobody can be
#: blamed (a drift with no majority); ``reason``: the one line.
PreflightFinding = Culprit


def flatten_facts(facts: Mapping[str, Any]) -> Dict[str, str]:
    """One rank's facts as ``{name: text}``: the environment's variables become ``env NAME``
    entries; lists are joined with commas."""
    flat: Dict[str, str] = {}
    for name, value in facts.items():
        if name == "env":
            for var, text in dict(value).items():
                flat[f"env {var}"] = str(text)
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(map(str, value))
        else:
            flat[name] = str(value)
    return flat


def drift_findings(facts: Sequence[Mapping[str, Any]], hostnames: Sequence[str]) -> List[PreflightFinding]:
    """Configuration drift across ``facts`` (one mapping per rank, ``hostnames[rank]`` its
    host). One finding per fact that differs (see the module docstring), in the facts' order."""
    flat = [flatten_facts(f) for f in facts]
    names = list(dict.fromkeys(name for f in flat for name in f))
    findings = []
    for name in names:
        values = [f.get(name, UNSET) for f in flat]
        if len(set(values)) == 1:
            continue
        by_host: Dict[str, List[int]] = {}
        for rank, host in enumerate(hostnames[:len(values)]):
            by_host.setdefault(host, []).append(rank)
        inside = [(h, rs) for h, rs in by_host.items() if len({values[r] for r in rs}) > 1]
        for host, ranks in inside:
            counts = Counter(values[r] for r in ranks)
            usual = counts.most_common(1)[0][0]
            odd = tuple(r for r in ranks if values[r] != usual)
            findings.append(PreflightFinding("drift", (), odd, (
                f"configuration drift inside host {host}: {name} is {values[odd[0]]!r} on ranks "
                f"{list(odd)}, {usual!r} on its other ranks")))
        host_value = {h: Counter(values[r] for r in rs).most_common(1)[0][0] for h, rs in by_host.items()}
        hosts_by_value: Dict[str, List[str]] = {}
        for host, value in host_value.items():
            hosts_by_value.setdefault(value, []).append(host)
        if len(hosts_by_value) == 1:
            continue
        ranked = sorted(hosts_by_value.items(), key=lambda kv: -len(kv[1]))
        if len(ranked[0][1]) > len(ranked[1][1]):
            usual, usual_hosts = ranked[0]
            for value, hosts in ranked[1:]:
                findings.append(PreflightFinding("drift", tuple(sorted(hosts)), (), (
                    f"configuration drift: {_hosts(hosts)} {'has' if len(hosts) == 1 else 'have'} "
                    f"{name} = {value!r}, the {len(usual_hosts)} other hosts {usual!r}")))
        else:
            split = "; ".join(f"{value!r} on {_hosts(hosts)}" for value, hosts in ranked)
            findings.append(PreflightFinding("drift", (), (), (
                f"configuration drift with no majority: {name} is {split}")))
    return findings


def compute_findings(seconds: Sequence[float], checksums: Sequence[float], hostnames: Sequence[str],
                     factor: float = COMPUTE_SLOW_FACTOR) -> List[PreflightFinding]:
    """Compute-slow hosts and ranks, and silent data corruption, from each rank's best matmul
    time (``seconds[rank]``) and result checksum (see the module docstring)."""
    findings: List[PreflightFinding] = []
    ranked = Counter(checksums).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        split = "; ".join(f"{value!r} on ranks {[r for r, v in enumerate(checksums) if v == value]}"
                          for value, _n in ranked)
        findings.append(PreflightFinding("corruption", (), (), (
            f"matmul checksums disagree with no majority (silent data corruption somewhere): {split}")))
    elif len(ranked) > 1:
        usual_sum = ranked[0][0]
        for rank, value in enumerate(checksums):
            if value != usual_sum:
                findings.append(PreflightFinding("corruption", (), (rank,), (
                    f"silent data corruption on rank {rank} (host {hostnames[rank]}): its matmul checksum "
                    f"{value!r} differs from {usual_sum!r} on the other ranks")))
    median = statistics.median(seconds) if seconds else 0.0
    slow = {r for r, s in enumerate(seconds) if median > 0 and s > factor * median}
    by_host: Dict[str, List[int]] = {}
    for rank, host in enumerate(hostnames[:len(seconds)]):
        by_host.setdefault(host, []).append(rank)
    for host, ranks in by_host.items():
        mine = [r for r in ranks if r in slow]
        if not mine:
            continue
        ratio = max(seconds[r] for r in mine) / median
        if len(mine) == len(ranks) and len(by_host) > 1:
            findings.append(PreflightFinding("compute-slow", (host,), (), (
                f"compute-slow host {host}: its matmul takes {ratio:.1f}x the median over ranks "
                f"(its processors, not its network)")))
        else:
            findings.append(PreflightFinding("compute-slow", (), tuple(mine), (
                f"compute-slow {'rank' if len(mine) == 1 else 'ranks'} {', '.join(map(str, mine))} "
                f"(host {host}): matmul {ratio:.1f}x the median over ranks")))
    return findings


def abnormal(culprits: Iterable[Mapping[str, Any]], findings: Iterable[PreflightFinding],
             rank_kinds: Sequence[str]) -> Tuple[List[Dict[str, object]], List[Dict[str, object]]]:
    """``(abnormal_hosts, abnormal_ranks)``: every host and every rank named by the link scan's
    ``culprits`` (those of ``rank_kinds`` name ranks, the others hosts) or by a pre-flight
    finding, each once with the reasons that name it (what a scheduler drains)."""
    hosts: Dict[str, List[str]] = {}
    ranks: Dict[int, List[str]] = {}
    for culprit in culprits:
        if culprit["kind"] in rank_kinds:
            for rank in culprit["ranks"]:
                ranks.setdefault(int(rank), []).append(str(culprit["reason"]))
        elif culprit["kind"] != "split":
            for host in culprit["hosts"]:
                hosts.setdefault(str(host), []).append(str(culprit["reason"]))
    for finding in findings:
        for host in finding.hosts:
            hosts.setdefault(host, []).append(finding.reason)
        for rank in finding.ranks:
            ranks.setdefault(rank, []).append(finding.reason)
    return ([{"host": h, "reasons": rs} for h, rs in sorted(hosts.items())],
            [{"rank": r, "reasons": rs} for r, rs in sorted(ranks.items())])


def _hosts(hosts: Sequence[str]) -> str:
    hosts = sorted(hosts)
    return f"host {hosts[0]}" if len(hosts) == 1 else f"hosts {', '.join(hosts)}"


def env_facts(environ: Mapping[str, str]) -> Dict[str, str]:
    """The variables of ``environ`` that change how NCCL, torch's NCCL layer and gloo behave."""
    return {k: v for k, v in sorted(environ.items()) if k.startswith(ENV_PREFIXES)}


def judge(collected: Sequence[Mapping[str, Any]], hostnames: Sequence[str],
          factor: float = COMPUTE_SLOW_FACTOR) -> Tuple[List[PreflightFinding], Dict[str, Any]]:
    """Rank 0: every rank's pre-flight record (``facts``, ``matmul_s``, ``checksum``; one per
    rank in rank order) → the findings (drift first, then compute) and the report's
    ``preflight`` part (findings, each rank's matmul time and checksum, each host's facts as
    its first rank reports them)."""
    findings = drift_findings([c["facts"] for c in collected], hostnames)
    findings += compute_findings([float(c["matmul_s"]) for c in collected],
                                 [float(c["checksum"]) for c in collected], hostnames, factor)
    first_rank: Dict[str, int] = {}
    for rank, host in enumerate(hostnames[:len(collected)]):
        first_rank.setdefault(host, rank)
    return findings, {"preflight": {
        "findings": [f.to_json() for f in findings],
        "matmul_s": [float(c["matmul_s"]) for c in collected],
        "checksums": [float(c["checksum"]) for c in collected],
        "facts": {host: flatten_facts(collected[rank]["facts"]) for host, rank in first_rank.items()}}}
