"""1-D convolutions that also run as channels-last 2-D convolutions.

torch's CPU convolutions (oneDNN) run a ``[B, C, T]`` Conv1d channels-first, where the
narrow, long convolutions of the Jukebox VQ-VAE (64 channels at audio rate) reach a
fraction of the matmul rate. Viewed as ``[B, C, 1, T]`` in channels-last memory the same
convolution is a 2-D one with a ``1 x k`` kernel, which oneDNN runs much faster: on 2 CPU
cores the Deep decode goes 0.32 -> 0.18 s in fp32 (same samples to 4e-6) and
0.17 -> 0.08 s under bf16 autocast; the encoder (Deep batch of 2), whose one-channel input
needs canonical strides (:func:`to_channels_last_2d`), 0.45 -> 0.33 s and 0.70 -> 0.12 s
against the channels-first run the input's own strides gave. Not yet
measured on a GPU, where cuDNN also has channels-last kernels.

:class:`~conchshell.nn.conv.Conv1d` and :class:`ConvTranspose1d` keep ``nn.Conv1d``'s /
``nn.ConvTranspose1d``'s parameters, so checkpoints load unchanged; a 3-D input runs the
ordinary 1-D path, a 4-D channels-last one (from :func:`to_channels_last_2d`) the 2-D path. A network converts its
input once, runs every layer in that layout (element-wise ops and residual sums keep it),
and converts back once with :func:`from_channels_last_2d`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conchshell.nn.conv import Conv1d
from conchshell.nn.direct import rewritten_forms_allowed


def to_channels_last_2d(x: Tensor) -> Tensor:
    """``[B, C, T]`` -> ``[B, C, 1, T]`` stored channels-last (one copy), with canonical
    strides. ``contiguous(memory_format=torch.channels_last)`` keeps a one-channel input's
    channels-first strides (the same memory), from which oneDNN writes the first
    convolution's output channels-first and every later layer stays so: the encode of a Deep
    batch of 2 (the GAN stage's real latents) went 0.70 -> 0.12 s in bf16 and 0.45 -> 0.33 s
    in fp32 on 2 cores (AMX) once the strides were canonical."""
    batch, channels, length = x.shape
    out = torch.empty((batch, channels, 1, length), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    return out.copy_(x.unsqueeze(2))


def from_channels_last_2d(x: Tensor) -> Tensor:
    """``[B, C, 1, T]`` -> a contiguous ``[B, C, T]``."""
    return x.squeeze(2).contiguous()


def is_time_major(x: Tensor) -> bool:
    """Whether a ``[B, C, T]`` tensor is stored time-major (``[B, T, C]`` in memory, as the
    3-D view of a channels-last ``[B, C, 1, T]`` one): then ``x.unsqueeze(2)`` is that
    channels-last tensor, with no copy."""
    return x.dim() == 3 and x.shape[1] > 1 and x.stride(1) == 1 and x.transpose(1, 2).is_contiguous()


def _check_zero_padding(conv: nn.Module) -> None:
    if conv.padding_mode != "zeros":
        raise ValueError(f"the channels-last path supports zero padding only, got {conv.padding_mode!r}")


class ConvTranspose1d(nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` that runs a 4-D channels-last input as a 2-D transposed convolution."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _check_zero_padding(self)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if x.dim() != 4:
            return super().forward(x, output_size)
        if output_size is not None:
            raise ValueError("output_size is not supported on the channels-last path")
        return F.conv_transpose2d(x, self.weight.unsqueeze(2), self.bias, (1, self.stride[0]),
                                  (0, self.padding[0]), (0, self.output_padding[0]), self.groups,
                                  (1, self.dilation[0]))


# From this dilation on, a dilated convolution runs faster over the phase grid (see
# :func:`relu_conv_on_phase_grid`); at 1 and 3 oneDNN's own kernel is as fast.
PHASE_GRID_MIN_DILATION = 9


def phase_grid_applies(x: Tensor, conv: Conv1d) -> bool:
    """Whether :func:`relu_conv_on_phase_grid` takes ``x`` through ``conv`` (never inside
    :func:`~conchshell.nn.direct.direct_convolutions`: FLOP counts are the plain conv's)."""
    dilation, padding, kernel = conv.dilation[0], conv.padding[0], conv.kernel_size[0]
    return (rewritten_forms_allowed() and x.dim() == 4 and x.shape[0] == 1 and x.device.type == "cpu"
            and x.is_contiguous(memory_format=torch.channels_last)
            and dilation >= PHASE_GRID_MIN_DILATION and padding % dilation == 0
            and conv.stride[0] == 1 and conv.groups == 1
            and 2 * padding == dilation * (kernel - 1)
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)))


def relu_conv_on_phase_grid(x: Tensor, conv: Conv1d) -> Tensor:
    """``conv(relu(x))`` for a channels-last ``[1, C, 1, T]`` ``x`` (see :func:`phase_grid_applies`).

    With dilation ``d``, the taps of output ``t`` are the samples ``t + j d``: in the
    ``[T/d, d]`` grid of sample ``t = r d + c`` they are the rows ``r + j`` of one column, so
    the convolution is a plain ``k x 1`` 2-D one over the grid, and in channels-last memory
    the grid is the sequence itself. The ReLU writes into a buffer padded with zeros to whole
    rows, so the grid costs no copy. oneDNN's dilated kernel slows down as the taps move
    apart: 64 channels, 64000 samples, 2 CPU cores, ReLU + conv, fp32: at d 27 / 81 / 243 /
    729 / 2187 12.5 / 12.1 / 14.2 / 14.0 / 16.7 ms against 11.2 / 10.8 / 11.0 / 10.5 /
    10.9 ms on the grid; bf16 6.6-8.5 against 5.1-5.7 ms. The Deep decode (dilations 1 to
    2187), alternated in one process: fp32 279-303 -> 251-267 ms, bf16 142-154 -> 120-140 ms
    (the same audio to 1e-6 in fp32).
    """
    batch, channels, _, length = x.shape
    dilation = conv.dilation[0]
    rows = -(-length // dilation)
    buffer = torch.empty((batch, channels, 1, rows * dilation), dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last)
    torch.clamp_min(x, 0, out=buffer[..., :length])
    buffer[..., length:].zero_()
    grid = _channels_last_view(buffer, rows, dilation)
    out = F.conv2d(grid, conv.weight.unsqueeze(3), conv.bias, 1, (conv.padding[0] // dilation, 0))
    # oneDNN writes channels-last here; the copy only guards the view below if it ever did not.
    out = out.contiguous(memory_format=torch.channels_last)
    return _channels_last_view(out, 1, rows * dilation)[..., :length]


def _channels_last_view(x: Tensor, height: int, width: int) -> Tensor:
    """A channels-last ``[1, C, h, w]`` tensor seen as ``[1, C, height, width]`` (the same
    ``h * w`` positions), with canonical strides: a ``view`` gives the size-1 batch another
    stride, and oneDNN then writes its output channels-first."""
    batch, channels = x.shape[:2]
    return x.as_strided((batch, channels, height, width),
                        (height * width * channels, 1, width * channels, channels))
