"""Strided 1-D convolutions computed as stride-1 convolutions over a phase-split input.

A convolution with stride ``s`` only ever pairs tap ``s*m + p`` of its kernel with padded
input sample ``s*(t+m) + p``. Splitting the input into its ``s`` phases (padded sample
``s*n + p`` becomes sample ``n`` of channel ``c*s + p``) and the kernel the same way (tap
``s*m + p`` becomes tap ``m`` of channel ``c*s + p``, zero-padded to whole phases) turns it
into a stride-1 convolution with ``s`` times the input channels per group and
``ceil(k/s)`` taps: the same products, summed in another order.

The discriminator's strided layers (k41 s4, 4 input channels per group) are where this
pays: oneDNN runs such narrow groups far below the matmul rate and the phase-split form
(16 channels per group, 11 taps) much faster. :func:`polyphase_conv1d` is one autograd
function: the split and its inverse are one strided copy each way (written by hand: as
pad + reshape + transpose, autograd made four copies), and where oneDNN's bf16
weight-gradient kernel is slow (fewer than 16 output channels per group, the two widest
layers: 1040 ms vs 186 ms in float32 for the 512->1024 layer at batch 4) the weight
gradient is computed in float32. CUDA keeps the direct convolution: not measured there.
Measured on 2 CPU cores, batch 4 (the discriminator's real + fake batch), bf16, forward +
backward per layer, direct -> phase split: 32->128 1832 -> 647 ms, 128->512 1769 -> 562 ms,
512->1024 1365 -> 1079 ms, 1024->1024 569 -> 473 ms (before the hand-written function).

FLOP counts should show the model's own work, not the zero taps of the split: inside
:func:`direct_convolutions` every :class:`PolyphaseConv1d` runs the plain convolution
(``conchshell.utils.profile.count_macs`` and the benchmark count that way).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# oneDNN's bf16 weight gradient of a grouped convolution is several times slower than its
# float32 one below this many output channels per group (see the module docstring).
BF16_WEIGHT_GRAD_MIN_GROUP_OUTPUTS = 16

_direct = False


@contextlib.contextmanager
def direct_convolutions() -> Iterator[None]:
    """Within the block, :class:`PolyphaseConv1d` layers run as plain convolutions."""
    global _direct
    previous, _direct = _direct, True
    try:
        yield
    finally:
        _direct = previous


def _phase_ranges(length: int, stride: int, padding: int, frames: int) -> Iterator[tuple[int, int, int, int]]:
    """For each phase ``p``: (p, first frame with an input sample, first such sample, count).

    Frame ``n`` of phase ``p`` holds padded sample ``stride*n + p``, i.e. input sample
    ``stride*n + p - padding``; each residue class of input samples lands in exactly one phase.
    """
    for phase in range(stride):
        first_frame = max(0, -(-(padding - phase) // stride))
        first_sample = stride * first_frame + phase - padding
        available = max(0, -(-(length - first_sample) // stride))
        yield phase, first_frame, first_sample, max(0, min(available, frames - first_frame))


def _split(x: Tensor, stride: int, padding: int, frames: int, dtype: torch.dtype) -> Tensor:
    """``[B, C, L]`` -> zero-padded phases ``[B, C*stride, frames]`` in ``dtype`` (one pass)."""
    batch, channels, length = x.shape
    phases = x.new_empty((batch, channels, stride, frames), dtype=dtype)
    for phase, first_frame, first_sample, count in _phase_ranges(length, stride, padding, frames):
        phases[:, :, phase, :first_frame] = 0
        phases[:, :, phase, first_frame:first_frame + count] = x[:, :, first_sample::stride][..., :count]
        phases[:, :, phase, first_frame + count:] = 0
    return phases.view(batch, channels * stride, frames)


def _merge(grad_phases: Tensor, length: int, stride: int, padding: int, dtype: torch.dtype) -> Tensor:
    """The gradient of :func:`_split`: phases ``[B, C*stride, frames]`` -> ``[B, C, L]``."""
    batch, split_channels, frames = grad_phases.shape
    grad_phases = grad_phases.view(batch, split_channels // stride, stride, frames)
    grad = grad_phases.new_empty((batch, split_channels // stride, length), dtype=dtype)
    for phase, first_frame, first_sample, count in _phase_ranges(length, stride, padding, frames):
        grad[:, :, first_sample::stride][..., :count] = grad_phases[:, :, phase, first_frame:first_frame + count]
        # Samples past the last window reach no output.
        grad[:, :, first_sample + stride * count::stride] = 0
    return grad


def _split_weight(weight: Tensor, stride: int) -> Tensor:
    """``[O, C/g, k]`` -> ``[O, C/g*stride, ceil(k/stride)]``, the taps of each phase."""
    out_channels, group_channels, kernel = weight.shape
    taps = -(-kernel // stride)
    weight = F.pad(weight, (0, taps * stride - kernel)).view(out_channels, group_channels, taps, stride)
    return weight.transpose(2, 3).reshape(out_channels, group_channels * stride, taps)


def _merge_weight(grad: Tensor, stride: int, kernel: int) -> Tensor:
    """The gradient of :func:`_split_weight`."""
    out_channels, split_channels, taps = grad.shape
    grad = grad.view(out_channels, split_channels // stride, stride, taps).transpose(2, 3)
    return grad.reshape(out_channels, split_channels // stride, taps * stride)[..., :kernel]


class _PolyphaseConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int,
                groups: int, dtype: torch.dtype) -> Tensor:
        length, kernel = x.shape[-1], weight.shape[-1]
        out_length = (length + 2 * padding - kernel) // stride + 1
        frames = out_length - 1 + -(-kernel // stride)
        phases = _split(x, stride, padding, frames, dtype)
        split_weight = _split_weight(weight, stride).to(dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.conv1d(phases, split_weight, None if bias is None else bias.to(dtype), groups=groups)
        ctx.save_for_backward(phases, split_weight)
        ctx.config = (length, kernel, stride, padding, groups, x.dtype, weight.dtype, bias is not None)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        phases, split_weight = ctx.saved_tensors
        length, kernel, stride, padding, groups, x_dtype, weight_dtype, has_bias = ctx.config
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(phases.dtype)

        def convolution_backward(out: Tensor, inputs: Tensor, weight: Tensor, mask: list[bool]) -> tuple:
            return torch.ops.aten.convolution_backward(out, inputs, weight, None, [1], [0], [1], False, [0],
                                                       groups, mask)

        grad_x = grad_weight = grad_bias = None
        if need_x:
            grad_phases = convolution_backward(grad_out, phases, split_weight, [True, False, False])[0]
            grad_x = _merge(grad_phases, length, stride, padding, x_dtype)
        if need_weight:
            group_outputs = split_weight.shape[0] // groups
            if phases.dtype == torch.bfloat16 and group_outputs < BF16_WEIGHT_GRAD_MIN_GROUP_OUTPUTS:
                split_grad = convolution_backward(grad_out.float(), phases.float(), split_weight.float(),
                                                  [False, True, False])[1]
            else:
                split_grad = convolution_backward(grad_out, phases, split_weight, [False, True, False])[1]
            grad_weight = _merge_weight(split_grad, stride, kernel).to(weight_dtype)
        if need_bias and has_bias:
            accumulate = torch.promote_types(grad_out.dtype, torch.float32)
            grad_bias = grad_out.sum(dim=(0, 2), dtype=accumulate).to(weight_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _compute_dtype(x: Tensor) -> torch.dtype:
    """What the convolution computes in: the autocast dtype when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def polyphase_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int,
                     groups: int) -> Tensor:
    """``F.conv1d(x, weight, bias, stride, padding, groups=groups)`` (zero padding, no
    dilation, batched ``[B, C, L]`` input) as a stride-1 convolution of the phase-split
    input. Under autocast it computes in the autocast dtype, like ``F.conv1d``."""
    if x.dim() != 3:
        raise ValueError(f"polyphase_conv1d needs a batched [B, C, L] input, got shape {tuple(x.shape)}")
    length, kernel = x.shape[-1], weight.shape[-1]
    if length + 2 * padding < kernel:
        raise ValueError(f"input of length {length} is shorter than the kernel ({kernel}, padding {padding})")
    return _PolyphaseConv1d.apply(x, weight, bias, stride, padding, groups, _compute_dtype(x))


class PolyphaseConv1d(nn.Conv1d):
    """``nn.Conv1d`` (same parameters and state dict) whose strided CPU forward runs
    :func:`polyphase_conv1d`; other devices, stride 1, dilated kernels, unbatched inputs and
    :func:`direct_convolutions` blocks run the plain convolution."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("PolyphaseConv1d supports numeric zero padding only")

    def forward(self, x: Tensor) -> Tensor:
        if _direct or x.dim() != 3 or x.device.type != "cpu" or self.stride[0] == 1 or self.dilation[0] != 1:
            return super().forward(x)
        return polyphase_conv1d(x, self.weight, self.bias, self.stride[0], self.padding[0], self.groups)
