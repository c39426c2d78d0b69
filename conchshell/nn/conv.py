"""The 1-D convolution the ConchShell networks run: ``F.conv1d`` for ``[B, C, T]`` inputs, a
``1 x k`` 2-D convolution for channels-last ``[B, C, 1, T]`` ones, and float32 where oneDNN's
bf16 kernel would compute a wrong result.

On an Intel Xeon with AMX (torch 2.13's oneDNN, kernel ``brg_conv_fwd:avx10_1_512_amx``)
some narrow bf16 1-D convolutions come out wrong, not merely rounded: their error is the
size of the result itself (relative error 0.3-1.2 against 0.003 for a correct bf16
convolution). Found in a sweep on 2 cores: even input counts below 16 per group with
``channels x taps`` a multiple of 32 from 64 up, at stride 1 (4 -> 8 and 8 -> 16 with 40
taps: two of the demo and ``tiny`` generators' stage convolutions, which bf16 training
runs directly), and 16 or 24 inputs at stride 4 or 8 with an even number of taps. The input and
weight gradients of the same shapes are correct, and 2-D / 3-D kernels with more than one
row were correct throughout.

Rather than guess oneDNN's rule, :func:`bf16_conv1d_is_exact` asks the kernel: the first
time a narrow shape (fewer than :data:`TRUSTED_GROUP_INPUTS` inputs per group) meets bf16 on
the CPU, it convolves a seeded probe in bf16 and in float32, in both layouts, and compares.
A shape that fails runs in float32 from then on (one warning says which), which costs
little, as only narrow layers qualify. Elsewhere (CUDA, float32, wide groups) this is
``F.conv1d``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# From this many inputs per group on, the bf16 kernel was correct for every shape swept
# (32-64 inputs, 2-41 taps, strides 1-8): those are not probed.
TRUSTED_GROUP_INPUTS = 32
# The probe convolution's batch and output frames; the faults seen did not depend on either
# (batches of 1 and 2, 160-400 frames), a batch of two also covers batch-blocked kernels.
PROBE_BATCH = 2
PROBE_FRAMES = 256
# A correct bf16 result of bf16 inputs differs from float32 by its own rounding, ~0.002.
PROBE_TOLERANCE = 0.02


def compute_dtype(x: Tensor) -> torch.dtype:
    """What a convolution of ``x`` computes in: the autocast dtype when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _single(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) else value


def _plain_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int | str,
                  dilation: int, groups: int) -> Tensor:
    if x.dim() == 4:  # [B, C, 1, T]: channels-last in, channels-last out
        padding_2d = padding if isinstance(padding, str) else (0, padding)
        return F.conv2d(x, weight.unsqueeze(2), bias, (1, stride), padding_2d, (1, dilation), groups)
    return F.conv1d(x, weight, bias, stride, padding, dilation, groups)


@functools.cache
def bf16_conv1d_is_exact(in_channels: int, out_channels: int, kernel: int, stride: int,
                         dilation: int, groups: int) -> bool:
    """Whether oneDNN's bf16 kernel computes this CPU 1-D convolution correctly (probed once
    per shape and process, channels-first and channels-last; see the module docstring)."""
    if in_channels // groups >= TRUSTED_GROUP_INPUTS:
        return True
    generator = torch.Generator().manual_seed(0)
    length = (kernel - 1) * dilation + 1 + stride * (PROBE_FRAMES - 1)
    x = torch.randn(PROBE_BATCH, in_channels, length, generator=generator).bfloat16()
    weight = torch.randn(out_channels, in_channels // groups, kernel, generator=generator).bfloat16()
    channels_last = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", enabled=False), torch.inference_mode():
        exact = _plain_conv1d(x.float(), weight.float(), None, stride, 0, dilation, groups)
        results = (_plain_conv1d(x, weight, None, stride, 0, dilation, groups),
                   _plain_conv1d(channels_last, weight, None, stride, 0, dilation, groups).squeeze(2))
        sound = all(bool((result.float() - exact).norm() <= PROBE_TOLERANCE * exact.norm()) for result in results)
    if not sound:
        warnings.warn(f"oneDNN computes the bf16 convolution {in_channels} -> {out_channels} channels, "
                      f"kernel {kernel}, stride {stride}, dilation {dilation}, groups {groups} wrongly on "
                      "this CPU; it runs in float32 instead", RuntimeWarning, stacklevel=2)
    return sound


def conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
           dilation: Any = 1, groups: int = 1) -> Tensor:
    """``F.conv1d`` of a ``[B, C, T]`` input, or of a channels-last ``[B, C, 1, T]`` one as the
    ``1 x k`` 2-D convolution; a CPU bf16 one that oneDNN would get wrong
    (:func:`bf16_conv1d_is_exact`) is computed in float32 and returned in bf16."""
    stride, padding, dilation = _single(stride), _single(padding), _single(dilation)
    if (x.device.type == "cpu" and compute_dtype(x) == torch.bfloat16
            and not bf16_conv1d_is_exact(x.shape[1], weight.shape[0], weight.shape[-1], stride, dilation, groups)):
        with torch.autocast("cpu", enabled=False):
            out = _plain_conv1d(x.float(), weight.float(), None if bias is None else bias.float(),
                                stride, padding, dilation, groups)
        return out.to(torch.bfloat16)
    return _plain_conv1d(x, weight, bias, stride, padding, dilation, groups)


class Conv1d(nn.Conv1d):
    """``nn.Conv1d`` (same parameters and state dict, zero padding) computed by :func:`conv1d`:
    it also runs a channels-last ``[B, C, 1, T]`` input, and never oneDNN's faulty bf16 shapes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"{type(self).__name__} supports zero padding only, got {self.padding_mode!r}")

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return conv1d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
