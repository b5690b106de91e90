"""Group creation cannot deadlock: the schedule model (pgroups.creation) against torch's own
naming, and the checker over random configs.

Ground truth: torch 2.13 itself. Under the fake backend every rank of a world can be played in
this process; the test records each ``new_group`` call the context makes and the name torch
gives the group, and compares them with the model's prediction for that rank. The checker then
proves, over every rank of random configs, that every call's members meet under one name.
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch.distributed as dist
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pgroups import ConfigError, ParallelContext, ProcessGroupInitializer
from pgroups import creation, torch_private
from pgroups.config import load_config
from pgroups.context import make_initializers
from pgroups.initializer import InitializerRegistry

from conftest import fake_world

# ---- a plugin whose groups cover only some ranks ----------------------------------------------


class GivenGroups(ProcessGroupInitializer):
    """A user mode whose groups are given in its options (``groups: [[0, 1], [4, 6]]``)."""

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        self.groups = [sorted(g) for g in groups]

    def rank_groups(self, topology):
        return [list(g) for g in self.groups]


def registry_with(names: Sequence[str]) -> InitializerRegistry:
    registry = InitializerRegistry()
    for name in names:
        registry.register(name, GivenGroups)
    return registry


# ---- what torch would do, from the model ---------------------------------------------------------

def predicted_torch_calls(calls: Sequence[creation.Call]) -> List[Tuple[Tuple[int, ...], bool, Optional[str]]]:
    """The ``new_group`` calls a rank's modelled calls become, with the name torch 2.13 gives
    each (None for a non-member), replaying torch's counters from a fresh default group."""
    registered, count = creation.DEFAULT_REGISTERED, creation.DEFAULT_GROUP_COUNT
    out = []
    for call in calls:
        if call.how in (creation.LOCAL, "placeholder"):
            out.append((tuple(call.members), True, creation.hashed_group_name(call.members, registered)))
            registered += 1
        elif call.how == creation.ALL:
            for group in call.groups:
                member = group == call.members
                out.append((group, False, str(count) if member else None))
                count += 1
                registered += member
        else:
            raise AssertionError(f"the fake backend cannot split: {call}")
    return out


def recorded_torch_calls(monkeypatch, world: int, rank: int, config: dict,
                         registry: InitializerRegistry) -> List[Tuple[Tuple[int, ...], bool, Optional[str]]]:
    """Init a context as ``rank`` of a fake world and record every new_group call and name."""
    log = []
    real = dist.new_group

    def recording(ranks=None, *args, use_local_synchronization=False, **kwargs):
        group = real(ranks, *args, use_local_synchronization=use_local_synchronization, **kwargs)
        member = group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER
        log.append((tuple(sorted(ranks)), use_local_synchronization, group.group_name if member else None))
        return group

    monkeypatch.setattr(dist, "new_group", recording)
    with fake_world(world, rank):
        ctx = ParallelContext(registry).init_from_config(config)
        ctx.destroy()
    monkeypatch.setattr(dist, "new_group", real)
    return log


def model_steps(config: dict, world: int, registry: InitializerRegistry, strategy: str,
                cpu_twins: bool = False, world_cpu_twin: bool = False) -> List[creation.Step]:
    cfg = load_config(config)
    topology = cfg.topology(world)
    return creation.config_steps(make_initializers(registry, cfg, topology), topology, strategy,
                                 cpu_twins, world_cpu_twin)


#: Configs that deadlock without the placeholders and their neighbours: embedding at pipeline 3
#: and 4 before other modes, user modes that cover some ranks, and the classic symmetric ones.
GROUND_TRUTH_CASES = [
    (12, {"parallel": {"tensor": 2, "pipeline": 3, "modes": ["embedding", "dp-pp"]}}, {}),
    (16, {"parallel": {"pipeline": 4, "modes": ["embedding", "tp-pp", "dp-pp"], "order": "tp-dp-pp"}}, {}),
    (3, {"parallel": {}, "extra_modes": {"part_a": {"groups": [[0, 1]]}, "part_b": {"groups": [[0, 2]]}}},
     {"part_a": None, "part_b": None}),
    (16, {"parallel": {"tensor": 2, "pipeline": 2}}, {}),
    (48, {"parallel": {"tensor": 2, "pipeline": 3, "context": 2, "order": "tp-cp-dp-pp",
                       "modes": ["embedding", "dp-cp", "tp-cp"]},
          "extra_modes": {"odd": {"groups": [[1, 3, 5], [7, 40]]}}}, {"odd": None}),
]


