"""One vocabulary: Megatron-Core's / DeviceMesh's tokens are the canonical mode names; InternEvo's
names and the ParallelMode enum are aliases, accepted everywhere and never printed."""
from __future__ import annotations

import itertools
import json
import random

import pytest

from pgroups import ModeNotInitializedError, ParallelContext, ParallelMode, Topology
from pgroups.cli import main
from pgroups.modes import MESH_AXES, VOCABULARY, canonical_name, parse_combination
from pgroups.nettest.steps import select_modes

from conftest import fake_world

#: Written out by hand from InternEvo's ParallelMode names and Megatron-Core's parallel_state
#: (its RankGenerator tokens: 'tp', 'pp', 'dp', 'cp', 'tp-pp' for the model-parallel group, 'ep',
#: and the expert generator's 'tp' for expert tensor); wp/wdp are ISP's axes, which Megatron lacks.
ALIAS_TO_CANONICAL = {
    "tensor": "tp", "context": "cp", "data": "dp", "pipe": "pp", "pipeline": "pp", "model": "tp-pp",
    "expert": "ep", "expert_tensor": "etp", "expert_data": "edp", "weight": "wp", "weight_data": "wdp",
}
#: Modes Megatron-Core and DeviceMesh have no word for: their own names.
OWN_NAMES = ("global", "zero1", "nettest", "embedding")
#: Megatron-Core's spellings of combinations (parallel_state.initialize_model_parallel): canonical as written.
MEGATRON_TOKENS = ("tp", "pp", "dp", "cp", "ep", "tp-pp", "dp-cp", "tp-dp-cp", "tp-dp", "tp-cp", "tp-ep", "tp-ep-pp")


def test_every_alias_and_enum_member_resolves_to_its_canonical_token():
    for alias, canonical in ALIAS_TO_CANONICAL.items():
        assert canonical_name(alias) == canonical, alias
    for name in OWN_NAMES:
        assert canonical_name(name) == name
    for member in ParallelMode:
        assert canonical_name(member) == ALIAS_TO_CANONICAL.get(member.value, member.value), member
    # the one table lists exactly these names, nothing more
    table = {alias: canonical for canonical, aliases, _, _ in VOCABULARY for alias in aliases}
    assert table == ALIAS_TO_CANONICAL
    assert {canonical for canonical, _, _, _ in VOCABULARY} == set(ALIAS_TO_CANONICAL.values()) | set(OWN_NAMES)
    assert {member for _, _, member, _ in VOCABULARY} == set(ParallelMode)


def test_megatron_spellings_are_canonical_in_any_order():
    for token in MEGATRON_TOKENS:
        assert canonical_name(token) == token
        for order in itertools.permutations(token.split("-")):
            assert canonical_name("-".join(order)) == token, order


def test_every_axis_combination_round_trips_through_its_canonical_token():
    """Every non-empty set of one mesh's axes, written in every order: one canonical token, which
    is its own canonical token and parses back to the same groups (mesh and axes)."""
    for mesh, axes in MESH_AXES.items():
        for size in range(1, len(axes) + 1):
            for subset in itertools.combinations(axes, size):
                spellings = {"-".join(order) for order in itertools.permutations(subset)}
                parsed = {parse_combination(s) for s in spellings}
                assert len(parsed) == 1, spellings  # every order: one mode
                tokens = {canonical_name(s) for s in spellings}
                assert len(tokens) == 1, (spellings, tokens)
                token = tokens.pop()
                assert canonical_name(token) == token
                assert parse_combination(token) == parsed.pop(), token


def test_an_alias_and_its_canonical_token_have_the_same_groups():
    rng = random.Random(7)
    for _ in range(20):
        tensor, pipeline, context, expert = (rng.choice([1, 2]) for _ in range(4))
        data = rng.choice([2, 4])
        world = tensor * pipeline * context * data
        topology = Topology.create(world, tensor=tensor, pipeline=pipeline, context=context, expert=expert,
                                   weight=tensor, order="tp-cp-ep-dp-pp")
        for alias, canonical in ALIAS_TO_CANONICAL.items():
            assert topology.groups(alias) == topology.groups(canonical), alias


def aliases_in(text: str) -> list:
    """The aliases that appear in ``text`` as a whole quoted name, a JSON key or a table row."""
    return [a for a in ALIAS_TO_CANONICAL
            if f"'{a}'" in text or f'"{a}"' in text or any(line.split()[:1] == [a] for line in text.splitlines())]


MOE_YAML = """
parallel: {tensor: 2, context: 2, pipeline: 2, expert: 4, expert_tensor: 1, weight: 4, zero1: 2,
           order: tp-cp-ep-dp-pp, modes: [cp-dp, tp-cp, model, embedding]}
"""


@pytest.mark.parametrize("config, world", [("config_examples/golden16.yaml", 16), ("moe", 32),
                                           ("config_examples/rlhf.yaml", 24)])
def test_pgroups_show_names_modes_canonically(tmp_path, capsys, config, world):
    if config == "moe":
        config = str(tmp_path / "moe.yaml")
        (tmp_path / "moe.yaml").write_text(MOE_YAML)
    assert main(["show", config, "--world-size", str(world), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    layouts = [m["modes"] for m in shown["models"].values()] if "models" in shown else [shown["modes"]]
    for layout in layouts:
        assert layout and all(canonical_name(mode) == mode for mode in layout), list(layout)
    assert main(["show", config, "--world-size", str(world)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(("world ", "model "))]
    assert rows and aliases_in("\n".join(rows)) == []
    assert main(["show", config, "--world-size", str(world), "--mode", "pipe", "--json"] +
                (["--model", "actor"] if "models" in shown else [])) == 0
    one = json.loads(capsys.readouterr().out)
    assert list((one["models"]["actor"] if "models" in one else one)["modes"]) == ["pp"]


def test_context_messages_and_handles_say_the_canonical_name():
    with fake_world(8, 5):
        ctx = ParallelContext().init_from_config({"parallel": {"tensor": 2, "pipeline": 2}})
        try:
            assert ctx.modes == ["global", "tp", "pp", "dp", "tp-pp", "zero1", "nettest"]
            assert ctx.group("tensor").mode == "tp" and ctx.group(ParallelMode.MODEL).label.startswith("mode 'tp-pp'")
            assert aliases_in(ctx.describe()) == []
            for asked in ("context", ParallelMode.EXPERT, "tensr"):
                with pytest.raises(ModeNotInitializedError) as info:
                    ctx.get_group(asked)
                message = str(info.value).split("(did you mean")[0]  # a suggestion may be an alias
                assert aliases_in(message) == [], message
            with pytest.raises(ValueError, match="'tp' group"):
                ctx.to_local_rank("tensor", 0)
        finally:
            ctx.destroy()


def test_nettest_selects_modes_by_canonical_name():
    built = ["global", "tp", "pp", "dp", "tp-pp", "zero1", "nettest"]
    assert select_modes(["tensor", "dp", "data", "model"], built) == ["tp", "dp", "tp-pp"]
    assert select_modes(["all"], built) == built
    with pytest.raises(Exception, match="unknown mode 'context'; built modes: global, tp, pp"):
        select_modes(["context"], built)
