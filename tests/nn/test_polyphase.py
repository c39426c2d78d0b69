"""Phase-split strided convolutions against torch's own."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conchshell.nn.layers import WNConv1d
from conchshell.nn.direct import direct_convolutions
from conchshell.nn.polyphase import (PolyphaseConv1d, _block_diagonal, _block_diagonal_weight, _convolution_groups,
                                     _grouped_conv1d, _weight_grad_groups, polyphase_conv1d)
from conchshell.utils.profile import count_macs


# float64 takes oneDNN's backward-data kernel for the input gradient, float32 the flipped
# forward convolution; 3 outputs per group: in float32 the weight gradient, the forward and
# the input-gradient convolutions take groups together.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride, kernel, padding, groups, length", [
    (4, 41, 20, 8, 1000),   # the discriminator's strided layers
    (4, 41, 20, 8, 1003),   # a length that is not a whole number of phases
    (4, 41, 0, 1, 97),      # no padding: the padded input is cropped at the end
    (2, 5, 1, 2, 33),       # kernel not a multiple of the stride
    (3, 3, 2, 4, 10),
    (5, 2, 0, 1, 12),       # kernel shorter than the stride: samples skipped
])
def test_equals_the_direct_convolution_with_gradients(stride, kernel, padding, groups, length, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 4 * groups, length, dtype=dtype, requires_grad=True)
    weight = torch.randn(3 * groups, 4, kernel, dtype=dtype, requires_grad=True)
    bias = torch.randn(3 * groups, dtype=dtype, requires_grad=True)
    tolerance = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    expected = F.conv1d(x, weight, bias, stride=stride, padding=padding, groups=groups)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, weight, bias), upstream)
    result = polyphase_conv1d(x, weight, bias, stride, padding, groups)
    assert result.shape == expected.shape
    torch.testing.assert_close(result, expected, **tolerance)
    for grad, expected_grad in zip(torch.autograd.grad(result, (x, weight, bias), upstream), expected_grads):
        torch.testing.assert_close(grad, expected_grad, **tolerance)


def test_too_short_input_is_an_error():
    with pytest.raises(ValueError, match="shorter than the kernel"):
        polyphase_conv1d(torch.randn(1, 1, 5), torch.randn(1, 1, 9), None, 4, 0, 1)


def test_module_keeps_conv1d_parameters_and_matches_it():
    torch.manual_seed(0)
    plain = WNConv1d(8, 16, 41, stride=4, padding=20, groups=2)
    phased = WNConv1d(8, 16, 41, stride=4, padding=20, groups=2, conv_type=PolyphaseConv1d)
    assert phased.state_dict().keys() == plain.state_dict().keys()
    phased.load_state_dict(plain.state_dict())
    x = torch.randn(3, 8, 777)
    torch.testing.assert_close(phased(x), plain(x), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(phased(x.bfloat16()).float(), plain(x.bfloat16()).float(), rtol=0.05, atol=0.05)


def test_module_without_stride_or_with_dilation_runs_as_usual():
    torch.manual_seed(0)
    for kwargs in ({"stride": 1, "padding": 1}, {"stride": 2, "dilation": 2}):
        conv = PolyphaseConv1d(2, 3, 3, **kwargs)
        x = torch.randn(1, 2, 20)
        torch.testing.assert_close(conv(x), F.conv1d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation))


def test_module_rejects_padding_it_cannot_phase_split():
    with pytest.raises(ValueError, match="zero padding"):
        PolyphaseConv1d(2, 3, 3, stride=2, padding=1, padding_mode="reflect")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_outputs", [4, 8, 16])  # gradients of 4, 2 and 1 groups at once
def test_autocast_gradients_match_the_direct_convolution(dtype, group_outputs):
    torch.manual_seed(0)
    groups = 4
    x = torch.randn(2, 4 * groups, 301).to(dtype).requires_grad_(True)
    conv = nn.Conv1d(4 * groups, group_outputs * groups, 41, stride=4, padding=20, groups=groups)
    outputs, grads = [], []
    for fn in (lambda: conv(x), lambda: polyphase_conv1d(x, conv.weight, conv.bias, 4, 20, groups)):
        conv.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
        out.float().pow(2).sum().backward()
        outputs.append(out)
        grads.append([x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()])
    assert outputs[0].dtype == outputs[1].dtype == torch.bfloat16
    assert [g.dtype for g in grads[1]] == [dtype, torch.float32, torch.float32]
    torch.testing.assert_close(outputs[1].float(), outputs[0].float(), rtol=0.02, atol=0.05)
    for got, expected in zip(grads[1], grads[0]):
        relative = (got.float() - expected.float()).norm() / expected.float().norm()
        assert relative < 0.02


def test_direct_convolutions_switch_counts_the_models_own_work():
    conv = PolyphaseConv1d(8, 16, 41, stride=4, padding=20, groups=2)
    x = torch.randn(1, 8, 400)
    direct_macs = 16 * 4 * 41 * 100  # out channels x inputs per group x taps x outputs
    assert count_macs(conv, x) == direct_macs
    with direct_convolutions():
        torch.testing.assert_close(conv(x), F.conv1d(x, conv.weight, conv.bias, 4, 20, groups=2))
    expected = F.conv1d(x, conv.weight, conv.bias, 4, 20, groups=2)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_narrow_groups_take_their_weight_gradient_together():
    assert _weight_grad_groups(torch.bfloat16, 256, 4) == 64      # 1024->1024: fours
    assert _weight_grad_groups(torch.bfloat16, 128, 8) == 64      # 512->1024: pairs
    assert _weight_grad_groups(torch.bfloat16, 32, 16) == 32      # wide enough already
    assert _weight_grad_groups(torch.bfloat16, 10, 5) == 2        # 4 does not divide 10: fives
    assert _weight_grad_groups(torch.bfloat16, 2, 1) == 1         # at most all groups as one
    assert _weight_grad_groups(torch.bfloat16, 3, 4) == 1
    assert _weight_grad_groups(torch.float32, 256, 4) == 128      # 1024->1024 in fp32: pairs
    assert _weight_grad_groups(torch.float32, 128, 8) == 128      # 512->1024 in fp32: as it is
    assert _weight_grad_groups(torch.float64, 256, 4) == 256
    # Time-major (channels-last) phases in bf16: combined up to 32 outputs per group.
    assert _weight_grad_groups(torch.bfloat16, 8, 16, time_major=True) == 4      # 32->128
    assert _weight_grad_groups(torch.bfloat16, 128, 8, time_major=True) == 32    # 512->1024
    assert _weight_grad_groups(torch.bfloat16, 256, 4, time_major=True) == 32    # 1024->1024
    assert _weight_grad_groups(torch.float32, 256, 4, time_major=True) == 256    # not measured


def test_time_major_bf16_convolutions_combine_groups_up_to_32_channels():
    assert _convolution_groups(torch.bfloat16, 8, 16, 16, time_major=True) == 4     # 32->128
    assert _convolution_groups(torch.bfloat16, 128, 16, 8, time_major=True) == 32   # 512->1024
    assert _convolution_groups(torch.bfloat16, 256, 16, 4, time_major=True) == 32   # 1024->1024
    assert _convolution_groups(torch.bfloat16, 8, 16, 16, time_major=False) == 8    # channels-first
    assert _convolution_groups(torch.float32, 256, 16, 4, time_major=False) == 128  # fp32 pairs


def test_combined_time_major_bf16_layer_matches_the_direct_convolution():
    # 8-in/4-out groups: every pass runs with combined groups (forward, input and weight
    # gradient), which must not change the result beyond bf16 rounding.
    torch.manual_seed(0)
    x = torch.randn(2, 32, 1, 400).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (0.1 * torch.randn(16, 8, 41)).requires_grad_()
    bias = torch.randn(16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = polyphase_conv1d(x, weight, bias, 4, 20, 4)
    grads = torch.autograd.grad(out.float().square().sum(), [x, weight, bias])
    x64, weight64, bias64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    expected = F.conv1d(x64.squeeze(2), weight64, bias64, 4, 20, groups=4)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x64, weight64, bias64])
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.squeeze(2).double(), expected, rtol=0.02, atol=0.05)
    for grad, reference in zip(grads, expected_grads):
        scale = reference.abs().max()
        assert (grad.double() - reference).abs().max() <= 0.03 * scale


@pytest.mark.parametrize("group_inputs, group_outputs, groups, combined", [
    (16, 4, 256, 128),  # the last strided layer: pairs
    (4, 16, 256, 128),  # its input gradient
    (16, 8, 128, 128),  # 512->1024: as it is
    (16, 3, 8, 2),      # fours: 2 and 3 groups are not enough and 3 does not divide 8
])
def test_narrow_float32_convolutions_run_as_fewer_groups(group_inputs, group_outputs, groups, combined,
                                                         monkeypatch):
    torch.manual_seed(0)
    weight = torch.randn(group_outputs * groups, group_inputs, 3)
    x, bias = torch.randn(2, group_inputs * groups, 20), torch.randn(group_outputs * groups)
    ran_with, torch_conv1d = [], F.conv1d

    def conv1d(x, weight, bias, stride, padding, dilation, groups):
        ran_with.append(groups)
        return torch_conv1d(x, weight, bias, stride, padding, dilation, groups)

    expected = F.conv1d(x, weight, bias, groups=groups)
    monkeypatch.setattr(F, "conv1d", conv1d)
    torch.testing.assert_close(_grouped_conv1d(x, weight, bias, groups), expected, rtol=1e-5, atol=1e-5)
    assert ran_with == [combined]
    ran_with.clear()
    _grouped_conv1d(x.double(), weight.double(), None, groups)
    assert ran_with == [groups]  # only float32 was measured


def test_block_diagonal_weight_is_undone_by_block_diagonal():
    weight = torch.randn(24, 5, 3)
    wide = _block_diagonal_weight(weight, 6, 2)
    assert wide.shape == (24, 15, 3)
    assert torch.equal(_block_diagonal(wide, 6, 2), weight)
    assert torch.count_nonzero(wide) == torch.count_nonzero(weight)


def _as_2d(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``[B, C, L]`` -> a ``[B, C, 1, L]`` leaf, stored channels-last or channels-first."""
    if channels_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.unsqueeze(2).detach().requires_grad_(True)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("stride, kernel, padding, groups, length", [
    (4, 41, 20, 8, 1000), (4, 41, 20, 8, 1003), (2, 5, 1, 2, 33), (5, 2, 0, 1, 12)])
