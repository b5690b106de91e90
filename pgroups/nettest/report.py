"""Output: nccl-tests-like tables, the summary, ``--json`` and ``--plot`` (rank 0's progress line is
:class:`pgroups.progress.Progress`, shared with the other commands).

Everything here reads the report dict that rank 0 builds (JSON-able, documented in docs/nettest.md:
``groups``, ``measurements``, ``findings``, ``retest``, ``confirmed``, ``transient``, ``links``,
``culprits``, ``suspects``, ``verdicts``, ``summary``, ``status``, ``exit_code``, and on a
hang ``timeout``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..ranks import format_ranks
from ..units import format_bytes


def _ranks_text(ranks: Sequence[int]) -> str:
    return format_ranks(ranks, compact=True)


def _hosts_text(hosts: Sequence[str], limit: int = 4) -> str:
    hosts = list(hosts)
    shown = ",".join(hosts[:limit])
    return shown + (f",… ({len(hosts)} hosts)" if len(hosts) > limit else "")


def format_tables(report: Dict[str, Any]) -> str:
    """One nccl-tests-like table per (group, collective) of the sweep."""
    groups = {g["id"]: g for g in report.get("groups", [])}
    rows: Dict[tuple, List[Dict[str, Any]]] = {}
    for m in report.get("measurements", []):
        rows.setdefault((m["group"], m["collective"]), []).append(m)
    out = []
    for (gid, collective), ms in rows.items():
        g = groups.get(gid, {"ranks": [], "hosts": []})
        redop = "sum" if collective in ("all_reduce", "reduce_scatter") else "none"
        out.append(f"# {gid}: {collective} over {len(g['ranks'])} ranks {_ranks_text(g['ranks'])} "
                   f"on {_hosts_text(g['hosts'])}")
        out.append(f"#{'size':>11} {'count':>10} {'type':>6} {'redop':>6} {'time':>10} {'algbw':>8} "
                   f"{'busbw':>8} {'#wrong':>7}")
        out.append(f"#{'(B)':>11} {'(elements)':>10} {'':>6} {'':>6} {'(us)':>10} {'(GB/s)':>8} {'(GB/s)':>8}")
        for m in sorted(ms, key=lambda m: m["size_bytes"]):
            out.append(f"{m['size_bytes']:>12} {m['count']:>10} {'float':>6} {redop:>6} {m['time_us']:>10.1f} "
                       f"{m['algbw_gbps']:>8.3f} {m['busbw_gbps']:>8.3f} {m['wrong']:>7}")
        out.append("")
    return "\n".join(out)


def format_group_summary(report: Dict[str, Any]) -> str:
    """One line per group and collective: busbw at the largest size, time at the smallest, verdict."""
    verdicts = report.get("verdicts", {})
    by_group: Dict[tuple, List[Dict[str, Any]]] = {}
    for m in report.get("measurements", []):
        by_group.setdefault((m["group"], m["collective"]), []).append(m)
    groups = {g["id"]: g for g in report.get("groups", [])}
    lines = [f"{'group':<16} {'ranks':<14} {'hosts':<16} {'collective':<15} {'busbw@max':>16} "
             f"{'time@min':>16} {'#wrong':>7}  verdict"]
    for (gid, collective), ms in by_group.items():
        ms = sorted(ms, key=lambda m: m["size_bytes"])
        small, large = ms[0], ms[-1]
        g = groups.get(gid, {"ranks": [], "hosts": []})
        bw = f"{large['busbw_gbps']:.3f} GB/s"
        lat = f"{small['time_us']:.0f} us"
        lines.append(f"{gid:<16} {_ranks_text(g['ranks']):<14} {_hosts_text(g['hosts'], 2):<16} {collective:<15} "
                     f"{bw + ' @' + format_bytes(large['size_bytes']):>16} "
                     f"{lat + ' @' + format_bytes(small['size_bytes']):>16} "
                     f"{sum(m['wrong'] for m in ms):>7}  {verdicts.get(gid, 'ok').upper()}")
    return "\n".join(lines)


CULPRIT_LABELS = {"host": "SLOW HOST", "link": "SLOW LINK", "rank": "SLOW RANK", "rank-link": "SLOW RANK PAIR",
                  "rail": "SLOW RAIL", "host-inside": "SLOW INSIDE HOST", "corrupting": "CORRUPTING RANK",
                  "split": "SPEED CLASSES", "unresolved": "SLOW, UNRESOLVED"}
MATRIX_MAX_HOSTS = 16


def link_matrix(links: Dict[str, Any]) -> Tuple[List[str], List[List[Optional[float]]]]:
    """(hosts, busbw[i][j]): the median busbw of each measured host pair (None: not measured)."""
    hosts = list(links.get("hosts", []))
    matrix = links.get("matrix", {})
    cells = [[(statistics.median(matrix[a][b]["busbw_gbps"]) if b in matrix.get(a, {}) else None)
              for b in hosts] for a in hosts]
    return hosts, cells


def format_link_matrix(report: Dict[str, Any]) -> str:
    """The host x host busbw matrix of the link scan (small clusters; the JSON has it always)."""
    links = report.get("links") or {}
    hosts, cells = link_matrix(links)
    if len(hosts) < 2 or len(hosts) > MATRIX_MAX_HOSTS:
        return ""
    width = max(9, max(len(h) for h in hosts) + 1)
    lines = [f"link scan: {links.get('inter_rounds', 0)} inter-host rounds, {links.get('intra_rounds', 0)} "
             f"intra-host rounds; busbw (GB/s) per host pair, rail by rail, best operation:",
             " " * width + "".join(f"{h:>{width}}" for h in hosts)]
    for host, row in zip(hosts, cells):
        lines.append(f"{host:<{width}}" + "".join(f"{'-' if v is None else f'{v:.3g}':>{width}}" for v in row))
    return "\n".join(lines)


def format_summary(report: Dict[str, Any]) -> str:
    """The verdict: groups tested, slow, wrong, suspect ranks and hosts, transient notes."""
    summary = report.get("summary", {})
    groups = {g["id"]: g for g in report.get("groups", [])}
    lines = []
    for finding in report.get("confirmed", []):
        g = groups.get(finding["group_id"], {"ranks": [], "hosts": []})
        label = "WRONG" if finding["metric"] == "wrong" else "SLOW"
        again = "" if finding["metric"] == "wrong" else " (confirmed on re-test)"
        lines.append(f"{label:<5} {finding['group_id']} ranks {_ranks_text(g['ranks'])} hosts "
                     f"{_hosts_text(g['hosts'])}: {finding['detail']}{again}")
    for culprit in report.get("culprits", []):
        lines.append(f"{CULPRIT_LABELS.get(culprit['kind'], culprit['kind'].upper())}: {culprit['reason']}")
    for finding in (report.get("preflight") or {}).get("findings", []):
        lines.append(f"PRE-FLIGHT: {finding['reason']}")
    diagnostics = report.get("nccl_diagnostics") or {}
    for finding in diagnostics.get("findings", []):
        lines.append(f"NCCL DIAGNOSTICS: {finding['reason']}")
    for skipped in diagnostics.get("not_run", []):
        lines.append(f"note: NCCL diagnostics not run on ranks {_ranks_text(skipped['ranks'])}: {skipped['reason']}")
    links = report.get("links") or {}
    for note in links.get("transient", [])[:8]:
        lines.append(f"note: transient, not counted: {note}")
    transient: Dict[str, List[str]] = {}
    for finding in report.get("transient", []):
        transient.setdefault(finding["group_id"], []).append(f"{finding['collective']} {finding['metric']}")
    if transient:
        listed = "; ".join(f"{gid} ({', '.join(what)})" for gid, what in transient.items())
        lines.append(f"note: transient, not counted (flagged in the sweep, fine on re-test): {listed}")
    for kind, same in report.get("skipped_kinds", {}).items():
        lines.append(f"note: mode {kind!r} has the same groups as {same!r}; measured once")
    if not report.get("groups"):
        lines.append("note: no group of two or more ranks to test (start more ranks, or name --modes)")
    slow, wrong = summary.get("slow", []), summary.get("wrong", [])
    verdict = "HEALTHY" if summary.get("healthy") else "UNHEALTHY"
    tested = summary.get("groups_tested", 0)
    lines.append(f"pgroups nettest: {verdict} — {tested} group{'' if tested == 1 else 's'} tested, "
                 f"{len(slow)} slow, {len(wrong)} wrong; suspect ranks "
                 f"{summary.get('suspect_ranks') or '-'}, suspect hosts {summary.get('suspect_hosts') or '-'} "
                 f"(world {report.get('world_size')}, {report.get('backend')} on {report.get('device')}, "
                 f"{report.get('elapsed_s', 0.0):.1f}s)")
    return "\n".join(lines)


def format_report(report: Dict[str, Any], tables: bool = True) -> str:
    parts = []
    if tables:
        parts.append(format_tables(report))
    parts.append(format_group_summary(report))
    parts.append(format_link_matrix(report))
    parts.append(format_summary(report))
    return "\n".join(p for p in parts if p)


def write_json(report: Dict[str, Any], path: str) -> None:
    """Write the whole report as JSON (``-`` writes to stdout)."""
    text = json.dumps(report, indent=1, sort_keys=False, default=str)
    if path == "-":
        print(text)
        return
    temporary = f"{path}.{os.getpid()}.tmp"   # several ranks may write it (store gone): whole files only
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    os.replace(temporary, path)


def prometheus_text(report: Dict[str, Any], timestamp: float) -> str:
    """The report as a node-exporter textfile-collector file: the run's timestamp and verdict,
    one busbw gauge per measured host link (its best measurement), one verdict gauge per host
    (1 healthy, 0 named in ``abnormal_hosts``). Pure."""
    def label(value: Any) -> str:
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")

    lines = ["# HELP pgroups_nettest_last_run_timestamp_seconds When the last pgroups nettest run ended.",
             "# TYPE pgroups_nettest_last_run_timestamp_seconds gauge",
             f"pgroups_nettest_last_run_timestamp_seconds {timestamp:.3f}",
             "# HELP pgroups_nettest_healthy 1 if the last run found nothing, else 0.",
             "# TYPE pgroups_nettest_healthy gauge",
             f"pgroups_nettest_healthy {1 if (report.get('summary') or {}).get('healthy') else 0}"]
    matrix = (report.get("links") or {}).get("matrix", {})
    best: Dict[Tuple[str, str], float] = {}
    for a, row in matrix.items():
        for b, cell in row.items():
            if a != b and cell.get("busbw_gbps"):
                pair = (min(a, b), max(a, b))
                best[pair] = max(best.get(pair, 0.0), max(cell["busbw_gbps"]))
    links = [(a, b, v) for (a, b), v in sorted(best.items())]
    if links:
        lines += ["# HELP pgroups_nettest_link_busbw_gbps Bus bandwidth of a host pair's link (best measurement).",
                  "# TYPE pgroups_nettest_link_busbw_gbps gauge"]
        lines += [f'pgroups_nettest_link_busbw_gbps{{host_a="{label(a)}",host_b="{label(b)}"}} {v:.6g}'
                  for a, b, v in links]
    abnormal = {entry["host"] for entry in report.get("abnormal_hosts", [])}
    hosts = list(dict.fromkeys(report.get("hostnames", [])))
    if hosts:
        lines += ["# HELP pgroups_nettest_host_healthy 1 if the last run named nothing on this host, else 0.",
                  "# TYPE pgroups_nettest_host_healthy gauge"]
        lines += [f'pgroups_nettest_host_healthy{{host="{label(h)}"}} {0 if h in abnormal else 1}' for h in hosts]
    return "\n".join(lines) + "\n"


def write_prometheus(report: Dict[str, Any], path: str, timestamp: float) -> None:
    """Write :func:`prometheus_text` to ``path`` whole (a temporary file renamed over it, so
    the node exporter never reads half a file)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(prometheus_text(report, timestamp))
    os.replace(temporary, path)


