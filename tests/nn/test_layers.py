"""Layers shared by the generators and the discriminator."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conchshell.nn.layers import MaxPool1d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_pool_equals_torch_in_the_input_dtype(dtype):
    x = torch.randn(2, 8, 101).to(dtype)
    ours, torchs = MaxPool1d(10, stride=2, padding=1), nn.MaxPool1d(10, stride=2, padding=1)
    with torch.inference_mode():
        result = ours(x)
    assert result.dtype == dtype and result.equal(torchs(x))


def test_bf16_max_pool_passes_gradients_to_the_maxima():
    x = torch.randn(1, 3, 50).bfloat16().requires_grad_(True)
    expected = x.detach().clone().requires_grad_(True)
    MaxPool1d(10, stride=1, padding=1)(x).float().sum().backward()
    nn.MaxPool1d(10, stride=1, padding=1)(expected).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.equal(expected.grad)
