"""What every rank runs: the steps (sweep, re-test, link scan, verdict) and the failure path.

Two planes, each in its own module:

- the **data plane** (:mod:`.bench`) is the collectives under test, on the groups under test
  (NCCL device groups on GPUs, gloo on CPU). ``Bench.run`` issues every operation and waits
  for it inside the failure handling; only ``--timeout`` ends an operation, and a peer that
  never enters (or is found dead when an operation is issued) fails it instead of hanging;
- the **control plane** (:mod:`.control`) is the rendezvous store of the default group (no
  collective at all): ranks post their figures and where they are, wait for each other
  between steps, and raise the *abort* flag when a group hangs — every other rank sees it
  within a second and stops. A rank that stops making progress while idle (no heartbeat for
  ``--timeout``) is named too.

Steps, the same on every rank: one *sweep* per wave of disjoint groups; rank 0 then diagnoses
and publishes a *re-test* plan (flagged groups and some healthy peers, each measured alone,
round-robin) and a *pair* plan (candidates paired with references, see :mod:`.diagnosis`);
everyone executes the plans; rank 0 publishes the exit code every rank returns.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch
import torch.distributed as dist

from ..config import load_config
from ..context import ParallelContext
from ..deadlines import is_timeout
from ..errors import ConfigError, GroupTimeoutError, LaunchError, ModeNotInitializedError
from ..hosts import local_hostname
from ..launch import from_environment
from . import diagnosis, metrics, startup, verdict
from .bench import Bench, GroupFailure
from .control import Coordinator, NettestTimeoutError, StoreGoneError, first_words, short_ranks, store_gone
from .diagnosis import Measurement, Rule
from .faults import FAULT_ENV, ActiveFaults, parse_faults
from .linkscan import Culprit, LinkScan, PairSample
from .startup import StartupBoard
from .groups import HOST_KINDS, GroupUnderTest, build_catalog, duplicate_kinds, group_of_rank, plan_waves

RETEST_REPEATS = 3
PAIR_MAX_BYTES = 8 * 1024 * 1024  # pair tests stop here: enough to compare pairs, and quick
CLOSE_WAIT_S = 2.0


@attrs.frozen
class NettestOptions:
    """Everything a rank needs to run the test (picklable, the same on every rank)."""

    config: Any
    modes: Tuple[str, ...] = ("nettest",)
    host_groups: bool = True
    collectives: Tuple[str, ...] = ("all_reduce",)
    min_bytes: int = metrics.DEFAULT_MIN_BYTES
    max_bytes: int = metrics.DEFAULT_MAX_BYTES
    step_factor: int = 2
    iters: int = 5
    warmup: int = 1
    timeout_s: float = 60.0
    rule: Rule = Rule()
    followup: bool = True
    progress: bool = True
    json_path: Optional[str] = None

    @property
    def sizes(self) -> List[int]:
        return metrics.size_sweep(self.min_bytes, self.max_bytes, self.step_factor)

    def to_json(self) -> Dict[str, Any]:
        return {"modes": list(self.modes), "host_groups": self.host_groups,
                "collectives": list(self.collectives), "min_bytes": self.min_bytes,
                "max_bytes": self.max_bytes, "step_factor": self.step_factor, "iters": self.iters,
                "warmup": self.warmup, "timeout_s": self.timeout_s, "followup": self.followup}


# ---- one rank's whole run ---------------------------------------------------------------------
def select_modes(requested: Sequence[str], built: Sequence[str]) -> List[str]:
    """``("all",)`` → every built mode; else the requested ones, which must be built (ConfigError)."""
    if list(requested) == ["all"]:
        return list(built)
    unknown = [m for m in requested if m not in built]
    if unknown:
        raise ConfigError(f"--modes: unknown mode {unknown[0]!r}; built modes: "
                          f"{', '.join(built)} (or 'all')")
    return list(dict.fromkeys(requested))


class RankRun:
    """One rank's run: builds the groups, executes the steps, and (rank 0) the diagnosis."""

    def __init__(self, ctx: ParallelContext, options: NettestOptions, progress: Any) -> None:
        self.ctx, self.options, self.progress = ctx, options, progress
        self.rank = ctx.get_global_rank()
        self.world_size = dist.get_world_size()
        self.hostnames = ctx.get_hostnames()
        self.coordinator = Coordinator.from_default_group(options.timeout_s, self.hostnames)
        self.coordinator.start_liveness()
        self.faults = ActiveFaults.for_rank(parse_faults(os.environ.get(FAULT_ENV)), self.rank,
                                            self.hostnames[self.rank])
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if ctx.backend.device_backend == "nccl" else torch.device("cpu"))
        self.bench = Bench(self.device, self.coordinator, self.faults, options.timeout_s,
                           options.warmup, options.iters)
        self.catalog: List[GroupUnderTest] = []
        self.handles: Dict[str, Any] = {}
        self.report: Dict[str, Any] = {}
        self._findings: List[diagnosis.Finding] = []
        self._confirmed: List[diagnosis.Finding] = []
        self._culprits: List[Culprit] = []
        self.exit_code = 0
        self.started = time.perf_counter()

    # -- groups ---------------------------------------------------------------------------
    def build_groups(self) -> None:
        modes = select_modes(self.options.modes, self.ctx.modes)
        mode_groups = {m: self.ctx.get_rank_groups(m) for m in modes}
        self.catalog = build_catalog(mode_groups, self.hostnames, self.options.host_groups)
        kinds = list(dict.fromkeys(g.kind for g in self.catalog))
        for kind in kinds:  # the same order on every rank: creation is collective
            groups = [g for g in self.catalog if g.kind == kind]
            mine = next((g for g in groups if self.rank in g.ranks), None)
            if kind in HOST_KINDS:
                handle = self.ctx.backend.build_for_rank_lists(f"nettest-{kind}", [list(g.ranks) for g in groups])
            else:
                try:
                    handle = self.ctx.get_group(kind)
                except ModeNotInitializedError:
                    handle = None
            if mine is not None:
                self.handles[mine.id] = handle
        self.report.update({
            "world_size": self.world_size, "backend": self.ctx.backend.device_backend,
            "device": str(self.device.type), "hostnames": self.hostnames,
            "skipped_kinds": duplicate_kinds({**mode_groups}),
            "groups": [g.to_json() for g in self.catalog]})

    # -- steps ----------------------------------------------------------------------------
    def run(self) -> Optional[Dict[str, Any]]:
        self.coordinator.position("building the groups under test")
        try:
            self.build_groups()
        except GroupTimeoutError as exc:   # a peer died while the groups were being built
            if isinstance(exc, NettestTimeoutError):
                raise
            self._alarm({"message": f"building the groups under test: {exc}", "kind": "timeout",
                         "step": "build-groups", "detected_by": self.rank, "cause": first_words(str(exc))})
        self.faults.stay_away()
        waves = plan_waves(self.catalog)
        sweep: List[Measurement] = []
        for index, wave in enumerate(waves):
            records = self._sweep_wave(index, len(waves), wave)
            collected = self.coordinator.exchange(f"sweep{index}", records)
            if self.rank == 0:
                sweep.extend(self._aggregate(collected, {g.id: g for g in wave}))
        plan = self._decide_retest(sweep) if self.rank == 0 else None
        retest_plan = self._share("retest", plan)
        retest = self._run_retest(retest_plan)
        if self.rank == 0:
            self._confirm(retest_plan, retest)
        self._run_link_scan()
        report = self._finish() if self.rank == 0 else None
        verdict = self._share("verdict", {"exit_code": report["exit_code"]} if report else None)
        self.exit_code = int(verdict["exit_code"])
        self.coordinator.close()
        return report

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
                where = f"sweep {index + 1}/{waves} {group.id} {collective} {metrics.format_size(shape.size_bytes)}"
                self.progress.update(f"{where} [{step + 1}/{len(shapes)}]")
                records.append(self._measure(group, collective, shape, where, repeats=1))
        return records

    def _measure(self, group: GroupUnderTest, collective: str, shape: metrics.MessageShape, where: str,
                 repeats: int, followup: bool = False) -> Dict[str, Any]:
        self.coordinator.position(where)
        try:
            record = self.bench.measure(collective, self.handles[group.id], list(group.ranks), self.rank,
                                        shape, repeats, followup)
        except GroupFailure as exc:
            self._hang(group.id, list(group.ranks), where, collective, shape.size_bytes, exc)
        record["group"] = group.id
        return record

    def _hang(self, group_id: str, ranks: List[int], where: str, collective: str, size_bytes: int,
              failure: GroupFailure) -> None:
        positions = self.coordinator.positions([r for r in ranks if r != self.rank])
        absent = {r: p for r, p in positions.items() if p != where}
        hosts = list(dict.fromkeys(self.hostnames[r] for r in ranks))
        cause = str(failure)
        timed_out = is_timeout(failure.__cause__ or failure)
        when = " when issued" if failure.phase == "issue" else ""
        what = (f"{collective} of {metrics.format_size(size_bytes)} did not complete within "
                f"{self.options.timeout_s:g}s" if timed_out else f"{collective} of "
                f"{metrics.format_size(size_bytes)} failed{when} ({cause})")
        culprits = "; ".join(f"rank {r} (host {self.hostnames[r]}) never entered it (last at: {p})"
                             for r, p in sorted(absent.items()))
        message = f"group {group_id} (ranks {ranks}, hosts {hosts}): {what}" + (f"; {culprits}" if culprits else "")
        report = {"message": message, "kind": "timeout" if timed_out else "failure", "group": group_id,
                  "ranks": ranks, "hosts": hosts, "collective": collective, "size_bytes": size_bytes,
                  "timeout_s": self.options.timeout_s, "detected_by": self.rank,
                  "never_entered": [{"rank": r, "host": self.hostnames[r], "last_at": p}
                                    for r, p in sorted(absent.items())],
                  "cause": cause, "failed_at": failure.phase}
        self._alarm(report)

    def _alarm(self, report: Dict[str, Any]) -> None:
        """Raise the abort flag with ``report`` and raise the first report raised (every rank
        tells one story)."""
        self.coordinator.abort(report)
        self.coordinator.check_abort()
        raise NettestTimeoutError(report["message"], report)

    def _aggregate(self, collected: Sequence[Sequence[Dict[str, Any]]],
                   groups: Mapping[str, Any]) -> List[Measurement]:
        by_key: Dict[Tuple[str, str, int], List[Dict[str, Any]]] = {}
        for records in collected:
            for record in records:
                by_key.setdefault((record["group"], record["collective"], record["size"]), []).append(record)
        return [diagnosis.aggregate(gid, _size_of(groups[gid]), recs) for (gid, _c, _s), recs in sorted(
            by_key.items(), key=lambda kv: (kv[0][0], metrics.COLLECTIVES.index(kv[0][1]), kv[0][2]))]

    # -- rank 0's decisions -----------------------------------------------------------------
    def _decide_retest(self, sweep: List[Measurement]) -> Dict[str, Any]:
        rule = self.options.rule
        slow = diagnosis.find_slow(self.catalog, sweep, rule, tick=self.coordinator.beat)
        wrong = diagnosis.find_wrong(self.catalog, sweep)
        self.report["measurements"] = [m.to_json() for m in sweep]
        self.report["findings"] = [f.to_json() for f in slow + wrong]
        self._findings = slow + wrong
        tasks = diagnosis.plan_retest(slow, self.catalog) if self.options.followup else []
        return {"tasks": [t.to_json() for t in tasks]}

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
                                 f"{metrics.format_size(shape.size_bytes)}")
                        self.progress.update(where)
                        _merge_record(mine, self._measure(group, collective, shape, where, repeats=1,
                                                          followup=True))
                self.coordinator.exchange(f"retest{repeat}.{index}", None)
        collected = self.coordinator.exchange("retest", list(mine.values())) if tasks else None
        if self.rank != 0 or not tasks:
            return []
        return self._aggregate(collected, by_id)

    def _confirm(self, retest_plan: Dict[str, Any], retest: List[Measurement]) -> None:
        """Rank 0: split the sweep's findings into confirmed and transient by the re-test."""
        findings = self._findings
        if retest_plan["tasks"]:
            confirmed, transient = diagnosis.confirm(findings, self.catalog, retest, self.options.rule)
        else:  # nothing slow to re-test (or --no-followup: sweep findings stand as they are)
            confirmed, transient = list(findings), []
        self.report["retest"] = {"tasks": retest_plan["tasks"], "repeats": RETEST_REPEATS,
                                 "measurements": [m.to_json() for m in retest]}
        self.report["confirmed"] = [f.to_json() for f in confirmed]
        self.report["transient"] = [f.to_json() for f in transient]
        self._confirmed = confirmed

    def _run_link_scan(self) -> None:
        """The link scan (:mod:`.linkscan`): rank 0 plans each round from the results so far;
        every rank in a pair exchanges a small and a large message both ways with its partner
        on the world group (no new groups); rank 0 records the figures."""
        if not self.options.followup:
            return
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
                scan.record(_scan_samples(index, plan["kind"], plan["rank_pairs"], collected))
            index += 1
        if scan is not None:
            self.report["links"] = dict(scan.to_json(), elapsed_s=time.perf_counter() - started)
            self._culprits = scan.culprits()

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
            where = f"{label} ranks {a}-{b} {metrics.format_size(size)}"
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

    def _finish(self) -> Dict[str, Any]:
        self.report.update(verdict.summarize(
            [g.id for g in self.catalog], [(f.group_id, f.metric) for f in self._confirmed],
            self._culprits, (self.report.get("links") or {}).get("matrix", {}), self.hostnames,
            [f["group_id"] for f in self.report.get("transient", [])]))
        self.report.update({"options": self.options.to_json(), "rule": self.options.rule.to_json(),
                            "elapsed_s": time.perf_counter() - self.started})
        return self.report


