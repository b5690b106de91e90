"""Group creation — the only module that creates or destroys torch.distributed process groups.

It never decides layouts: callers hand it rank lists (from initializers). It owns
- the creation *strategies*:
  ``all``   every rank enters every group's ``new_group`` (works everywhere; O(world) calls),
  ``local`` members only, ``new_group(..., use_local_synchronization=True)`` (O(modes) calls),
  ``split`` one ``split_group`` per mode from a device-bound default NCCL group (O(modes) calls);
- the device / CPU twins (NCCL + gloo; fake + fake under torch's fake backend; one gloo group
  when the device backend is gloo already);
- a dedupe cache, so identical rank lists across modes share one communicator;
- per-mode NCCL options (``nccl_options:`` in the config) passed as ``ProcessGroupNCCL.Options``
  to the NCCL groups of that mode (modes with different options never share a communicator);
- creation timeouts (a peer that never enters raises GroupTimeoutError naming the mode and
  ranks); how long waits last, and the NCCL watchdog margin, are :mod:`pgroups.deadlines`;
- destruction.

Contract of lazy creation (``groups: lazy`` or a CPU twin made on first request): creating a
group is collective over its members, who must request the same modes in the same order —
torch names members-only groups by how many groups a process already holds. Lazy device groups
therefore need the ``local`` strategy (:func:`check_lazy_creation`); lazily made CPU twins are
always members-only (gloo groups never split the world communicator).

NCCL (none of this has run on a GPU here; it is written from torch 2.13's distributed_c10d.py
and ProcessGroupNCCL.hpp): with a device-bound default group every NCCL group creation is a
split of the world communicator (:func:`creation_is_world_collective`), so ``auto`` picks
``split`` and ``local`` is refused. A split (ncclCommSplit, blocking) has no deadline: a rank
that never enters it leaves the others waiting until the launcher kills the job — only
store-based steps (rendezvous, gloo groups, non-split NCCL unique-id exchange) time out into
GroupTimeoutError.
"""
from __future__ import annotations

import contextlib
import datetime
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import nccl_options as nccl
from . import torch_private
from .deadlines import communicator_timeout, is_timeout, timeouts_named
from .errors import ConfigError, GroupTimeoutError, LaunchError
from .ranks import format_ranks

ProcessGroup = dist.ProcessGroup
GroupKey = Tuple[str, Tuple[int, ...], Optional[Hashable]]


def tensor_device(backend_name: str, cpu: bool = False) -> torch.device:
    """Where the tensors of a collective live: this rank's current GPU for a device group of an
    NCCL backend (``backend_name`` as torch names it: ``"nccl"``, ``"cpu:gloo,cuda:nccl"``), the
    CPU for gloo, fake and every CPU twin (``cpu=True``). The one place pgroups decides it."""
    if not cpu and "nccl" in str(backend_name).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend_name() -> str:
    """The backend string of the default group (e.g. ``"gloo"``, ``"nccl"``, ``"fake"``)."""
    return str(dist.get_backend()).lower()


def resolve_device_backend(requested: str) -> str:
    """Pick the device-group backend for ``requested`` (auto | nccl | gloo) on this machine.

    Under torch's fake backend every group is fake. Raises LaunchError for nccl without CUDA.
    """
    default = default_backend_name()
    if "fake" in default:
        return "fake"
    if requested == "auto":  # follow the default group: NCCL only when it runs NCCL on GPUs
        return "nccl" if torch.cuda.is_available() and "nccl" in default else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise LaunchError("backend 'nccl' needs CUDA GPUs and none is visible; use backend: gloo or auto")
    return requested


def cpu_backend_for(device_backend: str) -> str:
    return "fake" if device_backend == "fake" else "gloo"


def choose_strategy(requested: str, device_backend: str) -> str:
    """The creation strategy for ``requested`` (auto | all | local | split) on this job's default
    group: see :func:`strategy_for`. Raises LaunchError for a strategy that cannot work here."""
    world_collective = creation_is_world_collective(device_backend)
    return strategy_for(requested, world_collective, world_collective and hasattr(dist, "split_group"))