def plotting_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_plot(report: Dict[str, Any], path: str) -> None:
    """busbw against message size, one line per group, and beside it the link scan's host x
    host busbw matrix as a heatmap (when two or more hosts were scanned).

    Needs matplotlib (the CLI checks :func:`plotting_available` before running anything).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    collectives = list(dict.fromkeys(m["collective"] for m in report.get("measurements", [])))
    hosts, cells = link_matrix(report.get("links") or {})
    heatmap = len(hosts) >= 2
    panels = max(len(collectives) + (1 if heatmap else 0), 1)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    verdicts = report.get("verdicts", {})
    for ax, collective in zip(axes[0], collectives):
        lines: Dict[str, List[Dict[str, Any]]] = {}
        for m in report["measurements"]:
            if m["collective"] == collective:
                lines.setdefault(m["group"], []).append(m)
        for gid, ms in lines.items():
            ms = sorted(ms, key=lambda m: m["size_bytes"])
            style = "-" if verdicts.get(gid, "ok") == "ok" else "--"
            ax.plot([m["size_bytes"] for m in ms], [m["busbw_gbps"] for m in ms], style, marker=".",
                    label=f"{gid} ({verdicts.get(gid, 'ok')})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        ax.set_title(collective)
        ax.legend(fontsize="small")
    if heatmap:
        ax = axes[0][-1]
        values = [[float("nan") if v is None else v for v in row] for row in cells]
        image = ax.imshow(values, cmap="viridis")
        ticks = range(len(hosts))
        ax.set_xticks(ticks, hosts, rotation=60, fontsize="small")
        ax.set_yticks(ticks, hosts, fontsize="small")
        ax.set_title("link scan: busbw per host pair (GB/s; blank: not measured)")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
