"""Mel filterbank and log-mel against librosa; gradients, autocast and the STFT distance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conchshell.nn.spectral import (
    LogMelSpectrogram,
    MultiResolutionSTFTDistance,
    mel_filterbank,
    mel_l1,
)

librosa = pytest.importorskip("librosa")


def piano_like(batch: int = 2, seconds: float = 1.0, sample_rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """Decaying harmonic tones plus a little noise: energy across the whole mel range."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    signals = []
    for item in range(batch):
        f0 = 110.0 * 2 ** (item * 7 / 12)
        tone = sum(torch.sin(2 * torch.pi * f0 * k * t) / k for k in range(1, 12) if f0 * k < 7800)
        noise = 0.01 * torch.randn(t.shape, generator=generator)
        signals.append(0.3 * tone * torch.exp(-3 * t) + noise)
    return torch.stack(signals)[:, None]


@pytest.mark.parametrize("sample_rate, n_fft, n_mels, fmin, fmax", [
    (16000, 2048, 128, 0.0, 8000.0),  # the loss's settings
    (22050, 1024, 80, 30.0, 11025.0),
    (44100, 512, 40, 200.0, 12000.0),
])
def test_filterbank_equals_librosa_slaney(sample_rate, n_fft, n_mels, fmin, fmax):
    ours = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)
    reference = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin,
                                    fmax=fmax, htk=False, norm="slaney")
    assert ours.shape == (n_mels, n_fft // 2 + 1) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=1e-6)


def test_filterbank_rejects_bad_band():
    with pytest.raises(ValueError, match="fmax"):
        mel_filterbank(16000, 512, 40, 0.0, 9000.0)


def test_log_mel_matches_librosa_computation():
    mel = LogMelSpectrogram()
    audio = piano_like()
    ours = mel(audio)
    assert ours.shape == (2, 128, 1 + audio.shape[-1] // 300) and ours.dtype == torch.float32
    filters = librosa.filters.mel(sr=16000, n_fft=2048, n_mels=128, fmin=0.0, fmax=8000.0,
                                  htk=False, norm="slaney")
    for item in range(audio.shape[0]):
        magnitude = np.abs(librosa.stft(audio[item, 0].numpy(), n_fft=2048, hop_length=300,
                                        win_length=1200, window="hann", center=True,
                                        pad_mode="reflect"))
        reference = np.log10(np.maximum(filters @ magnitude, 1e-5))
        relative = np.abs(ours[item].numpy() - reference).max() / np.abs(reference).max()
        assert relative < 1e-4, relative


def test_log_mel_accepts_both_layouts_and_keeps_buffers_out_of_state_dict():
    mel = LogMelSpectrogram(n_fft=512, hop_length=128, win_length=512, n_mels=40)
    audio = piano_like(seconds=0.25)
    torch.testing.assert_close(mel(audio), mel(audio[:, 0]))
    assert mel.state_dict() == {}
    with pytest.raises(ValueError, match="mono"):
        mel(torch.zeros(1, 2, 1000))


def test_log_mel_is_differentiable():
    mel = LogMelSpectrogram()
    audio = piano_like(seconds=0.5).requires_grad_(True)
    target = piano_like(seconds=0.5, seed=1) * 0.5
    loss = mel_l1(audio, target, mel)
    loss.backward()
    assert loss.item() > 0
    assert torch.isfinite(audio.grad).all() and audio.grad.abs().sum() > 0


def test_log_mel_gradient_is_finite_on_silence():
    mel = LogMelSpectrogram(n_fft=512, hop_length=128, win_length=512, n_mels=40)
    silence = torch.zeros(1, 1, 2000, requires_grad=True)
    mel(silence).sum().backward()
    assert torch.isfinite(silence.grad).all()


def test_mel_l1_is_zero_for_identical_audio():
    mel = LogMelSpectrogram()
    audio = piano_like(seconds=0.25)
    assert mel_l1(audio, audio.clone(), mel).item() == 0.0


def test_log_mel_under_bf16_autocast_is_float32_and_close_to_fp32():
    mel = LogMelSpectrogram()
    audio = piano_like(seconds=0.5)
    reference = mel(audio)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        # The waveform arrives in bf16 as it would from a bf16 decoder.
        under_autocast = mel(audio.to(torch.bfloat16))
    assert under_autocast.dtype == torch.float32
    # The only loss left is rounding the waveform itself to bf16 (8 bits of mantissa).
    assert (under_autocast - reference).abs().mean().item() < 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_log_mel_on_cuda_matches_cpu():
    mel = LogMelSpectrogram()
    audio = piano_like(seconds=0.5)
    torch.testing.assert_close(mel.cuda()(audio.cuda()).cpu(), LogMelSpectrogram()(audio),
                               atol=1e-3, rtol=1e-3)


def test_stft_distance_is_zero_for_identical_and_grows_with_noise():
    distance = MultiResolutionSTFTDistance()
    clean = piano_like()
    assert distance(clean, clean.clone()).item() == pytest.approx(0.0, abs=1e-6)
    generator = torch.Generator().manual_seed(3)
    slight = clean + 0.01 * torch.randn(clean.shape, generator=generator)
    heavy = clean + 0.3 * torch.randn(clean.shape, generator=generator)
    assert 0 < distance(slight, clean).item() < distance(heavy, clean).item()
    per_item = distance(heavy, clean, reduction="none")
    assert per_item.shape == (2,)
    assert per_item.mean().item() == pytest.approx(distance(heavy, clean).item(), rel=1e-6)


def test_stft_distance_formula_on_a_scaled_signal():
    # x = a * y gives SC = |1 - a| and LM = |log a| exactly (wherever y clears eps), at every
    # resolution, so the distance is |1 - a| + |log a|.
    distance = MultiResolutionSTFTDistance(eps=1e-12)
    reference = piano_like(batch=1, seconds=0.5)
    value = distance(0.5 * reference, reference).item()
    assert value == pytest.approx(0.5 + np.log(2.0), rel=1e-4)


def test_stft_distance_is_differentiable_and_checks_shapes():
    distance = MultiResolutionSTFTDistance(resolutions=[(256, 64, 256)])
    estimate = piano_like(batch=1, seconds=0.25).requires_grad_(True)
    distance(estimate * 0.8, piano_like(batch=1, seconds=0.25, seed=2)).backward()
    assert torch.isfinite(estimate.grad).all() and estimate.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shape mismatch"):
        distance(torch.zeros(1, 1000), torch.zeros(1, 1200))
