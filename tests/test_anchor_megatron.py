"""Acceptance anchor: Megatron-Core's ``RankGenerator`` / ``generate_masked_orthogonal_rank_groups``.

The reference below re-derives Megatron-Core's algorithm (NVIDIA/Megatron-LM,
``megatron/core/parallel_state.py``) in this test's own words, with the checks
``initialize_model_parallel`` makes before it builds a group. For every size and order it
accepts, pgroups (``expert_layout: megatron``, the default) must give the same rank lists, bit
for bit and in the same list order, for every mode Megatron builds:

- dense generator (ep = 1): ``tp, cp, dp, pp, dp-cp, tp-cp, tp-pp, tp-dp-cp``;
- expert generator (cp = 1, tp = etp, dp = edp): ``ep, tp, dp, tp-ep, tp-ep-pp`` (and ``pp``,
  which Megatron asserts equal to the dense one).

And where Megatron refuses a layout, pgroups refuses it too (a ConfigError, not a traceback).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pgroups import ConfigError, Topology, load_config

DENSE_TOKENS = ["tp", "cp", "dp", "pp", "dp-cp", "tp-cp", "tp-pp", "tp-dp-cp"]
EXPERT_TOKENS = ["ep", "tp", "dp", "tp-ep", "tp-ep-pp", "pp"]
#: pgroups' names for the expert generator's tokens (Megatron's tp/dp there are etp/edp)
OUR_EXPERT_NAMES = {"ep": ["ep", "expert"], "tp": ["etp", "expert_tensor"], "dp": ["edp", "expert_data"],
                    "tp-ep": ["tp-ep", "ep-etp"], "tp-ep-pp": ["tp-ep-pp", "pp-ep-etp"], "pp": ["pp"]}
OUR_DENSE_NAMES = {"tp": ["tp", "tensor"], "cp": ["cp", "context"], "dp": ["dp", "data"], "pp": ["pp", "pipe"],
                   "dp-cp": ["dp-cp", "cp-dp"], "tp-cp": ["tp-cp"], "tp-pp": ["tp-pp", "model"],
                   "tp-dp-cp": ["tp-dp-cp", "cp-tp-dp"]}


class MegatronRefused(Exception):
    pass


def masked_orthogonal_groups(world: int, sizes: List[int], mask: List[bool]) -> List[List[int]]:
    """Megatron's rule: rank = sum(index_i * stride_i) with strides the prefix products of
    ``sizes``; one group per combination of the unmasked indices (enumerated fastest axis
    first), its ranks over the masked indices (fastest axis first)."""
    strides = [math.prod(sizes[:i]) for i in range(len(sizes))]
    inside = [(s, d) for s, d, m in zip(sizes, strides, mask) if m]
    outside = [(s, d) for s, d, m in zip(sizes, strides, mask) if not m]

    def offset(index: int, axes) -> int:
        total = 0
        for size, stride in axes:  # mixed-radix digits of index, fastest axis first
            total += (index % size) * stride
            index //= size
        return total

    group_size = math.prod(s for s, _ in inside)
    return [[offset(g, outside) + offset(r, inside) for r in range(group_size)]
            for g in range(world // group_size)]


class RankGeneratorReference:
    """Megatron-Core's RankGenerator: names missing from the order are appended (size 1 only)."""

    def __init__(self, tp: int, ep: int, dp: int, pp: int, cp: int, order: str) -> None:
        sizes = {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "cp": cp}
        names = order.lower().split("-")
        for name, size in sizes.items():
            if name not in names:
                if size != 1:
                    raise MegatronRefused(f"size of {name} is {size} but the order {order!r} lacks it")
                names.append(name)
        self.names, self.world = names, tp * ep * dp * pp * cp
        self.sizes = [sizes[n] for n in names]

    def get_ranks(self, token: str) -> List[List[int]]:
        wanted = token.split("-")
        return masked_orthogonal_groups(self.world, self.sizes, [n in wanted for n in self.names])


