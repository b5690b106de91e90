"""Acceptance anchor: InternEvo's ISP initializers (InternLM/InternEvo,
``internlm/core/context/process_group_initializer.py``), re-derived here as the loops they run.

InternEvo's layout is the order ``tp-dp-pp`` (pipeline slowest) with sequence parallel =
tensor. With ``parallel.weight`` set (ISP) and ``expert_layout: internevo``, pgroups must give
the same groups, each bit for bit: Initializer_Tensor, Initializer_Pipeline, Initializer_Data,
Initializer_Weight, Initializer_Weight_Data, Initializer_Zero1_ISP and the expert groups of
Initializer_Expert_Data (both its forms: expert tensor = tensor, and a separate expert tensor
size). InternEvo's loops list some groups in another order than pgroups (which orders a mode's
groups by smallest member, except zero1's classic "each base group cut in chunks"); the tests
compare the group *sets* and, for every rank, its group.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from hypothesis import given, settings
from hypothesis import strategies as st

from pgroups import load_config


def internevo_groups(world: int, tp: int, pp: int, wp: int, zero1: int, ep: int,
                     etp: Optional[int]) -> Dict[str, List[List[int]]]:
    """The ranks InternEvo's initializers put in each group (their loops, rewritten)."""
    dp = world // (tp * pp)
    sp = tp                                   # ISP: sequence parallel size == tensor size
    per_pp = world // pp                      # ranks_num_per_pp
    wdp = per_pp // wp
    out: Dict[str, List[List[int]]] = {}
    out["tensor"] = [[i * tp + j for j in range(tp)] for i in range(world // tp)]
    num_pp_groups = world // pp
    out["pipe"] = [[i + j * num_pp_groups for j in range(pp)] for i in range(num_pp_groups)]
    out["data"] = [[i * per_pp + j + k * sp for k in range(dp)] for i in range(pp) for j in range(sp)]
    out["weight"] = [[i * wp + j for j in range(wp)] for i in range(world // wp)]
    out["weight_data"] = [[i * per_pp + j + k * wp for k in range(wdp)]
                          for i in range(pp) for j in range(per_pp // wdp)]
    chunk = wp * zero1
    out["zero1"] = [[i * per_pp + j * chunk + k + m * wp for m in range(zero1)]
                    for i in range(pp) for j in range(per_pp // chunk) for k in range(wp)]
    # Initializer_Expert_Data: each stage's "real data parallel" groups, expert tensor fastest,
    # cut into expert groups of ep consecutive members; expert data = the same slot of each.
    etp = tp if etp is None else etp
    real_dp = dp * tp // etp
    expert, expert_data = [], []
    for i in range(pp):
        for j in range(etp):
            dp_ranks = [i * per_pp + j + k * etp for k in range(real_dp)]
            parts = [dp_ranks[s:s + ep] for s in range(0, real_dp, ep)]
            expert.extend(parts)
            expert_data.extend(list(slot) for slot in zip(*parts))
    out["expert"], out["expert_data"] = expert, expert_data
    return out


@st.composite
def isp_configs(draw):
    tp, dp, pp = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    world, stage = tp * dp * pp, tp * dp
    wp = draw(st.sampled_from([d for d in range(1, stage + 1) if stage % d == 0]))
    zero1 = draw(st.sampled_from([d for d in range(1, stage // wp + 1) if (stage // wp) % d == 0]))
    etp = draw(st.one_of(st.none(), st.sampled_from([d for d in range(1, stage + 1) if stage % d == 0])))
    real_dp = stage // (tp if etp is None else etp)
    ep = draw(st.sampled_from([d for d in range(1, real_dp + 1) if real_dp % d == 0]))
    return world, tp, pp, wp, zero1, ep, etp


def topology_for(world, tp, pp, wp, zero1, ep, etp):
    parallel = {"tensor": tp, "pipeline": pp, "weight": wp, "zero1": zero1, "expert": ep,
                "expert_layout": "internevo", "order": "tp-dp-pp"}
    if etp is not None:
        parallel["expert_tensor"] = etp
    return load_config({"parallel": parallel}).topology(world)


@settings(max_examples=100, deadline=None)
@given(isp_configs())
def test_isp_and_expert_groups_equal_internevos_initializers(config):
    topology = topology_for(*config)
    for mode, theirs in internevo_groups(*config).items():
        ours = topology.groups(mode)
        assert sorted(ours) == sorted(theirs), mode
        for group in theirs:
            for rank in group:
                assert topology.group_of(rank, mode) == group, (mode, rank)


def test_internevo_docstring_examples():
    """The examples written in InternEvo's docstrings, literally."""
    # n=16 tp/sp=4 pp=2 dp=2 wp=2 wdp=4 zero1=2 (Initializer_Zero1_ISP / Initializer_Weight_Data)
    topology = topology_for(16, 4, 2, 2, 2, 1, None)
    assert topology.groups("weight") == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert topology.groups("data") == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert topology.groups("pipe") == [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]
    assert topology.groups("weight_data") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert sorted(topology.groups("zero1")) == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    # n=32 wp=8 sp=4 (no pp): weight data groups
    topology = topology_for(32, 4, 1, 8, 1, 1, None)
    assert topology.groups("weight_data") == [[0, 8, 16, 24], [1, 9, 17, 25], [2, 10, 18, 26], [3, 11, 19, 27],
                                              [4, 12, 20, 28], [5, 13, 21, 29], [6, 14, 22, 30], [7, 15, 23, 31]]
    # Initializer_Expert_Data: world 8, tensor 2, expert 2
    topology = topology_for(8, 2, 1, 1, 1, 2, None)
    assert sorted(topology.groups("expert")) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(topology.groups("expert_data")) == [[0, 4], [1, 5], [2, 6], [3, 7]]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 4), st.data())
def test_the_two_expert_layouts_agree_when_pp_is_last_and_ep_before_dp(tp, cp, dp, data):
    """Megatron's default order (tp-cp-ep-dp-pp) puts each stage's ranks together with etp
    fastest then ep: there the two layouts are the same groups. They differ when pipeline is
    not the slowest axis or ep comes after dp (see docs/layout.md)."""
    pp = data.draw(st.integers(1, 3))
    stage = tp * cp * dp
    ep = data.draw(st.sampled_from([d for d in range(1, stage + 1) if stage % d == 0]))
    etp = data.draw(st.sampled_from([d for d in range(1, stage // ep + 1) if (stage // ep) % d == 0]))
    common = {"tensor": tp, "context": cp, "pipeline": pp, "expert": ep, "expert_tensor": etp,
              "order": "tp-cp-ep-dp-pp"}
    world = stage * pp
    megatron = load_config({"parallel": common}).topology(world)
    internevo = load_config({"parallel": dict(common, expert_layout="internevo")}).topology(world)
    for mode in ("expert", "expert_tensor", "expert_data", "tp-ep", "tp-ep-pp", "ep-edp"):
        assert megatron.groups(mode) == internevo.groups(mode), mode
        assert megatron.layout_key(mode) == internevo.layout_key(mode), mode


def test_the_two_expert_layouts_differ_on_the_classic_order():
    """Order tp-pp-dp (pipeline not slowest): Megatron's layout needs ep in the order and
    refuses edp != dp; InternEvo's re-factors each stage's ranks."""
    topology = load_config({"parallel": {"tensor": 2, "pipeline": 2, "expert": 2,
                                         "expert_layout": "internevo"}}).topology(16)
    # stage 0 holds ranks 0,1,4,5,8,9,12,13 (tp-pp-dp); etp 2 fastest, then ep 2, then edp 2
    assert topology.group_of(0, "expert") == [0, 4]
    assert topology.group_of(0, "expert_data") == [0, 8]
    assert topology.group_of(0, "expert_tensor") == [0, 1]
    assert topology.groups("pp") == topology.groups("pipe")
