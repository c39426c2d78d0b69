"""Convolutions of one input with only a few output channels each, as one matrix product.

oneDNN runs a 2-D convolution with 3 output channels far below the matmul rate: the
pseudo-video's last two frames come from two such convolutions of TCNN-6's 256-channel
block at 224x224 (the block's own 1x1 group means, and the last layer's group-averaged
3x3 filters), 13-15 ms under bf16 on 2 CPU cores at batch 1. Every output of a
convolution is the sum over the kernel's taps of one ``[C] . [C]`` product per tap, so one
``[B*H*W, C] @ [C, taps * outputs]`` product (the input read once, for every tap of every
kernel) followed by a shifted sum per tap gives them all: 6 ms, and no less accurate (the
sums are in float32, rounded once). Inside :func:`conchshell.nn.direct.direct_convolutions`
and off CPU the plain convolutions run, so FLOP counts are the layers' own (the same
products).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from conchshell.nn.conv import compute_dtype
from conchshell.nn.direct import rewritten_forms_allowed


class SameSizeConv(NamedTuple):
    """A stride-1 2-D convolution whose zero padding keeps the input's size."""

    weight: Tensor  # [O, C, k, k]
    bias: Tensor | None
    dilation: int = 1

    @property
    def padding(self) -> int:
        return self.dilation * (self.weight.shape[-1] - 1) // 2


def _check(convs: Sequence[SameSizeConv], channels: int) -> None:
    for conv in convs:
        out_channels, in_channels, height, width = conv.weight.shape
        if in_channels != channels:
            raise ValueError(f"a kernel reads {in_channels} channels, the input has {channels}")
        if height != width or height % 2 == 0:
            raise ValueError(f"kernels must be square and of odd size, got {height}x{width}")


def shared_input_convs(x: Tensor, convs: Sequence[SameSizeConv]) -> list[Tensor]:
    """``[F.conv2d(x, c.weight, c.bias, padding=c.padding, dilation=c.dilation) for c in convs]``.

    ``x`` is ``[B, C, H, W]``; on CPU, in channels-last memory and outside
    ``direct_convolutions``, every output comes from one product of ``x`` with all the
    kernels' taps and float32 shifted sums (module docstring). Outputs are ``[B, O, H, W]``
    in the dtype the convolutions compute in (the autocast dtype under autocast).
    """
    _check(convs, x.shape[1])
    if (x.device.type != "cpu" or not rewritten_forms_allowed()
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return [F.conv2d(x, c.weight, c.bias, padding=c.padding, dilation=c.dilation) for c in convs]
    batch, channels, height, width = x.shape
    dtype = compute_dtype(x)
    # Rows: kernel after kernel, tap after tap (row-major), the tap's outputs together.
    rows = torch.cat([c.weight.permute(2, 3, 0, 1).reshape(-1, channels) for c in convs])
    pixels = x.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # a view
    with torch.autocast(x.device.type, enabled=False):
        products = pixels.to(dtype) @ rows.to(dtype).t()
    outputs, first = [], 0
    for conv in convs:
        out_channels, kernel = conv.weight.shape[0], conv.weight.shape[-1]
        taps = kernel * kernel
        # [taps, O, B, H, W]: each tap's map contiguous along W for the shifted sums.
        by_tap = (products[:, first:first + taps * out_channels].float()
                  .view(batch, height, width, taps, out_channels).permute(3, 4, 0, 1, 2).contiguous())
        first += taps * out_channels
        out = torch.zeros((out_channels, batch, height, width), dtype=torch.float32, device=x.device)
        if conv.bias is not None:
            out += conv.bias.float()[:, None, None, None]
        for tap in range(taps):
            shift_h = (tap // kernel) * conv.dilation - conv.padding
            shift_w = (tap % kernel) * conv.dilation - conv.padding
            h0, h1 = max(0, -shift_h), min(height, height - shift_h)
            w0, w1 = max(0, -shift_w), min(width, width - shift_w)
            if h1 > h0 and w1 > w0:
                out[:, :, h0:h1, w0:w1] += by_tap[tap, :, :, h0 + shift_h:h1 + shift_h, w0 + shift_w:w1 + shift_w]
        outputs.append(out.permute(1, 0, 2, 3).to(dtype))
    return outputs
