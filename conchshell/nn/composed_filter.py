"""An affine stack of same-size 2-D convolutions as one composed filter per output, applied through the FFT.

Stride-1 convolutions with nothing non-linear between them make one affine map: every
output is the input convolved with one composed kernel, plus a constant. The kernel is the
stack's response to a unit impulse, computed once in float64 (:func:`impulse_response`);
its radius R is the sum of the layers' paddings. Each layer pads with zeros, so the
composed convolution agrees with the stack only where no layer's window reached the
padding: at least R samples from every edge. There, a circular convolution of the
input's own size is the same thing (nothing wraps that far in), and through the FFT it
costs a few transforms whatever the kernels' size (:func:`filter_interior`). The border
band, where the stack really differs, has to be computed by the stack itself.

TCNN-6's time features are such a stack (6 convolutions, R = 18, a 37 x 37 kernel per frame
channel; see :func:`conchshell.models.pseudo_video.image_to_block_frames`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def impulse_response(affine: Callable[[Tensor], Tensor], channels: int, radius: int) -> tuple[Tensor, Tensor]:
    """The composed kernels and the constant of an affine map of ``[N, channels, S, S]`` inputs.

    ``affine`` maps float64 inputs to ``[N, *outputs, S, S]``, and each of its outputs reads
    the inputs within ``radius`` of it. Returns ``kernels`` ``[channels, *outputs, S, S]``
    (S = 2 radius + 1; the true convolution kernel, centre at ``[radius, radius]``) and the
    constant ``[*outputs]``. The impulse sits at the centre, so no layer of the stack reaches
    the canvas's edge from it, and the centre of the zero input's response is an interior
    sample: both are exact however the stack pads.
    """
    size = 2 * radius + 1
    inputs = torch.zeros(channels + 1, channels, size, size, dtype=torch.float64)
    for channel in range(channels):
        inputs[channel, channel, radius, radius] = 1.0
    responses = affine(inputs)  # the last input is zero: the constant alone
    constant = responses[-1]
    return responses[:-1] - constant, constant[..., radius, radius]


def circular_spectra(kernels: Tensor, height: int, width: int) -> Tensor:
    """``kernels`` ``[C, *outputs, S, S]`` (from :func:`impulse_response`) -> their
    ``height x width`` circular-convolution spectra, complex64 ``[C, *outputs, height, width // 2 + 1]``."""
    size = kernels.shape[-1]
    if kernels.shape[-2] != size or size % 2 == 0:
        raise ValueError(f"kernels must be square and of odd size, got {tuple(kernels.shape[-2:])}")
    if height < size or width < size:
        raise ValueError(f"a {height}x{width} input is smaller than the {size}x{size} kernels")
    radius = size // 2
    canvas = kernels.new_zeros((*kernels.shape[:-2], height, width))
    canvas[..., :size, :size] = kernels
    # The kernel's centre to index (0, 0), its other taps wrapped to the far ends.
    canvas = torch.roll(canvas, (-radius, -radius), (-2, -1))
    return torch.fft.rfft2(canvas).to(torch.complex64)


def filter_interior(x: Tensor, spectra: Tensor, constant: Tensor) -> Tensor:
    """``x`` ``[B, C, H, W]`` -> ``[B, *outputs, H, W]`` float32: the composed convolution plus
    the constant, computed circularly. Only rows and columns at least the kernels' radius
    from the edges hold the stack's values (to float32 rounding); the rest is wrapped."""
    batch, channels, height, width = x.shape
    if spectra.shape[0] != channels or spectra.shape[-2] != height or spectra.shape[-1] != width // 2 + 1:
        raise ValueError(f"spectra of shape {tuple(spectra.shape)} do not fit an input of shape {tuple(x.shape)}")
    outputs = spectra.shape[1:-2]
    with torch.autocast(x.device.type, enabled=False):
        signal = torch.fft.rfft2(x.float())
        mixed = torch.einsum("bchw,cohw->bohw", signal, spectra.reshape(channels, -1, *spectra.shape[-2:]))
        out = torch.fft.irfft2(mixed, s=(height, width))
    return out.view(batch, *outputs, height, width).add_(constant.float()[..., None, None])
