"""Differentiable spectral features of waveforms: mel filterbank, log-mel, multi-resolution STFT.

Everything here is plain torch (the filterbank is built with numpy once), so it runs on CPU
or CUDA, back-propagates into the waveform, and never imports librosa at run time (librosa's
first call costs ~25 s of numba compilation).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Slaney's mel scale (the Auditory Toolbox's, and librosa's default with htk=False): linear
# below 1 kHz at 200/3 Hz per mel, logarithmic above with 27 mels per factor of 6.4.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(frequencies: np.ndarray) -> np.ndarray:
    """Hertz -> Slaney mels."""
    frequencies = np.asarray(frequencies, dtype=np.float64)
    linear = frequencies / _SLANEY_HZ_PER_MEL
    # np.maximum keeps log() away from 0 Hz; those entries take the linear branch anyway.
    log_part = _SLANEY_BREAK_MEL + np.log(np.maximum(frequencies, 1e-10) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    return np.where(frequencies >= _SLANEY_BREAK_HZ, log_part, linear)


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Slaney mels -> Hertz."""
    mels = np.asarray(mels, dtype=np.float64)
    linear = mels * _SLANEY_HZ_PER_MEL
    log_part = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (mels - _SLANEY_BREAK_MEL))
    return np.where(mels >= _SLANEY_BREAK_MEL, log_part, linear)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> Tensor:
    """Triangular mel filters on the Slaney scale with Slaney (unit-area) normalisation.

    Equal to ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin,
    fmax=fmax, htk=False, norm="slaney")``. Returns float32 ``[n_mels, n_fft // 2 + 1]``.
    """
    if fmax is None:
        fmax = sample_rate / 2.0
    if not 0.0 <= fmin < fmax <= sample_rate / 2.0:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={fmin}, fmax={fmax}")
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    # n_mels + 2 edges: filter i rises from edge i to its peak at i+1 and falls to i+2.
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges)
    distance = edges[:, None] - fft_freqs[None, :]
    rising = -distance[:-2] / widths[:-1, None]
    falling = distance[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney normalisation divides each triangle by its bandwidth so every filter has the same
    # area: wide high-frequency filters do not dominate the energy.
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def _as_batch_of_signals(waveform: Tensor) -> Tensor:
    """[B,1,T] or [B,T] -> [B,T]."""
    if waveform.dim() == 3:
        if waveform.shape[1] != 1:
            raise ValueError(f"expected mono audio [B,1,T], got shape {tuple(waveform.shape)}")
        return waveform[:, 0]
    if waveform.dim() != 2:
        raise ValueError(f"expected audio [B,1,T] or [B,T], got shape {tuple(waveform.shape)}")
    return waveform


def _stft_magnitude(signal: Tensor, n_fft: int, hop_length: int, win_length: int,
                    window: Tensor) -> Tensor:
    """|STFT| of [B,T] float32 audio, centred frames with reflect padding -> [B, n_fft//2+1, frames]."""
    spectrum = torch.stft(signal, n_fft=n_fft, hop_length=hop_length, win_length=win_length,
                          window=window, center=True, pad_mode="reflect", normalized=False,
                          onesided=True, return_complex=True)
    return spectrum.abs()


class LogMelSpectrogram(nn.Module):
    """log10 mel-magnitude spectrogram, the paper's phi for the mel loss (DESIGN.md section 3).

    Input ``[B,1,T]`` or ``[B,T]``; output float32 ``[B, n_mels, 1 + T // hop_length]``.
    """

    def __init__(self, sample_rate: int = 16000, n_fft: int = 2048, hop_length: int = 300,
                 win_length: int = 1200, n_mels: int = 128, fmin: float = 0.0,
                 fmax: float = 8000.0, clamp_min: float = 1e-5) -> None:
        super().__init__()
        if win_length > n_fft:
            raise ValueError(f"win_length {win_length} must not exceed n_fft {n_fft}")
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.win_length = win_length
        self.clamp_min = clamp_min
        # Derived from the constructor arguments, so not worth storing in checkpoints.
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        self.register_buffer("filterbank", mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax),
                             persistent=False)

    def forward(self, waveform: Tensor) -> Tensor:
        signal = _as_batch_of_signals(waveform)
        # bf16 STFTs lose most of the dynamic range a log spectrum needs, so the whole
        # feature is computed in float32 even inside an autocast region.
        with torch.autocast(device_type=signal.device.type, enabled=False):
            signal = signal.float()
            # Magnitude, not power: the original's Audio2Mel (MelGAN's) uses |STFT|, and the
            # paper's lambda_mel = 15 was tuned on that scale.
            magnitude = _stft_magnitude(signal, self.n_fft, self.hop_length, self.win_length,
                                        self.window)
            mel = torch.matmul(self.filterbank, magnitude)
            return torch.log10(mel.clamp(min=self.clamp_min))


