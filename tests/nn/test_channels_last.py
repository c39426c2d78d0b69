import pytest
import torch
from torch import nn

from conchshell.nn.channels_last import (
    Conv1d,
    ConvTranspose1d,
    from_channels_last_2d,
    to_channels_last_2d,
)


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
