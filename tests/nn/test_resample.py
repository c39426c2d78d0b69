"""Windowed-sinc resampler: round trips, agreement with soxr, lengths, gradients, identity."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conchshell.nn.resample import Resample

# Samples at each end that see the zero padding outside the signal (64 zero crossings at the
# lower rate is 64 samples at 16 kHz; the 44.1 kHz leg widens that): compared only inside.
EDGE = 1000


def sines(frequencies_and_amplitudes, sample_rate: int, length: int) -> np.ndarray:
    t = np.arange(length) / sample_rate
    return sum(a * np.sin(2 * np.pi * f * t + 0.7 * i)
               for i, (f, a) in enumerate(frequencies_and_amplitudes)).astype(np.float32)


def test_round_trip_16k_44k1_16k_keeps_a_band_limited_signal():
    signal = sines([(220, 0.3), (1000, 0.2), (3100, 0.2), (5200, 0.1), (6900, 0.1)], 16000, 16000)
    audio = torch.from_numpy(signal)[None, None]
    up, down = Resample(16000, 44100), Resample(44100, 16000)
    upsampled = up(audio)
    assert upsampled.shape == (1, 1, 44100)
    restored = down(upsampled)
    assert restored.shape == audio.shape
    error = (restored - audio)[..., EDGE:-EDGE].abs().max().item()
    # Measured: ~5e-7 (float32 rounding) with the default kaiser_best filter.
    assert error < 1e-4, error


def test_upsampling_a_sine_matches_soxr_and_the_analytic_signal():
    soxr = pytest.importorskip("soxr")
    signal = sines([(440, 0.8)], 16000, 16000)
    ours = Resample(16000, 44100)(torch.from_numpy(signal)[None])[0].numpy()
    reference = soxr.resample(signal, 16000, 44100, quality="VHQ")
    assert ours.shape == reference.shape
    # Measured: ~5e-7 inside, ~2e-3 at the ends (soxr treats the edges differently).
    assert np.abs(ours - reference)[EDGE:-EDGE].max() < 1e-4
    analytic = sines([(440, 0.8)], 44100, len(ours))
    assert np.abs(ours - analytic)[EDGE:-EDGE].max() < 1e-4


def test_downsampling_removes_content_above_the_new_nyquist():
    # 44.1 kHz: a 1 kHz tone plus a 12 kHz tone that would alias to 4 kHz at 16 kHz.
    signal = sines([(1000, 0.5)], 44100, 44100) + sines([(12000, 0.5)], 44100, 44100)
    ours = Resample(44100, 16000)(torch.from_numpy(signal)[None])[0].numpy()
    expected = sines([(1000, 0.5)], 16000, len(ours))
    assert np.abs(ours - expected)[EDGE:-EDGE].max() < 1e-3


@pytest.mark.parametrize("orig, new, length", [(16000, 44100, 1), (16000, 44100, 161), (44100, 16000, 1000),
                                                (16000, 22050, 12345), (48000, 16000, 7), (3, 2, 10)])
def test_output_length_is_ceil(orig, new, length):
    resample = Resample(orig, new, lowpass_width=6)
    out = resample(torch.randn(2, 1, length))
    assert out.shape == (2, 1, math.ceil(length * new / orig)) == (2, 1, resample.output_length(length))
    assert resample(torch.randn(3, length)).shape == (3, math.ceil(length * new / orig))


def test_gradients_flow_to_the_input():
    audio = torch.randn(2, 1, 800, requires_grad=True)
    out = Resample(16000, 44100)(audio)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    assert torch.isfinite(audio.grad).all() and audio.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(Resample(3, 2, lowpass_width=4).double(),
                                    torch.randn(1, 1, 20, dtype=torch.float64, requires_grad=True))


def test_equal_rates_are_the_identity():
    audio = torch.randn(2, 1, 500)
    assert Resample(16000, 16000)(audio) is audio


def test_kernel_is_a_non_persistent_buffer_and_follows_dtype():
    resample = Resample(16000, 44100)
    assert resample.kernels.shape[0] == 441 and resample.state_dict() == {}
    out = resample.double()(torch.randn(1, 1, 320, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_hann_window_option_and_bad_arguments():
    signal = torch.from_numpy(sines([(500, 0.5)], 16000, 8000))[None]
    restored = Resample(44100, 16000, beta=None)(Resample(16000, 44100, beta=None)(signal))
    assert (restored - signal)[:, EDGE:-EDGE].abs().max() < 1e-2
    with pytest.raises(ValueError):
        Resample(0, 16000)
    with pytest.raises(ValueError):
        Resample(16000, 44100, rolloff=1.5)
