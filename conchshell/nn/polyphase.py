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
:func:`conchshell.nn.direct.direct_convolutions` every :class:`PolyphaseConv1d` runs the
plain convolution (``conchshell.utils.profile.count_macs`` and the benchmark count that way).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conchshell.nn.direct import rewritten_forms_allowed

# Weight-gradient kernel by output channels per group under bf16 (oneDNN, 2 CPU cores, the
# Deep discriminator's real + fake batch of 4). At 16 or more, bf16 on the phases as they
# are. Below 16 that kernel is several times slower than float32 (512->1024 layer, 8 per
# group: 1062 vs 241 ms), so 8 to 15 use float32. Below 8, bf16 on channels-last copies of
# the phases and the output gradient is faster still (1024->1024 layer, 4 per group: 410 ms
# in float32, 14 + 11 + 111 ms for the two copies and the kernel).
BF16_WEIGHT_GRAD_MIN_GROUP_OUTPUTS = 16
CHANNELS_LAST_WEIGHT_GRAD_MAX_GROUP_OUTPUTS = 7


def _frame_regions(length: int, stride: int, padding: int, frames: int) -> list[tuple[int, int, bool]]:
    """Frame ranges ``(first, end, interior)`` covering ``[0, frames)``. Frame ``n`` holds
    padded samples ``stride*n .. stride*n + stride - 1``, i.e. input samples from
    ``stride*n - padding``; an interior frame's samples all lie inside the input."""
    first = min(frames, -(-padding // stride))
    last = max(first, min(frames, (length + padding) // stride))
    regions = ((0, first, False), (first, last, True), (last, frames, False))
    return [region for region in regions if region[1] > region[0]]


def _copy_frames(destination: Tensor, source: Tensor) -> None:
    """``destination[...] = source`` for ``[B, C, frames, stride]`` views whose last dimension
    is contiguous in both: then each 8-byte frame (4 bf16 phases) moves as one int64, about
    5x faster than a copy that transposes 2-byte elements."""
    if (destination.dtype == source.dtype and destination.shape[-1] * destination.element_size() == 8
            and destination.stride(-1) == 1 and source.stride(-1) == 1):
        try:
            destination.view(torch.int64).copy_(source.view(torch.int64))
            return
        except RuntimeError:  # a view at an offset or stride that is not a whole int64
            pass
    destination.copy_(source)


def _split(x: Tensor, stride: int, padding: int, frames: int, dtype: torch.dtype,
           channels_last: bool = False) -> Tensor:
    """``[B, C, L]`` -> zero-padded phases ``[B, C*stride, frames]`` in ``dtype``; with
    ``channels_last`` the same values as a view of a ``[B, frames, C*stride]`` tensor."""
    batch, channels, length = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    if channels_last:
        phases = x.new_empty((batch, frames, channels, stride), dtype=dtype)
        by_frame = phases.permute(0, 2, 1, 3)
    else:
        phases = x.new_empty((batch, channels, stride, frames), dtype=dtype)
        by_frame = phases.permute(0, 1, 3, 2)
    for first, end, interior in _frame_regions(length, stride, padding, frames):
        low, high = stride * first - padding, stride * end - padding
        if interior:
            _copy_frames(by_frame[:, :, first:end], x[:, :, low:high].view(batch, channels, end - first, stride))
            continue
        segment = x.new_zeros((batch, channels, high - low), dtype=dtype)
        inside_low, inside_high = max(low, 0), min(high, length)
        if inside_high > inside_low:
            segment[:, :, inside_low - low:inside_high - low] = x[:, :, inside_low:inside_high]
        by_frame[:, :, first:end] = segment.view(batch, channels, end - first, stride)
    if channels_last:
        return phases.view(batch, frames, channels * stride).transpose(1, 2)
    return phases.view(batch, channels * stride, frames)


def _merge(grad_phases: Tensor, length: int, stride: int, padding: int, dtype: torch.dtype) -> Tensor:
    """The gradient of :func:`_split`: phases ``[B, C*stride, frames]`` -> ``[B, C, L]``."""
    batch, split_channels, frames = grad_phases.shape
    channels = split_channels // stride
    by_frame = grad_phases.reshape(batch, channels, stride, frames).permute(0, 1, 3, 2)
    grad = grad_phases.new_empty((batch, channels, length), dtype=dtype)
    for first, end, interior in _frame_regions(length, stride, padding, frames):
        low, high = stride * first - padding, stride * end - padding
        if interior:
            grad[:, :, low:high].view(batch, channels, end - first, stride).copy_(by_frame[:, :, first:end])
            continue
        segment = by_frame[:, :, first:end].reshape(batch, channels, high - low)
        inside_low, inside_high = max(low, 0), min(high, length)
        if inside_high > inside_low:
            grad[:, :, inside_low:inside_high] = segment[:, :, inside_low - low:inside_high - low]
    # Samples past the last frame reach no output.
    grad[:, :, max(0, stride * frames - padding):] = 0
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


def _weight_grad_form(dtype: torch.dtype, group_outputs: int) -> str:
    """How the weight gradient is computed: ``"direct"``, ``"float32"`` or ``"channels_last"``
    (see :data:`BF16_WEIGHT_GRAD_MIN_GROUP_OUTPUTS`)."""
    if dtype != torch.bfloat16 or group_outputs >= BF16_WEIGHT_GRAD_MIN_GROUP_OUTPUTS:
        return "direct"
    return "channels_last" if group_outputs <= CHANNELS_LAST_WEIGHT_GRAD_MAX_GROUP_OUTPUTS else "float32"


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
        form = _weight_grad_form(dtype, weight.shape[0] // groups)
        # The channels-last weight gradient splits the input again in its own layout, so the
        # input (kept alive by the layer before anyway) is saved instead of the phases.
        ctx.save_for_backward(x if form == "channels_last" else phases, split_weight)
        ctx.config = (length, kernel, stride, padding, groups, frames, form, x.dtype, weight.dtype,
                      bias is not None)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        saved_input, split_weight = ctx.saved_tensors
        length, kernel, stride, padding, groups, frames, form, x_dtype, weight_dtype, has_bias = ctx.config
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(split_weight.dtype)

        def convolution_backward(out: Tensor, inputs: Tensor, weight: Tensor, mask: list[bool]) -> tuple:
            dims = inputs.dim() - 2
            return torch.ops.aten.convolution_backward(out, inputs, weight, None, [1] * dims, [0] * dims,
                                                       [1] * dims, False, [0] * dims, groups, mask)

        grad_x = grad_weight = grad_bias = None
        if need_x:
            # The input gradient reads only the input's shape, not its values.
            phases = saved_input if form != "channels_last" else grad_out.new_empty(
                (grad_out.shape[0], split_weight.shape[1] * groups, frames))
            grad_phases = convolution_backward(grad_out, phases, split_weight, [True, False, False])[0]
            grad_x = _merge(grad_phases, length, stride, padding, x_dtype)
        if need_weight:
            if form == "channels_last":
                phases = _split(saved_input, stride, padding, frames, split_weight.dtype, channels_last=True)
                grad_last = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
                split_grad = convolution_backward(grad_last.unsqueeze(2), phases.unsqueeze(2),
                                                  split_weight.unsqueeze(2), [False, True, False])[1].squeeze(2)
            elif form == "float32":
                split_grad = convolution_backward(grad_out.float(), saved_input.float(), split_weight.float(),
                                                  [False, True, False])[1]
            else:
                split_grad = convolution_backward(grad_out, saved_input, split_weight, [False, True, False])[1]
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
    :func:`~conchshell.nn.direct.direct_convolutions` blocks run the plain convolution."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("PolyphaseConv1d supports numeric zero padding only")

    def forward(self, x: Tensor) -> Tensor:
        if not rewritten_forms_allowed() or x.dim() != 3 or x.device.type != "cpu" or self.stride[0] == 1 or self.dilation[0] != 1:
            return super().forward(x)
        return polyphase_conv1d(x, self.weight, self.bias, self.stride[0], self.padding[0], self.groups)
