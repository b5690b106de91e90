"""Several models in one job (``models:``): placement, groups in global ranks, shared
communicators, release / rebuild, the CLI.

Anchor: Megatron-Core's ``HyperCommGrid(shape, dim_names, rank_offset)`` — its rules re-derived
here (the first dim name varies fastest; a group along some dims holds the ranks that share every
other dim's coordinate; ranks start at ``rank_offset``), not its code.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Dict, List, Sequence

import pytest
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgroups import ConfigError, ModeNotInitializedError, ParallelContext, cli, creation, load_config
from pgroups.model_context import plan_models
from pgroups.initializer import default_registry
from pgroups.selfcheck import all_reduce_every_mode

from conftest import fake_world, run_ranks

RLHF = {"models": {"actor": {"parallel": {"tensor": 4, "pipeline": 2}, "ranks": "0-15"},
                   "rollout": {"parallel": {"tensor": 2}, "ranks": "0-15"},
                   "reward": {"parallel": {"tensor": 4, "order": "tp-dp-pp"}, "ranks": "16-23"}}}


def hyper_comm_grid_groups(shape: Sequence[int], dim_names: Sequence[str], dims: Sequence[str],
                           rank_offset: int) -> List[List[int]]:
    """HyperCommGrid's groups along ``dims`` (sorted), re-derived: coordinate c of a rank, with
    the first dim fastest, gives rank = offset + sum(c[i] * prod(shape[:i]))."""
    strides = [math.prod(shape[:i]) for i in range(len(shape))]
    chosen = [dim_names.index(d) for d in dims]
    others = [i for i in range(len(shape)) if i not in chosen]
    groups = []
    for fixed in itertools.product(*(range(shape[i]) for i in others)):
        group = []
        for free in itertools.product(*(range(shape[i]) for i in chosen)):
            coord = dict(zip(others, fixed)) | dict(zip(chosen, free))
            group.append(rank_offset + sum(coord[i] * strides[i] for i in range(len(shape))))
        groups.append(sorted(group))
    return sorted(groups)


MODE_DIMS = {"tensor": ["tp"], "pipe": ["pp"], "data": ["dp"], "model": ["tp", "pp"], "context": ["cp"],
             "dp-cp": ["dp", "cp"]}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor=st.sampled_from([1, 2, 4]), pipeline=st.sampled_from([1, 2, 3]), context=st.sampled_from([1, 2]),
       data=st.sampled_from([1, 2, 3]), offset=st.integers(0, 12), tail=st.integers(0, 5), data_order=st.randoms())
def test_a_placed_model_has_hyper_comm_grid_groups(tensor, pipeline, context, data, offset, tail, data_order):
    axes = ["tp", "pp", "dp"] + (["cp"] if context > 1 else [])
    data_order.shuffle(axes)
    n = tensor * pipeline * context * data
    world = offset + n + tail
    config = load_config({"models": {"m": {"parallel": {"tensor": tensor, "pipeline": pipeline, "context": context,
                                                        "order": "-".join(axes)},
                                           "ranks": f"{offset}-{offset + n - 1}"}}})
    ranks, topology, inits, _ = plan_models(default_registry, config, world)["m"]
    size = {"tp": tensor, "pp": pipeline, "dp": data, "cp": context}
    shape = [size[a] for a in axes]
    single = load_config({"parallel": {"tensor": tensor, "pipeline": pipeline, "context": context,
                                       "order": "-".join(axes)}}).topology(n)
    for mode, dims in MODE_DIMS.items():
        if mode not in inits:
            continue
        ours = sorted(sorted(g) for g in inits[mode].rank_groups(topology))
        assert ours == hyper_comm_grid_groups(shape, axes, dims, offset), mode
        assert ours == sorted(sorted(r + offset for r in g) for g in single.groups(mode)), mode


#: (dp, tp) DeviceMeshes in global ranks: actor rank = tp + 4 pp + 8 dp (rank 5's stage pp 1);
#: rollout tp 2 x dp 8; reward tp 4 x dp 2 from 16
MESHES = {"actor": [[4, 5, 6, 7], [12, 13, 14, 15]], "rollout": [[2 * d, 2 * d + 1] for d in range(8)],
          "reward": [[16, 17, 18, 19], [20, 21, 22, 23]]}


def test_the_context_answers_in_global_ranks_on_the_fake_backend():
    for rank, expected in ((5, {"actor": [4, 5, 6, 7], "rollout": [4, 5]}), (18, {"reward": [16, 17, 18, 19]})):
        with fake_world(24, rank):
            ctx = ParallelContext().init_from_config(RLHF)
            try:
                for name, tensor in expected.items():
                    model = ctx.model(name)
                    assert model.get_ranks_in_group("tensor") == tensor
                    assert model.get_local_rank("tensor") == tensor.index(rank)
                    assert model.get_rank_groups("tensor")[0][0] == model.ranks[0]
                    assert model.device_mesh(("dp", "tp")).mesh.tolist() == MESHES[name]
                outside = next(n for n in ("actor", "reward") if n not in expected)
                with pytest.raises(ModeNotInitializedError, match=f"rank {rank} is not in model {outside!r}"):
                    ctx.model(outside).get_group("tensor")
                with pytest.raises(ConfigError, match="did you mean 'actor'"):
                    ctx.model("actr")
                with pytest.raises(ModeNotInitializedError, match="several models"):
                    ctx.get_group("tensor")
            finally:
                ctx.destroy()


def test_megatron_groups_by_model_reuse_each_models_communicators():
    with fake_world(24, 5):
        ctx = ParallelContext().init_from_config(RLHF)
        try:
            collections = ctx.megatron_groups_by_model(("tp", "pp", "mp"))
            assert set(collections) == {"actor", "rollout"}  # rank 5 is not in the reward model
            for name, groups in collections.items():
                assert groups.tp is ctx.model(name).get_group("tensor")
                assert groups.pp is ctx.model(name).get_group("pipe")
        finally:
            ctx.destroy()


def test_identical_groups_share_one_communicator_across_models():
    with fake_world(24, 5):
        ctx = ParallelContext().init_from_config(RLHF)
        try:
            actor, rollout = ctx.model("actor"), ctx.model("rollout")
            assert rollout.get_group("global") is actor.get_group("global")
            # rollout pipe (pipeline 1) is one rank per group: actor's data is not; rollout data
            # (8 ranks, tp 2) is not actor's data (2 ranks): separate communicators
            assert rollout.get_group("data") is not actor.get_group("data")
            assert ctx.describe() and "shares 'actor.global'" in rollout.describe()
        finally:
            ctx.destroy()


def test_creation_per_rank_does_not_grow_with_the_world():
    """Members-only creation: a rank makes calls for the models it belongs to only."""
    calls = {}
    for world in (1024, 16384):
        config = {"models": {"actor": {"parallel": {"tensor": 8, "pipeline": 4}, "ranks": f"0-{world // 2 - 1}"},
                             "rollout": {"parallel": {"tensor": 4}, "ranks": f"0-{world // 2 - 1}"},
                             "reward": {"parallel": {"tensor": 8}, "ranks": f"{world // 2}-{world - 1}"}}}
        with fake_world(world, world - 1):
            ctx = ParallelContext().init_from_config(config)
            calls[world] = (ctx.backend.calls, ctx.backend.placeholders)
            ctx.destroy()
    assert calls[1024] == calls[16384]


def test_overlapping_models_need_the_count_agreement():
    """Models that overlap in part: ranks 8-15 walked the actor's steps, 16-23 did not, and the
    critic's groups mix them. The members' agreement on their count (always on real backends)
    is what lets them meet; the checker shows both."""
    config = load_config({"models": {"actor": {"parallel": {"tensor": 4, "pipeline": 2}, "ranks": "0-15"},
                                     "critic": {"parallel": {"tensor": 2, "pipeline": 2}, "ranks": "8-23"}}})
    steps = []
    for name, (ranks, topology, inits, _) in plan_models(default_registry, config, 24).items():
        groups = {m: i.rank_groups(topology) for m, i in inits.items()}
        steps += creation.placed_steps(name, creation.context_steps(groups, 24, "local"), ranks)
    assert creation.check_steps(steps, 24, agree=False) is not None
    assert creation.check_steps(steps, 24, agree=True) is None


# ---- real gloo processes: one world of 12 for every model scenario -----------------------------

GLOO_MODELS = {"models": {"actor": {"parallel": {"tensor": 4, "pipeline": 2}, "ranks": "0-7"},
                          "rollout": {"parallel": {"tensor": 2}, "ranks": "0-7"},            # colocated
                          "reward": {"parallel": {"tensor": 4}, "ranks": "8-11"},           # disjoint
                          "critic": {"parallel": {"pipeline": 2, "modes": ["embedding"]}, "ranks": "6-9"}},  # overlapping
               "backend": "gloo", "timeout_s": 60}
HEADS, KV_HEADS = 8, 2


def model_ranks(name: str) -> range:
    first, last = GLOO_MODELS["models"][name]["ranks"].split("-")
    return range(int(first), int(last) + 1)


def models_worker() -> Dict[str, Any]:
    """Every model's groups all-reduce; outside ranks get the error; the colocated models share a
    communicator; the actor's release / rebuild; then a weight sync by model name (below)."""
    from pgroups import gpc

    gpc.init_from_config(GLOO_MODELS)
    rank = gpc.get_global_rank()
    out: Dict[str, Any] = {"failures": {}, "outside": []}
    try:
        for name in gpc.model_names:
            model = gpc.model(name)
            if not model.is_in_model():
                try:
                    model.get_group("tensor")
                except ModeNotInitializedError as exc:
                    out["outside"].append(str(exc))
                continue
            out["failures"][name] = sum(f["device_failures"] + f["cpu_failures"] for f in all_reduce_every_mode(model).values())
        if rank < 8:  # colocated: the identical group is one object
            out["same_global"] = gpc.model("rollout").get_group("global") is gpc.model("actor").get_group("global")
            actor_tensor = gpc.model("actor").get_group("tensor")
            out["released"] = gpc.model("actor").release()
            out["shared_alive"] = gpc.model("rollout").get_group("global") is not None
            out["rebuilt_new"] = gpc.model("actor").get_group("tensor") is not actor_tensor
            out["after_rebuild"] = sum(f["device_failures"] for f in all_reduce_every_mode(gpc.model("actor")).values())
        out["sync"] = sync_by_name(gpc, rank)
    finally:
        gpc.destroy()
    return out