def _scan_samples(index: int, kind: str, rank_pairs: Sequence[Sequence[int]],
                  collected: Sequence[Sequence[Dict[str, Any]]]) -> List[PairSample]:
    """Rank 0: one PairSample per pair of a scan round from both ranks' records (the best
    operation of each, averaged over the two ranks, as every follow-up judges)."""
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


def _merge_record(records: Dict[Tuple[str, str, int], Dict[str, Any]], record: Dict[str, Any]) -> None:
    """Fold one more repetition of (group, collective, size) into this rank's record of it."""
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


def _size_of(group: Any) -> int:
    return group.size


def _shape_for(collective: str, size_bytes: int, group_size: int) -> metrics.MessageShape:
    return metrics.message_shape(collective, size_bytes, group_size)


def _pair_size(requested: int) -> int:
    return metrics.message_shape("sendrecv", requested, 2).size_bytes


class NullProgress:
    """The progress display of ranks other than 0: says nothing."""

    def update(self, text: str) -> None:
        pass

    def done(self) -> None:
        pass


@attrs.frozen
class RankResult:
    """What one rank's run ends with: the exit code every rank agrees on, and rank 0's report."""

    rank: int
    exit_code: int
    report: Optional[Dict[str, Any]] = None


def run_rank(options: NettestOptions, progress: Any = None) -> RankResult:
    """Initialize this rank from the environment (torchrun, SLURM, or our local launcher), run
    the test and return its RankResult (the report on rank 0 only).

    ``progress`` (used on rank 0 only) has ``update(text)`` and ``done()``. Raises
    NettestTimeoutError when a group hangs or a rank dies: every surviving rank first answers
    the abort, the rank that raised it names the ranks that did not answer, the report (what
    was measured, and the hang) is written to ``options.json_path`` by rank 0 — or by the rank
    that raised the abort when rank 0 is gone, or by the lowest rank of each host when the
    store is gone — and the ranks on the store's host leave last. When the default group does
    not form within ``--timeout`` (ranks that never came or died during the start-up), the
    NettestTimeoutError names them (:mod:`.startup`). ConfigError / LaunchError for bad input. The context is destroyed in every case; on NCCL the communicators are
    aborted first after a hang (destroying one with a hung operation would wait for it).
    """
    config = load_config(options.config)
    # The groups' deadline is --timeout: gloo groups time out with it (a hung operation fails by
    # itself at about the moment our wait gives up, and no thread is left blocked at exit); NCCL
    # communicators get pgroups.deadlines' watchdog margin on top, so that the tool, not NCCL's
    # watchdog, reports the hang.
    config = attrs.evolve(config, timeout_s=options.timeout_s)
    board = _startup_board(options) if not dist.is_initialized() else None
    faults = parse_faults(os.environ.get(FAULT_ENV))
    ActiveFaults.for_rank(faults, _env_rank(), local_hostname()).never_start()
    if board is not None:
        board.start()
    ctx = ParallelContext()
    run: Optional[RankRun] = None
    hung = False
    shown, progress = progress, NullProgress()
    try:
        try:
            ctx.init_from_config(config)
            if ctx.get_global_rank() == 0 and shown is not None:
                progress = shown
            run = RankRun(ctx, options, progress)
        except (LaunchError, GroupTimeoutError, RuntimeError) as exc:
            if board is None or isinstance(exc, NettestTimeoutError):
                raise
            raise _failed_startup(board, options, exc) from None
        if board is not None:
            board.stop()
        report = run.run()
        if board is not None:
            board.forget()
        return RankResult(run.rank, run.exit_code, report)
    except NettestTimeoutError as exc:
        hung = True
        if run is None:
            raise
        raise _conclude(run, exc) from None
    finally:
        progress.done()
        if run is not None:
            run.bench.close()
            run.coordinator.shutdown()
        _close_context(ctx, hung)


