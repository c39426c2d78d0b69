"""Frozen long-kernel 1-D convolutions computed through the discrete Fourier transform
(overlap-save): in float32 through ``torch.fft``, in bf16 as three matrix products.

The Low/Deep generators' stage convolutions have kernel 40 and up to 1024 x 512 channels:
at Deep scale they are 65 of the generator's 87 GFLOP. Cut the output into blocks of
``L = N - K + 1`` frames; each block is the first ``L`` values of the circular
cross-correlation of ``N`` input samples with the kernel, i.e. of ``irfft(X * conj(W))``,
and mixing channels is one complex ``[O, C] @ [C, blocks]`` product per frequency. That
needs about ``4 (N/2 + 1) / L`` real multiply-adds per output and channel pair where the
direct form needs ``K``: at ``K = 40``, ``N = 128``, 2.9 instead of 40.

float32 (:func:`fft_conv1d`): measured on 2 CPU cores (Deep's 512 -> 1024 layer, 854
frames, batch 1, AVX-512): direct float32 217 ms, direct bf16 107 ms, this form 45 ms. It is
also the most accurate of the three: the kernel's spectrum is computed in float64 and the
output's error is 2e-7 of its norm (direct float32: 3e-6, bf16: 3e-3).

bf16 (:func:`spectral_matmul_conv1d`, under bf16 autocast): on a CPU with AMX the complex64
channel mixing became the generator's largest cost (70 of 124 ms, Deep at batch 1): at a
batch of one it streams the 273 MB spectrum of the widest layer at 8 GB/s. Here the
transforms are products with DFT matrices and the mixing one real bf16 product per
frequency with the real parts of the spectrum stacked over the imaginary ones (``[2O, C]``:
half the bytes of complex64), all on the bf16 matrix units, with no complex tensor and no
transposing copy of the spectra. 2 CPU cores (AMX), 512 -> 1024: 39.5 -> 13.4 ms at batch 1,
85 -> 27 ms at batch 4; 1024 -> 256: 25 -> 7.4 and 64 -> 30 ms. Its error, 4.5e-3 of the
output's norm at those sizes, is about twice the direct bf16 convolution's (2.3e-3): the
transforms and the mixed spectrum are rounded to bf16 as well.

Only frozen layers (weight without ``requires_grad``) take these forms: in training, the
weight gradient in the frequency domain is a ``[N/2+1, O, C]`` complex tensor and the
whole backward is slower than the direct bf16 one (Deep's 512 -> 1024 layer, batch 2:
919-1688 ms against 699 ms). The kernel's spectrum (complex64: 273 MB for that layer; bf16
stacked: 137 MB) is computed on the first call and kept until the weight changes.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conchshell.nn.conv import compute_dtype
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


def _dft_angles(size: int, samples: int, device: torch.device | None = None) -> Tensor:
    """``2 pi f n / size`` for the ``size/2 + 1`` frequencies f (rows) and the first
    ``samples`` sample indices n (columns), in float64."""
    bins = torch.arange(size // 2 + 1, dtype=torch.float64, device=device)
    return (2 * math.pi / size) * torch.outer(bins, torch.arange(samples, dtype=torch.float64, device=device))


def _spectrum_parts(weight: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of ``conj(rfft(weight, size))``, float64 ``[size/2+1, O, C]``.

    One product with the ``[size/2+1, K]`` DFT matrix, which writes the frequency-major
    layout directly: ``torch.fft.rfft`` gives ``[O, C, F]`` and the transposing copy to
    ``[F, O, C]`` made up most of the time (2 CPU cores, in one process: Deep's widest layer
    424 -> 174 ms, all eight Deep layers 0.99-1.16 -> 0.34-0.37 s)."""
    out_channels, in_channels, kernel = weight.shape
    if size < kernel:
        raise ValueError(f"a block of {size} samples is shorter than the kernel ({kernel})")
    frequencies = size // 2 + 1
    angle = _dft_angles(size, kernel, weight.device)
    # conj(sum_k w[k] e^{-i angle}) = sum_k w[k] (cos angle + i sin angle), for real w.
    dft = torch.cat([torch.cos(angle), torch.sin(angle)])
    parts = dft @ weight.detach().double().reshape(out_channels * in_channels, kernel).t()
    shape = (frequencies, out_channels, in_channels)
    return parts[:frequencies].view(shape), parts[frequencies:].view(shape)