@pytest.mark.parametrize("world, config, plugins", GROUND_TRUTH_CASES)
@pytest.mark.parametrize("strategy, cpu_groups", [("local", "lazy"), ("local", "eager"), ("all", "eager")])
def test_model_predicts_every_call_and_name_torch_makes(monkeypatch, world, config, plugins, strategy, cpu_groups):
    registry = registry_with(list(plugins))
    config = dict(config, strategy=strategy, cpu_groups=cpu_groups)
    # the fake backend has no gloo default: the world's CPU twin is a group of its own
    steps = model_steps(config, world, registry, strategy, cpu_twins=cpu_groups == "eager", world_cpu_twin=True)
    for rank in sorted({0, 1, world // 2, world - 2, world - 1}):
        predicted = predicted_torch_calls(creation.eager_schedule(steps, world, rank))
        assert recorded_torch_calls(monkeypatch, world, rank, config, registry) == predicted, f"rank {rank}"


def test_model_predicts_torch_at_4096_ranks(monkeypatch):
    world = 4096
    config = {"parallel": {"tensor": 8, "pipeline": 4, "modes": ["embedding", "dp-pp", "tp-pp"]}}
    registry = InitializerRegistry()
    steps = model_steps(config, world, registry, "local")
    for rank in (0, 9, 17, 2047, 4095):  # first, middle and last stages
        predicted = predicted_torch_calls(creation.eager_schedule(steps, world, rank))
        assert recorded_torch_calls(monkeypatch, world, rank, config, registry) == predicted


def test_hashed_name_is_torchs_own():
    with fake_world(8, 3):
        held = torch_private.groups_held()
        group = dist.new_group([1, 3, 6], use_local_synchronization=True)
        assert group.group_name == creation.hashed_group_name([6, 1, 3], held)
        dist.destroy_process_group(group)


# ---- the checker finds the bug, and proves the fix ----------------------------------------------

def test_checker_finds_the_issue_15_deadlock_without_placeholders():
    steps = model_steps({"parallel": {"tensor": 2, "pipeline": 3, "modes": ["embedding", "dp-pp"]}},
                        12, InitializerRegistry(), "local")
    deadlock = creation.check_steps(steps, 12, padding=False)
    assert deadlock is not None and deadlock.label == "dp-pp/device"
    # the middle stage (ranks 2, 3, 8, 9) holds no embedding group: one group fewer
    assert "ranks [3, 9] hold 5 groups; ranks [1, 5, 7, 11] hold 6 groups" in deadlock.message()
    assert creation.check_steps(steps, 12) is None


def test_checker_finds_subset_plugins_and_uneven_hosts_without_placeholders():
    steps = model_steps({"parallel": {}, "extra_modes": {"part_a": {"groups": [[0, 1]]}, "part_b": {"groups": [[0, 2]]}}},
                        3, registry_with(["part_a", "part_b"]), "local")
    assert creation.check_steps(steps, 3, padding=False).label == "part_b/device"
    assert creation.check_steps(steps, 3) is None
    hosts = creation.host_steps([2, 1], "local")  # pgroups nettest --simulate-hosts 2 --nproc 3
    assert creation.check_steps(hosts, 3, padding=False).label == "nettest-inter-node/device"
    assert creation.check_steps(hosts, 3) is None


def test_checker_reports_who_never_comes():
    # rank 1 asks for b before a, rank 0 for a before b: both wait in their first call
    a, b = creation.Step("a/device", ((0, 1),), "local"), creation.Step("b/device", ((0, 1),), "local")
    calls = {0: creation.lazy_schedule([a, b], 0), 1: creation.lazy_schedule([b, a], 1)}
    deadlock = creation.find_deadlock(calls, 2)
    assert deadlock is not None and deadlock.missing
    assert "never do" in deadlock.message() and "rank 1 in b/device" in deadlock.message()


# ---- random configs -------------------------------------------------------------------------------

CANDIDATE_MODES = ["embedding", "dp-pp", "tp-pp", "tp-dp", "cp-dp", "tp-cp", "pp", "zero1", "ep", "tp-ep-pp"]


@st.composite
def random_config(draw, max_world: int = 4096):
    tensor = draw(st.sampled_from([1, 2, 4, 8]))
    pipeline = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    context = draw(st.sampled_from([1, 1, 2]))
    data = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 16, 32]))
    world = tensor * pipeline * context * data
    assume(world <= max_world)
    axes = ["tp", "pp", "dp"] + (["cp"] if context > 1 else [])
    order = "-".join(draw(st.permutations(axes)))
    modes = draw(st.lists(st.sampled_from(CANDIDATE_MODES), max_size=5, unique=True))
    parallel = {"tensor": tensor, "pipeline": pipeline, "context": context, "data": data, "order": order,
                "modes": modes}
    if draw(st.booleans()) and data * context % 2 == 0 and context == 1:
        parallel["expert"] = 2
        parallel["order"] = order.replace("dp", "ep-dp") if "ep" not in order else order
    # user modes over part of the world: random disjoint groups, some ranks in none
    extra = {}
    for index in range(draw(st.integers(0, 2))):
        seed = draw(st.integers(0, 2 ** 16))
        rng = random.Random(seed)
        ranks = rng.sample(range(world), rng.randint(0, world))
        groups, at = [], 0
        while at < len(ranks):
            size = rng.randint(1, 4)
            groups.append(sorted(ranks[at:at + size]))
            at += size
        if groups:
            extra[f"user{index}"] = {"groups": groups}
    config = {"parallel": parallel, "extra_modes": extra}
    try:
        cfg = load_config(config)
        registry = registry_with(list(extra))
        inits = make_initializers(registry, cfg, cfg.topology(world))
    except ConfigError:
        assume(False)
    return world, cfg, inits


