"""The reshard simulator (``pgroups.reshard.plan``): hand-checkable schedules give the times worked
out by hand (one message; two messages sharing a NIC, and the NIC affinity that makes them share;
NCCL's in-order stream against gloo's concurrent operations; latency-bound tiny messages); the
schedule it runs is the executor's own (every rank's rounds equal its Resharder's); and on random
real plans and networks no simulated sync beats the lower bound, and a single transfer meets it."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgroups.cli import main
from pgroups.errors import ConfigError
from pgroups.reshard import Resharder, plan_reshard
from pgroups.reshard.plan import Network, SimChunk, lower_bound, rank_rounds, simulate
from pgroups.reshard.plan.schedule import describe_rounds
from pgroups.reshard.plan.scenarios import pairs
from pgroups.reshard.wire import ALIGN, Round, batches
from test_reshard_executor import layout, tiny_model
from test_reshard_wire import SHAPES, _Context

GB = 1e9
MB = 1 << 20


def one_message(src: int, dst: int, nbytes: int, step: int = 1, chunks: int = 1, direct: bool = True):
    """``{rank: rounds}`` of one message from ``src`` to ``dst`` in ``chunks`` equal chunks
    (``direct``: sent from the source tensor, else packed into a buffer region)."""
    size = nbytes // chunks
    return {src: [Round(step, i, None, SimChunk(dst, size, direct)) for i in range(chunks)],
            dst: [Round(step, i, SimChunk(src, size, direct), None) for i in range(chunks)]}


def merge(*schedules):
    """Ranks' rounds of several schedules together, each rank's in (step, index) order."""
    out = {}
    for schedule in schedules:
        for rank, rounds in schedule.items():
            out.setdefault(rank, []).extend(rounds)
    return {r: sorted(rounds, key=lambda x: (x.step, x.index)) for r, rounds in out.items()}


@pytest.mark.parametrize("semantics", ["nccl", "gloo"])
def test_one_message_takes_latency_plus_bytes_over_the_nic(semantics):
    net = Network(nic_bw=10 * GB, latency_s=5e-6)
    result = simulate(one_message(3, 11, 100 * MB), net, semantics)
    assert result.makespan_s == pytest.approx(5e-6 + 100 * MB / (10 * GB), rel=1e-12)
    assert result.bound.nic_s == pytest.approx(100 * MB / (10 * GB), rel=1e-12)
    assert result.bound.intra_s == 0
    # the sender's NIC out and the receiver's NIC in carried it; intra-host: the rank ports
    assert result.bound.port_bytes == {("nic_out", 0, 3): 100 * MB, ("nic_in", 1, 3): 100 * MB}
    inside = simulate(one_message(3, 5, 100 * MB), Network(intra_bw=200 * GB), semantics)
    assert inside.makespan_s == pytest.approx(100 * MB / (200 * GB), rel=1e-12)
    assert inside.bound.port_bytes == {("out", 3): 100 * MB, ("in", 5): 100 * MB}


@pytest.mark.parametrize("semantics", ["nccl", "gloo"])
def test_two_messages_share_a_nic_only_when_affinity_puts_their_ranks_on_it(semantics):
    # ranks 0 and 1 of host 0 send to two other hosts at once (steps 8 and 17 of W = 24)
    schedule = merge(one_message(0, 8, 64 * MB, step=8), one_message(1, 16, 64 * MB, step=17))
    alone = 64 * MB / (10 * GB)
    for nics, shared in ((8, False), (4, True), (2, True), (1, True)):
        net = Network(nics_per_host=nics, nic_bw=10 * GB)
        result = simulate(schedule, net, semantics)
        expected = 2 * alone if shared else alone
        assert result.makespan_s == pytest.approx(expected, rel=1e-12), nics
        assert result.lower_bound_s == pytest.approx(expected, rel=1e-12)
        if shared:   # one NIC out busy the whole time, at full rate
            assert result.utilisation(("nic_out", 0, 0)) == pytest.approx(1.0)
        # per host: bytes out through its NICs, bytes in
        assert result.host_nic_bytes() == {0: (128 * MB, 0), 1: (0, 64 * MB), 2: (0, 64 * MB)}
    # local rank 2 is on NIC 1 of 4 (ranks 0-1 on NIC 0, 2-3 on NIC 1): no sharing
    other = merge(one_message(0, 8, 64 * MB, step=8), one_message(2, 16, 64 * MB, step=18))
    assert simulate(other, Network(nics_per_host=4, nic_bw=10 * GB), semantics).makespan_s == \
        pytest.approx(alone, rel=1e-12)


def test_nccl_runs_a_ranks_batches_in_order_and_a_batchs_operations_concurrently():
    # rank 0 first receives 4 units from rank 8 (step 8), then sends 1 unit to rank 16 (step 16).
    # The two use different ports (NIC in / NIC out of rank 0). In one batch (the default: the
    # whole sync one group) both move at once: 4 units. Cut per step (as with a progress
    # callback), gloo still overlaps the two posted batches; NCCL's one stream starts the second
    # batch only after the first: 4 + 1 units.
    unit = 32 * MB / (10 * GB)
    schedule = merge(one_message(8, 0, 4 * 32 * MB, step=8), one_message(0, 16, 32 * MB, step=16))
    net = Network(nic_bw=10 * GB)
    for semantics in ("nccl", "gloo"):
        assert simulate(schedule, net, semantics).makespan_s == pytest.approx(4 * unit, rel=1e-12)
    assert simulate(schedule, net, "gloo", per_step=True).makespan_s == pytest.approx(4 * unit, rel=1e-12)
    nccl = simulate(schedule, net, "nccl", per_step=True)
    assert nccl.makespan_s == pytest.approx(5 * unit, rel=1e-12)
    assert nccl.finish_s[16] == pytest.approx(5 * unit, rel=1e-12)
    assert nccl.lower_bound_s == pytest.approx(4 * unit, rel=1e-12)


def test_tiny_messages_are_latency_bound():
    # rank 0 sends one packed byte to each of 4 other hosts (steps 8, 16, 24, 32). In one batch all
    # 4 move at once (each at a quarter of the NIC): one latency. With a region of one chunk (a
    # cap of 1 byte) every round is a batch: NCCL runs them one after the other (4 latencies);
    # gloo keeps 2 batches in flight (two regions): 2 latencies; 4 with one region
    net = Network(nic_bw=1 * GB, latency_s=1e-3)
    schedule = merge(*(one_message(0, 8 * k, 1, step=8 * k, direct=False) for k in range(1, 5)))
    for semantics in ("nccl", "gloo"):
        result = simulate(schedule, net, semantics)
        assert result.makespan_s == pytest.approx(1e-3 + 4 / GB, rel=1e-9)
        assert result.lower_bound_s == pytest.approx(4 / GB) and result.ratio > 1e5
    assert simulate(schedule, net, "nccl", caps=(1, 1)).makespan_s == pytest.approx(4 * (1e-3 + 1 / GB), rel=1e-9)
    assert simulate(schedule, net, "gloo", caps=(1, 1)).makespan_s == pytest.approx(2 * (1e-3 + 2 / GB), rel=1e-9)
    assert simulate(schedule, net, "gloo", caps=(1, 1), regions=1).makespan_s == \
        pytest.approx(4 * (1e-3 + 1 / GB), rel=1e-9)
    # 17 bytes: two rounds a batch (the second at offset 16, aligned)
    assert simulate(schedule, net, "nccl", caps=(17, 17)).makespan_s == pytest.approx(2 * (1e-3 + 2 / GB), rel=1e-9)


def test_messages_between_one_pair_move_one_at_a_time():
    # one message of 4 chunks in one batch: the pair's connection moves them in order, each
    # paying the latency (4 latencies), where 4 peers in one batch pay one (above)
    net = Network(nic_bw=1 * GB, latency_s=1e-3)
    for semantics in ("nccl", "gloo"):
        result = simulate(one_message(0, 8, 4, chunks=4), net, semantics)
        assert result.makespan_s == pytest.approx(4 * (1e-3 + 1 / GB), rel=1e-9)


def test_lower_bound_is_the_busiest_port():
    net = Network(ranks_per_host=4, nics_per_host=2, nic_bw=1.0, intra_bw=10.0)
    # ranks 0,1 on NIC 0 of host 0; 2,3 on NIC 1; host 1 = ranks 4-7
    bound = lower_bound(net, [(0, 4, 30), (1, 6, 20), (2, 5, 25), (0, 1, 80), (3, 1, 50)])
    # NIC 0 of host 0 sends 30 + 20 = 50; NIC 0 of host 1 (ranks 4, 5) receives 30 + 25 = 55
    assert bound.nic_s == 55.0
    assert bound.port_bytes[("nic_out", 0, 0)] == 50 and bound.port_bytes[("nic_out", 0, 1)] == 25
    assert bound.intra_s == 13.0        # rank 1 receives 80 + 50 inside its host at 10/s
    assert bound.seconds == 55.0


def test_a_schedule_whose_peers_do_not_match_is_refused():
    schedule = one_message(0, 8, 10)
    schedule[8] = []
    with pytest.raises(ValueError, match="rank 0 waits"):
        simulate(schedule, Network(), "gloo")
    with pytest.raises(ValueError, match="semantics"):
        simulate(one_message(0, 8, 10), Network(), "mpi")
    with pytest.raises(ConfigError, match="nics_per_host"):
        Network(ranks_per_host=4, nics_per_host=8)


# ---- the real schedule ---------------------------------------------------------------------------------
def _random_plan(src, dst, spread):
    """A plan over 16 ranks: the source on the first ranks, the destination on the last or (spread)
    on every other rank; 4 ranks per host so that the plan has intra- and inter-host messages."""
    model = tiny_model()
    src_ranks = list(range(src[0] * src[1]))
    dst_ranks = list(range(0, 16, 16 // (dst[0] * dst[1])))[:dst[0] * dst[1]] if spread else \
        list(range(16 - dst[0] * dst[1], 16))
    hosts = [f"h{r // 4}" for r in range(16)]
    return plan_reshard(layout(16, *src, src_ranks), layout(16, *dst, dst_ranks), model, hosts)


@settings(max_examples=15, deadline=None)
@given(src=st.sampled_from(SHAPES), dst=st.sampled_from(SHAPES), spread=st.booleans(),
       bucket=st.sampled_from([64, 300, 1 << 20]), verify=st.booleans(),
       fp8=st.booleans(), atomic=st.booleans(), budget=st.one_of(st.none(), st.integers(1 << 12, 1 << 16)))
def test_the_simulated_rounds_and_batches_are_the_executors(src, dst, spread, bucket, verify, fp8, atomic, budget):
    plan = _random_plan(src, dst, spread)
    dtypes = {s.name: torch.float8_e4m3fn for s in plan.model.tensors
              if fp8 and s.dtype.is_floating_point and len(s.shape) >= 2}
    schedule = rank_rounds(plan, bucket, dtypes, verify)
    for rank in range(16):
        executor = Resharder(plan, context=_Context(rank), bucket_bytes=bucket, verify=verify, dst_dtypes=dtypes,
                             atomic=atomic, max_staging_bytes=budget)
        assert describe_rounds(schedule.get(rank, ())) == describe_rounds(executor.rounds)
        # what the simulator posts (wire.batches with the caps the budget gives) is what the executor posts
        for per_step in (False, True):
            cut = batches(schedule.get(rank, ()), atomic, executor.batch_caps, per_step)
            assert [(b.start, b.stop) for b in cut] == [(b.start, b.stop) for b in executor.batches(per_step)]


@settings(max_examples=30, deadline=None)
@given(src=st.sampled_from(SHAPES), dst=st.sampled_from(SHAPES), spread=st.booleans(),
       bucket=st.sampled_from([64, 300, 4096]), semantics=st.sampled_from(["nccl", "gloo"]),
       atomic=st.booleans(), caps=st.one_of(st.none(), st.tuples(st.integers(0, 5000), st.integers(0, 5000))),
       regions=st.integers(1, 2), per_step=st.booleans(),
       nics=st.sampled_from([1, 2, 4]), nic_bw=st.floats(1e3, 1e6), intra_bw=st.floats(1e3, 1e7),
       fabric=st.one_of(st.none(), st.floats(1e3, 1e7)))
def test_no_simulated_sync_beats_the_lower_bound(src, dst, spread, bucket, semantics, atomic, caps, regions, per_step, nics,
                                                  nic_bw, intra_bw, fabric):
    plan = _random_plan(src, dst, spread)
    net = Network(ranks_per_host=4, nics_per_host=nics, nic_bw=nic_bw, intra_bw=intra_bw, host_fabric_bw=fabric)
    result = simulate(rank_rounds(plan, bucket), net, semantics, atomic=atomic, caps=caps, regions=regions,
                      per_step=per_step)
    assert result.makespan_s >= result.lower_bound_s * (1 - 1e-9)
    # every byte the plan sends over the network is on some rank's rounds, once (plus the
    # alignment gaps between the pieces packed in one chunk: under ALIGN per piece)
    sent = sum(n for (kind, *_), n in result.bound.port_bytes.items() if kind in ("nic_out", "out"))
    planned = sum(t.nbytes for t in plan.transfers if not t.is_local)
    pieces = sum(len(m.pieces) for rank in plan.ranks for m in Resharder(
        plan, context=_Context(rank), bucket_bytes=bucket).recv_messages.values())
    assert 0 <= sent - planned < ALIGN * max(pieces, 1)
    assert all(u <= 1 + 1e-9 for u in result.nic_utilisation().values())


@settings(max_examples=30, deadline=None)
@given(src=st.integers(0, 63), dst=st.integers(0, 63), nbytes=st.integers(1, 1 << 30), nics=st.sampled_from([1, 2, 8]),
       nic_bw=st.floats(1e6, 1e12), intra_bw=st.floats(1e6, 1e12), semantics=st.sampled_from(["nccl", "gloo"]),
       chunks=st.integers(1, 4))
def test_a_single_transfer_meets_the_lower_bound(src, dst, nbytes, nics, nic_bw, intra_bw, semantics, chunks):
    if src == dst:
        dst = (dst + 1) % 64
    nbytes = max(chunks, nbytes - nbytes % chunks)
    result = simulate(one_message(src, dst, nbytes, chunks=chunks),
                      Network(nics_per_host=nics, nic_bw=nic_bw, intra_bw=intra_bw), semantics)
    expected = nbytes / (nic_bw if src // 8 != dst // 8 else intra_bw)
    assert result.lower_bound_s == pytest.approx(expected, rel=1e-12)
    assert result.makespan_s == pytest.approx(expected, rel=1e-9)


# ---- bytes between hosts in `pgroups reshard-plan` -------------------------------------------------------
@pytest.mark.parametrize("per_host", [2, 4])
def test_reshard_plan_reports_bytes_between_hosts(capsys, per_host):
    args = ["reshard-plan", "config_examples/reshard_train.yaml", "config_examples/reshard_infer.yaml",
            "--world-size", "16", "--ranks-per-host", str(per_host), "--model", "config_examples/reshard_model.yaml"]
    assert main(args + ["--json", "--transfers"]) == 0
    data = json.loads(capsys.readouterr().out)
    # re-derived from the transfer list: rank r is on host r // per_host
    out, inc = {}, {}
    for t in data["transfers"]:
        a, b = t["src"] // per_host, t["dst"] // per_host
        if a != b:
            out[f"host{a}"] = out.get(f"host{a}", 0) + t["bytes"]
            inc[f"host{b}"] = inc.get(f"host{b}", 0) + t["bytes"]
    traffic = data["host_bytes"]
    assert out and inc, "this layout pair moves bytes between hosts"
    assert {h: v[0] for h, v in traffic["hosts"].items() if v[0]} == out
    assert {h: v[1] for h, v in traffic["hosts"].items() if v[1]} == inc
    assert traffic["out_max_over_mean"] == pytest.approx(max(out.values()) / (sum(out.values()) / len(out)))
    assert traffic["in_max_over_mean"] == pytest.approx(max(inc.values()) / (sum(inc.values()) / len(inc)))
    assert main(args) == 0
    text = capsys.readouterr().out
    assert (f"per host out max/mean {traffic['out_max_over_mean']:.2f}, in max/mean "
            f"{traffic['in_max_over_mean']:.2f}") in text
    # hosts unknown: no such report
    assert main(args[:5] + args[7:] + ["--json"]) == 0
    assert "host_bytes" not in json.loads(capsys.readouterr().out)


# ---- the RLHF-shaped pairs: the executor's posting rule against the NIC bound ----------------------------
@pytest.fixture(scope="module")
def rlhf_schedules():
    """Every pair of :mod:`pgroups.reshard.plan.scenarios` at 64 ranks (one decoder layer per
    training stage: the peer pattern of the full model; 8 ranks per host), 256 MiB buckets."""
    hosts = [f"node{r // 8}" for r in range(64)]
    out = {}
    for name, (make_model, src, dst) in pairs(64, layers_per_stage=1).items():
        out[name] = rank_rounds(plan_reshard(src, dst, make_model(), hosts), 256 * MB)
    return out


def test_posted_as_the_executor_posts_every_rlhf_pair_is_within_1_1x_of_the_nic_bound(rlhf_schedules):
    # 8 NICs x 400 Gb/s per host, 450 GB/s per rank inside a host, 5 us per message, NCCL
    # semantics; the default posting rule (no max_staging_bytes): every rank's sync one group
    net = Network(nic_bw=50 * GB, intra_bw=450 * GB, latency_s=5e-6)
    for name, schedule in rlhf_schedules.items():
        result = simulate(schedule, net, "nccl")
        assert result.bound.nic_s > result.bound.intra_s, name    # the NICs are the bottleneck
        assert result.makespan_s <= 1.1 * result.lower_bound_s, (name, result.ratio)
        # the busiest host's NICs are evenly loaded: the NIC bound is the host bound
        assert result.host_bound_s == pytest.approx(result.bound.nic_s, rel=0.01), name


def test_posting_one_step_at_a_time_chains_the_waits(rlhf_schedules):
    # the same rounds cut at every step (as with a progress callback): a rank's steps run one
    # after another on its stream and each waits for its peer's earlier steps — far from the bound
    net = Network(nic_bw=50 * GB, intra_bw=450 * GB, latency_s=5e-6)
    ratios = {name: simulate(schedule, net, "nccl", per_step=True).ratio for name, schedule in rlhf_schedules.items()}
    assert min(ratios.values()) > 1.5, ratios


def test_the_naive_syncs_take_their_hand_computed_fluid_times():
    # 64 ranks, 8 per host, dense tp8 x pp4 -> tp4: one source copy is ranks 0-31 (hosts 0-3).
    # Rank-0 broadcast: the gather brings 24 of 32 even shares through rank 0's NIC (8 of them
    # come from its own host), then the chain carries the whole model M across every host
    # boundary: 0.75 M / B + M / B. All-gather: each copy's ring of 32 crosses a host boundary
    # every 8 ranks, and each link carries M minus the receiver's share: (31/32) M / B.
    from pgroups.reshard.layout import local_shapes
    from pgroups.reshard.plan.baselines import allgather_schedule, broadcast_schedule, model_bytes

    make_model, src, dst = pairs(64, layers_per_stage=1)["dense-tp4"]
    model = make_model()
    total, nic = model_bytes(model), 50 * GB
    net = Network(nic_bw=nic, intra_bw=450 * GB)
    share = total // 32
    bcast = simulate(broadcast_schedule(src, dst, model), net, "nccl", per_step=True)
    assert bcast.makespan_s == pytest.approx(24 * share / nic + total / nic, rel=1e-9)
    gather = simulate(allgather_schedule(src, dst, model), net, "nccl", per_step=True)
    assert gather.makespan_s == pytest.approx((total - share) / nic, rel=1e-9)
    # disjoint: after its ring, source rank j sends rollout rank 32 + j its tp4 shard (a quarter)
    make_model, src, dst = pairs(64, layers_per_stage=1)["dense-disjoint"]
    disjoint = simulate(allgather_schedule(src, dst, model), net, "nccl", per_step=True)
    quarter = max(sum(math.prod(shape) * 2 for shape in local_shapes(dst, model, rank).values())   # bf16
                  for rank in dst.ranks)
    assert disjoint.makespan_s == pytest.approx((total - share) / nic + quarter / nic, rel=1e-9)