def sync_by_name(gpc, rank: int) -> Dict[str, list]:
    """Sync one layer from the actor (TP4 x PP2) to the colocated rollout (TP2) and to the disjoint
    reward model (TP4); each destination runs the layer tensor-parallel over its *own* tensor
    group (partial outputs all-reduced there) and returns the output."""
    import torch

    from pgroups.reshard import ParallelLayout, cut_shards, empty_shards, execute_plan, plan_share
    from reshard_compute import canonical, rms, sharded_attention, sharded_mlp
    from test_reshard_functional import FFN, HEAD_DIM, HIDDEN, one_layer

    model, full, names = one_layer("interleaved", HEADS, KV_HEADS, canonical(5, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN))
    specs = {t.name: t for t in model.tensors}
    actor = gpc.model("actor")
    src = ParallelLayout.create(actor.topology, actor.ranks)
    x = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(2))
    out = {}
    for name in ("rollout", "reward"):
        target = gpc.model(name)
        dst = ParallelLayout.create(target.topology, target.ranks)
        mine = empty_shards(dst, model, rank, fill=float("nan"))
        execute_plan(plan_share(src, dst, model, rank, gpc.get_hostnames()),
                     cut_shards(src, model, rank, full.__getitem__), mine, timeout_s=60)
        if not target.is_in_model():
            continue
        tensor = target.get_group("tensor")
        size, position = target.get_world_size("tensor"), target.get_local_rank("tensor")
        attn = sharded_attention(rms(x, mine["input_norm"]), mine, specs, names, size, position, HEADS, KV_HEADS)
        dist.all_reduce(attn, group=tensor)
        h = x + attn
        mlp = sharded_mlp(rms(h, mine["post_norm"]), mine, names)
        dist.all_reduce(mlp, group=tensor)
        out[name] = (h + mlp).tolist()
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(480)
def test_models_on_twelve_gloo_ranks():
    import torch

    from reshard_compute import canonical, relative_error
    from test_reshard_functional import FFN, HEAD_DIM, HIDDEN, reference_layer

    results = run_ranks(12, models_worker, timeout_s=460, env={"OMP_NUM_THREADS": "1"})
    for rank, out in enumerate(results):
        expected = {name for name in GLOO_MODELS["models"] if rank in model_ranks(name)}
        assert set(out["failures"]) == expected and all(v == 0 for v in out["failures"].values()), (rank, out)
        assert len(out["outside"]) == 4 - len(expected)
        assert all("is not in model" in message for message in out["outside"])
    for out in results[:8]:
        assert out["same_global"] and out["shared_alive"] and out["rebuilt_new"]
        assert "tp" in out["released"] and out["after_rebuild"] == 0
    # resharding by model name: each destination computes the unsharded layer with its own groups
    w = canonical(5, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN)
    want = reference_layer(torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(2)), w, HEADS, KV_HEADS)
    for rank, out in enumerate(results):
        assert set(out["sync"]) == ({"rollout"} if rank < 8 else {"reward"}), rank
        for got in out["sync"].values():
            assert relative_error(torch.tensor(got), want) < 1e-5, rank


