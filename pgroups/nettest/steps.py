"""The steps every rank runs (sweep, re-test, link scan, verdict), each returning what it found.

:class:`RankRun` executes them in order; :meth:`RankRun.run` alone assembles the report from
the steps' results (``partial`` holds what is known so far, for the failure path). The steps,
the same on every rank: one *sweep* per wave of disjoint groups; rank 0 then diagnoses and
publishes a *re-test* plan (flagged groups and some healthy peers, each measured alone,
round-robin); everyone executes it; the *link scan* (:mod:`.linkscan`) pairs ranks round by
round; rank 0 publishes the exit code every rank returns. The pure parts — folding records
into measurements, pairing scan records into samples — are module functions, tested without
processes.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch
import torch.distributed as dist

from ..context import ParallelContext
from ..errors import GroupTimeoutError, ModeNotInitializedError
from ..handle import GroupHandle
from ..units import format_bytes
from . import diagnosis, metrics, nccl_diagnostics, preflight, probe, verdict
from .bench import Bench, GroupFailure
from .control import Coordinator, NettestTimeoutError, first_words
from .diagnosis import Measurement
from .failure import alarm, hang_report
from .hooks import faults_for_rank
from .groups import HOST_KINDS, GroupUnderTest, build_catalog, duplicate_kinds, group_of_rank, plan_waves
from .linkscan import Culprit, LinkScan, PairSample

if TYPE_CHECKING:
    from .runner import NettestOptions

RETEST_REPEATS = 3
PAIR_MAX_BYTES = 8 * 1024 * 1024  # pair tests stop here: enough to compare pairs, and quick


def select_modes(requested: Sequence[str], built: Sequence[str]) -> List[str]:
    """``("all",)`` → every built mode; else the requested ones by canonical name (``tensor`` is
    ``tp``), which must be built (ConfigError naming the first that is not)."""
    from ..errors import ConfigError
    from ..modes import canonical_name

    if list(requested) == ["all"]:
        return list(built)
    unknown = [m for m in requested if canonical_name(m) not in built]
    if unknown:
        raise ConfigError(f"--modes: unknown mode {unknown[0]!r}; built modes: "
                          f"{', '.join(built)} (or 'all')")
    return list(dict.fromkeys(canonical_name(m) for m in requested))


@attrs.frozen
class RetestDecision:
    """Rank 0's reading of the sweep: its findings (slow and wrong), the re-test plan, and the
    report's ``measurements`` / ``findings``."""

    findings: List[diagnosis.Finding]
    plan: Dict[str, Any]
    report: Dict[str, Any]


