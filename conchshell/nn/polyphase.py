"""Strided 1-D convolutions computed as stride-1 convolutions over a phase-split input.

A convolution with stride ``s`` only ever pairs tap ``s*m + p`` of its kernel with input
sample ``s*(t+m) + p``. Splitting the input into its ``s`` phases (sample ``s*n + p`` becomes
sample ``n`` of channel ``c*s + p``) and the kernel the same way (tap ``s*m + p`` becomes tap
``m`` of channel ``c*s + p``, zero-padded to whole phases) turns it into a stride-1
convolution with ``s`` times the input channels per group and ``ceil(k/s)`` taps: the same
products, summed in another order.

The discriminator's strided layers (k41 s4, 4 input channels per group) are where this
pays: oneDNN runs such narrow groups far below the matmul rate, and runs the phase-split
form (16 channels per group, 11 taps) much faster. On 2 CPU cores, batch 4 (the
discriminator's real + fake batch), forward + backward per layer, bf16 autocast:
32->128 1832 -> 647 ms, 128->512 1769 -> 562 ms, 512->1024 1365 -> 1079 ms,
1024->1024 569 -> 473 ms. CUDA keeps the direct convolution: not measured there.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def polyphase_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int,
                     groups: int) -> Tensor:
    """``F.conv1d(x, weight, bias, stride, padding, groups=groups)`` (zero padding, no
    dilation) as a stride-1 convolution of the phase-split input."""
    batch, channels, length = x.shape
    out_channels, group_channels, kernel = weight.shape
    out_length = (length + 2 * padding - kernel) // stride + 1
    if out_length < 1:
        raise ValueError(f"input of length {length} is shorter than the kernel ({kernel}, padding {padding})")
    taps = -(-kernel // stride)
    # Padded input covering exactly out_length outputs; F.pad crops when the end is negative.
    needed = stride * (out_length - 1 + taps)
    x = F.pad(x, (padding, needed - length - padding))
    phases = x.reshape(batch, channels, needed // stride, stride).transpose(2, 3)
    phases = phases.reshape(batch, channels * stride, needed // stride)
    weight = F.pad(weight, (0, taps * stride - kernel)).reshape(out_channels, group_channels, taps, stride)
    weight = weight.transpose(2, 3).reshape(out_channels, group_channels * stride, taps)
    return F.conv1d(phases, weight, bias, groups=groups)


class PolyphaseConv1d(nn.Conv1d):
    """``nn.Conv1d`` (same parameters and state dict) whose strided CPU forward runs
    :func:`polyphase_conv1d`; other devices, stride 1 and dilated kernels run as usual."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("PolyphaseConv1d supports numeric zero padding only")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.device.type != "cpu" or self.stride[0] == 1 or self.dilation[0] != 1:
            return super().forward(x)
        return polyphase_conv1d(x, self.weight, self.bias, self.stride[0], self.padding[0], self.groups)
