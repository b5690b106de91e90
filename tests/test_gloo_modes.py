"""Real gloo processes at world 8: the N-axis modes (context, expert, weight, embedding and axis
combinations) are built by the context and all_reduce over exactly the ranks the pure topology
names — on the device and the CPU group, under two strategies and both expert layouts."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist

from pgroups import ParallelContext, load_config

from conftest import run_ranks

MODES = ["tp-cp", "dp-cp", "tp-dp-cp", "embedding", "tp-ep", "tp-ep-pp"]
FIRST = {"parallel": {"tensor": 2, "context": 2, "pipeline": 2, "expert": 2, "expert_tensor": 1, "weight": 2,
                      "order": "tp-cp-ep-dp-pp", "modes": MODES},
         "cpu_groups": "eager", "timeout_s": 60}
SECOND = {"parallel": {"tensor": 2, "pipeline": 2, "expert": 2, "weight": 2, "zero1": 2, "order": "tp-pp-dp",
                       "expert_layout": "internevo", "modes": ["embedding", "wp-pp"]},
          "strategy": "all", "groups": "lazy", "timeout_s": 60}


def probe(ctx: ParallelContext) -> Dict[str, Any]:
    out = {}
    for mode in ctx.modes:  # the same order on every rank (lazy groups are collective)
        sums, torch_ranks = [], []
        for group in (ctx.get_group(mode), ctx.get_cpu_group(mode)):
            value = torch.tensor([ctx.get_global_rank() + 1], dtype=torch.int64)
            dist.all_reduce(value, group=group)
            sums.append(int(value))
            torch_ranks.append(dist.get_process_group_ranks(group))
        out[mode] = {"ranks": ctx.get_ranks_in_group(mode), "sums": sums, "torch_ranks": torch_ranks}
    return out


def worker(first: dict, second: dict) -> List[Dict[str, Any]]:
    results = []
    ctx = ParallelContext()
    for config in (first, second):
        ctx.init_from_config(config)
        try:
            results.append(probe(ctx))
        finally:
            ctx.destroy()
    return results


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_new_modes_build_and_all_reduce_on_eight_gloo_ranks():
    results = run_ranks(8, worker, FIRST, SECOND, timeout_s=150)
    for index, config in enumerate((FIRST, SECOND)):
        topology = load_config(config).topology(8)
        for rank, result in enumerate(results):
            seen = result[index]
            expected_modes = set(topology.default_modes()) | set(config["parallel"]["modes"])
            assert set(seen) == expected_modes, (index, rank)
            for mode, got in seen.items():
                ranks = topology.group_of(rank, mode)
                assert got["ranks"] == ranks, (index, rank, mode)
                assert got["torch_ranks"] == [ranks, ranks], (index, rank, mode)
                assert got["sums"] == [sum(r + 1 for r in ranks)] * 2, (index, rank, mode)
    first = {m: load_config(FIRST).topology(8).group_of(5, m) for m in ("tp-cp", "context", "expert", "weight")}
    assert first == {"tp-cp": [4, 5, 6, 7], "context": [5, 7], "expert": [4, 5], "weight": [4, 5]}


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_pgroups_run_checks_modes_some_ranks_are_not_in(tmp_path, capfd):
    """``pgroups run`` over a layout with embedding on 4 stages: ranks 1 and 2 (middle stages)
    hold no embedding group; every other mode is checked everywhere. ``-q``: no progress lines
    (neither the command's nor rank 0's)."""
    from pgroups.cli import main

    path = tmp_path / "embedding.yaml"
    path.write_text("parallel: {pipeline: 4, weight: 1, modes: [embedding, tp-ep-pp]}\ntimeout_s: 60\n")
    assert main(["run", str(path), "--nproc", "4", "--timeout", "150", "-q"]) == 0
    out, err = capfd.readouterr()
    assert "[pgroups run" not in err, err
    assert "all groups passed (11 modes, world 4)" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("embedding "))
    assert row[1:5] == ["1", "2", "ok", "ok"]  # one group [0, 3] of 2 ranks
