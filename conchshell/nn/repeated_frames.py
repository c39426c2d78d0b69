"""A 3-D convolution of a clip whose frames come in runs of identical copies, without the copies.

The pseudo-video repeats every TCNN frame ``r`` times (TCNN-6: 6 frames x 3 = 18), and
I3D's first layer, a 7x7x7 conv of temporal stride 2, then multiplies the same frame by
up to three of its temporal taps for every output step. Since the frame is the same, those
taps can be added first: output step ``t`` is a 2-D convolution of the few distinct frames
its window covers (2 or 3 of them), each with the sum of the taps that fall on it. Stacking
those frames as the input channels makes every step one ``conv2d``.

TCNN-6's clip on 2 CPU cores (batch 1): I3D's first conv 45 -> 19 ms under bf16 and
67 -> 34 ms in fp32, the output the same to 7e-7 of its norm in fp32 (the taps are added in
another order); the 18-frame clip is never built. Inside
:func:`conchshell.nn.direct.direct_convolutions` the clip is built and convolved as it
stands, so FLOP counts are the model's own.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from conchshell.nn.direct import rewritten_forms_allowed


def repeat_frames(frames: Tensor, repeats: int) -> Tensor:
    """``[B, C, N, H, W]`` -> the clip ``[B, C, N * repeats, H, W]``, every frame ``repeats`` times."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    return frames if repeats == 1 else frames.repeat_interleave(repeats, dim=2)


def temporal_tap_groups(frames: int, repeats: int, kernel: int, stride: int,
                        padding: tuple[int, int]) -> list[list[tuple[int, list[int]]]]:
    """For each output step, ``(distinct frame, temporal taps on it)`` in frame order.

    The clip has ``frames * repeats`` frames and ``padding`` (before, after) zero frames
    around them; taps that fall on padding contribute nothing and are left out.
    """
    length = frames * repeats
    before, after = padding
    steps = (length + before + after - kernel) // stride + 1
    groups: list[list[tuple[int, list[int]]]] = []
    for step in range(steps):
        by_frame: dict[int, list[int]] = {}
        for tap in range(kernel):
            position = step * stride + tap - before
            if 0 <= position < length:
                by_frame.setdefault(position // repeats, []).append(tap)
        groups.append(sorted(by_frame.items()))
    return groups


def repeated_frames_conv3d(frames: Tensor, repeats: int, weight: Tensor, bias: Tensor | None,
                           stride: Sequence[int], padding: Sequence[tuple[int, int]]) -> Tensor:
    """``conv3d(pad(repeat_frames(frames, repeats), padding), weight, bias, stride)``.

    ``frames`` is ``[B, C, N, H, W]``; ``padding`` gives (before, after) zero padding of
    T, H and W of the repeated clip. Dilation and groups are 1. On CPU, outside
    :func:`~conchshell.nn.direct.direct_convolutions` and with ``repeats > 1``, it runs
    one ``conv2d`` per output step (module docstring); otherwise the plain convolution.
    """
    t_padding, (h_before, h_after), (w_before, w_after) = padding
    if repeats == 1 or frames.device.type != "cpu" or not rewritten_forms_allowed():
        clip = F.pad(repeat_frames(frames, repeats), (w_before, w_after, h_before, h_after, *t_padding))
        return F.conv3d(clip, weight, bias, tuple(stride))
    batch, _, count, _, _ = frames.shape
    steps = temporal_tap_groups(count, repeats, weight.shape[2], stride[0], t_padding)
    if not steps:
        raise ValueError(f"a clip of {count * repeats} frames (padded by {tuple(t_padding)}) is shorter "
                         f"than the kernel ({weight.shape[2]} taps)")
    if not all(steps):
        raise ValueError(f"temporal padding {tuple(t_padding)} leaves a window of the kernel "
                         f"({weight.shape[2]} taps) on padding only")
    # [B, H, W, N, C]: the channels of consecutive frames lie side by side, so a run of
    # frames is a channels-last [B, frames * C, H, W] view.
    by_pixel = F.pad(frames, (w_before, w_after, h_before, h_after)).permute(0, 3, 4, 2, 1).contiguous()
    _, height, width, _, _ = by_pixel.shape
    out: Tensor | None = None
    for step, taps_by_frame in enumerate(steps):
        first, last = taps_by_frame[0][0], taps_by_frame[-1][0]
        step_weight = torch.cat([weight[:, :, taps].sum(dim=2) for _, taps in taps_by_frame], dim=1)
        step_input = by_pixel[:, :, :, first:last + 1].reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        step_out = F.conv2d(step_input, step_weight, bias, tuple(stride[1:]))
        if out is None:
            out = torch.empty((batch, step_out.shape[1], len(steps), *step_out.shape[2:]),
                              dtype=step_out.dtype, device=step_out.device,
                              memory_format=torch.channels_last_3d)
        out[:, :, step] = step_out
    assert out is not None  # there is at least one step
    return out
