from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conchshell.nn.conv3d import conv3d, uses_onednn
from conchshell.nn.direct import direct_convolutions


# Batch-1 shapes PyTorch itself would give to its im2col fallback (channels x frames x
# height <= 20480 with a 3-wide kernel), as in I3D's Inception blocks, and a strided one.
@pytest.mark.parametrize("shape, out_channels, stride, padding", [
    ((1, 32, 9, 28, 28), 48, 1, 1),
    ((1, 24, 5, 14, 14), 16, 1, 1),
    ((1, 16, 4, 9, 9), 8, 2, 0),
])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_equals_the_plain_convolution(shape, out_channels, stride, padding, memory_format):
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    weight = torch.randn(out_channels, shape[1], 3, 3, 3).contiguous(memory_format=memory_format)
    bias = torch.randn(out_channels)
    with torch.inference_mode():
        assert uses_onednn(x, weight)
        got = conv3d(x, weight, bias, stride, padding)
    expected = F.conv3d(x.double(), weight.double(), bias.double(), stride, padding)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert got.is_contiguous(memory_format=memory_format)


def test_plain_where_it_would_not_pay_or_could_not_count():
    x, weight = torch.randn(1, 4, 3, 6, 6), torch.randn(4, 4, 3, 3, 3)
    assert not uses_onednn(x.requires_grad_(), weight)  # autograd: PyTorch's own choice
    x = x.detach()
    with direct_convolutions():  # FLOP counting sees F.conv3d
        assert not uses_onednn(x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 takes oneDNN anyway
        assert not uses_onednn(x, weight)
    assert not uses_onednn(x.double(), weight.double())
    torch.backends.mkldnn.enabled = False  # the user turned oneDNN off
    try:
        assert not uses_onednn(x, weight)
    finally:
        torch.backends.mkldnn.enabled = True
    assert uses_onednn(x, weight)


def test_gradients_still_flow_through_the_plain_path():
    x = torch.randn(1, 4, 3, 6, 6, requires_grad=True)
    weight = torch.randn(4, 4, 3, 3, 3, requires_grad=True)
    conv3d(x, weight, None, 1, 1).square().sum().backward()
    assert x.grad is not None and weight.grad is not None
