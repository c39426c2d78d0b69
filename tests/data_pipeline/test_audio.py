"""Audio pipeline: decoding, mono, resampling, normalisation, crops and gain."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from conchshell.data.audio import (
    center_crop_or_pad,
    load_audio,
    peak_normalize,
    random_crop_or_pad,
    random_gain,
)
from conchshell.errors import DataError


def tone(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize(
    "name, rate, subtype",
    [("a.wav", 44100, "PCM_16"), ("a.flac", 44100, "PCM_16"), ("a.ogg", 22050, "VORBIS"), ("a.wav", 16000, "FLOAT")],
)
def test_stereo_any_rate_and_format_becomes_mono_16k_peak_one(tmp_path, name, rate, subtype):
    left = tone(0.5, rate, 440.0, 0.3)
    stereo = np.stack([left, 0.5 * left], axis=1)
    path = tmp_path / name
    sf.write(path, stereo, rate, subtype=subtype)
    x = load_audio(path, 16000)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 8000) <= 1
    assert np.max(np.abs(x)) == pytest.approx(1.0, abs=1e-6)
    assert dominant_frequency(x, 16000) == pytest.approx(440.0, abs=3.0)


def test_channels_are_averaged(tmp_path):
    left = tone(0.1, 16000, 300.0, 0.4)
    path = tmp_path / "opposite.wav"
    sf.write(path, np.stack([left, -left], axis=1), 16000, subtype="FLOAT")
    # Opposite channels cancel: the mix is silent and must stay silent (no 0/0).
    x = load_audio(path, 16000)
    assert np.all(x == 0.0)


def test_resampling_keeps_duration_and_content_when_upsampling(tmp_path):
    path = tmp_path / "low.wav"
    sf.write(path, tone(0.25, 8000, 1000.0), 8000)
    x = load_audio(path, 16000)
    assert len(x) == 4000
    assert dominant_frequency(x, 16000) == pytest.approx(1000.0, abs=5.0)


def test_peak_normalize_scales_quiet_audio_and_leaves_silence():
    x = np.array([0.0, 0.1, -0.25], dtype=np.float32)
    np.testing.assert_allclose(peak_normalize(x), [0.0, 0.4, -1.0], rtol=1e-6)
    silent = np.zeros(10, np.float32)
    out = peak_normalize(silent)
    assert np.all(out == 0.0) and out.dtype == np.float32


@pytest.mark.parametrize("case", ["missing", "garbage", "empty", "nan"])
def test_unusable_audio_raises_data_error_naming_the_file(tmp_path, case):
    path = tmp_path / f"{case}.wav"
    if case == "garbage":
        path.write_bytes(b"definitely not audio")
    elif case == "empty":
        sf.write(path, np.zeros(0, np.float32), 16000)
    elif case == "nan":
        sf.write(path, np.array([0.1, np.nan, 0.2], np.float32), 16000, subtype="FLOAT")
    with pytest.raises(DataError, match=f"{case}.wav"):
        load_audio(path, 16000)


def test_random_crop_or_pad():
    x = np.arange(100, dtype=np.float32)
    rng = np.random.default_rng(0)
    windows = {tuple(random_crop_or_pad(x, 10, rng)) for _ in range(30)}
    assert len(windows) > 5  # offsets vary
    for w in windows:
        assert np.all(np.diff(w) == 1) and 0 <= w[0] <= 90  # contiguous and inside the signal
    short = random_crop_or_pad(np.ones(4, np.float32), 10, rng)
    np.testing.assert_array_equal(short, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    # The same generator state gives the same window.
    a = random_crop_or_pad(x, 10, np.random.default_rng(7))
    b = random_crop_or_pad(x, 10, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_center_crop_or_pad():
    x = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(center_crop_or_pad(x, 4), [3, 4, 5, 6])
    np.testing.assert_array_equal(center_crop_or_pad(x[:3], 5), [0, 1, 2, 0, 0])
    np.testing.assert_array_equal(center_crop_or_pad(x, 10), x)


def test_random_gain_range_and_reproducibility():
    x = np.ones(5, np.float32)
    gains = [random_gain(x, np.random.default_rng(s))[0] for s in range(200)]
    assert 0.5 <= min(gains) and max(gains) < 1.0 and max(gains) - min(gains) > 0.4
    assert random_gain(x, np.random.default_rng(3)).dtype == np.float32
    np.testing.assert_array_equal(random_gain(x, np.random.default_rng(3)), random_gain(x, np.random.default_rng(3)))