class RankRun:
    """One rank's run: builds the groups, executes the steps, and (rank 0) the diagnosis."""

    def __init__(self, ctx: ParallelContext, options: "NettestOptions", progress: Any,
                 nccl_diag: Optional[Tuple[nccl_diagnostics.Decision, Optional[nccl_diagnostics.StdoutTee]]] = None
                 ) -> None:
        """``nccl_diag``: this rank's decision on NCCL's own diagnostics and the tee that has
        been keeping their report lines since before the default group formed (:mod:`.nccl_diagnostics`)."""
        self.ctx, self.options, self.progress = ctx, options, progress
        self.nccl_diag = nccl_diag
        self.rank = ctx.get_global_rank()
        self.world_size = dist.get_world_size()
        self.hostnames = ctx.get_hostnames()
        self.coordinator = Coordinator.from_default_group(options.timeout_s, self.hostnames)
        self.coordinator.start_liveness()
        self.faults = faults_for_rank(self.rank, self.hostnames[self.rank])
        self.device = ctx.backend.device_for_tensors()
        self.bench = Bench(self.device, self.coordinator, self.faults, options.timeout_s,
                           options.warmup, options.iters)
        self.catalog: List[GroupUnderTest] = []
        self.handles: Dict[str, Optional[GroupHandle]] = {}   # test group id -> this rank's handle
        self.partial: Dict[str, Any] = {}   # the report so far (assembled by run() only)
        self.exit_code = 0
        self.started = time.perf_counter()

    # -- groups ---------------------------------------------------------------------------
    def build_groups(self) -> Dict[str, Any]:
        """Create the groups under test (collective, the same order on every rank): sets the
        catalog and this rank's group of each kind; returns the report's group part."""
        modes = select_modes(self.options.modes, self.ctx.modes)
        mode_groups = {m: self.ctx.get_rank_groups(m) for m in modes}
        self.catalog = build_catalog(mode_groups, self.hostnames, self.options.host_groups)
        kinds = list(dict.fromkeys(g.kind for g in self.catalog))
        for kind in kinds:  # the same order on every rank: creation is collective
            groups = [g for g in self.catalog if g.kind == kind]
            mine = next((g for g in groups if self.rank in g.ranks), None)
            if kind in HOST_KINDS:
                handle = self.ctx.group_for_rank_lists(f"nettest-{kind}", [list(g.ranks) for g in groups],
                                                       kind, "host group")
            else:
                try:
                    handle = self.ctx.group(kind)
                except ModeNotInitializedError:
                    handle = None
            if mine is not None:
                self.handles[mine.id] = handle
        return {"world_size": self.world_size, "backend": self.ctx.backend.device_backend,
                "device": str(self.device.type), "hostnames": self.hostnames,
                "skipped_kinds": duplicate_kinds({**mode_groups}),
                "groups": [g.to_json() for g in self.catalog]}

    # -- steps ----------------------------------------------------------------------------
    def run(self) -> Optional[Dict[str, Any]]:
        """Every step in order; rank 0 returns the report (None elsewhere); sets ``exit_code``."""
        self.coordinator.position("building the groups under test")
        try:
            self.partial.update(self.build_groups())
        except GroupTimeoutError as exc:   # a peer died while the groups were being built
            if isinstance(exc, NettestTimeoutError):
                raise
            alarm(self.coordinator, {"message": f"building the groups under test: {exc}", "kind": "timeout",
                                     "step": "build-groups", "detected_by": self.rank,
                                     "cause": first_words(str(exc))})
        checked = self._preflight()
        if checked is not None:
            self.partial.update(checked[1])
        self.faults.stay_away()
        sweep = self._sweep()
        decision = self._decide_retest(sweep) if self.rank == 0 else None
        if decision is not None:
            self.partial.update(decision.report)
        retest_plan = self._share("retest", decision.plan if decision else None)
        retest = self._run_retest(retest_plan)
        confirmed: List[diagnosis.Finding] = []
        if decision is not None:
            confirmed, confirm_report = self._confirm(decision.findings, retest_plan, retest)
            self.partial.update(confirm_report)
        links, culprits = self._run_link_scan()
        if links is not None:
            self.partial["links"] = links
        findings = list(checked[0]) if checked else []
        diagnosed = self._nccl_diagnostics()
        if diagnosed is not None:
            findings += diagnosed[0]
            self.partial.update(diagnosed[1])
        report = self._finish(confirmed, culprits, findings) if self.rank == 0 else None
        shared = self._share("verdict", {"exit_code": report["exit_code"]} if report else None)
        self.exit_code = int(shared["exit_code"])
        self.coordinator.close()
        return report

    def _preflight(self) -> Optional[Tuple[List[preflight.PreflightFinding], Dict[str, Any]]]:
        """Every rank reports its facts and times the matmul (:mod:`.probe`); rank 0 returns
        the findings and the report's ``preflight`` part (:func:`.preflight.judge`)."""
        self.coordinator.position("pre-flight (facts, matmul)")
        self.progress.update("pre-flight: configuration and matmul")
        seconds, checksum = probe.timed_matmul(self.device, self.faults.inside_matmul, self.faults.bad_checksum)
        record = {"facts": probe.facts(self.device, self.faults.environment(os.environ)),
                  "matmul_s": seconds, "checksum": checksum}
        collected = self.coordinator.exchange("preflight", record)
        if collected is None:
            return None
        return preflight.judge(collected, self.hostnames, max(preflight.COMPUTE_SLOW_FACTOR, self.options.rule.slow_factor))

    def _nccl_diagnostics(self) -> Optional[Tuple[List[preflight.PreflightFinding], Dict[str, Any]]]:
        """On an NCCL job with ``--nccl-diagnostics`` (the default), every rank sends the ``NCCL
        DIAG`` lines its communicators printed (or why it ran none); rank 0 returns the
        findings and the report's part (:func:`.nccl_diagnostics.judge`). Whether the records
        are exchanged depends only on the options and the device backend, the same on every
        rank; the tee is stopped here in every case, so the rest of the run prints as usual."""
        decision, tee = self.nccl_diag or (nccl_diagnostics.Decision(False, "not prepared"), None)
        lines = tee.stop() if tee is not None else []
        if not (self.options.nccl_diagnostics and self.ctx.backend.device_backend == "nccl"):
            return None
        self.coordinator.position("NCCL diagnostics (collecting the report lines)")
        record = {"ran": decision.run and tee is not None, "reason": decision.reason, "lines": lines}
        collected = self.coordinator.exchange("nccl-diagnostics", record)
        if collected is None:
            return None
        return nccl_diagnostics.judge(collected, self.hostnames)

    def _sweep(self) -> List[Measurement]:
        """Every wave of disjoint groups in turn; rank 0 returns the measurements."""
        waves = plan_waves(self.catalog)
        sweep: List[Measurement] = []
        for index, wave in enumerate(waves):
            records = self._sweep_wave(index, len(waves), wave)
            collected = self.coordinator.exchange(f"sweep{index}", records)
            if self.rank == 0:
                sweep.extend(aggregate_records(collected, {g.id: g.size for g in wave}))
        return sweep

    def _share(self, key: str, plan: Optional[Any]) -> Any:
        if self.rank == 0:
            self.coordinator.publish(key, plan)
            return plan
        return self.coordinator.fetch(key)

    def _sweep_wave(self, index: int, waves: int, wave: Sequence[GroupUnderTest]) -> List[Dict[str, Any]]:
        group = group_of_rank(wave, self.rank)
        self.coordinator.position(f"sweep {index + 1}/{waves} (idle)")
        if group is None:
            return []
        records = []
        for collective in self.options.collectives:
            shapes = metrics.shapes_for_sweep(collective, self.options.sizes, group.size)
            for step, shape in enumerate(shapes):
                where = f"sweep {index + 1}/{waves} {group.id} {collective} {format_bytes(shape.size_bytes)}"
                # a line of its own in a log when a wave's collective starts (logs get at most one
                # line every few seconds otherwise, and a watcher waits for the sweep to start)
                self.progress.update(f"{where} [{step + 1}/{len(shapes)}]", force=step == 0)
                records.append(self._measure(group, collective, shape, where, repeats=1))
        return records

    def _measure(self, group: GroupUnderTest, collective: str, shape: metrics.MessageShape, where: str,
                 repeats: int, followup: bool = False) -> Dict[str, Any]:
        self.coordinator.position(where)
        try:
            handle = self.handles[group.id]
            record = self.bench.measure(collective, handle.group if handle else None, list(group.ranks), self.rank,
                                        shape, repeats, followup)
        except GroupFailure as exc:
            self._hang(group.id, list(group.ranks), where, collective, shape.size_bytes, exc)
        record["group"] = group.id
        return record

    def _hang(self, group_id: str, ranks: List[int], where: str, collective: str, size_bytes: int,
              failure: GroupFailure) -> None:
        positions = self.coordinator.positions([r for r in ranks if r != self.rank])
        alarm(self.coordinator, hang_report(group_id, ranks, where, collective, size_bytes, failure,
                                            positions, self.hostnames, self.options.timeout_s, self.rank))

    # -- rank 0's decisions -----------------------------------------------------------------
    def _decide_retest(self, sweep: List[Measurement]) -> RetestDecision:
        rule = self.options.rule
        slow = diagnosis.find_slow(self.catalog, sweep, rule, tick=self.coordinator.beat)
        wrong = diagnosis.find_wrong(self.catalog, sweep)
        tasks = diagnosis.plan_retest(slow, self.catalog) if self.options.followup else []
        return RetestDecision(slow + wrong, {"tasks": [t.to_json() for t in tasks]},
                              {"measurements": [m.to_json() for m in sweep],
                               "findings": [f.to_json() for f in slow + wrong]})

    def _run_retest(self, plan: Dict[str, Any]) -> List[Measurement]:
        """Each task's group alone (the others wait at a barrier), round-robin, RETEST_REPEATS
        times: every figure is the best of measurements spread over the whole re-test."""
        by_id = {g.id: g for g in self.catalog}
        tasks = [diagnosis.RetestTask(t["group"], tuple(tuple(i) for i in t["items"])) for t in plan["tasks"]]
        mine: Dict[Tuple[str, str, int], Dict[str, Any]] = {}
        for repeat in range(RETEST_REPEATS if tasks else 0):
            for index, task in enumerate(tasks):
                group = by_id[task.group_id]
                self.coordinator.position(f"re-test {repeat + 1}/{RETEST_REPEATS} {group.id} (idle)")
                if self.rank in group.ranks:
                    for collective, size in task.items:
                        shape = _shape_for(collective, size, group.size)
                        where = (f"re-test {repeat + 1}/{RETEST_REPEATS} {group.id} {collective} "
                                 f"{format_bytes(shape.size_bytes)}")
                        self.progress.update(where)
                        merge_record(mine, self._measure(group, collective, shape, where, repeats=1,
                                                          followup=True))
                self.coordinator.exchange(f"retest{repeat}.{index}", None)
        collected = self.coordinator.exchange("retest", list(mine.values())) if tasks else None
        if self.rank != 0 or not tasks:
            return []
        return aggregate_records(collected, {g.id: g.size for g in self.catalog})

    def _confirm(self, findings: List[diagnosis.Finding], retest_plan: Dict[str, Any],
                 retest: List[Measurement]) -> Tuple[List[diagnosis.Finding], Dict[str, Any]]:
        """Rank 0: split the sweep's findings into confirmed and transient by the re-test;
        returns the confirmed ones and the report's re-test part."""
        if retest_plan["tasks"]:
            confirmed, transient = diagnosis.confirm(findings, self.catalog, retest, self.options.rule)
        else:  # nothing slow to re-test (or --no-followup: sweep findings stand as they are)
            confirmed, transient = list(findings), []
        return confirmed, {"retest": {"tasks": retest_plan["tasks"], "repeats": RETEST_REPEATS,
                                      "measurements": [m.to_json() for m in retest]},
                           "confirmed": [f.to_json() for f in confirmed],
                           "transient": [f.to_json() for f in transient]}

    def _run_link_scan(self) -> Tuple[Optional[Dict[str, Any]], List[Culprit]]:
        """The link scan (:mod:`.linkscan`): rank 0 plans each round from the results so far;
        every rank in a pair exchanges a small and a large message both ways with its partner
        on the world group (no new groups); rank 0 returns the report's ``links`` part and the
        culprits (None and [] on the other ranks, and with --no-followup)."""
        if not self.options.followup:
            return None, []
        scan = (LinkScan(self.hostnames, self.options.rule, tick=self.coordinator.beat)
                if self.rank == 0 else None)
        sizes = {"small": _pair_size(min(self.options.sizes)),
                 "large": _pair_size(min(max(self.options.sizes), PAIR_MAX_BYTES))}
        index, started = 0, time.perf_counter()
        while True:
            planned = scan.next_round() if scan is not None else None
            plan = self._share(f"scan{index}", planned.to_json() if planned is not None else None)
            if plan is None:
                break
            if index == 0 and self.device.type == "cuda":
                self._touch_world_group()
            records = self._scan_round(index, plan, sizes)
            collected = self.coordinator.exchange(f"scan{index}", records)
            if scan is not None:
                scan.record(scan_samples(index, plan["kind"], plan["rank_pairs"], collected))
            index += 1
        if scan is None:
            return None, []
        return dict(scan.to_json(), elapsed_s=time.perf_counter() - started), scan.culprits()

    def _scan_round(self, index: int, plan: Dict[str, Any], sizes: Mapping[str, int]) -> List[Dict[str, Any]]:
        pair = next((p for p in plan["rank_pairs"] if self.rank in p), None)
        label = f"link scan round {index + 1} ({plan['kind']})"
        self.coordinator.position(f"{label} (idle)")
        if pair is None:
            return []
        a, b = pair
        partner = b if a == self.rank else a
        records = []
        for which, size in sizes.items():
            where = f"{label} ranks {a}-{b} {format_bytes(size)}"
            self.progress.update(where)
            self.coordinator.position(where)
            try:
                record = self.bench.measure_pair(partner, self.rank, size, repeats=1)
            except GroupFailure as exc:
                self._hang(f"pair {a}-{b}", [a, b], where, "sendrecv", size, exc)
            records.append({**record, "pair": [a, b], "label": which})
        return records

    def _touch_world_group(self) -> None:
        """One all-reduce on the world device group, by every rank, before the pair rounds: an
        NCCL communicator must be complete before only two of its ranks talk over it."""
        where = "link scan: world group warm-up"
        self.coordinator.position(where)
        try:
            self.bench.run(lambda: [dist.all_reduce(torch.zeros(1, device=self.device), async_op=True)])
        except GroupFailure as exc:
            self._hang("global", list(range(self.world_size)), where, "all_reduce", 4, exc)

    def _finish(self, confirmed: List[diagnosis.Finding], culprits: List[Culprit],
                checked: Sequence[preflight.PreflightFinding]) -> Dict[str, Any]:
        report = dict(self.partial)
        report.update(verdict.summarize(
            [g.id for g in self.catalog], [(f.group_id, f.metric) for f in confirmed],
            culprits, (report.get("links") or {}).get("matrix", {}), self.hostnames,
            [f["group_id"] for f in report.get("transient", [])], [f.reason for f in checked]))
        hosts, ranks = preflight.abnormal(report["culprits"], checked, verdict.RANK_CULPRITS)
        report.update(abnormal_hosts=hosts, abnormal_ranks=ranks)
        report.update({"options": self.options.to_json(), "rule": self.options.rule.to_json(),
                       "elapsed_s": time.perf_counter() - self.started})
        return report