def _finish_before_terminate() -> None:
    """From here the rank only reports (every step bounded): a launcher that stops a host's
    other ranks when one exits (torchrun sends SIGTERM) must not cut a rank off before its one
    line and the report — it exits 3 moments later by itself (torchrun's SIGKILL follows
    after 30 s anyway)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _env_rank() -> int:
    text = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or ""
    return int(text) if text.isdigit() else -1


def _startup_board(options: NettestOptions) -> Optional[StartupBoard]:
    try:
        launch = from_environment()
    except LaunchError:
        return None   # the context's own start-up says what is missing
    return StartupBoard.from_environment(launch, local_hostname(), options.timeout_s)


def _failed_startup(board: StartupBoard, options: NettestOptions, exc: BaseException) -> BaseException:
    """The default group (or the first exchange) did not form: name who never arrived, write
    the report (the lowest rank present writes it), and return the error to raise —
    NettestTimeoutError if ranks are missing, StoreGoneError if the store cannot be read, the
    original error if everyone is there (something else failed)."""
    from .report import write_json

    _finish_before_terminate()
    missing = board.find_missing()
    if missing is None:   # the store is gone: each host's first local rank writes what it knows
        error = store_gone(f"unreachable after the start-up failed: {first_words(str(exc))}")
        writer = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0"
        report = error.report
    elif not missing.ranks:
        return exc
    else:
        message = startup.describe(missing, options.timeout_s)
        report = {"message": message, "kind": "start-up", "missing": missing.ranks,
                  "never_arrived": list(missing.never_arrived), "stopped_answering": list(missing.went_silent),
                  "missing_hosts": missing.known_hosts, "cause": first_words(str(exc))}
        present = [r for r in range(board.world_size) if r not in set(missing.ranks)]
        writer = bool(present) and board.rank == present[0]
        error = NettestTimeoutError(message, report)
    if options.json_path and writer:
        write_json({"status": "timeout", "exit_code": 3, "world_size": board.world_size, "timeout": report,
                    "options": options.to_json()}, options.json_path)
    return error


def _conclude(run: RankRun, exc: NettestTimeoutError) -> NettestTimeoutError:
    """After an abort: answer, learn the final story, write the report, leave in order."""
    from .report import write_json

    _finish_before_terminate()
    coordinator, report = run.coordinator, exc.report
    store_gone = isinstance(exc, StoreGoneError)
    if not store_gone:
        try:
            report = coordinator.conclude_abort(report)
        except StoreGoneError as gone:
            store_gone, report = True, dict(report, message=f"{report.get('message', exc)}; {gone}")
    coordinator.stop_liveness()
    missing = set(report.get("missing", []))
    if store_gone:
        same_host = [r for r, h in enumerate(run.hostnames) if h == run.hostnames[run.rank]]
        writer = run.rank == min(same_host)
        store_host = run.hostnames[0]
        with_it = [r for r, h in enumerate(run.hostnames) if h == store_host]
        report = dict(report, missing=with_it, missing_hosts=[store_host],
                      message=f"{report.get('message', exc)}: probably with {store_host} "
                              f"(ranks {short_ranks(with_it)}), where it runs")
    else:
        writer = run.rank == 0 or (0 in missing and report.get("detected_by") == run.rank)
    if writer and run.options.json_path:
        run.report.update({"status": "timeout", "timeout": report, "exit_code": 3,
                           "options": run.options.to_json(), "elapsed_s": time.perf_counter() - run.started})
        write_json(run.report, run.options.json_path)
    if not store_gone:
        try:
            coordinator.leave_after_abort(report)
            coordinator.close_after_abort(report)
        except StoreGoneError:
            pass
    error_type = StoreGoneError if store_gone else NettestTimeoutError
    return error_type(report.get("message", str(exc)), report)


def _close_context(ctx: ParallelContext, hung: bool) -> None:
    """Destroy the context; after a hang, abort NCCL communicators first, and do not wait
    longer than CLOSE_WAIT_S for a destroy that a hung operation may block."""
    if hung and dist.is_initialized() and ctx.backend is not None and ctx.backend.device_backend == "nccl":
        try:
            dist.distributed_c10d._abort_process_group()
        except (RuntimeError, ValueError, AttributeError):
            pass
    if not hung:
        ctx.destroy()
        return
    closer = threading.Thread(target=_destroy_quietly, args=(ctx,), daemon=True)
    closer.start()
    closer.join(CLOSE_WAIT_S)


def _destroy_quietly(ctx: ParallelContext) -> None:
    try:
        ctx.destroy(sync=False)
    except Exception:  # noqa: BLE001 - tearing down after a hang: nothing left to report
        pass