def test_2d_input_gives_a_channels_last_output_and_the_same_gradients(stride, kernel, padding, groups, length,
                                                                      channels_last):
    torch.manual_seed(0)
    x = _as_2d(torch.randn(2, 4 * groups, length, dtype=torch.float64), channels_last)
    weight = torch.randn(3 * groups, 4, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3 * groups, dtype=torch.float64, requires_grad=True)
    expected = F.conv1d(x.squeeze(2), weight, bias, stride=stride, padding=padding, groups=groups)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, weight, bias), upstream)
    result = polyphase_conv1d(x, weight, bias, stride, padding, groups)
    assert result.shape == (*expected.shape[:2], 1, expected.shape[-1])
    assert result.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(result.squeeze(2), expected)
    grads = torch.autograd.grad(result, (x, weight, bias), upstream.unsqueeze(2))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    # The input gradient comes back in the input's own layout.
    assert grads[0].squeeze(2).stride(1) == (1 if channels_last else length)


def test_2d_input_under_bf16_autocast_and_inside_direct_convolutions():
    torch.manual_seed(0)
    conv = WNConv1d(16, 32, 41, stride=4, padding=20, groups=4, conv_type=PolyphaseConv1d)
    x = torch.randn(2, 16, 501)
    expected = conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        phased = conv(_as_2d(x, channels_last=True))
    assert phased.dtype == torch.bfloat16 and phased.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(phased.squeeze(2).float(), expected, rtol=0.05, atol=0.05)
    # The plain form of a [B, C, 1, L] input, where FLOPs are counted.
    with direct_convolutions():
        torch.testing.assert_close(conv(_as_2d(x, channels_last=True)).squeeze(2), expected, rtol=1e-5, atol=1e-5)
        assert count_macs(conv, _as_2d(x, channels_last=True)) == count_macs(conv, x)


def test_2d_input_must_have_height_one():
    with pytest.raises(ValueError, match=r"\[B, C, 1, L\]"):
        polyphase_conv1d(torch.randn(1, 4, 2, 50), torch.randn(4, 4, 5), None, 2, 0, 1)