# ---- config and CLI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ({"parallel": {}, "models": {"a": {}}}, "either parallel: .* or models:"),
    ({"models": {"a": {"ranks": "0-40"}}}, r"models.a.ranks: rank 24 is outside the world 0..23"),
    ({"models": {"a": {"parallel": {"tensor": 3}, "ranks": "0-7"}}}, r"models.a .*not divisible by tensor\(3\)"),
    ({"models": {"a": {"ranks": "0-3,2"}}}, "rank 2 is listed twice"),
    ({"models": {"a-b": {}}}, "not a valid model name"),
    ({"models": {"a": {"parallell": {}}}}, "did you mean 'parallel'"),
])
def test_bad_model_configs_are_one_line_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        plan_models(default_registry, load_config(config), 24)


def test_cli_show_and_validate_models(tmp_path, capsys):
    path = tmp_path / "rlhf.yaml"
    path.write_text("models:\n"
                    "  actor:   {parallel: {tensor: 4, pipeline: 2}, ranks: 0-15}\n"
                    "  rollout: {parallel: {tensor: 2}, ranks: 0-15}\n"
                    "  reward:  {parallel: {tensor: 4, order: tp-dp-pp}, ranks: 16-23}\n")
    assert cli.main(["show", str(path), "-n", "24", "--model", "reward", "--mode", "tensor"]) == 0
    out = capsys.readouterr().out
    assert "model reward: ranks [16..23]" in out and "[16,17,18,19] [20,21,22,23]" in out
    assert cli.main(["show", str(path), "-n", "24", "--model", "rolout"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "did you mean 'rollout'" in err
    assert cli.main(["show", str(path), "-n", "20"]) == 2
    assert "models.reward.ranks: rank 20 is outside the world" in capsys.readouterr().err
    assert cli.main(["validate", str(path), "-n", "24"]) == 0
    assert "3 models on world 24" in capsys.readouterr().out


def test_reshard_plan_cli_by_model_name(tmp_path, capsys):
    path = tmp_path / "rlhf.yaml"
    path.write_text("models:\n  actor: {parallel: {tensor: 4, pipeline: 2}, ranks: 0-15}\n"
                    "  rollout: {parallel: {tensor: 2}, ranks: 0-15}\n")
    assert cli.main(["reshard-plan", str(path), "--src", "actor", "--dst", "rollout", "-n", "16"]) == 0
    out = capsys.readouterr().out
    assert "src: tensor 4 x pipeline 2 x data 2" in out and "dst: tensor 2 x pipeline 1 x data 8" in out
    assert cli.main(["reshard-plan", str(path), "--src", "actor", "--dst", "rolout", "-n", "16"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "did you mean 'rollout'" in err


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_pgroups_run_checks_every_model(tmp_path, capsys):
    path = tmp_path / "two.yaml"
    path.write_text("models:\n  trainer: {parallel: {tensor: 2}, ranks: 0-3}\n"
                    "  server: {parallel: {tensor: 2}, ranks: 2-5}\nbackend: gloo\n")
    assert cli.main(["run", str(path), "--nproc", "6", "--timeout", "220"]) == 0
    out = capsys.readouterr().out
    for name in ("trainer", "server"):  # each reported by its model's first rank, merged
        assert f"{name}.tp " in out and f"{name}.global " in out
    assert "all groups passed" in out and "FAIL" not in out