def aggregate_records(collected: Sequence[Optional[Sequence[Dict[str, Any]]]],
                      group_sizes: Mapping[str, int]) -> List[Measurement]:
    """Rank 0: every rank's records (one list per rank) folded into one Measurement per
    (group, collective, size), ordered by group, collective (as in metrics.COLLECTIVES) and
    size. Pure."""
    by_key: Dict[Tuple[str, str, int], List[Dict[str, Any]]] = {}
    for records in collected:
        for record in records or []:
            by_key.setdefault((record["group"], record["collective"], record["size"]), []).append(record)
    return [diagnosis.aggregate(gid, group_sizes[gid], recs) for (gid, _c, _s), recs in sorted(
        by_key.items(), key=lambda kv: (kv[0][0], metrics.COLLECTIVES.index(kv[0][1]), kv[0][2]))]


def scan_samples(index: int, kind: str, rank_pairs: Sequence[Sequence[int]],
                  collected: Sequence[Sequence[Dict[str, Any]]]) -> List[PairSample]:
    """Rank 0: one PairSample per pair of a scan round from both ranks' records (the best
    operation of each, averaged over the two ranks, as every follow-up judges); a pair
    without both ranks' small and large records is left out. Pure."""
    by_pair: Dict[Tuple[int, int], Dict[str, List[Dict[str, Any]]]] = {}
    for rank_records in collected:
        for record in rank_records:
            by_pair.setdefault(tuple(record["pair"]), {}).setdefault(record["label"], []).append(record)
    samples = []
    for a, b in rank_pairs:
        found = by_pair.get((a, b), {})
        if len(found.get("small", [])) != 2 or len(found.get("large", [])) != 2:
            continue
        small = diagnosis.aggregate(f"{a}-{b}", 2, found["small"])
        large = diagnosis.aggregate(f"{a}-{b}", 2, found["large"])
        wrong_at = {rank: sum(r["wrong"] for label in found.values() for r in label if r["rank"] == rank)
                    for rank in (a, b)}
        samples.append(PairSample(index, kind, a, b, large.judged_busbw, small.judged_time_s * 1e6,
                                  wrong_at[a], wrong_at[b]))
    return samples


def merge_record(records: Dict[Tuple[str, str, int], Dict[str, Any]], record: Dict[str, Any]) -> None:
    """Fold one more repetition of (group, collective, size) into this rank's record of it
    (times appended, best operation and wrong counts combined). Pure."""
    key = (record["group"], record["collective"], record["size"])
    if key not in records:
        records[key] = dict(record, wrong_from=dict(record["wrong_from"]))
        return
    merged = records[key]
    merged["times"] = merged["times"] + record["times"]
    merged["op_best"] = min(merged["op_best"], record["op_best"])
    merged["wrong"] += record["wrong"]
    for source, count in record["wrong_from"].items():
        merged["wrong_from"][source] = merged["wrong_from"].get(source, 0) + count


def _shape_for(collective: str, size_bytes: int, group_size: int) -> metrics.MessageShape:
    return metrics.message_shape(collective, size_bytes, group_size)


def _pair_size(requested: int) -> int:
    return metrics.message_shape("sendrecv", requested, 2).size_bytes