def megatron_layout(world: int, tp: int, pp: int, cp: int, ep: int, etp: Optional[int], order: str):
    """What initialize_model_parallel builds (or MegatronRefused where it raises or asserts)."""
    if world % (tp * pp * cp):
        raise MegatronRefused("world not divisible by tp*pp*cp")
    dp = world // (tp * pp * cp)
    dense = RankGeneratorReference(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
    etp = tp if etp is None else etp
    if world % (etp * ep * pp):
        raise MegatronRefused("world not divisible by etp*ep*pp")
    edp = world // (etp * ep * pp)
    expert = RankGeneratorReference(tp=etp, ep=ep, dp=edp, pp=pp, cp=1, order=order)
    if not (order.endswith("pp") or pp == 1 or edp == dp):
        raise MegatronRefused("attention and moe data parallel sizes differ without pp-last order")
    if dense.get_ranks("pp") != expert.get_ranks("pp"):
        raise MegatronRefused("pipeline groups differ between the dense and expert generators")
    return ({t: dense.get_ranks(t) for t in DENSE_TOKENS}, {t: expert.get_ranks(t) for t in EXPERT_TOKENS})


def ours(world: int, tp: int, pp: int, cp: int, ep: int, etp: Optional[int], order: str) -> Topology:
    parallel: Dict[str, object] = {"tensor": tp, "pipeline": pp, "context": cp, "expert": ep, "order": order}
    if etp is not None:
        parallel["expert_tensor"] = etp
    return load_config({"parallel": parallel}).topology(world)


@st.composite
def megatron_configs(draw):
    tp, cp, pp = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    dp = draw(st.integers(1, 4))
    world = tp * cp * pp * dp
    ep = draw(st.sampled_from([d for d in range(1, 9) if (world // pp) % d == 0]))
    etp = draw(st.one_of(st.none(), st.sampled_from([d for d in range(1, 5) if (world // pp) % (d * ep) == 0])))
    names = ["tp", "dp", "pp"] + [n for n, size in (("cp", cp), ("ep", ep))
                                    if size > 1 or draw(st.booleans())]
    order = "-".join(draw(st.permutations(names)))
    return world, tp, pp, cp, ep, etp, order


def expect_refusal(*args, **kwargs) -> None:
    """Where Megatron refuses, pgroups refuses too: at once when the config uses experts; when
    it does not (ep 1, etp = tp), only a request for an expert-mesh mode is refused."""
    try:
        topology = ours(*args, **kwargs)
    except ConfigError:
        return
    assert not topology.expert_enabled
    for name, canonical in (("tp-ep-pp", "tp-ep-pp"), ("expert", "ep"), ("edp", "edp")):
        with pytest.raises(ConfigError, match=f"mode {canonical!r}: "):
            topology.groups(name)


def check_equal(topology: Topology, theirs: List[List[int]], names: List[str]) -> None:
    for name in names:
        assert topology.groups(name) == theirs, name
        for group in theirs:
            for rank in group:
                assert topology.group_of(rank, name) == group, (name, rank)


@settings(max_examples=150, deadline=None)
@given(megatron_configs())
def test_every_mode_megatron_builds_equals_its_rank_generator(config):
    world, tp, pp, cp, ep, etp, order = config
    try:
        dense, expert = megatron_layout(*config)
    except MegatronRefused:
        expect_refusal(*config)
        return
    topology = ours(*config)
    for token, groups in dense.items():
        check_equal(topology, groups, OUR_DENSE_NAMES[token])
    for token, groups in expert.items():
        check_equal(topology, groups, OUR_EXPERT_NAMES[token])


@pytest.mark.parametrize("order", ["tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp", "tp-pp-dp", "tp-dp-pp", "cp-tp-dp-pp",
                                   "pp-dp-ep-cp-tp", "dp-tp-pp-cp"])
def test_megatron_defaults_at_world_64(order):
    """Fixed examples beside the random ones: Megatron's default order and others at world 64."""
    sizes = dict(tp=2, pp=2, cp=2 if "cp" in order else 1, ep=2 if "ep" in order else 1, etp=None)
    try:
        dense, expert = megatron_layout(64, **sizes, order=order)
    except MegatronRefused:
        expect_refusal(64, **sizes, order=order)
        return
    topology = ours(64, **sizes, order=order)
    for token, groups in dense.items():
        check_equal(topology, groups, OUR_DENSE_NAMES[token])
    for token, groups in expert.items():
        check_equal(topology, groups, OUR_EXPERT_NAMES[token])


def test_reference_reproduces_megatrons_docstring_example():
    """The reference itself against the example in Megatron's docstring (tp-dp-pp, 2-3-4, dp mask)."""
    groups = masked_orthogonal_groups(24, [2, 3, 4], [False, True, False])
    assert groups[0] == [0, 2, 4] and groups[1] == [1, 3, 5] and groups[7] == [19, 21, 23]
    assert RankGeneratorReference(tp=2, ep=1, dp=2, pp=2, cp=1, order="tp-pp-dp").get_ranks("dp") == \
        [[0, 4], [1, 5], [2, 6], [3, 7]]  # Megatron's text: 8 GPUs, tp-pp-dp, 2-2-2


def test_megatron_refusals_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"parallel.order 'tp-pp-dp' has no cp but context\(2\) > 1"):
        ours(16, tp=2, pp=1, cp=2, ep=1, etp=None, order="tp-pp-dp")
    with pytest.raises(ConfigError, match=r"has no ep but expert\(2\) > 1.*expert_layout: internevo"):
        ours(16, tp=2, pp=1, cp=1, ep=2, etp=None, order="tp-pp-dp")
    with pytest.raises(ConfigError, match=r"parallel.expert_tensor: with order 'tp-pp-ep-dp' the expert mesh's "
                                          r"pipeline groups differ"):
        ours(16, tp=2, pp=2, cp=1, ep=2, etp=1, order="tp-pp-ep-dp")
    with pytest.raises(ConfigError, match=r"requires expert_data\(2\) == data\(4\)"):
        ours(16, tp=2, pp=2, cp=1, ep=2, etp=None, order="tp-pp-ep-dp")