def strategy_for(requested: str, world_collective: bool, can_split: bool) -> str:
    """Pure decision. ``auto`` → ``split`` when torch can split the default group, ``all`` when
    creation is world-collective without ``split_group``, else ``local`` (members only).

    Raises LaunchError for ``split`` without a device-bound NCCL default group, and for
    ``local`` when creation is world-collective (members-only creation would deadlock: the
    ranks outside a group never enter the split that the members wait in).
    """
    if requested == "auto":
        return "split" if can_split else ("all" if world_collective else "local")
    if requested == "split" and not can_split:
        raise LaunchError(
            "strategy 'split' needs the nccl backend and a default group bound to a device "
            "(init_process_group(device_id=...)); use strategy: local or auto")
    if requested == "local" and world_collective:
        raise LaunchError(WORLD_COLLECTIVE_WHY + ", so strategy 'local' (members only) would deadlock; "
                          "use strategy: auto, split or all")
    return requested


#: Why NCCL group creation involves every rank when the default group is bound to a device.
WORLD_COLLECTIVE_WHY = (
    "the default group is NCCL bound to a device, so torch creates every NCCL group as a split of "
    "the world communicator (ncclCommSplit), which every rank must enter")


def creation_is_world_collective(device_backend: str) -> bool:
    """True when creating a device group needs every rank of the world, members or not.

    torch (``distributed_c10d._new_process_group_helper``): with a default group bound to a
    device (``init_process_group(device_id=...)``, as :func:`pgroups.launch.init_distributed`
    does on GPUs), each NCCL ``new_group`` is created by splitting the default communicator, and
    non-members take part through ``perform_nocolor_split``; ``split_group`` is collective over
    its parent too. gloo groups never split: members-only creation works for CPU twins.
    """
    if device_backend != "nccl":
        return False
    return torch_private.default_group_bound_device() is not None


def check_lazy_creation(groups: str, strategy: str, world_collective: bool) -> None:
    """Lazy device groups are created on first request. Under ``local`` that request is
    collective over the group's members; under ``all`` (gloo) over the world — every rank must
    then request every lazy mode, in one order. Where creation splits the world communicator
    (``split``, or any strategy on a device-bound NCCL default group) a lazy request made by a
    group's members would deadlock: raises ConfigError for ``groups: lazy`` there."""
    if groups == "lazy" and (strategy == "split" or world_collective):
        raise ConfigError(f"groups: lazy cannot work with strategy {strategy!r} here: "
                          f"{WORLD_COLLECTIVE_WHY}, so a request made by a group's members alone "
                          "would deadlock. Use groups: eager")


