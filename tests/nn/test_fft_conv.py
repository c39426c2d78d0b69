"""FFT (overlap-save) convolutions against torch's own."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conchshell.nn.direct import direct_convolutions
from conchshell.nn.fft_conv import (
    MIN_FFT_KERNEL,
    FFTConv1d,
    dft_matrices,
    fft_conv1d,
    fft_size,
    kernel_spectrum,
    spectral_matmul_conv1d,
    stacked_kernel_spectrum,
)
from conchshell.utils.profile import count_macs


def _relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    return ((result.double() - expected).norm() / expected.norm()).item()


SHAPES = pytest.mark.parametrize("batch, channels, out_channels, kernel, length, padding", [
    (1, 8, 16, 40, 300, 1),    # a Low/Deep stage conv, several blocks
    (3, 4, 5, 40, 60, 0),      # fewer frames than one block
    (2, 3, 2, 16, 45, 7),      # the shortest FFT kernel, wide padding
    (1, 2, 3, 60, 59, 1),      # exactly one output frame
    (2, 5, 4, 42, 2 * 87 + 41, 0),  # a whole number of blocks (N = 128, L = 87)
])


@SHAPES
def test_equals_the_direct_convolution(batch, channels, out_channels, kernel, length, padding):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, length)
    weight = torch.randn(out_channels, channels, kernel)
    bias = torch.randn(out_channels)
    expected = F.conv1d(x.double(), weight.double(), bias.double(), padding=padding)
    result = fft_conv1d(x, kernel_spectrum(weight, fft_size(kernel)), bias, kernel, padding)
    assert result.dtype == torch.float32 and result.shape == expected.shape
    assert _relative_error(result, expected) < 1e-6
    without_bias = fft_conv1d(x, kernel_spectrum(weight, fft_size(kernel)), None, kernel, padding)
    torch.testing.assert_close(without_bias.double(), expected - bias.double()[:, None], rtol=1e-5, atol=1e-4)


@SHAPES
def test_bf16_matrix_form_equals_the_direct_convolution_to_bf16_rounding(batch, channels, out_channels, kernel,
                                                                        length, padding):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, length)
    weight = torch.randn(out_channels, channels, kernel)
    bias = torch.randn(out_channels)
    expected = F.conv1d(x.double(), weight.double(), bias.double(), padding=padding)
    stacked = stacked_kernel_spectrum(weight, fft_size(kernel))
    result = spectral_matmul_conv1d(x, stacked, bias, kernel, padding)
    assert result.dtype == torch.bfloat16 and result.shape == expected.shape and result.is_contiguous()
    assert _relative_error(result, expected) < 1e-2
    without_bias = spectral_matmul_conv1d(x, stacked, None, kernel, padding)
    assert _relative_error(without_bias, expected - bias.double()[:, None]) < 1e-2


def test_dft_matrices_are_rfft_and_the_first_samples_of_irfft():
    size, block = 64, 25
    forward, inverse = dft_matrices(size, block, torch.float64, torch.device("cpu"))
    assert forward.shape == (66, size) and inverse.shape == (66, block)
    signal = torch.randn(size, 3, dtype=torch.float64)
    spectrum = torch.fft.rfft(signal, dim=0)  # [33, 3]
    parts = torch.stack([spectrum.real, spectrum.imag], dim=1).reshape(66, 3)  # rows (f, part)
    torch.testing.assert_close(forward @ signal, parts)
    torch.testing.assert_close(inverse.t() @ parts, signal[:block])


def test_stacked_spectrum_is_real_parts_over_imaginary_parts():
    weight = torch.randn(5, 3, 40)
    spectrum = kernel_spectrum(weight, 128)
    stacked = stacked_kernel_spectrum(weight, 128, torch.float32)
    assert stacked.shape == (65, 10, 3)
    torch.testing.assert_close(stacked, torch.cat([spectrum.real, spectrum.imag], dim=1))
    assert stacked_kernel_spectrum(weight, 128).dtype == torch.bfloat16


def test_block_length_is_three_kernels_rounded_up_to_a_power_of_two():
    assert [fft_size(k) for k in (16, 40, 42, 60)] == [64, 128, 128, 256]


def test_kernel_spectrum_is_the_conjugate_rfft_frequency_major():
    weight = torch.randn(5, 3, 40, dtype=torch.float64)
    expected = torch.fft.rfft(weight, n=128).conj().permute(2, 0, 1)
    spectrum = kernel_spectrum(weight, 128)
    assert spectrum.shape == (65, 5, 3) and spectrum.dtype == torch.complex64
    assert (spectrum - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_bad_inputs_are_errors():
    spectrum = kernel_spectrum(torch.randn(2, 3, 20), 64)
    with pytest.raises(ValueError, match="batched"):
        fft_conv1d(torch.randn(3, 50), spectrum, None, 20, 0)
    with pytest.raises(ValueError, match="channels"):
        fft_conv1d(torch.randn(1, 4, 50), spectrum, None, 20, 0)
    with pytest.raises(ValueError, match="shorter than the kernel"):
        fft_conv1d(torch.randn(1, 3, 10), spectrum, None, 20, 1)
    with pytest.raises(ValueError, match="block"):
        fft_conv1d(torch.randn(1, 3, 100), kernel_spectrum(torch.randn(2, 3, 20), 16), None, 20, 0)


def _conv(kernel: int = 40, **kwargs) -> FFTConv1d:
    torch.manual_seed(0)
    return FFTConv1d(6, 4, kernel, padding=1, **kwargs)


def test_only_frozen_stride_one_long_kernels_take_the_fft_form():
    x = torch.randn(2, 6, 200)
    trainable = _conv()
    assert not trainable.rewrites(x)
    assert _conv().requires_grad_(False).rewrites(x)
    assert not _conv(stride=2).requires_grad_(False).rewrites(x)
    assert not _conv(dilation=2).requires_grad_(False).rewrites(x)
    assert not _conv(MIN_FFT_KERNEL - 1).requires_grad_(False).rewrites(x)
    frozen = _conv().requires_grad_(False)
    with direct_convolutions():
        assert not frozen.rewrites(x)
    assert not frozen.rewrites(x[0])  # unbatched input: the plain convolution


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_frozen_layer_computes_in_bf16_under_bf16_autocast_and_float32_outside(x_dtype):
    conv = _conv().requires_grad_(False)
    x = torch.randn(2, 6, 200).to(x_dtype)
    expected = F.conv1d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        result = conv(x)
        with direct_convolutions():
            direct = conv(x)
    assert result.dtype == torch.bfloat16 and direct.dtype == torch.bfloat16
    assert _relative_error(result, expected) < 1e-2 and _relative_error(direct, expected) < 1e-2
    with torch.inference_mode():
        exact = conv(x.float())
    assert exact.dtype == torch.float32 and _relative_error(exact, expected) < 1e-6


def test_the_spectrum_is_kept_until_the_weight_changes():
    conv = _conv().requires_grad_(False)
    x = torch.randn(1, 6, 200)
    with torch.inference_mode():
        first = conv(x)
        spectrum = conv.spectrum()
        assert conv(x).equal(first) and conv.spectrum() is spectrum
        conv.weight.mul_(2)
        doubled = conv(x)
    assert conv.spectrum() is not spectrum
    torch.testing.assert_close(doubled - conv.bias[:, None], 2 * (first - conv.bias[:, None]))
    spectrum = conv.spectrum()
    assert conv.spectrum(torch.bfloat16).dtype == torch.bfloat16  # one dtype kept at a time
    assert conv.spectrum() is not spectrum and conv.spectrum().dtype == torch.complex64


def test_counts_the_macs_of_the_direct_convolution():
    conv = _conv().requires_grad_(False)
    x = torch.randn(2, 6, 200)
    frames = 200 + 2 - 40 + 1
    assert count_macs(conv, x) == 2 * 4 * 6 * 40 * frames


def test_a_spectrum_made_under_inference_mode_serves_input_gradients_later():
    conv = _conv().requires_grad_(False)
    x = torch.randn(1, 6, 120)
    with torch.inference_mode():
        conv(x)
    x.requires_grad_(True)
    conv(x).pow(2).sum().backward()
    direct = x.detach().clone().requires_grad_(True)
    F.conv1d(direct.double(), conv.weight.double(), conv.bias.double(), padding=1).pow(2).sum().backward()
    torch.testing.assert_close(x.grad.double(), direct.grad.double(), rtol=1e-4, atol=1e-5)


def test_moving_the_layer_drops_its_spectrum():
    conv = _conv().requires_grad_(False)
    with torch.inference_mode():
        conv(torch.randn(1, 6, 120))
    assert conv._spectrum is not None
    conv.to(torch.float64)
    assert conv._spectrum is None
