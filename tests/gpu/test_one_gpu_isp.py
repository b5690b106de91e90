"""The ISP weight-parallel runtime on one GPU (weight 1, NCCL job of world 1).

At weight 1 no collective moves a byte: every "gather" is a copy into a pool buffer on the GPU,
and the pool hands the same buffers to the next blocks while earlier kernels may still read
them. That is correct only because every kernel is ordered on one CUDA stream; the test trains
3 AdamW steps with prefetching (depth 2) and the memory pool on, and compares the losses and the
final weights with the same model trained without WeightParallel on the same GPU. What this
cannot show: gathers and reduce-scatters overlapping on NCCL's stream (weight >= 2: 2 GPUs).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List

import pytest
import torch
from torch import nn

from .cuda_support import CUDA, one_rank

pytestmark = [pytest.mark.gpus(1), pytest.mark.multiprocess]

STEPS, BLOCKS, DIM = 3, 4, 32


class Stack(nn.Module):
    """Blocks of two linears with a GELU between, plus a replicated head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(DIM, 2 * DIM + 3), nn.GELU(), nn.Linear(2 * DIM + 3, DIM))
                                    for _ in range(BLOCKS))
        self.head = nn.Linear(DIM, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def train(model: nn.Module, wrap: Any = None) -> List[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if wrap is not None:
        wrap.attach_optimizer(optimizer)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(16, DIM, generator=generator).to(CUDA)
    target = torch.randn(16, 8, generator=generator).to(CUDA)
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def isp_on_one_gpu() -> Dict[str, Any]:
    from pgroups import ParallelContext
    from pgroups.comm import WeightParallel

    ctx = ParallelContext().init_from_config({"parallel": {"weight": 1}, "timeout_s": 60})
    try:
        reference = Stack().to(CUDA)
        model = copy.deepcopy(reference)
        wp = WeightParallel(model, blocks=model.layers, ctx=ctx, prefetch_depth=2)
        isp_losses = train(model, wp)
        full = {name: tensor.cpu() for name, tensor in wp.full_state_dict().items()}
        reference_losses = train(reference)
        expected = {name: tensor.detach().cpu() for name, tensor in reference.state_dict().items()}
        return {"backend": ctx.backend.device_backend, "losses": (isp_losses, reference_losses),
                "full": full, "expected": expected, "devices": sorted({str(p.device) for p in model.parameters()})}
    finally:
        ctx.destroy()


@pytest.mark.timeout(300)
def test_isp_at_weight_1_on_cuda_trains_like_the_unsharded_model():
    result = one_rank(isp_on_one_gpu)
    assert result["backend"] == "nccl" and result["devices"] == ["cuda:0"]
    isp_losses, reference_losses = result["losses"]
    assert isp_losses[-1] < isp_losses[0]  # it trains
    torch.testing.assert_close(torch.tensor(isp_losses), torch.tensor(reference_losses), rtol=1e-5, atol=1e-6)
    assert result["full"].keys() == result["expected"].keys()
    for name, tensor in result["expected"].items():
        torch.testing.assert_close(result["full"][name], tensor, rtol=1e-5, atol=1e-5, msg=name)