class GroupBackend:
    """Creates, caches and destroys the process groups of one context.

    ``calls`` counts this rank's ``new_group`` / ``split_group`` calls (the benchmark reports it).
    """

    def __init__(self, device_backend: str, strategy: str, timeout_s: float,
                 nccl_options: Optional[Mapping[str, nccl.NcclOptions]] = None,
                 store: Optional[Any] = None, creation_timeout_s: Optional[float] = None) -> None:
        self.device_backend = device_backend
        self.nccl_options = dict(nccl_options or {})
        self.cpu_backend = cpu_backend_for(device_backend)
        self.strategy = strategy
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.calls = 0
        #: one-rank groups made so that every rank holds as many groups as its peers (see
        #: :mod:`pgroups.creation`); not counted in ``calls``
        self.placeholders = 0
        self._meeting = (CreationRendezvous(store, creation_timeout_s or timeout_s)
                         if store is not None else None)
        self._steps: Dict[str, int] = {}  # how often this rank entered each step label
        self._cache: Dict[GroupKey, Optional[ProcessGroup]] = {}  # "all" strategy only
        self._created: List[ProcessGroup] = []

    @property
    def cpu_twin_needed(self) -> bool:
        """False when the device group already runs CPU tensors (gloo). Under the fake backend
        twins are built (as fake groups) so that simulations count what an NCCL job creates."""
        return self.device_backend != "gloo"

    def world_group(self) -> ProcessGroup:
        return dist.group.WORLD

    def options_key(self, mode: str) -> Optional[Hashable]:
        """What distinguishes ``mode``'s device communicator beyond its ranks: its NCCL options
        on an NCCL job (or a fake one, which simulates it), None otherwise."""
        if self.device_backend not in ("nccl", "fake"):
            return None
        return nccl.options_key(self.nccl_options.get(mode))

    def _pg_options(self, mode: str, backend: str) -> Optional[Any]:
        options = self.nccl_options.get(mode)
        if backend != "nccl" or not options:
            return None
        built = nccl_process_group_options(options)
        built._timeout = communicator_timeout(backend, self.timeout)  # torch warns when it differs from new_group's
        return built

    def device_for_tensors(self) -> torch.device:
        """Where tensors for this backend's device groups live: this rank's GPU under NCCL."""
        return tensor_device(self.device_backend)

    def world_cpu_group_needs_creation(self) -> bool:
        """Whether the world's CPU group is a group of its own (one creation, by every rank),
        rather than the default group itself: true when a CPU twin is needed and the default
        group has no gloo backend (torch.distributed started with plain ``nccl`` by the user;
        pgroups starts ``cpu:gloo,cuda:nccl``). Under the fake backend nothing can hang: False."""
        return self.cpu_twin_needed and self.device_backend != "fake" and "gloo" not in default_backend_name()

    def build(self, mode: str, my_ranks: Optional[Sequence[int]],
              all_groups: Callable[[], List[List[int]]], cpu: bool = False,
              strategy: Optional[str] = None) -> Optional[ProcessGroup]:
        """Create ``mode``'s group that holds this rank (None if it is in none) and return it.

        ``my_ranks`` is this rank's sorted group; ``all_groups`` lists every group of the mode
        (only called by the ``all`` and ``split`` strategies, which need every rank to take
        part). ``cpu`` builds the gloo twin instead of the device group. ``strategy`` overrides
        the backend's strategy for this call. Collective: see the module docstring.
        """
        backend = self.cpu_backend if cpu else self.device_backend
        strategy = strategy or ("local" if cpu and self.strategy == "split" else self.strategy)
        if my_ranks is not None and len(my_ranks) == dist.get_world_size() and (
                not cpu or not self.cpu_twin_needed or "gloo" in default_backend_name()) and (
                cpu or self.options_key(mode) is None):
            return self.world_group()
        def describe(exc: BaseException) -> str:
            return (f"creating the {'cpu' if cpu else 'device'} group of mode {mode!r} "
                    f"with ranks {format_ranks(my_ranks)} timed out after {self.timeout.total_seconds():g}s "
                    f"on rank {dist.get_rank()}: a peer never entered (is every member running "
                    "and requesting the same modes in the same order? across hosts, set "
                    "GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)")

        label = f"{mode}/{'cpu' if cpu else 'device'}"
        step = f"{label}#{self._steps.get(label, 0)}"
        self._steps[label] = self._steps.get(label, 0) + 1
        with timeouts_named(describe):
            meeting = list(range(dist.get_world_size())) if strategy != "local" else my_ranks
            if self._meeting is not None and meeting is not None:
                what = f"creating the {'cpu' if cpu else 'device'} group of mode {mode!r}"
                held = self._meeting.meet(f"{step}/{meeting[0]}", what, meeting, dist.get_rank(), torch_private.groups_held())
                while torch_private.groups_held() < held:  # agree with the peers that hold more groups
                    self._placeholder()
            created = len(self._created)  # after the agreement: what this step itself registers
            if strategy == "all":
                group = self._build_all(backend, my_ranks, all_groups(), mode, cpu)
            elif strategy == "split":
                group = self._build_split(backend, my_ranks, all_groups(), mode)
            else:
                group = self._build_local(backend, my_ranks, mode)
        if len(self._created) == created:  # registered nothing in this step: keep in step
            self._placeholder()
        return group

    def _placeholder(self) -> None:
        """Register a one-rank group, so that this rank holds as many groups as its peers after
        a step in which it created none of its own (see :mod:`pgroups.creation`)."""
        rank = dist.get_rank()
        group = dist.new_group([rank], timeout=self.timeout, backend=self.cpu_backend,
                               use_local_synchronization=True, group_desc="pgroups:placeholder")
        self.placeholders += 1
        self._created.append(group)

    def build_for_rank_lists(self, name: str, rank_groups: Sequence[Sequence[int]],
                             cpu: bool = False) -> Optional[ProcessGroup]:
        """Create groups for arbitrary disjoint rank lists (host-aware groups of the network
        test, …) and return the one that holds this rank (None if none does).

        Every rank calls it with the same ``rank_groups`` in the same order. It costs this rank
        one creation call whatever the number of groups — one ``split_group`` over all of them
        (strategy ``split``), or one members-only ``new_group`` for its own group (``local``) —
        except under strategy ``all``, which enters every group. Raises GroupTimeoutError like
        :meth:`build`.
        """
        groups = [sorted(g) for g in rank_groups]
        rank = dist.get_rank()
        mine = next((g for g in groups if rank in g), None)
        return self.build(name, mine, lambda: groups, cpu=cpu)

    def _new_group(self, ranks: Sequence[int], backend: str, mode: str, local: bool) -> Optional[ProcessGroup]:
        self.calls += 1
        group = dist.new_group(list(ranks), timeout=communicator_timeout(backend, self.timeout), backend=backend,
                               pg_options=self._pg_options(mode, backend),
                               use_local_synchronization=local, group_desc=f"pgroups:{mode}")
        if group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER:
            self._created.append(group)
            return group
        return None

    def _build_local(self, backend: str, my_ranks: Optional[Sequence[int]], mode: str) -> Optional[ProcessGroup]:
        # No rank-local dedupe here: a partial match (one rank's nettest block equal to its
        # tensor group) would make this rank create nothing in the step, and the placeholder
        # it then makes costs as much as the group. Modes equal as a whole are shared.
        if my_ranks is None:
            return None
        return self._new_group(my_ranks, backend, mode, local=True)

    def _build_all(self, backend: str, my_ranks: Optional[Sequence[int]],
                   groups: List[List[int]], mode: str, cpu: bool) -> Optional[ProcessGroup]:
        mine = tuple(my_ranks) if my_ranks is not None else None
        result = None
        for ranks in groups:  # every rank walks the same list: the cache stays identical everywhere
            key = ("cpu" if cpu else "device", tuple(ranks), None if cpu else self.options_key(mode))
            if key not in self._cache:
                self._cache[key] = self._new_group(ranks, backend, mode, local=False)
            if key[1] == mine:
                result = self._cache[key]
        return result

    def _build_split(self, backend: str, my_ranks: Optional[Sequence[int]],
                     groups: List[List[int]], mode: str) -> Optional[ProcessGroup]:
        # split_group is collective over the default group: one call per mode on every rank.
        self.calls += 1
        group = dist.split_group(split_ranks=[list(g) for g in groups], timeout=communicator_timeout(backend, self.timeout),
                                 pg_options=self._pg_options(mode, backend), group_desc=f"pgroups:{mode}")
        if group is not None:
            self._created.append(group)
        return group

    def destroy_group(self, group: ProcessGroup) -> None:
        """Destroy one group this backend created (a model's release); the world group is kept."""
        if group is self.world_group():
            return
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group(group)
        self._created = [g for g in self._created if g is not group]
        self._cache = {key: g for key, g in self._cache.items() if g is not group}

    def settle(self, rank: int, world_size: int) -> Optional[str]:
        """Meet every rank of the world through the store before a teardown, at most the creation
        deadline: a rank that destroys its groups while a peer is still inside a collective with it
        closes gloo connections under the peer (seen as "terminate called without an active
        exception" in docs/isp.md's training loop, 3 runs of 8 without a barrier). Returns None, or the
        one-line reason when some ranks never arrived (the caller destroys anyway). Nothing to do
        under the fake backend or in a world of one."""
        if self._meeting is None or world_size == 1:
            return None
        try:
            self._meeting.meet("teardown", "meeting before the teardown", list(range(world_size)), rank, 0,
                               hint="did they exit, or fail, without calling destroy()?")
        except GroupTimeoutError as exc:
            return str(exc)
        return None

    def destroy(self) -> None:
        """Destroy every group this backend created (not the default group)."""
        for group in reversed(self._created):
            try:
                dist.destroy_process_group(group)
            except (RuntimeError, ValueError):
                pass  # already gone with the default group
        self._created.clear()
        self._cache.clear()


