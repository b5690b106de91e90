"""``pgroups nettest`` on NCCL: the times are the transfers' (not their launch), and a healthy run
exits 0 with its link scan. Needs 2 GPUs (skipped with one reason otherwise: conftest.py); it has not run
on the CPU machine this project is developed on."""
from __future__ import annotations

import json

import pytest
import torch

from pgroups import cli

from conftest import run_ranks_outcomes

pytestmark = pytest.mark.gpus(2)

# No link between two GPUs moves 64 MiB faster than this; a time taken at the launch of the
# operation (before NCCL's stream ran it) gives figures far above it.
PHYSICAL_BOUND_GBPS = 2000.0


def as_torchrun_rank(argv):
    import os

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    return cli.main(["nettest", *argv])


@pytest.mark.timeout(600)
def test_healthy_nccl_run_times_transfers_and_exits_0(tmp_path):
    path = tmp_path / "gpu.json"
    argv = ["-b", "64M", "-e", "64M", "-c", "all_reduce,sendrecv", "--quiet", "--no-tables", "--json", str(path)]
    outcomes = run_ranks_outcomes(2, as_torchrun_rank, argv, timeout_s=500)
    assert [o.value for o in outcomes] == [0, 0], [o.error for o in outcomes]
    report = json.loads(path.read_text())
    assert report["backend"] == "nccl" and report["device"] == "cuda"
    for m in report["measurements"]:
        assert 0 < m["busbw_gbps"] < PHYSICAL_BOUND_GBPS, m
    for sample in report["links"]["samples"]:
        assert 0 < sample["busbw_gbps"] < PHYSICAL_BOUND_GBPS, sample
    assert report["culprits"] == []
    # NCCL's own diagnostics (pgroups.nettest.nccl_diagnostics, written from NCCL 2.31's docs):
    # on NCCL >= 2.31 both ranks ran them and each kept its communicators' "NCCL DIAG" report
    # lines (two GPUs: a peer-to-peer edge to check); on older NCCL the reason names the version.
    diagnostics = report["nccl_diagnostics"]
    version = tuple(torch.cuda.nccl.version())
    if version[:2] >= (2, 31):
        assert diagnostics["ran_on"] == [0, 1], diagnostics
        assert all(any("NCCL DIAG" in line for line in diagnostics["reports"][r]) for r in ("0", "1")), diagnostics
        assert diagnostics["findings"] == [], diagnostics  # a healthy machine: no failed check
    else:
        assert diagnostics["ran_on"] == [] and "2.31 or newer" in diagnostics["not_run"][0]["reason"]
