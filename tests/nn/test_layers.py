"""Layers shared by the generators and the discriminator."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from conchshell.nn.channels_last import to_channels_last_2d
from conchshell.nn.layers import MaxPool1d, ReflectionPad1d, ResnetBlock1d


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


def test_reflection_pad_pads_the_time_axis_of_channels_last_inputs():
    x = torch.randn(2, 5, 30)
    pad = ReflectionPad1d(3)
    channels_last = pad(to_channels_last_2d(x))
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert channels_last.squeeze(2).equal(pad(x)) and pad(x).equal(nn.ReflectionPad1d(3)(x))


def _frozen_block(channels: int = 64) -> ResnetBlock1d:
    torch.manual_seed(0)
    block = ResnetBlock1d(channels, dilation=3)
    for module in block.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return block.requires_grad_(False)


def test_frozen_bf16_block_runs_channels_last_with_the_same_output(monkeypatch):
    block = _frozen_block()
    x = torch.randn(2, 64, 200)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert block.runs_channels_last(x)
        fast = block(x)
        monkeypatch.setattr(ResnetBlock1d, "runs_channels_last", lambda self, x: False)
        plain = block(x)
    assert fast.shape == plain.shape and fast.is_contiguous()
    torch.testing.assert_close(fast.float(), plain.float(), rtol=0, atol=1e-2 * plain.abs().max().item())


def test_trainable_or_float32_blocks_keep_channels_first():
    x = torch.randn(1, 64, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ResnetBlock1d(64).runs_channels_last(x)  # trainable
    assert not _frozen_block().runs_channels_last(x)  # float32
