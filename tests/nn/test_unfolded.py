"""Unfolded (matrix-product) convolutions against torch's own."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conchshell.nn.direct import direct_convolutions
from conchshell.nn.layers import WNConv1d
from conchshell.nn.unfolded import MAX_UNFOLDED_ROWS, UnfoldedConv1d, unfolded_conv1d
from conchshell.utils.profile import count_macs


@pytest.mark.parametrize("channels, kernel, padding, with_bias", [
    (1, 16, 0, True),   # the discriminator's first layer
    (3, 4, 2, True),
    (2, 1, 0, False),
    (4, 5, 7, True),    # padding wider than the kernel
])
def test_equals_the_direct_convolution_with_gradients(channels, kernel, padding, with_bias):
    torch.manual_seed(0)
    x = torch.randn(3, channels, 40, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, channels, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = [t for t in (x, weight, bias) if t is not None]
    expected = F.conv1d(x, weight, bias, padding=padding)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    result = unfolded_conv1d(x, weight, bias, padding)
    torch.testing.assert_close(result, expected)
    for grad, expected_grad in zip(torch.autograd.grad(result, inputs, upstream), expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="shorter than the kernel"):
        unfolded_conv1d(torch.randn(1, 1, 5), torch.randn(2, 1, 9), None)
    with pytest.raises(ValueError, match="channels"):
        unfolded_conv1d(torch.randn(1, 2, 20), torch.randn(2, 1, 3), None)
    with pytest.raises(ValueError, match="batched"):
        unfolded_conv1d(torch.randn(1, 20), torch.randn(2, 1, 3), None)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_matches_the_direct_convolution(x_dtype):
    torch.manual_seed(0)
    conv = WNConv1d(1, 32, 16, conv_type=UnfoldedConv1d)
    x = torch.randn(2, 1, 500).to(x_dtype).requires_grad_(True)
    results = []
    for direct in (True, False):
        conv.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if direct:
                with direct_convolutions():
                    out = conv(x)
            else:
                out = conv(x)
        out.float().pow(2).sum().backward()
        grads = [x.grad] + [p.grad for p in conv.parameters()]
        results.append((out, [g.clone() for g in grads]))
    (expected, expected_grads), (out, grads) = results
    assert out.dtype == torch.bfloat16 and grads[0].dtype == x_dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.02, atol=0.02)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).norm() / want.float().norm() < 0.02


def test_module_keeps_conv1d_parameters_and_falls_back_where_it_does_not_apply():
    torch.manual_seed(0)
    plain = WNConv1d(1, 8, 16)
    unfolded = WNConv1d(1, 8, 16, conv_type=UnfoldedConv1d)
    assert unfolded.state_dict().keys() == plain.state_dict().keys()
    unfolded.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 300)
    torch.testing.assert_close(unfolded(x), plain(x), rtol=1e-5, atol=1e-5)
    wide = UnfoldedConv1d(MAX_UNFOLDED_ROWS, 4, 2, padding=1)  # 2 * 64 rows: the plain conv
    assert not wide.rewrites(torch.randn(1, MAX_UNFOLDED_ROWS, 10))
    for kwargs in ({"stride": 2}, {"dilation": 2}, {"groups": 2}):
        conv = UnfoldedConv1d(2, 4, 3, **kwargs)
        assert not conv.rewrites(torch.randn(1, 2, 20))
    with pytest.raises(ValueError, match="zero padding"):
        UnfoldedConv1d(1, 2, 3, padding=1, padding_mode="reflect")


def test_macs_are_those_of_the_convolution():
    conv = UnfoldedConv1d(1, 32, 16)
    assert count_macs(conv, torch.randn(1, 1, 115)) == 32 * 16 * 100