def kernel_spectrum(weight: Tensor, size: int) -> Tensor:
    """``[O, C, K]`` weight -> ``conj(rfft(weight, size))`` as ``[size/2+1, O, C]`` complex64."""
    real, imaginary = _spectrum_parts(weight, size)
    return torch.complex(real.float(), imaginary.float())


def stacked_kernel_spectrum(weight: Tensor, size: int, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``[O, C, K]`` weight -> ``[size/2+1, 2O, C]`` in ``dtype``: the real parts of
    :func:`kernel_spectrum` above its imaginary parts, for :func:`spectral_matmul_conv1d`."""
    return torch.cat(_spectrum_parts(weight, size), dim=1).to(dtype)


@functools.lru_cache(maxsize=16)
def dft_matrices(size: int, block: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The real DFT of ``size`` samples as ``[2F, size]`` (rows: frequency, then real and
    imaginary part; ``F = size/2 + 1``) and the first ``block`` samples of its inverse, from
    the same rows, as ``[2F, block]``: ``irfft`` of a half spectrum ``Y`` is
    ``sum_f c_f (Re Y_f cos - Im Y_f sin) / size`` with ``c_f = 1`` at 0 and ``size/2``, else 2."""
    frequencies = size // 2 + 1
    angle = _dft_angles(size, size)
    forward = torch.stack([torch.cos(angle), -torch.sin(angle)], dim=1).reshape(2 * frequencies, size)
    weight = torch.full((frequencies, 1), 2.0 / size, dtype=torch.float64)
    weight[0] = weight[-1] = 1.0 / size
    first = angle[:, :block]
    inverse = torch.stack([weight * torch.cos(first), -weight * torch.sin(first)], dim=1)
    return forward.to(dtype=dtype, device=device), inverse.reshape(2 * frequencies, block).to(dtype=dtype, device=device)


def _blocks(length: int, kernel: int, padding: int, size: int) -> tuple[int, int, int, int]:
    """(output frames, block length L, number of blocks, zeros to pad on the right) of an
    overlap-save convolution of ``length`` samples padded by ``padding`` on the left."""
    block = size - kernel + 1
    frames = length + 2 * padding - kernel + 1
    if frames < 1:
        raise ValueError(f"the padded input ({length + 2 * padding}) is shorter than the kernel ({kernel})")
    if block < 1:
        raise ValueError(f"a block of {size} samples is shorter than the kernel ({kernel})")
    blocks = -(-frames // block)
    return frames, block, blocks, (blocks - 1) * block + size - length - padding


def _check_input(x: Tensor, kernel_channels: int) -> None:
    if x.dim() != 3:
        raise ValueError(f"the FFT convolution needs a batched input [B, C, T], got {tuple(x.shape)}")
    if x.shape[1] != kernel_channels:
        raise ValueError(f"input has {x.shape[1]} channels, the kernel {kernel_channels}")


def fft_conv1d(x: Tensor, spectrum: Tensor, bias: Tensor | None, kernel: int, padding: int) -> Tensor:
    """Stride-1 cross-correlation of ``x`` [B, C, T] (float32) with the kernel whose
    :func:`kernel_spectrum` is ``spectrum``, zero-padded by ``padding``: [B, O, T + 2p - K + 1]."""
    frequencies, out_channels, kernel_channels = spectrum.shape
    _check_input(x, kernel_channels)
    batch, channels, length = x.shape
    size = 2 * (frequencies - 1)
    frames, block, blocks, right = _blocks(length, kernel, padding, size)
    padded = F.pad(x, (padding, right))
    signal = torch.fft.rfft(padded.unfold(-1, size, block), dim=-1)  # [B, C, blocks, F]
    signal = signal.permute(3, 1, 0, 2).reshape(frequencies, channels, batch * blocks)
    mixed = torch.bmm(spectrum, signal).view(frequencies, out_channels, batch, blocks)
    out = torch.fft.irfft(mixed.permute(2, 1, 3, 0), n=size, dim=-1)[..., :block]
    out = out.reshape(batch, out_channels, blocks * block)[..., :frames]
    return out if bias is None else out.add_(bias.float()[:, None])


def spectral_matmul_conv1d(x: Tensor, stacked: Tensor, bias: Tensor | None, kernel: int, padding: int) -> Tensor:
    """:func:`fft_conv1d` in ``stacked``'s dtype (bf16) from :func:`stacked_kernel_spectrum`:
    the transforms as products with :func:`dft_matrices`, the mixing as one real product
    per frequency, ``[2O, C] @ [C, 2 B blocks]`` (real and imaginary parts of the signal side
    by side), whose four quarters combine into the output's spectrum."""
    frequencies, stacked_outputs, kernel_channels = stacked.shape
    _check_input(x, kernel_channels)
    batch, channels, length = x.shape
    out_channels = stacked_outputs // 2
    size = 2 * (frequencies - 1)
    frames, block, blocks, right = _blocks(length, kernel, padding, size)
    columns = batch * blocks
    forward, inverse = dft_matrices(size, block, stacked.dtype, x.device)
    padded = F.pad(x.to(stacked.dtype), (padding, right))
    step_t, step_c, step_b = padded.stride(2), padded.stride(1), padded.stride(0)
    windows = padded.as_strided((size, channels, batch, blocks), (step_t, step_c, step_b, block * step_t))
    signal = forward @ windows.reshape(size, channels * columns)  # [(f, part), (c, b, block index)]
    signal = signal.view(frequencies, 2, channels, columns).transpose(1, 2).reshape(frequencies, channels, 2 * columns)
    quarters = torch.bmm(stacked, signal).view(frequencies, 2, out_channels, 2, columns)
    mixed = torch.empty((frequencies, 2, out_channels, columns), dtype=quarters.dtype, device=x.device)
    # (Wr + i Wi)(Xr + i Xi): real part Wr Xr - Wi Xi, imaginary part Wr Xi + Wi Xr.
    torch.sub(quarters[:, 0, :, 0], quarters[:, 1, :, 1], out=mixed[:, 0])
    torch.add(quarters[:, 0, :, 1], quarters[:, 1, :, 0], out=mixed[:, 1])
    out = mixed.view(2 * frequencies, out_channels * columns).t() @ inverse  # [(o, b, block index), L]
    out = out.view(out_channels, batch, blocks * block)[..., :frames].transpose(0, 1)
    result = torch.empty((batch, out_channels, frames), dtype=out.dtype, device=x.device)
    if bias is None:
        return result.copy_(out)
    return torch.add(out, bias.to(out.dtype)[:, None], out=result)


class FFTConv1d(RewrittenConv1d):
    """``nn.Conv1d`` (same parameters and state dict) that, frozen, on CPU, runs through the
    DFT: in float32, or in bf16 when it computes in bf16 (see the module docstring);
    trainable layers run the plain convolution."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._spectrum: Tensor | None = None
        self._spectrum_of: tuple[Any, ...] | None = None

    def applies(self) -> bool:
        return (not self.weight.requires_grad and self.kernel_size[0] >= MIN_FFT_KERNEL
                and self.stride == (1,) and self.dilation == (1,) and self.groups == 1)

    def spectrum(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The kernel's spectrum for computing in ``dtype`` (float32: :func:`kernel_spectrum`,
        bf16: :func:`stacked_kernel_spectrum`), computed again only when the weight or the
        dtype has changed."""
        weight = self.weight
        key = (weights_key(weight), dtype)
        if self._spectrum is None or self._spectrum_of != key:
            self._spectrum = None  # free the old one before making the new
            size = fft_size(self.kernel_size[0])
            # A plain tensor even when first called under inference_mode, so that a later
            # call with autograd on (gradients to the input) can still use it.
            with torch.inference_mode(False), torch.no_grad():
                self._spectrum = (stacked_kernel_spectrum(weight, size, dtype) if dtype == torch.bfloat16
                                  else kernel_spectrum(weight, size))
            self._spectrum_of = key
        return self._spectrum

    def _apply(self, fn: Any, recurse: bool = True) -> "FFTConv1d":
        # .to() / .cuda() / .half() replace the weight: drop the spectrum rather than keep
        # hundreds of MB for a weight that is gone.
        self._spectrum = self._spectrum_of = None
        return super()._apply(fn, recurse)

    def rewritten_forward(self, x: Tensor) -> Tensor:
        kernel, padding = self.kernel_size[0], self.padding[0]
        in_bf16 = compute_dtype(x) == torch.bfloat16
        with torch.autocast(x.device.type, enabled=False):
            if in_bf16:
                return spectral_matmul_conv1d(x, self.spectrum(torch.bfloat16), self.bias, kernel, padding)
            return fft_conv1d(x.float(), self.spectrum(), self.bias, kernel, padding)


def spectra_bytes(module: nn.Module) -> int:
    """Memory held by the kernel spectra that ``module``'s FFT layers keep between calls."""
    return sum(m._spectrum.nbytes for m in module.modules()
               if isinstance(m, FFTConv1d) and m._spectrum is not None)