def mel_l1(estimate: Tensor, reference: Tensor, mel: LogMelSpectrogram) -> Tensor:
    """Mean absolute difference between the log-mel spectrograms of two waveforms (paper eq. 5)."""
    return F.l1_loss(mel(estimate), mel(reference))


class MultiResolutionSTFTDistance(nn.Module):
    """Spectral distance between two waveforms averaged over several STFT resolutions.

    For each resolution r with magnitudes X (estimate) and Y (reference), per item::

        SC_r  = ||Y - X||_F / ||Y||_F                     (spectral convergence)
        LM_r  = mean |log(max(Y, eps)) - log(max(X, eps))|  (log-magnitude L1, natural log)
        d     = (1 / R) * sum_r (SC_r + LM_r)

    (Yamamoto et al., Parallel WaveGAN, 2020.) ``reduction="mean"`` averages d over the batch;
    ``"none"`` returns one distance per item ``[B]``, for evaluation tables. Lower is better,
    0 for identical signals.
    """

    def __init__(self, resolutions: Sequence[tuple[int, int, int]] = ((512, 128, 512),
                                                                      (1024, 256, 1024),
                                                                      (2048, 512, 2048)),
                 eps: float = 1e-5) -> None:
        super().__init__()
        if not resolutions:
            raise ValueError("need at least one (n_fft, hop_length, win_length) resolution")
        self.resolutions = [tuple(int(v) for v in r) for r in resolutions]
        self.eps = eps
        for index, (n_fft, _, win_length) in enumerate(self.resolutions):
            if win_length > n_fft:
                raise ValueError(f"resolution {index}: win_length {win_length} > n_fft {n_fft}")
            self.register_buffer(f"window_{index}", torch.hann_window(win_length), persistent=False)

    def forward(self, estimate: Tensor, reference: Tensor, reduction: str = "mean") -> Tensor:
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        estimate = _as_batch_of_signals(estimate)
        reference = _as_batch_of_signals(reference)
        if estimate.shape != reference.shape:
            raise ValueError(f"shape mismatch: estimate {tuple(estimate.shape)} "
                             f"vs reference {tuple(reference.shape)}")
        with torch.autocast(device_type=estimate.device.type, enabled=False):
            estimate, reference = estimate.float(), reference.float()
            total = estimate.new_zeros(estimate.shape[0])
            for index, (n_fft, hop_length, win_length) in enumerate(self.resolutions):
                window = getattr(self, f"window_{index}")
                x = _stft_magnitude(estimate, n_fft, hop_length, win_length, window)
                y = _stft_magnitude(reference, n_fft, hop_length, win_length, window)
                # Clamping the reference norm keeps a silent reference from dividing by 0.
                convergence = (y - x).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1).clamp(min=self.eps)
                log_magnitude = (torch.log(y.clamp(min=self.eps)) - torch.log(x.clamp(min=self.eps))
                                 ).abs().flatten(1).mean(dim=1)
                total = total + convergence + log_magnitude
            distance = total / len(self.resolutions)
        return distance.mean() if reduction == "mean" else distance