CREATION_HINT = ("are they running and requesting the same modes? across hosts, set GLOO_SOCKET_IFNAME / "
                 "NCCL_SOCKET_IFNAME")


class CreationRendezvous:
    """Where the members of a group meet, through the store, before creating it.

    Each member writes how many groups it holds and counts itself in; the last to arrive
    publishes the largest count; everyone waits for it at most ``timeout_s`` (the config's
    creation deadline, shorter than the collective timeout). It gives (a) a creation deadline
    whose error names who entered and who did not, and (b) agreement on the count torch names
    members-only groups by: members holding fewer groups pad up to it with placeholders. In an
    eager build every rank already holds the same count (:mod:`pgroups.creation`), so nobody
    pads; requests by members alone (lazy groups, CPU twins on first use) rely on it.

    Store traffic per member and step: one set, one add, one wait, one get; the last arriver
    also reads every member's count once (a ``multi_get``).
    """

    def __init__(self, store: Any, timeout_s: float) -> None:
        self.store = store
        self.timeout = datetime.timedelta(seconds=timeout_s)

    def meet(self, step: str, what: str, members: Sequence[int], rank: int, held: int,
             hint: str = CREATION_HINT) -> int:
        """Arrive at ``step`` (a key every member derives alike) with ``held`` groups; return the
        largest count among ``members`` once all arrived. Raises GroupTimeoutError naming
        ``what`` the members meet for (e.g. "creating mode 'tp'"), the ranks that arrived and
        the ones that did not, and ``hint``."""
        store = self.store
        store.set(f"{step}/held/{rank}", str(held))
        if store.add(f"{step}/arrived", 1) == len(members):
            counts = store.multi_get([f"{step}/held/{m}" for m in members])
            store.set(f"{step}/most", str(max(int(c) for c in counts)))
        try:
            store.wait([f"{step}/most"], self.timeout)
        except (RuntimeError, dist.DistError) as exc:
            if not is_timeout(exc):
                raise
            entered = [m for m in members if self._arrived(f"{step}/held/{m}")]
            missing = [m for m in members if m not in entered]
            raise GroupTimeoutError(
                f"{what} with ranks {format_ranks(members)} timed out after "
                f"{self.timeout.total_seconds():g}s (creation_timeout_s) on rank {rank}: ranks "
                f"{format_ranks(entered)} entered, ranks {format_ranks(missing)} never did ({hint})") from exc
        return int(store.get(f"{step}/most"))

    def _arrived(self, key: str) -> bool:
        try:
            return bool(self.store.check([key]))
        except (RuntimeError, dist.DistError):
            return False


def nccl_process_group_options(options: nccl.NcclOptions, options_class: Optional[type] = None) -> Any:
    """torch's ``ProcessGroupNCCL.Options`` for one mode's validated ``nccl_options``.

    ``is_high_priority_stream`` goes to the options, every other key to ``options.config`` (a
    key left out keeps NCCL's default), as Megatron-Core's ``get_nccl_options`` does.
    ``options_class`` replaces torch's class (tests). Raises LaunchError when this torch build
    has no NCCL.
    """
    if options_class is None:
        options_class = getattr(getattr(dist, "ProcessGroupNCCL", None), "Options", None)
        if options_class is None:
            raise LaunchError("nccl_options need torch.distributed.ProcessGroupNCCL, which this "
                              "torch build lacks (a CPU-only build); remove nccl_options or use a CUDA build")
    built = options_class(is_high_priority_stream=bool(options.get("is_high_priority_stream", False)))
    for key, value in nccl.config_fields(options).items():
        setattr(built.config, key, value)
    return built
