"""Audio pipeline: decode, mono, resample, peak-normalise; crops and gain for training.

Every random choice takes an explicit ``numpy.random.Generator``: the dataset derives one
per item from ``(seed, epoch, index)``, so a batch is the same whatever the number of
workers or ranks, and a resumed run sees exactly the crops it would have seen.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from conchshell.errors import DataError

# Below this peak a clip is treated as silence and left untouched: scaling numerical
# noise of a silent file up to full scale would hand the model loud hiss as "music".
SILENCE_PEAK = 1e-6


def load_audio(path: str | os.PathLike, sample_rate: int, normalize: bool = True) -> np.ndarray:
    """Decode any soundfile-readable file to mono float32 at ``sample_rate``, peak 1.

    Channels are averaged; the rate is converted with soxr's high-quality filter; the
    result is scaled so its largest absolute sample is 1 (silence stays silence), unless
    ``normalize`` is False (evaluation scores files at the level they were written).
    Raises :class:`DataError` naming the file when it is missing, cannot be decoded,
    holds no samples, or holds NaN/inf.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"audio file not found: {path}")
    try:
        data, source_rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile reports every decoding failure as a RuntimeError/LibsndfileError
        raise DataError(f"cannot read audio {path}: {_first_line(exc)}") from exc
    if data.shape[0] == 0:
        raise DataError(f"audio {path} holds no samples")
    if not np.isfinite(data).all():
        raise DataError(f"audio {path} contains NaN or infinite samples")
    mono = data.mean(axis=1, dtype=np.float32)
    if source_rate != sample_rate:
        mono = soxr.resample(mono, source_rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return peak_normalize(mono) if normalize else mono


def peak_normalize(x: np.ndarray) -> np.ndarray:
    """Scale to a peak of 1; a (near-)silent signal is returned unchanged."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak <= SILENCE_PEAK:
        return x.astype(np.float32, copy=False)
    return (x / peak).astype(np.float32, copy=False)


def random_gain(x: np.ndarray, rng: np.random.Generator, low: float = 0.5, high: float = 1.0) -> np.ndarray:
    """Multiply by one gain drawn uniformly from ``[low, high)``."""
    return (x * np.float32(rng.uniform(low, high))).astype(np.float32, copy=False)


def random_crop_or_pad(x: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A window of ``length`` samples at a random offset; zero-padded at the end when shorter."""
    if x.shape[-1] <= length:
        return _pad_to(x, length)
    offset = int(rng.integers(0, x.shape[-1] - length + 1))
    return x[..., offset : offset + length].copy()


def center_crop_or_pad(x: np.ndarray, length: int) -> np.ndarray:
    """The centred window of ``length`` samples (validation); zero-padded at the end when shorter."""
    if x.shape[-1] <= length:
        return _pad_to(x, length)
    offset = (x.shape[-1] - length) // 2
    return x[..., offset : offset + length].copy()


def _pad_to(x: np.ndarray, length: int) -> np.ndarray:
    padding = [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])]
    return np.pad(x, padding).astype(np.float32, copy=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