def host_split(world: int, seed: int) -> List[int]:
    """Random hosts holding unequal numbers of ranks (at least one each), summing to ``world``."""
    rng = random.Random(seed)
    sizes, left = [], world
    while left:
        size = min(left, rng.randint(1, 9))
        sizes.append(size)
        left -= size
    return sizes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=random_config(), strategy=st.sampled_from(["local", "all", "split"]),
       cpu_twins=st.booleans(), hosts_seed=st.integers(0, 2 ** 16))
def test_no_config_deadlocks_under_any_strategy(case, strategy, cpu_twins, hosts_seed):
    world, cfg, inits = case
    assume(strategy != "all" or world <= 512)  # `all` enters every group: O(world) calls per rank
    steps = creation.config_steps(inits, cfg.topology(world), strategy, cpu_twins)
    steps += creation.host_steps(host_split(world, hosts_seed), strategy)
    deadlock = creation.check_steps(steps, world)
    assert deadlock is None, deadlock.message()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=random_config(max_world=1024), seed=st.integers(0, 2 ** 16))
def test_lazy_requests_in_one_order_never_deadlock(case, seed):
    """Lazy groups: each rank requests the modes it belongs to in one global order (any order,
    any rank using only some of its modes is not allowed: a member that never asks leaves its
    peers waiting — the documented contract); the members agree on the count before naming."""
    world, cfg, inits = case
    steps = creation.config_steps(inits, cfg.topology(world), "local", cpu_twins=True)
    random.Random(seed).shuffle(steps)
    calls = {r: creation.lazy_schedule(steps, r) for r in range(world)}
    assert creation.find_deadlock(calls, world) is None


def test_lazy_requests_need_the_agreement():
    """Without agreeing on the count, members-only requests deadlock where a partial mode came
    first: embedding at pipeline 3, then dp-pp (the agreement is what makes lazy work)."""
    steps = model_steps({"parallel": {"tensor": 2, "pipeline": 3, "modes": ["embedding", "dp-pp"]}},
                        12, InitializerRegistry(), "local")
    unagreed = {r: [c if c.how != creation.LOCAL else creation.Call(c.label, c.how, c.key, c.members, c.waits_for)
                    for c in creation.lazy_schedule(steps, r)] for r in range(12)}
    assert creation.find_deadlock(unagreed, 12).label == "dp-pp/device"
    assert creation.find_deadlock({r: creation.lazy_schedule(steps, r) for r in range(12)}, 12) is None


@pytest.mark.parametrize("parallel", [
    {"tensor": 8, "pipeline": 16, "modes": ["embedding", "dp-pp", "tp-pp"]},                  # dense RLHF actor
    {"tensor": 4, "pipeline": 8, "context": 2, "expert": 8, "order": "tp-cp-ep-dp-pp",
     "modes": ["embedding", "dp-cp", "tp-ep-pp"]},                                                # MoE
])
@pytest.mark.parametrize("strategy", ["local", "split"])
def test_no_deadlock_at_16384_ranks(parallel, strategy):
    world = 16384
    steps = model_steps({"parallel": parallel}, world, InitializerRegistry(), strategy, cpu_twins=True)
    steps += creation.host_steps([8] * 2047 + [4, 4], strategy)  # one host short of GPUs: two halves
    assert creation.check_steps(steps, world, padding=False) is not None  # the hazard is real here
    assert creation.check_steps(steps, world) is None
