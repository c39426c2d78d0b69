"""Stride-1 1-D convolutions with few inputs per output, computed as one matrix product.

A convolution whose every output reads only ``C*k`` input values (``C`` input channels,
kernel ``k``) is the product of its ``[O, C*k]`` weight with the unfolded input
``[B, C*k, N]`` (row ``c*k + j`` is channel ``c`` shifted by ``j``). The unfolded copy costs
``C*k`` times the input, so the form only pays for narrow inputs. oneDNN runs such convs
far below the matmul rate: the discriminator's first layer (1 -> 32 channels, k16) on a
Deep batch of 4 (the real + fake batch, 1M samples each) takes 143 ms forward, 72 ms for the
weight gradient and 213 ms for the input gradient on 2 CPU cores in bf16; as products,
54 + 5 ms, 49 ms and 74 ms.

:func:`unfolded_conv1d` is one autograd function: it keeps the (padded) input, not the
unfolded copy, and unfolds again in the backward (5 ms). The input gradient is the
transposed weight's product with the output gradient, folded back by ``k`` shifted sums in
float32. The bias is one more weight column against a row of ones, so neither it nor its
gradient takes a pass of its own. Inside :func:`conchshell.nn.direct.direct_convolutions`
the layer runs as a plain convolution, so FLOP counts are those of the convolution (the
same products).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from conchshell.nn.conv import compute_dtype
from conchshell.nn.direct import RewrittenConv1d

# Above this many input values per output the unfolded copy outweighs the gain.
MAX_UNFOLDED_ROWS = 64


def _unfold(x: Tensor, kernel: int, ones_row: bool) -> Tensor:
    """``[B, C, L]`` -> ``[B, C*kernel (+1), L - kernel + 1]``: row ``c*kernel + j`` is
    ``x[:, c, j:]``; with ``ones_row`` a last row of ones, so the bias is a weight column."""
    batch, channels, length = x.shape
    frames = length - kernel + 1
    rows = channels * kernel
    cols = x.new_empty((batch, rows + int(ones_row), frames))
    taps = cols[:, :rows].view(batch, channels, kernel, frames)
    for tap in range(kernel):
        taps[:, :, tap] = x[:, :, tap:tap + frames]
    if ones_row:
        cols[:, rows] = 1
    return cols


class _UnfoldedConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, padding: int,
                dtype: torch.dtype) -> Tensor:
        out_channels, channels, kernel = weight.shape
        padded = F.pad(x.to(dtype), (padding, padding)) if padding else x.to(dtype)
        matrix = weight.to(dtype).reshape(out_channels, channels * kernel)
        if bias is not None:
            matrix = torch.cat([matrix, bias.to(dtype)[:, None]], dim=1)
        out = torch.matmul(matrix, _unfold(padded, kernel, bias is not None))
        ctx.save_for_backward(padded, matrix)
        ctx.config = (kernel, padding, x.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        padded, matrix = ctx.saved_tensors
        kernel, padding, x_dtype, weight_dtype = ctx.config
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(padded.dtype)
        batch, channels, length = padded.shape
        rows, frames = channels * kernel, grad_out.shape[-1]
        has_bias = matrix.shape[1] > rows
        accumulate = torch.promote_types(padded.dtype, torch.float32)
        grad_x = grad_weight = grad_bias = None
        if need_x:
            grad_cols = torch.matmul(matrix[:, :rows].t(), grad_out).view(batch, channels, kernel, frames)
            grad_padded = padded.new_zeros((batch, channels, length), dtype=accumulate)
            for tap in range(kernel):
                grad_padded[:, :, tap:tap + frames] += grad_cols[:, :, tap]
            grad_x = grad_padded[:, :, padding:length - padding].to(x_dtype)
        if need_weight or (need_bias and has_bias):
            cols = _unfold(padded, kernel, has_bias)
            # One product per item, summed at float32 or better; the last column is the bias's.
            # As cols @ grad_out.T: oneDNN's grad_out @ cols.T is 2.5x slower at 17 rows.
            grad_matrix = sum((cols[item] @ grad_out[item].t()).to(accumulate) for item in range(batch)).t()
            if need_weight:
                grad_weight = grad_matrix[:, :rows].reshape(-1, channels, kernel).to(weight_dtype)
            if need_bias and has_bias:
                grad_bias = grad_matrix[:, rows].to(weight_dtype)
        return grad_x, grad_weight, grad_bias, None, None


def unfolded_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int = 0) -> Tensor:
    """``F.conv1d(x, weight, bias, padding=padding)`` (stride 1, zero padding, one group,
    batched ``[B, C, L]`` input) as a product with the unfolded input. Under autocast it
    computes in the autocast dtype, like ``F.conv1d``."""
    if x.dim() != 3:
        raise ValueError(f"unfolded_conv1d needs a batched [B, C, L] input, got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[1]} channels, the weight expects {weight.shape[1]}")
    if x.shape[-1] + 2 * padding < weight.shape[-1]:
        raise ValueError(f"input of length {x.shape[-1]} is shorter than the kernel "
                         f"({weight.shape[-1]}, padding {padding})")
    return _UnfoldedConv1d.apply(x, weight, bias, padding, compute_dtype(x))


class UnfoldedConv1d(RewrittenConv1d):
    """``nn.Conv1d`` (same parameters and state dict) whose CPU forward runs
    :func:`unfolded_conv1d` when each output reads at most :data:`MAX_UNFOLDED_ROWS` inputs;
    other devices, strides, dilations, groups, unbatched inputs and
    :func:`~conchshell.nn.direct.direct_convolutions` blocks run the plain convolution."""

    def applies(self) -> bool:
        return (self.stride[0] == 1 and self.dilation[0] == 1 and self.groups == 1
                and self.in_channels * self.kernel_size[0] <= MAX_UNFOLDED_ROWS)

    def rewritten_forward(self, x: Tensor) -> Tensor:
        return unfolded_conv1d(x, self.weight, self.bias, self.padding[0])
