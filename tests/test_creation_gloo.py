"""Group creation with real gloo processes: the shapes that hang without placeholder steps build
every group and pass ``pgroups run``'s all-reduce checks — modes that cover some ranks (embedding at pipeline
3 and 4 followed by other modes), user modes over a subset, lazy requests by members only, every
strategy gloo has — and ``pgroups nettest`` on hosts with unequal rank counts.

One world of 12 ranks runs every context scenario in turn (init, check, destroy), so the suite
pays for one spawn.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import pytest

from pgroups import ParallelContext, ProcessGroupInitializer, cli, register_initializer
from pgroups.selfcheck import all_reduce_every_mode

from conftest import run_ranks

pytestmark = pytest.mark.multiprocess

WORLD = 12
SCENARIOS: List[Dict[str, Any]] = [
    # dp-pp after embedding at pipeline 3 (hangs without placeholders), under both strategies gloo can use
    {"parallel": {"tensor": 2, "pipeline": 3, "modes": ["embedding", "dp-pp"]}, "strategy": "local"},
    {"parallel": {"tensor": 2, "pipeline": 3, "modes": ["embedding", "dp-pp"]}, "strategy": "all"},
    # embedding at pipeline 4 (the two middle stages hold none), then two more mixed modes
    {"parallel": {"pipeline": 4, "modes": ["embedding", "tp-pp", "dp-pp"], "order": "tp-dp-pp"}},
    # lazy device groups: members request them on first use (see the worker)
    {"parallel": {"pipeline": 3, "modes": ["embedding", "dp-pp"]}, "groups": "lazy"},
    # user modes over part of the world, docs/groups.md's "each rank in at most one group"
    {"parallel": {"tensor": 2}, "extra_modes": {"part_a": {"groups": [[0, 1]]}, "part_b": {"groups": [[0, 2]]},
                                                 "part_c": {"groups": [[1, 2, 5], [7, 11]]}}},
]


@register_initializer("part_a")
@register_initializer("part_b")
@register_initializer("part_c")
class GivenGroups(ProcessGroupInitializer):
    """A user mode whose groups are given in its options."""

    def __init__(self, groups):
        self.groups = [sorted(g) for g in groups]

    def rank_groups(self, topology):
        return [list(g) for g in self.groups]


def scenarios_worker(scenarios: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Build and check each scenario's context in turn; return the per-mode failure counts."""
    results = []
    for config in scenarios:
        ctx = ParallelContext().init_from_config(dict(config, backend="gloo", timeout_s=60))
        try:
            if config.get("groups") == "lazy":  # members ask in the context's mode order, no one else
                for mode in ctx.modes:
                    if ctx.is_member(mode):
                        ctx.get_group(mode)
            summary = all_reduce_every_mode(ctx)
            results.append({mode: figures["device_failures"] + figures["cpu_failures"]
                            for mode, figures in summary.items()})
            results[-1]["placeholders"] = ctx.backend.placeholders
        finally:
            ctx.destroy()
    return results


@pytest.mark.timeout(400)
def test_partial_modes_build_and_pass_the_all_reduce_check():
    results = run_ranks(WORLD, scenarios_worker, SCENARIOS, timeout_s=380)
    for config, per_mode in zip(SCENARIOS, results[0]):
        modes = set(per_mode) - {"placeholders"}
        assert {"embedding", "dp-pp"} <= modes or "part_b" in modes, config
        assert all(per_mode[m] == 0 for m in modes), (config, per_mode)
    # rank 2 sits in the middle stage at pipeline 3 (rank = tp + 2*pp + 6*dp): it holds no
    # embedding group, so it registered a placeholder; rank 0 (first stage) needed none
    assert results[2][0]["placeholders"] == 1 and results[0][0]["placeholders"] == 0


def test_validate_with_a_world_size_checks_the_creation_schedule(tmp_path, capsys):
    path = tmp_path / "e.yaml"
    path.write_text("parallel:\n  tensor: 2\n  pipeline: 3\n  modes: [embedding, dp-pp]\n")
    assert cli.main(["validate", str(path), "-n", "12"]) == 0
    out = capsys.readouterr().out
    assert "group creation checked" in out and "no rank waits for a peer that never comes" in out
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "not checked" in out and "-n" in out


@pytest.mark.timeout(240)
def test_nettest_on_hosts_with_unequal_rank_counts(tmp_path, capsys):
    """``--simulate-hosts 2 --nproc 3``: hosts of 2 and 1 ranks (the SLURM 8 + 4 shape, small)."""
    report = tmp_path / "net.json"
    code = cli.main(["nettest", "--nproc", "3", "--simulate-hosts", "2", "-c", "all_reduce", "-e", "16K",
                     "-f", "4", "--quiet", "--max-time", "200", "--json", str(report)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    groups = {g["id"]: g["ranks"] for g in json.loads(report.read_text())["groups"]}
    assert groups["intra-node#0"] == [0, 1] and groups["inter-node#0"] == [0, 2]


def test_validate_names_the_mode_that_would_deadlock(tmp_path, capsys, monkeypatch):
    """The reporting path, shown on the schedule without placeholders (creation before the fix)."""
    from pgroups import creation

    unpadded = creation.eager_schedule
    monkeypatch.setattr(creation, "eager_schedule", lambda steps, world, rank, padding=True: unpadded(steps, world, rank, False))
    path = tmp_path / "e.yaml"
    path.write_text("parallel:\n  tensor: 2\n  pipeline: 3\n  modes: [embedding, dp-pp]\nstrategy: local\n")
    assert cli.main(["validate", str(path), "-n", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "mode 'dp-pp' under strategy 'local'" in err and "hold different numbers of groups" in err
