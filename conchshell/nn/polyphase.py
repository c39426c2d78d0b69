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
function: the split and its inverse are one copy each way (written by hand: as
pad + reshape + transpose, autograd made four copies), where oneDNN's weight-gradient
kernel is slow (bf16 below 16 output channels per group, the two widest layers; float32
below 8) adjacent groups are computed as one and the gradient's diagonal blocks kept
(:func:`_weight_grad_groups`), and in float32 the input gradient is a forward convolution
(:func:`_input_grad_as_convolution`: oneDNN's backward-data kernel is 2-2.5x slower on
AVX2). Float32 forward convolutions with fewer than 8 input or output channels per group
(the last strided layer, both ways) run as half as many groups with block-diagonal kernels
(:func:`_grouped_conv1d`). A ``[B, C, 1, L]`` input (a channels-last network's layout:
the discriminator's under bf16, ``runs_channels_last``) keeps the phases time-major and runs
the convolutions as channels-last 2-D ones, with a channels-last output: the split and its
inverse stay one copy each. There bf16 groups narrower than 32 channels run combined in
all three passes (:func:`_convolution_groups`, :func:`_weight_grad_groups`): the Deep bf16
GAN step went 11.4 -> 9.5 s on AMX. CUDA keeps the direct convolution: not measured there.
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
from torch import Tensor

from conchshell.nn.channels_last import is_time_major
from conchshell.nn.conv import compute_dtype, conv1d
from conchshell.nn.direct import RewrittenConv1d

# Channels per group below which oneDNN runs a grouped convolution several times slower than
# with adjacent groups computed as one (block-diagonal kernels: the wasted products cost
# less). Keyed by (dtype, phases stored time-major); a missing key combines nothing. Weight
# gradients go by a group's outputs (see :func:`_weight_grad_groups`), forward convolutions
# and the time-major input gradients by the narrower of its inputs and outputs (see
# :func:`_convolution_groups`). bf16 channels-first forward passes were not measured.
WEIGHT_GRAD_MIN_GROUP_OUTPUTS = {(torch.bfloat16, False): 16, (torch.float32, False): 8,
                                 (torch.bfloat16, True): 32}
CONVOLUTION_MIN_GROUP_CHANNELS = {(torch.float32, False): 8, (torch.bfloat16, True): 32}


def _frame_regions(length: int, stride: int, padding: int, frames: int) -> list[tuple[int, int, bool]]:
    """Frame ranges ``(first, end, interior)`` covering ``[0, frames)``. Frame ``n`` holds
    padded samples ``stride*n .. stride*n + stride - 1``, i.e. input samples from
    ``stride*n - padding``; an interior frame's samples all lie inside the input."""
    first = min(frames, -(-padding // stride))
    last = max(first, min(frames, (length + padding) // stride))
    regions = ((0, first, False), (first, last, True), (last, frames, False))
    return [region for region in regions if region[1] > region[0]]


def _split(x: Tensor, stride: int, padding: int, frames: int, dtype: torch.dtype,
           time_major: bool) -> Tensor:
    """``[B, C, L]`` (either layout) -> zero-padded phases ``[B, C*stride, frames]`` in
    ``dtype``, stored time-major (:func:`~conchshell.nn.channels_last.is_time_major`) or
    channels-first."""
    batch, channels, length = x.shape
    if time_major:
        storage = x.new_empty((batch, frames, channels, stride), dtype=dtype)
        by_frame = storage.permute(0, 2, 1, 3)
        phases = storage.view(batch, frames, channels * stride).transpose(1, 2)
    else:
        storage = x.new_empty((batch, channels, stride, frames), dtype=dtype)
        by_frame = storage.permute(0, 1, 3, 2)
        phases = storage.view(batch, channels * stride, frames)
    for first, end, interior in _frame_regions(length, stride, padding, frames):
        low, high = stride * first - padding, stride * end - padding
        if interior:  # one transposing copy (per phase: 4 strided passes, 10-40 % slower)
            by_frame[:, :, first:end] = x[:, :, low:high].view(batch, channels, end - first, stride)
            continue
        segment = x.new_zeros((batch, channels, high - low), dtype=dtype)
        inside_low, inside_high = max(low, 0), min(high, length)
        if inside_high > inside_low:
            segment[:, :, inside_low - low:inside_high - low] = x[:, :, inside_low:inside_high]
        by_frame[:, :, first:end] = segment.view(batch, channels, end - first, stride)
    return phases


def _merge(grad_phases: Tensor, length: int, stride: int, padding: int, dtype: torch.dtype,
           time_major: bool) -> Tensor:
    """The gradient of :func:`_split`: phases ``[B, C*stride, frames]`` -> ``[B, C, L]``,
    stored time-major or channels-first (the layout of the split's input)."""
    batch, split_channels, frames = grad_phases.shape
    channels = split_channels // stride
    by_frame = grad_phases.reshape(batch, channels, stride, frames).permute(0, 1, 3, 2)
    if time_major:
        grad = grad_phases.new_empty((batch, length, channels), dtype=dtype).transpose(1, 2)
    else:
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


def _combined_groups(groups: int, group_channels: int, threshold: int) -> int:
    """The most groups, each a run of adjacent groups of a ``groups``-group convolution with
    ``group_channels`` channels per group, that have at least ``threshold`` channels each
    (all groups as one at most)."""
    combined = 1
    while combined < groups and (group_channels * combined < threshold or groups % combined):
        combined += 1
    return groups // combined


def _weight_grad_groups(dtype: torch.dtype, groups: int, group_outputs: int, time_major: bool = False) -> int:
    """Groups to compute the weight gradient with. Below
    :data:`WEIGHT_GRAD_MIN_GROUP_OUTPUTS` outputs per group, oneDNN's kernel is several
    times slower than with fewer, wider groups, even counting the wasted products: so
    adjacent groups are computed as one (the gradient's block diagonal is the layer's), the
    fewest that reach the threshold. Deep batch of 4, 2 CPU cores: bf16 (AVX-512) 512->1024
    (8 per group) 888 ms, as pairs 175 ms; 1024->1024 (4 per group) 671 ms, in fours 148 ms.
    fp32 (AVX2): 1024->1024 744 ms, as pairs 336 ms, in fours 519 ms; 512->1024 760 ms, as
    pairs 982 ms (so 8 per group stays). bf16 time-major (AMX; 16/32/64 outputs per group,
    ms): 32->128 311/257/317, 128->512 812/528/515, 512->1024 642/405/325 (8 per group:
    2062), 1024->1024 171/118/111 (4 per group: 1805)."""
    threshold = WEIGHT_GRAD_MIN_GROUP_OUTPUTS.get((dtype, time_major), 1)
    return _combined_groups(groups, group_outputs, threshold)


def _convolution_groups(dtype: torch.dtype, groups: int, group_inputs: int, group_outputs: int,
                        time_major: bool) -> int:
    """Groups to run a forward convolution (or a time-major input gradient) with: adjacent
    groups as one, block-diagonal, until the narrower of a group's inputs and outputs
    reaches :data:`CONVOLUTION_MIN_GROUP_CHANNELS`. On AVX2 oneDNN runs the last strided
    layer's float32 16-in/4-out groups at 9 GFLOP/s, as pairs at 33 (Deep batch of 4, 2
    cores: forward 655 -> 177 ms; its input gradient, 4-in/16-out, 231 -> 110 ms); fours
    were slower than pairs, and 8 per group (512->1024) stays: 348 ms, as pairs 397. bf16
    time-major on AMX, forward / input gradient as they are -> combined to 32 (ms): 32->128
    176/93 -> 111/69, 128->512 153/120 -> 107/88, 512->1024 156/126 -> 108/81, 1024->1024
    59/67 -> 41/35 (other widths within 10 % of these)."""
    threshold = CONVOLUTION_MIN_GROUP_CHANNELS.get((dtype, time_major), 1)
    return _combined_groups(groups, min(group_inputs, group_outputs), threshold)


def _block_diagonal(grad: Tensor, groups: int, combined_groups: int) -> Tensor:
    """The weight gradient of ``groups`` groups from one computed with ``combined_groups``
    (each covering ``groups // combined_groups`` adjacent groups): its diagonal blocks."""
    if combined_groups == groups:
        return grad
    out_channels, wide_inputs, taps = grad.shape
    per = groups // combined_groups
    blocks = grad.view(combined_groups, per, out_channels // groups, per, wide_inputs // per, taps)
    diagonal = torch.diagonal(blocks, dim1=1, dim2=3)  # [G', O/g, C/g, taps, per]
    return diagonal.permute(0, 4, 1, 2, 3).reshape(out_channels, wide_inputs // per, taps)


def _block_diagonal_weight(weight: Tensor, groups: int, combined_groups: int) -> Tensor:
    """The kernel of ``combined_groups`` groups that computes what ``weight`` does with
    ``groups``: each group's kernel on the diagonal of its run, zeros elsewhere (the inverse
    of :func:`_block_diagonal`)."""
    if combined_groups == groups:
        return weight
    out_channels, group_inputs, taps = weight.shape
    per = groups // combined_groups
    wide = weight.new_zeros((combined_groups, per, out_channels // groups, per, group_inputs, taps))
    torch.diagonal(wide, dim1=1, dim2=3).copy_(
        weight.view(combined_groups, per, out_channels // groups, group_inputs, taps).permute(0, 2, 3, 4, 1))
    return wide.view(out_channels, per * group_inputs, taps)


def _grouped_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """``F.conv1d(x, weight, bias, groups=groups)`` outside autocast, narrow groups combined
    (:func:`_convolution_groups`); for a time-major ``x``, the channels-last ``[B, O, 1, T]``
    output of the same convolution in 2-D."""
    out_channels, group_inputs, _ = weight.shape
    time_major = is_time_major(x)
    wide = _convolution_groups(weight.dtype, groups, group_inputs, out_channels // groups, time_major)
    weight = _block_diagonal_weight(weight, groups, wide)
    with torch.autocast(device_type=x.device.type, enabled=False):
        # Time-major as 2-D, returned so: a view made here could not be modified in place.
        return conv1d(x.unsqueeze(2) if time_major else x, weight, bias, groups=wide)


def _input_grad_as_convolution(grad_out: Tensor, split_weight: Tensor, groups: int) -> Tensor:
    """The input gradient of the stride-1 phase-split convolution as a forward convolution:
    ``grad_out``, zero-padded by ``taps - 1`` on both sides, with each group's kernel
    transposed (inputs and outputs swapped) and flipped. The same products as oneDNN's
    backward-data kernel, which runs grouped float32 layers at a third of its forward rate on
    AVX2 (Deep batch of 4, 2 cores: 32->128 4.2 -> 1.5 s, 128->512 3.3 -> 1.6 s, 512->1024
    2.8 -> 1.1 s, 1024->1024 1.1 -> 0.5 s, the padding copy included; a padding argument
    instead of the copy was 5-30 % slower). In bf16 on AVX-512 it was no faster, so bf16
    keeps the backward-data kernel."""
    out_channels, group_inputs, taps = split_weight.shape
    kernel = (split_weight.view(groups, out_channels // groups, group_inputs, taps).transpose(1, 2)
              .reshape(groups * group_inputs, out_channels // groups, taps).flip(-1))
    return _grouped_conv1d(F.pad(grad_out, (taps - 1, taps - 1)), kernel, None, groups)


class _PolyphaseConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int,
                groups: int, dtype: torch.dtype) -> Tensor:
        as_2d = x.dim() == 4
        x = x.squeeze(2) if as_2d else x
        length, kernel = x.shape[-1], weight.shape[-1]
        out_length = (length + 2 * padding - kernel) // stride + 1
        frames = out_length - 1 + -(-kernel // stride)
        phases = _split(x, stride, padding, frames, dtype, time_major=as_2d)
        split_weight = _split_weight(weight, stride).to(dtype)
        out = _grouped_conv1d(phases, split_weight, None if bias is None else bias.to(dtype), groups)
        ctx.save_for_backward(phases, split_weight)
        ctx.config = (length, kernel, stride, padding, groups, x.dtype, weight.dtype, bias is not None,
                      as_2d, is_time_major(x))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        phases, split_weight = ctx.saved_tensors
        length, kernel, stride, padding, groups, x_dtype, weight_dtype, has_bias, as_2d, x_time_major = ctx.config
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(phases.dtype)

        def convolution_backward(weight: Tensor, weight_groups: int, mask: list[bool]) -> tuple:
            bias_sizes = [weight.shape[0]] if mask[2] else None
            if not as_2d:
                return torch.ops.aten.convolution_backward(grad_out, phases, weight, bias_sizes, [1], [0], [1],
                                                           False, [0], weight_groups, mask)
            # A copy only if the output gradient came channels-first.
            grad_out_2d = grad_out.contiguous(memory_format=torch.channels_last)
            grads = torch.ops.aten.convolution_backward(grad_out_2d, phases.unsqueeze(2), weight.unsqueeze(2),
                                                        bias_sizes, [1, 1], [0, 0], [1, 1], False, [0, 0],
                                                        weight_groups, mask)
            return tuple(None if g is None or g.dim() == 1 else g.squeeze(2) for g in grads[:2]) + (grads[2],)

        grad_x = grad_weight = grad_bias = None
        if need_x:
            if phases.dtype == torch.float32 and not as_2d:
                grad_phases = _input_grad_as_convolution(grad_out, split_weight, groups)
            else:
                out_channels, group_inputs, _ = split_weight.shape
                wide = _convolution_groups(phases.dtype, groups, group_inputs, out_channels // groups, as_2d)
                wide_weight = _block_diagonal_weight(split_weight, groups, wide)
                grad_phases = convolution_backward(wide_weight, wide, [True, False, False])[0]
            grad_x = _merge(grad_phases, length, stride, padding, x_dtype, x_time_major)
            grad_x = grad_x.unsqueeze(2) if as_2d else grad_x
        need_bias = need_bias and has_bias
        if need_weight or need_bias:
            out_channels, group_inputs, taps = split_weight.shape
            wide = _weight_grad_groups(phases.dtype, groups, out_channels // groups, as_2d)
            # Only the shape of the weight is read. The bias gradient comes from the same kernel:
            # a sum of its own cast a bf16 gradient to float32 first (a 0.5 GB copy at Deep scale).
            shape_only = split_weight.new_empty((out_channels, group_inputs * groups // wide, taps))
            _, split_grad, grad_bias = convolution_backward(shape_only, wide, [False, need_weight, need_bias])
            if need_weight:
                split_grad = _block_diagonal(split_grad, groups, wide)
                grad_weight = _merge_weight(split_grad, stride, kernel).to(weight_dtype)
            if need_bias:
                grad_bias = grad_bias.to(weight_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def polyphase_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int,
                     groups: int) -> Tensor:
    """``F.conv1d(x, weight, bias, stride, padding, groups=groups)`` (zero padding, no
    dilation, batched ``[B, C, L]`` input) as a stride-1 convolution of the phase-split
    input. Under autocast it computes in the autocast dtype, like ``F.conv1d``.

    A ``[B, C, 1, L]`` input (a channels-last network's layout, either memory order) gives
    the ``[B, O, 1, T]`` output stored channels-last: the phases are stored time-major and
    the convolutions run as channels-last 2-D ones, oneDNN's fast layout for bf16 (see the
    module docstring)."""
    if not (x.dim() == 3 or (x.dim() == 4 and x.shape[2] == 1)):
        raise ValueError(f"polyphase_conv1d needs a batched [B, C, L] or [B, C, 1, L] input, "
                         f"got shape {tuple(x.shape)}")
    length, kernel = x.shape[-1], weight.shape[-1]
    if length + 2 * padding < kernel:
        raise ValueError(f"input of length {length} is shorter than the kernel ({kernel}, padding {padding})")
    return _PolyphaseConv1d.apply(x, weight, bias, stride, padding, groups, compute_dtype(x))


class PolyphaseConv1d(RewrittenConv1d):
    """``nn.Conv1d`` (same parameters and state dict) whose strided CPU forward runs
    :func:`polyphase_conv1d`; other devices, stride 1, dilated kernels, unbatched inputs and
    :func:`~conchshell.nn.direct.direct_convolutions` blocks run the plain convolution."""

    rewrites_channels_last = True

    def applies(self) -> bool:
        return self.stride[0] != 1 and self.dilation[0] == 1

    def rewritten_forward(self, x: Tensor) -> Tensor:
        return polyphase_conv1d(x, self.weight, self.bias, self.stride[0], self.padding[0], self.groups)
