"""nettest's data plane on one GPU (world 1, NCCL): verification of every collective on CUDA
buffers, and timing with CUDA events that covers the transfer, not its launch.

The timing check makes each timed operation wait for a GPU kernel of known length
(``torch.cuda._sleep`` on a side stream, which NCCL's stream waits for since the operation is
issued from it): ``Bench._timed`` must report at least that long per operation. Timing only the
launch (the end event recorded without waiting for NCCL's stream) would report about 0. Written
from torch 2.13's ProcessGroupNCCL (the NCCL stream waits for the issuing stream;
``work.wait()`` makes the current stream wait for the NCCL stream).
"""
from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from .cuda_support import CUDA, one_rank, sleep_cycles_per_second

pytestmark = [pytest.mark.gpus(1), pytest.mark.multiprocess]

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
STALL_S, ITERS = 0.05, 4


class OneHost:
    """The coordinator a Bench asks on one host: every rank on ``localhost``, never aborted."""

    def host(self, rank: int) -> str:
        return "localhost"

    def beat(self) -> None:
        pass

    def check_abort(self) -> None:
        pass


def bench_on_one_gpu() -> Dict[str, Any]:
    import torch.distributed as dist

    from pgroups import ParallelContext
    from pgroups.nettest import bench, metrics

    ctx = ParallelContext().init_from_config({"parallel": {}, "timeout_s": 60})
    result: Dict[str, Any] = {}
    try:
        group = ctx.get_group("nettest")
        for corrupt in (False, True):
            runner = bench.Bench(CUDA, OneHost(), bench.ActiveFaults(corrupt=corrupt), timeout_s=60, warmup=1, iters=2)
            for collective in COLLECTIVES:
                record = runner.measure(collective, group, [0], 0, metrics.message_shape(collective, 1 << 20, 1))
                result[(collective, corrupt)] = (record["wrong"], min(record["times"]))
            runner.close()
        rate = sleep_cycles_per_second()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(int(STALL_S * rate))
        end.record()
        end.synchronize()
        result["stall_s"] = start.elapsed_time(end) / 1e3
        side, data = torch.cuda.Stream(CUDA), torch.ones(1 << 18, device=CUDA)

        def stalled_issue() -> list:
            with torch.cuda.stream(side):  # NCCL's stream waits for ``side``, busy for STALL_S
                torch.cuda._sleep(int(STALL_S * rate))
                return [dist.all_reduce(data, group=group, async_op=True)]

        runner = bench.Bench(CUDA, OneHost(), bench.ActiveFaults(), timeout_s=60, warmup=0, iters=ITERS)
        result["timed_s"] = runner._timed(stalled_issue, ITERS, False, data.numel() * 4)
        runner.close()
        return result
    finally:
        ctx.destroy()


@pytest.fixture(scope="module")
def measured() -> Dict[str, Any]:
    return one_rank(bench_on_one_gpu)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("collective", COLLECTIVES)
def test_every_collective_is_verified_on_cuda_buffers(measured, collective):
    wrong, seconds = measured[(collective, False)]
    assert wrong == 0 and seconds > 0
    corrupted, _ = measured[(collective, True)]
    assert corrupted > 0  # the injected corruption (about 8 elements) is seen on the GPU


@pytest.mark.timeout(300)
def test_cuda_event_timing_covers_the_transfer_not_its_launch(measured):
    stall_s, timed = measured["stall_s"], measured["timed_s"]
    assert abs(stall_s - STALL_S) < STALL_S * 0.5, stall_s  # the calibration holds
    assert len(timed) == 1  # one batch of ITERS operations between two events, its mean
    assert stall_s * 0.9 <= timed[0] < stall_s * 3, (timed, stall_s)
