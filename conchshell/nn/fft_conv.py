"""Frozen long-kernel 1-D convolutions computed through the FFT (overlap-save), in float32.

The Low/Deep generators' stage convolutions have kernel 40 and up to 1024 x 512 channels:
at Deep scale they are 65 of the generator's 87 GFLOP. Cut the output into blocks of
``L = N - K + 1`` frames; each block is the first ``L`` values of the circular
cross-correlation of ``N`` input samples with the kernel, i.e. of ``irfft(X * conj(W))``,
and mixing channels is one complex ``[O, C] @ [C, blocks]`` product per frequency. That
needs about ``4 (N/2 + 1) / L`` real multiply-adds per output and channel pair where the
direct form needs ``K``: at ``K = 40``, ``N = 128``, 2.9 instead of 40.

Measured on 2 CPU cores (Deep's 512 -> 1024 layer, 854 frames, batch 1): direct float32
217 ms, direct bf16 107 ms, this form 45 ms. It is also the most accurate of the three:
the kernel's spectrum is computed in float64 and the output's error is 2e-7 of its norm
(direct float32: 3e-6, bf16: 3e-3), so it computes in float32 under bf16 autocast too.

Only frozen layers (weight without ``requires_grad``) take this form: in training, the
weight gradient in the frequency domain is a ``[N/2+1, O, C]`` complex tensor and the
whole backward is slower than the direct bf16 one (Deep's 512 -> 1024 layer, batch 2:
919-1688 ms against 699 ms). The kernel's spectrum (``[N/2+1, O, C]`` complex64: 273 MB
for that layer) is computed on the first call and kept until the weight changes.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conchshell.nn.direct import RewrittenConv1d, weights_key

# Below this kernel length the direct convolution is as fast (and the spectrum is waste).
MIN_FFT_KERNEL = 16
# Block length N as a multiple of the kernel, rounded up to a power of two: 3K keeps the
# blocks' overlap (K - 1 of N samples) small without making the spectrum large
# (K = 40 -> N = 128: 45 ms for the layer above; N = 64: 61 ms, N = 256: 54 ms).
FFT_SIZE_PER_KERNEL = 3


def fft_size(kernel: int) -> int:
    """The block length N used for a kernel of ``kernel`` taps."""
    return 1 << (FFT_SIZE_PER_KERNEL * kernel - 1).bit_length()


def kernel_spectrum(weight: Tensor, size: int) -> Tensor:
    """``[O, C, K]`` weight -> ``conj(rfft(weight, size))`` as ``[size/2+1, O, C]`` complex64.

    Computed in float64 as one product with the ``[size/2+1, K]`` DFT matrix, which writes
    the frequency-major layout directly: ``torch.fft.rfft`` gives ``[O, C, F]`` and the
    transposing copy to ``[F, O, C]`` made up most of the time (2 CPU cores, in one process:
    Deep's widest layer 424 -> 174 ms, all eight Deep layers 0.99-1.16 -> 0.34-0.37 s)."""
    out_channels, in_channels, kernel = weight.shape
    if size < kernel:
        raise ValueError(f"a block of {size} samples is shorter than the kernel ({kernel})")
    frequencies = size // 2 + 1
    taps = torch.arange(kernel, dtype=torch.float64, device=weight.device)
    bins = torch.arange(frequencies, dtype=torch.float64, device=weight.device)
    angle = (2 * math.pi / size) * torch.outer(bins, taps)
    # conj(sum_k w[k] e^{-i angle}) = sum_k w[k] (cos angle + i sin angle), for real w.
    dft = torch.cat([torch.cos(angle), torch.sin(angle)])
    parts = dft @ weight.detach().double().reshape(out_channels * in_channels, kernel).t()
    spectrum = torch.complex(parts[:frequencies].float(), parts[frequencies:].float())
    return spectrum.view(frequencies, out_channels, in_channels)


def fft_conv1d(x: Tensor, spectrum: Tensor, bias: Tensor | None, kernel: int, padding: int) -> Tensor:
    """Stride-1 cross-correlation of ``x`` [B, C, T] (float32) with the kernel whose
    :func:`kernel_spectrum` is ``spectrum``, zero-padded by ``padding``: [B, O, T + 2p - K + 1]."""
    if x.dim() != 3:
        raise ValueError(f"fft_conv1d needs a batched input [B, C, T], got {tuple(x.shape)}")
    batch, channels, length = x.shape
    frequencies, out_channels, kernel_channels = spectrum.shape
    if channels != kernel_channels:
        raise ValueError(f"input has {channels} channels, the kernel {kernel_channels}")
    size = 2 * (frequencies - 1)
    block = size - kernel + 1
    frames = length + 2 * padding - kernel + 1
    if frames < 1:
        raise ValueError(f"the padded input ({length + 2 * padding}) is shorter than the kernel ({kernel})")
    if block < 1:
        raise ValueError(f"a block of {size} samples is shorter than the kernel ({kernel})")
    blocks = -(-frames // block)
    padded = F.pad(x, (padding, (blocks - 1) * block + size - length - padding))
    signal = torch.fft.rfft(padded.unfold(-1, size, block), dim=-1)  # [B, C, blocks, F]
    signal = signal.permute(3, 1, 0, 2).reshape(frequencies, channels, batch * blocks)
    mixed = torch.bmm(spectrum, signal).view(frequencies, out_channels, batch, blocks)
    out = torch.fft.irfft(mixed.permute(2, 1, 3, 0), n=size, dim=-1)[..., :block]
    out = out.reshape(batch, out_channels, blocks * block)[..., :frames]
    return out if bias is None else out.add_(bias.float()[:, None])


class FFTConv1d(RewrittenConv1d):
    """``nn.Conv1d`` (same parameters and state dict) that, frozen, on CPU, runs through the
    FFT in float32 (see the module docstring); trainable layers run the plain convolution."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._spectrum: Tensor | None = None
        self._spectrum_of: tuple[Any, ...] | None = None

    def applies(self) -> bool:
        return (not self.weight.requires_grad and self.kernel_size[0] >= MIN_FFT_KERNEL
                and self.stride == (1,) and self.dilation == (1,) and self.groups == 1)

    def spectrum(self) -> Tensor:
        """The kernel's spectrum, computed again only when the weight has changed."""
        weight = self.weight
        key = weights_key(weight)
        if self._spectrum is None or self._spectrum_of != key:
            # A plain tensor even when first called under inference_mode, so that a later
            # call with autograd on (gradients to the input) can still use it.
            with torch.inference_mode(False), torch.no_grad():
                self._spectrum = kernel_spectrum(weight, fft_size(self.kernel_size[0]))
            self._spectrum_of = key
        return self._spectrum

    def _apply(self, fn: Any, recurse: bool = True) -> "FFTConv1d":
        # .to() / .cuda() / .half() replace the weight: drop the spectrum rather than keep
        # hundreds of MB for a weight that is gone.
        self._spectrum = self._spectrum_of = None
        return super()._apply(fn, recurse)

    def rewritten_forward(self, x: Tensor) -> Tensor:
        # float32 under bf16 autocast too: faster than the bf16 direct form, and exact to 2e-7.
        with torch.autocast(x.device.type, enabled=False):
            return fft_conv1d(x.float(), self.spectrum(), self.bias, self.kernel_size[0], self.padding[0])


def spectra_bytes(module: nn.Module) -> int:
    """Memory held by the kernel spectra that ``module``'s FFT layers keep between calls."""
    return sum(m._spectrum.nbytes for m in module.modules()
               if isinstance(m, FFTConv1d) and m._spectrum is not None)
