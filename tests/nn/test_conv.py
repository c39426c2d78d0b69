"""The guarded 1-D convolution: F.conv1d's results, in both layouts, and float32 where
oneDNN's bf16 kernel is wrong."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conchshell.nn import conv as conv_module
from conchshell.nn.conv import TRUSTED_GROUP_INPUTS, Conv1d, bf16_conv1d_is_exact, conv1d


def _relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    return ((result.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(stride=2, padding=3),
    dict(padding=4, dilation=3),
    dict(groups=2, padding="same"),
])
def test_equals_f_conv1d_in_both_layouts(kwargs):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 6, 50), torch.randn(4, 6 // kwargs.get("groups", 1), 5), torch.randn(4)
    expected = F.conv1d(x, weight, bias, **kwargs)
    torch.testing.assert_close(conv1d(x, weight, bias, **kwargs), expected)
    channels_last = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    out = conv1d(channels_last, weight, bias, **kwargs)
    assert out.shape == (2, 4, 1, expected.shape[-1]) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.squeeze(2), expected)


def test_module_keeps_nn_conv1d_state_and_rejects_other_padding_modes():
    layer = Conv1d(3, 5, 7, padding=3)
    plain = torch.nn.Conv1d(3, 5, 7, padding=3)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 40)
    torch.testing.assert_close(layer(x), plain(x))
    with pytest.raises(ValueError, match="zero padding"):
        Conv1d(3, 5, 7, padding=3, padding_mode="reflect")


def test_wide_groups_are_trusted_without_a_probe(monkeypatch):
    monkeypatch.setattr(conv_module, "_plain_conv1d", None)  # a probe would call it
    bf16_conv1d_is_exact.cache_clear()
    assert bf16_conv1d_is_exact(TRUSTED_GROUP_INPUTS, 8, 40, 1, 1, 1)
    assert bf16_conv1d_is_exact(2 * TRUSTED_GROUP_INPUTS, 8, 40, 1, 1, 2)
    bf16_conv1d_is_exact.cache_clear()


@pytest.mark.parametrize("channels, out_channels, kernel, stride", [
    (4, 8, 40, 1), (8, 16, 40, 1),  # two of the demo and tiny generators' stages
    (2, 8, 32, 1), (16, 8, 8, 4),   # other shapes oneDNN's AMX kernel got wrong
])
def test_bf16_is_right_where_onednn_was_wrong(channels, out_channels, kernel, stride):
    torch.manual_seed(0)
    x, weight = torch.randn(2, channels, 300), torch.randn(out_channels, channels, kernel)
    expected = F.conv1d(x.double(), weight.double(), stride=stride, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for result in (conv1d(x, weight, stride=stride, padding=1),
                       conv1d(x.unsqueeze(2).contiguous(memory_format=torch.channels_last), weight,
                              stride=stride, padding=1).squeeze(2)):
            assert result.dtype == torch.bfloat16
            assert _relative_error(result, expected) < 0.01


def test_a_shape_found_wrong_runs_in_float32_with_gradients(monkeypatch):
    monkeypatch.setattr(conv_module, "bf16_conv1d_is_exact", lambda *shape: False)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 100, requires_grad=True)
    layer = Conv1d(4, 8, 9, padding=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = F.conv1d(x.double(), layer.weight.double(), layer.bias.double(), padding=4)
    assert _relative_error(out, expected) < 0.004  # float32 arithmetic, one bf16 rounding
    out.float().pow(2).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


def test_the_probe_warns_once_per_wrong_shape(monkeypatch):
    def wrong_in_bf16(x, weight, bias, stride, padding, dilation, groups):
        out = F.conv1d(x.float().squeeze(2) if x.dim() == 4 else x.float(), weight.float(), bias, stride,
                       padding, dilation, groups)
        return -out if x.dtype == torch.bfloat16 else out

    monkeypatch.setattr(conv_module, "_plain_conv1d", wrong_in_bf16)
    bf16_conv1d_is_exact.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="4 -> 8 channels, kernel 40, stride 1.*float32"):
            assert not bf16_conv1d_is_exact(4, 8, 40, 1, 1, 1)
        assert not bf16_conv1d_is_exact(4, 8, 40, 1, 1, 1)  # cached: no second warning, no second probe
    finally:
        bf16_conv1d_is_exact.cache_clear()
