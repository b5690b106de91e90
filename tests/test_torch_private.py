"""The private torch APIs behind ``pgroups.torch_private`` that ISP uses: what each answers on
this torch, and what its fallback does when torch moves it."""
from __future__ import annotations

import pytest
import torch

from pgroups import torch_private


def test_autograd_backward_running_is_true_only_inside_a_backward_pass():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", torch_private.autograd_backward_running()))
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", torch_private.autograd_backward_running()))
            return grad

    x = torch.ones(2, requires_grad=True)
    Probe.apply(x).sum().backward()
    assert seen == [("forward", False), ("backward", True)]
    assert torch_private.autograd_backward_running() is False


def test_autograd_backward_running_without_the_private_api_names_it(monkeypatch):
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    with pytest.raises(RuntimeError, match="_current_graph_task_id is gone"):
        torch_private.autograd_backward_running()


def test_tensor_version_counts_in_place_changes_and_the_fallback_always_differs():
    param = torch.nn.Parameter(torch.zeros(3))
    before = torch_private.tensor_version(param)
    assert torch_private.tensor_version(param) == before  # reading changes nothing
    with torch.no_grad():
        param.add_(1.0)
    assert torch_private.tensor_version(param) == before + 1

    class NoVersion:
        pass

    first, second = torch_private.tensor_version(NoVersion()), torch_private.tensor_version(NoVersion())
    assert first != second and first < 0 and second < 0  # never equal: every use looks stale, gathers again
