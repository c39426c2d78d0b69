"""Rank-0 metrics logging: JSON lines, TensorBoard events, media fallbacks, progress bar."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conchshell.training.logging import (
    METRICS_FILE,
    TENSORBOARD_DIR,
    MetricsLogger,
    image_to_hwc_uint8,
    mel_to_rgb,
    progress,
)


def _strict_json(line: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=refuse)


def test_main_rank_writes_json_lines_and_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, is_main=True) as logger:
        assert logger.tensorboard_enabled
        logger.log_scalars(1, {"loss/g": 0.5, "loss/d": torch.tensor(1.25)})
        logger.log_scalars(2, {"loss/g": float("nan"), "lr": 1e-5})
        # Written and flushed before close: a crash right now would lose nothing.
        lines = (tmp_path / METRICS_FILE).read_text().splitlines()
        assert len(lines) == 2
        logger.log_audio(2, "audio/fake", torch.sin(torch.linspace(0, 100, 1600)) * 2.0, 16_000)
        logger.log_image(2, "image/input", torch.rand(3, 8, 8))
        logger.log_mel_image(2, "mel/fake", torch.randn(16, 20))

    records = [_strict_json(line) for line in lines]
    assert records[0]["step"] == 1 and records[0]["loss/g"] == 0.5 and records[0]["loss/d"] == 1.25
    assert records[1]["loss/g"] == "nan" and records[1]["lr"] == 1e-5
    assert all(isinstance(r["time"], float) and r["time"] > 1e9 for r in records)

    events = list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    accumulator = EventAccumulator(str(tmp_path / TENSORBOARD_DIR)).Reload()
    tags = accumulator.Tags()
    assert {"loss/g", "loss/d", "lr"} <= set(tags["scalars"])
    assert {"image/input", "mel/fake"} <= set(tags["images"])
    assert "audio/fake" in tags["audio"]
    assert [e.value for e in accumulator.Scalars("loss/d")] == [1.25]


def test_resumed_logger_appends(tmp_path):
    for step in (1, 2):
        with MetricsLogger(tmp_path, is_main=True, use_tensorboard=False) as logger:
            logger.log_scalars(step, {"x": step})
    steps = [_strict_json(line)["step"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2]


def test_other_ranks_write_nothing(tmp_path):
    out_dir = tmp_path / "run"
    logger = MetricsLogger(out_dir, is_main=False)
    logger.log_scalars(1, {"loss": 1.0})
    logger.log_audio(1, "a", torch.zeros(10), 16_000)
    logger.log_image(1, "i", torch.zeros(3, 4, 4))
    logger.log_mel_image(1, "m", torch.zeros(4, 4))
    assert logger.progress(10).disable
    logger.close()
    assert not out_dir.exists()


def test_without_tensorboard_media_goes_to_files(tmp_path):
    import soundfile
    from PIL import Image

    with MetricsLogger(tmp_path, is_main=True, use_tensorboard=False) as logger:
        assert not logger.tensorboard_enabled
        logger.log_audio(3, "audio/fake", np.full(800, 0.25, dtype=np.float32), 16_000)
        logger.log_image(3, "image/in", np.zeros((5, 6, 3), dtype=np.uint8))
        logger.log_mel_image(3, "mel/x", np.random.randn(8, 12))
    assert not (tmp_path / TENSORBOARD_DIR).exists()
    wave, rate = soundfile.read(tmp_path / "media" / "audio_fake-step=00000003.wav")
    assert rate == 16_000 and wave.shape == (800,) and np.allclose(wave, 0.25, atol=1e-4)
    assert Image.open(tmp_path / "media" / "image_in-step=00000003.png").size == (6, 5)
    assert Image.open(tmp_path / "media" / "mel_x-step=00000003.png").size == (12, 8)


def test_image_conversion_accepts_chw_float_hwc_uint8_and_grayscale():
    chw = torch.zeros(3, 2, 4)
    chw[0] = 1.0  # red
    hwc = image_to_hwc_uint8(chw)
    assert hwc.shape == (2, 4, 3) and hwc.dtype == np.uint8 and (hwc[..., 0] == 255).all()
    assert (hwc[..., 1:] == 0).all()
    assert image_to_hwc_uint8(np.full((2, 3, 3), 7, np.uint8)).tolist() == np.full((2, 3, 3), 7).tolist()
    assert image_to_hwc_uint8(torch.full((2, 3), 2.0)).shape == (2, 3, 3)  # clipped to white
    assert image_to_hwc_uint8(torch.full((1, 2, 3), 0.5))[0, 0].tolist() == [128, 128, 128]
    with pytest.raises(ValueError):
        image_to_hwc_uint8(torch.zeros(2, 3, 4, 5))


def test_mel_image_puts_low_frequencies_at_the_bottom():
    mel = torch.zeros(6, 5)
    mel[0] = 3.0  # loudest in the lowest band
    rgb = mel_to_rgb(mel)
    assert rgb.shape == (6, 5, 3) and rgb.dtype == np.uint8
    assert rgb[-1].astype(int).sum() > rgb[0].astype(int).sum()
    assert mel_to_rgb(torch.zeros(3, 3)).shape == (3, 3, 3)  # constant input does not divide by 0


def test_progress_bar_counts_steps():
    hidden = progress(total=10, initial=4, disable=True)
    assert hidden.disable
    hidden.update(2)  # a no-op when disabled: the loop keeps its own step counter
    hidden.close()
    shown = progress(total=10, initial=4, disable=False)
    shown.set_postfix({"g": 0.123456})
    shown.update(2)
    assert shown.n == 6 and shown.total == 10 and not shown.disable
    assert "step" in str(shown) and "g=0.123" in str(shown)
    shown.close()
