import pytest
import torch
from torch import nn

from conchshell.nn.channels_last import (
    ConvTranspose1d,
    from_channels_last_2d,
    phase_grid_applies,
    relu_conv_on_phase_grid,
    to_channels_last_2d,
)
from conchshell.nn.conv import Conv1d
from conchshell.nn.direct import direct_convolutions
from conchshell.nn.resnet1d import ResidualConvBlock1d


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, padding=9, dilation=9),
    dict(kernel_size=4, stride=2, padding=1),
    dict(kernel_size=1),
    dict(kernel_size=5, padding=2, groups=2),
])
def test_conv1d_channels_last_path_matches_the_1d_path_forward_and_backward(kwargs):
    torch.manual_seed(0)
    conv = Conv1d(4, 6, **kwargs)
    x = torch.randn(2, 4, 37, requires_grad=True)
    reference = conv(x)
    (reference * torch.arange(reference.numel()).view_as(reference).sin()).sum().backward()
    grads = (x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad = None
    conv.zero_grad()
    out = from_channels_last_2d(conv(to_channels_last_2d(x)))
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip((x.grad, conv.weight.grad, conv.bias.grad), grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=4, stride=2, padding=1),
    dict(kernel_size=8, stride=4, padding=2),
    dict(kernel_size=3, stride=2, padding=1, output_padding=1),
])
def test_conv_transpose1d_channels_last_path_matches_the_1d_path(kwargs):
    torch.manual_seed(0)
    conv = ConvTranspose1d(4, 3, **kwargs)
    x = torch.randn(2, 4, 11)
    torch.testing.assert_close(from_channels_last_2d(conv(to_channels_last_2d(x))), conv(x),
                               rtol=1e-5, atol=1e-5)


def test_layout_helpers_round_trip_and_store_channels_last():
    x = torch.randn(2, 5, 7)
    y = to_channels_last_2d(x)
    assert y.shape == (2, 5, 1, 7)
    assert y.is_contiguous(memory_format=torch.channels_last)
    back = from_channels_last_2d(y)
    assert back.is_contiguous() and torch.equal(back, x)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_one_channel_input_keeps_the_network_channels_last(requires_grad):
    # Its channels-first strides are channels-last too, but oneDNN reads them as
    # channels-first and would write the first convolution's output that way.
    x = torch.randn(2, 1, 50, requires_grad=requires_grad)
    y = to_channels_last_2d(x)
    assert y.stride() == (50, 1, 50, 1) and torch.equal(y.squeeze(2), x)
    out = Conv1d(1, 8, 3, padding=1)(y)
    assert out.stride(1) == 1 and out.is_contiguous(memory_format=torch.channels_last)
    if requires_grad:
        y.sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))


def test_parameters_and_state_dict_match_the_torch_modules():
    ours, theirs = Conv1d(3, 4, 3, padding=1), nn.Conv1d(3, 4, 3, padding=1)
    theirs.load_state_dict(ours.state_dict())  # strict: same names and shapes
    x = torch.randn(1, 3, 9)
    torch.testing.assert_close(ours(x), theirs(x))
    up, up_ref = ConvTranspose1d(3, 2, 4, 2, 1), nn.ConvTranspose1d(3, 2, 4, 2, 1)
    up_ref.load_state_dict(up.state_dict())
    torch.testing.assert_close(up(x), up_ref(x))


def test_non_zero_padding_modes_are_refused():
    with pytest.raises(ValueError, match="zero padding"):
        Conv1d(2, 2, 3, padding=1, padding_mode="reflect")


@pytest.mark.parametrize("dilation, length, kernel", [
    (9, 100, 3),     # not a whole number of grid rows: the ReLU buffer's tail is zeros
    (27, 81, 3),     # exactly three rows
    (243, 1000, 3),  # fewer rows than taps reach: most outputs see padding
    (9, 50, 5),
])
def test_phase_grid_convolution_equals_the_dilated_one(dilation, length, kernel):
    torch.manual_seed(0)
    conv = Conv1d(8, 6, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation).requires_grad_(False)
    x = to_channels_last_2d(torch.randn(1, 8, length, dtype=torch.float64)).float()
    with torch.no_grad():
        assert phase_grid_applies(x, conv)
        got = relu_conv_on_phase_grid(x, conv)
        expected = conv(torch.relu(x))
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_phase_grid_only_where_it_is_the_same_computation():
    conv = Conv1d(4, 4, 3, padding=27, dilation=27).requires_grad_(False)
    x = to_channels_last_2d(torch.randn(1, 4, 200))
    with torch.no_grad():
        assert phase_grid_applies(x, conv)
        assert not phase_grid_applies(to_channels_last_2d(torch.randn(2, 4, 200)), conv)  # batch
        assert not phase_grid_applies(x.squeeze(2), conv)  # the 1-D path
        assert not phase_grid_applies(x, Conv1d(4, 4, 3, padding=3, dilation=3).requires_grad_(False))
        assert not phase_grid_applies(x, Conv1d(4, 4, 3, padding=20, dilation=27).requires_grad_(False))
    assert not phase_grid_applies(x.requires_grad_(), conv)  # autograd keeps the plain path


def test_residual_unit_takes_the_phase_grid_without_autograd():
    torch.manual_seed(1)
    unit = ResidualConvBlock1d(8, 8, dilation=81).requires_grad_(False)
    x = to_channels_last_2d(torch.randn(1, 8, 500))
    with torch.no_grad():
        fast = unit(x)
    slow = unit(x.clone().requires_grad_())  # autograd on: the plain path
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)


def test_phase_grid_stands_aside_inside_direct_convolutions():
    conv = Conv1d(4, 4, 3, padding=27, dilation=27).requires_grad_(False)
    x = to_channels_last_2d(torch.randn(1, 4, 200))
    with torch.no_grad(), direct_convolutions():
        assert not phase_grid_applies(x, conv)


def test_time_major_is_the_3d_view_of_a_channels_last_tensor():
    from conchshell.nn.channels_last import is_time_major

    x = torch.randn(2, 8, 30)
    assert not is_time_major(x)
    assert is_time_major(to_channels_last_2d(x).squeeze(2))
    assert is_time_major(x.transpose(1, 2).contiguous().transpose(1, 2))
    assert not is_time_major(torch.randn(2, 1, 30))  # one channel: no layout to speak of
