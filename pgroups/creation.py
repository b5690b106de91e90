"""The group-creation schedule as data, and a checker that proves no rank waits forever (pure).

Why creation can deadlock at all — torch 2.13's ``distributed_c10d.py``:

- ``new_group(ranks, use_local_synchronization=True)`` (our ``local`` strategy) names the group
  ``sha1("r0_r1_…_" + str(len(_world.pg_names)))`` (``_hash_ranks_to_str``): the sorted ranks
  *and the number of groups this process already holds* (the default group counts as one).
  The name is the group's store prefix (``PrefixStore(f"{name}/", default_store)``), under
  which gloo's full-mesh rendezvous and NCCL's unique-id exchange meet. Members that hold
  different numbers of groups use different prefixes and each waits for the others forever.
- ``new_group(ranks)`` without local synchronization (our ``all`` strategy: every rank enters
  every group) names it ``str(_world.group_count)``, a counter every rank — member or not —
  advances by one per call; only members register the group (``len(pg_names)`` grows on
  members only).
- ``split_group(split_ranks=…)`` (our ``split`` strategy; NCCL on a device-bound default group)
  is collective over the parent group, and names each member's group with the same hash as
  ``local`` (its own split, ``len(pg_names)``). Non-members get None and register nothing.

So every path names groups by per-process history. pgroups makes the history equal instead:
in an eager build every rank takes part in every creation *step* (one mode's device groups,
one mode's CPU twins, one list of nettest groups) and registers exactly one group in it — its
own, or a one-rank *placeholder* when it is in none of the step's groups or its group was
reused from the cache — unless every rank skips the step alike (a mode sharing an earlier
mode's communicators, a mode whose one group is the world). Members therefore always hold the
same number of groups when they meet. Requests made by a group's members alone (lazy groups,
CPU twins made on first use) cannot be padded that way; the members first agree on the
largest count among them through the store and pad up to it (:mod:`pgroups.backend`'s
creation rendezvous), which :func:`lazy_schedule` models.

This module models each rank's sequence of creation calls (:class:`Call`) and simulates them
(:func:`find_deadlock`): a call completes when every rank it waits for stands at the matching
call, and a members-only call also needs its members to derive one name. The model is compared
with torch's own naming under the fake backend in the tests (the ground truth), and run over
random configs as a property test.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import attrs

from .ranks import format_ranks

#: Groups a process holds before pgroups creates any: torch's default group.
DEFAULT_REGISTERED = 1
#: ``_world.group_count`` after ``init_process_group`` (the default group took name "0").
DEFAULT_GROUP_COUNT = 1

LOCAL, ALL, SPLIT = "local", "all", "split"
#: Strategies of a step: how its groups are created. ``world`` and ``shared`` make no call.
WORLD, SHARED = "world", "shared"

Group = Tuple[int, ...]


def hashed_group_name(ranks: Sequence[int], registered: int) -> str:
    """The name torch 2.13 gives a members-only (or split) group: ``_hash_ranks_to_str``.

    ``registered`` is ``len(_world.pg_names)`` on the calling process (default group included).

    >>> hashed_group_name([1, 3], 1) == hashlib.sha1(b"1_3_1").hexdigest()
    True
    """
    text = "_".join(map(str, sorted(ranks))) + "_" + str(registered)
    return hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()


@attrs.frozen
class Step:
    """One creation step: ``label`` (``"tensor/device"``), every group of it (sorted, disjoint;
    ranks in none are allowed), and how they are created (``local`` | ``all`` | ``split`` |
    ``world`` | ``shared``)."""

    label: str
    groups: Tuple[Group, ...]
    strategy: str
    #: the ranks that walk this step under members-only creation (a model's ranks); None: all
    participants: Optional[frozenset] = None
    _by_rank: Dict[int, Group] = attrs.field(init=False, eq=False, repr=False, factory=dict)

    def group_of(self, rank: int) -> Optional[Group]:
        if not self._by_rank and self.groups:
            self._by_rank.update((r, g) for g in self.groups for r in g)
        return self._by_rank.get(rank)


@attrs.frozen
class Call:
    """One blocking creation call a rank makes.

    ``key`` is what every rank it waits for must also be calling (the step and its members);
    ``waits_for`` those ranks (None: the whole world). ``members`` is this rank's own group in
    the call (empty for a non-member of a world-collective call); ``groups`` the groups an
    ``all`` call walks. ``agree``: the members agree on a count before naming (lazy requests).
    """

    label: str
    how: str                      # local | all | split | placeholder
    key: Hashable
    members: Group
    waits_for: Optional[Group]
    groups: Tuple[Group, ...] = ()
    agree: bool = False


@attrs.frozen
class Deadlock:
    """Why a schedule cannot finish: the call that never completes, who entered it, who never
    did (and what those are doing instead), or members that derive different names."""

    label: str
    members: Group
    entered: Group
    missing: Group
    elsewhere: Tuple[Tuple[int, str], ...] = ()        # (rank, label of the call it waits in, or "done")
    names: Tuple[Tuple[int, int], ...] = ()            # (rank, groups it held) when names disagree

    def message(self) -> str:
        what = f"creating {self.label} with ranks {format_ranks(self.members, limit=12)}"
        if self.names:
            held: Dict[int, List[int]] = defaultdict(list)
            for rank, count in self.names:
                held[count].append(rank)
            parts = "; ".join(f"ranks {format_ranks(r, limit=8)} hold {c} groups" for c, r in sorted(held.items()))
            return (f"{what} would never complete: its members name it differently because they "
                    f"hold different numbers of groups ({parts})")
        where = ", ".join(f"rank {r} in {at}" for r, at in self.elsewhere[:4])
        return (f"{what} would never complete: ranks {format_ranks(self.entered, limit=12)} enter it, "
                f"ranks {format_ranks(self.missing, limit=12)} never do ({where})")


# ---- schedules ------------------------------------------------------------------------------

def eager_schedule(steps: Sequence[Step], world_size: int, rank: int, padding: bool = True,
                   agree: bool = False) -> List[Call]:
    """The calls ``rank`` makes when every rank walks ``steps`` in order (an eager build).

    ``padding`` is pgroups' rule (a placeholder where the rank registers nothing in a step that
    makes calls); ``padding=False`` models creation without it (which deadlocks: ``dp-pp`` after
    ``embedding`` at pipeline 3, world 12).
    The ``all`` strategy's communicator cache (identical rank lists of earlier steps reused)
    is modelled as :class:`pgroups.backend.GroupBackend` keeps it. A ``local`` step with
    ``participants`` (a model's ranks) is skipped by every other rank; members of its groups
    then agree on their count before naming when ``agree`` (the creation rendezvous, which
    real backends always run).
    """
    calls: List[Call] = []
    cache: Set[Tuple[str, Group]] = set()
    for step in steps:
        if step.strategy in (WORLD, SHARED):
            continue
        if step.strategy == LOCAL and step.participants is not None and rank not in step.participants:
            continue
        mine = step.group_of(rank)
        registers = mine is not None
        if step.strategy == LOCAL:
            if mine is not None:
                calls.append(Call(step.label, LOCAL, (step.label, mine), mine, mine, agree=agree))
        elif step.strategy == ALL:
            kind = step.label.rsplit("/", 1)[-1]
            fresh = tuple(g for g in step.groups if (kind, g) not in cache)
            registers = mine is not None and mine in fresh
            cache.update((kind, g) for g in fresh)
            calls.append(Call(step.label, ALL, (step.label, ALL), mine or (), None, groups=fresh))
        elif step.strategy == SPLIT:
            calls.append(Call(step.label, SPLIT, (step.label, SPLIT), mine or (), None))
        else:
            raise ValueError(f"unknown creation strategy {step.strategy!r}")
        if padding and not registers:
            calls.append(placeholder(step.label, rank))
    return calls


def lazy_schedule(requests: Sequence[Step], rank: int) -> List[Call]:
    """The calls ``rank`` makes when it requests the groups of ``requests`` on first use, in
    that order (members only: steps where it is in no group are not requested). The members
    agree on a count before naming (pgroups' creation rendezvous)."""
    calls = []
    for step in requests:
        mine = step.group_of(rank)
        if mine is not None and step.strategy not in (WORLD, SHARED):
            calls.append(Call(step.label, LOCAL, (step.label, mine), mine, mine, agree=True))
    return calls


def placeholder(label: str, rank: int) -> Call:
    return Call(label, "placeholder", (label, rank, "placeholder"), (rank,), (rank,))


# ---- the checker ----------------------------------------------------------------------------

def find_deadlock(calls_by_rank: Mapping[int, Sequence[Call]], world_size: int,
                  registered: Optional[Mapping[int, int]] = None,
                  group_count: Optional[Mapping[int, int]] = None) -> Optional[Deadlock]:
    """Simulate every rank's calls; None when all complete, else the first stuck call.

    A call completes when every rank in ``waits_for`` (the world when None) stands at a call
    with the same ``key``; then the members derive the group's name as torch does (from their
    own ``registered`` count, or the largest among them when ``agree``) — members that derive
    different names never meet, which is reported as a deadlock too. ``registered`` and
    ``group_count`` give each rank's starting counts (torch's defaults when omitted).
    ``calls_by_rank`` must hold every rank of the world.
    """
    ranks = range(world_size)
    reg = {r: (registered or {}).get(r, DEFAULT_REGISTERED) for r in ranks}
    count = {r: (group_count or {}).get(r, DEFAULT_GROUP_COUNT) for r in ranks}
    position = {r: 0 for r in ranks}
    waiting: Dict[Hashable, Set[int]] = defaultdict(set)
    runnable = list(ranks)
    while runnable:
        rank = runnable.pop()
        calls = calls_by_rank[rank]
        if position[rank] >= len(calls):
            continue
        call = calls[position[rank]]
        needed = call.waits_for if call.waits_for is not None else ranks
        arrived = waiting[call.key]
        arrived.add(rank)
        if len(arrived) < len(needed):
            continue
        del waiting[call.key]
        mismatch = _complete(call, [calls_by_rank[r][position[r]] for r in needed], needed, reg, count)
        if mismatch is not None:
            return mismatch
        for member in needed:
            position[member] += 1
            runnable.append(member)
    stuck = [r for r in ranks if position[r] < len(calls_by_rank[r])]
    if not stuck:
        return None
    return _describe_stuck(calls_by_rank, position, waiting, stuck, world_size)


def _complete(call: Call, calls: Sequence[Call], needed: Iterable[int], reg: Dict[int, int],
              count: Dict[int, int]) -> Optional[Deadlock]:
    """Apply a completed call to the counts; a Deadlock if its members derive different names."""
    if call.how == "placeholder":
        reg[call.members[0]] += 1
        return None
    if call.how == ALL:
        starts = {count[r] for r in needed}
        if len(starts) > 1:  # names str(group_count) differ between ranks
            return Deadlock(call.label, call.groups[0] if call.groups else (), tuple(needed), (),
                            names=tuple((r, count[r]) for r in needed))
        for r, own in zip(needed, calls):
            count[r] += len(own.groups)
            if own.members and own.members in own.groups:
                reg[r] += 1
        return None
    by_group: Dict[Group, List[int]] = defaultdict(list)
    for r, own in zip(needed, calls):
        if own.members:
            by_group[own.members].append(r)
    for members, holders in by_group.items():
        if call.agree:
            agreed = max(reg[r] for r in holders)
            for r in holders:
                reg[r] = agreed
        if len({reg[r] for r in holders}) > 1:
            return Deadlock(call.label, members, tuple(holders), (), names=tuple((r, reg[r]) for r in holders))
        for r in holders:
            reg[r] += 1
    return None


def _describe_stuck(calls_by_rank: Mapping[int, Sequence[Call]], position: Mapping[int, int],
                    waiting: Mapping[Hashable, Set[int]], stuck: Sequence[int], world_size: int) -> Deadlock:
    # The stuck call that the most advanced waiting rank reached first is as good as any: report
    # the one of the lowest stuck rank, with who is there and where the others wait.
    rank = min(r for r in stuck if any(r in arrived for arrived in waiting.values()))
    call = calls_by_rank[rank][position[rank]]
    needed = tuple(call.waits_for) if call.waits_for is not None else tuple(range(world_size))
    entered = tuple(sorted(waiting.get(call.key, ())))
    missing = tuple(r for r in needed if r not in waiting.get(call.key, ()))

    def where(r: int) -> str:
        calls = calls_by_rank[r]
        return calls[position[r]].label if position[r] < len(calls) else "done"

    members = call.members if call.how == LOCAL else needed
    return Deadlock(call.label, members, entered, missing, tuple((r, where(r)) for r in missing))


# ---- steps of a context -----------------------------------------------------------------------

def context_steps(mode_groups: Mapping[str, Sequence[Sequence[int]]], world_size: int, strategy: str,
                  shares: Optional[Mapping[str, Optional[str]]] = None, cpu_twins: bool = False,
                  world_cpu_twin: bool = False) -> List[Step]:
    """The steps of an eager build, as :class:`pgroups.context.ParallelContext` makes them: the
    device groups of every mode in order, then (``cpu_twins``: twins built eagerly) the CPU twins
    of every mode — members-only ``local`` under the ``split`` strategy.

    ``shares`` maps a mode to an earlier mode with identical groups (no call); a mode whose one
    group is the whole world uses the world group (no call), except for CPU twins when
    ``world_cpu_twin`` (the default group has no gloo backend to serve as the world's twin).
    """
    shares = shares or {}
    steps = []
    kinds = [("device", strategy)] + ([("cpu", LOCAL if strategy == SPLIT else strategy)] if cpu_twins else [])
    for kind, how in kinds:
        for mode, groups in mode_groups.items():
            sorted_groups = tuple(tuple(sorted(g)) for g in groups)
            whole_world = len(sorted_groups) == 1 and len(sorted_groups[0]) == world_size
            if shares.get(mode):
                how_here = SHARED
            elif whole_world and not (kind == "cpu" and world_cpu_twin):
                how_here = WORLD
            else:
                how_here = how
            steps.append(Step(f"{mode}/{kind}", sorted_groups, how_here))
    return steps


def check_steps(steps: Sequence[Step], world_size: int, padding: bool = True,
                agree: bool = False) -> Optional[Deadlock]:
    """Run the checker over an eager build of ``steps`` at ``world_size``."""
    calls = {r: eager_schedule(steps, world_size, r, padding, agree) for r in range(world_size)}
    return find_deadlock(calls, world_size)


def sharing_key(layout_key: Optional[Hashable], options_key: Optional[Hashable] = None) -> Optional[Hashable]:
    """What two modes (of one context or of several models) must agree on to share one
    communicator: identical groups (the initializers' layout key; None: never shared) and the
    same NCCL options (``options_key``: :func:`pgroups.nccl_options.options_key`, None without)."""
    return None if layout_key is None else (layout_key, options_key)


def shared_owner(owners: Dict[Hashable, object], key: Optional[Hashable], candidate: object) -> Optional[object]:
    """The communicator-sharing rule, for the context and for this module's checker alike: the
    first mode registered under ``key`` owns the communicator, every later mode with that key
    reuses it. Registers ``candidate`` when it is the first; returns the earlier owner, or None
    when ``candidate`` makes its own (``key`` None never shares)."""
    if key is None:
        return None
    first = owners.setdefault(key, candidate)
    return None if first is candidate else first


def config_steps(initializers: Mapping[str, "object"], topology: "object", strategy: str,
                 cpu_twins: bool = False, world_cpu_twin: bool = False,
                 options: Optional[Mapping[str, Optional[Hashable]]] = None,
                 owners: Optional[Dict[Hashable, object]] = None, label: str = "",
                 world_size: Optional[int] = None) -> List[Step]:
    """The eager steps of a context built from ``initializers`` (mode → initializer, in creation
    order, as :func:`pgroups.mode_plan.make_initializers` returns them) on ``topology``: modes with
    one :func:`sharing_key` share the first one's communicators (:func:`shared_owner`), as the
    context decides. ``options``: each mode's NCCL options key; ``owners`` / ``label``: the
    sharing record across several models (each model's modes registered as ``label:mode``);
    ``world_size``: the job's, when ``topology`` is one model's (its groups span the world only
    when the model does).

    ``world_cpu_twin``: the world's CPU group is a group of its own (the default group has no
    gloo backend), so a mode whose one group is the world still creates its CPU twin.
    """
    mode_groups = {}
    shares: Dict[str, Optional[str]] = {}
    owners = {} if owners is None else owners
    for name, init in initializers.items():
        mode_groups[name] = init.rank_groups(topology)  # type: ignore[attr-defined]
        key = sharing_key(init.layout_key(topology), (options or {}).get(name))  # type: ignore[attr-defined]
        owner = shared_owner(owners, key, f"{label}:{name}" if label else name)
        shares[name] = None if owner is None else str(owner)
    world = topology.world_size if world_size is None else world_size  # type: ignore[attr-defined]
    return context_steps(mode_groups, world, strategy, shares, cpu_twins, world_cpu_twin)


def placed_steps(label_prefix: str, steps: Sequence[Step], ranks: Sequence[int]) -> List[Step]:
    """A model's steps (groups already in global ranks) walked by its ``ranks`` only under
    members-only creation; labels prefixed ``model:``."""
    members = frozenset(ranks)
    return [attrs.evolve(s, label=f"{label_prefix}:{s.label}", participants=members) for s in steps]


def host_steps(ranks_per_host: Sequence[int], strategy: str) -> List[Step]:
    """The steps the network test adds for hosts holding ``ranks_per_host`` ranks each (in rank
    order): intra-host groups, then inter-host rails (the j-th rank of every host), each kind
    without its one-rank groups and left out when none remains (``nettest.groups.build_catalog``)."""
    intra, start = [], 0
    for count in ranks_per_host:
        intra.append(tuple(range(start, start + count)))
        start += count
    depth = max(ranks_per_host, default=0)
    inter = [tuple(host[j] for host in intra if j < len(host)) for j in range(depth)]
    steps = []
    for kind, groups in (("nettest-intra-node", intra), ("nettest-inter-node", inter)):
        kept = tuple(g for g in groups if len(g) > 1)
        if kept:
            steps.append(Step(f"{kind}/device", kept, WORLD if kept == (tuple(range(start)),) else strategy))
    return steps
