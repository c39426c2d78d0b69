"""Rank-0 experiment logging: a JSON-lines metrics file, TensorBoard, and a progress bar.

``metrics.jsonl`` is the source of truth (one ``{"step", "time", **scalars}`` object per
line, flushed on every write so a crash loses nothing already logged); TensorBoard is a
convenience view of the same numbers plus audio, images and mel spectrograms. On every
rank but the main one all methods do nothing, so the training loop can call them
unconditionally.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
MEDIA_DIR = "media"  # where audio/images go when TensorBoard is not installed


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"scalar expected, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().cpu().item())
    return float(value)


def _json_number(value: float) -> float | str:
    # JSON has no NaN/Infinity; strings keep the signal (a diverged loss) while staying valid.
    return value if math.isfinite(value) else str(value)


def _to_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def image_to_hwc_uint8(image: Any) -> np.ndarray:
    """CHW float in [0, 1], HWC uint8, or HW grayscale (either kind) -> HWC uint8 RGB."""
    array = _to_numpy(image)
    if array.dtype == np.uint8:
        hwc = array if array.ndim == 3 else array[:, :, None]
    else:
        if array.ndim == 3:
            array = array.transpose(1, 2, 0)
        elif array.ndim != 2:
            raise ValueError(f"image must be CHW, HWC or HW, got shape {array.shape}")
        hwc = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        hwc = hwc if hwc.ndim == 3 else hwc[:, :, None]
    if hwc.ndim != 3 or hwc.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must have 1, 3 or 4 channels, got shape {array.shape}")
    if hwc.shape[2] == 1:
        hwc = np.repeat(hwc, 3, axis=2)
    return np.ascontiguousarray(hwc[:, :, :3])


def mel_to_rgb(log_mel: Any, cmap: str = "magma") -> np.ndarray:
    """Render ``[n_mels, frames]`` as an HWC uint8 image, low frequencies at the bottom.

    Values are min-max normalised per image; matplotlib's colour map is used when available
    (only its colour table, no figure), otherwise a grayscale ramp.
    """
    mel = _to_numpy(log_mel).astype(np.float64)
    if mel.ndim != 2:
        raise ValueError(f"log-mel must be [n_mels, frames], got shape {mel.shape}")
    low, high = np.nanmin(mel), np.nanmax(mel)
    scaled = (mel - low) / (high - low) if high > low else np.zeros_like(mel)
    scaled = np.nan_to_num(scaled[::-1])  # row 0 is the lowest mel band; images start at the top
    try:
        import matplotlib

        rgba = matplotlib.colormaps[cmap](scaled)
        return (rgba[:, :, :3] * 255.0 + 0.5).astype(np.uint8)
    except ImportError:
        return image_to_hwc_uint8(scaled)


def progress(total: int, initial: int = 0, disable: bool = False) -> tqdm:
    """A step progress bar showing steps/s; pass ``disable=not is_main`` on other ranks.

    Show losses with ``bar.set_postfix({"g": g_loss, "d": d_loss})``.
    """
    return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True,
                smoothing=0.05)


class MetricsLogger:
    """Writes scalars to ``out_dir/metrics.jsonl`` and media to TensorBoard, on the main rank only."""

    def __init__(self, out_dir: Path, is_main: bool, use_tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.is_main = is_main
        self._jsonl = None
        self._writer = None
        if not is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Append so a resumed run continues the same file.
        self._jsonl = open(self.out_dir / METRICS_FILE, "a", encoding="utf-8")
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: logging to metrics.jsonl and "
                              f"{MEDIA_DIR}/ only (pip install tensorboard)", stacklevel=2)
            else:
                self._writer = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR))

    @property
    def tensorboard_enabled(self) -> bool:
        return self._writer is not None

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Append one JSON line ``{"step", "time", **scalars}`` and mirror it to TensorBoard."""
        if not self.is_main:
            return
        if self._jsonl is None:
            raise RuntimeError("MetricsLogger.log_scalars called after close()")
        values = {name: _to_float(value) for name, value in scalars.items()}
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({name: _json_number(value) for name, value in values.items()})
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, global_step=int(step))

    def log_audio(self, step: int, tag: str, wave: Any, sample_rate: int) -> None:
        """Log a mono waveform ``[T]`` (float, nominally in [-1, 1]; clipped beyond)."""
        if not self.is_main:
            return
        samples = np.clip(_to_numpy(wave).astype(np.float32).reshape(-1), -1.0, 1.0)
        if self._writer is not None:
            self._writer.add_audio(tag, torch.from_numpy(samples)[None], global_step=int(step),
                                   sample_rate=int(sample_rate))
            return
        import soundfile

        soundfile.write(self._media_path(step, tag, ".wav"), samples, int(sample_rate))

    def log_image(self, step: int, tag: str, image: Any) -> None:
        """Log an image given as CHW float in [0, 1] or HWC uint8 (HW grayscale also accepted)."""
        if not self.is_main:
            return
        self._write_image(step, tag, image_to_hwc_uint8(image))

    def log_mel_image(self, step: int, tag: str, log_mel: Any) -> None:
        """Log a ``[n_mels, frames]`` log-mel spectrogram as a colour-mapped image."""
        if not self.is_main:
            return
        self._write_image(step, tag, mel_to_rgb(log_mel))

    def progress(self, total: int, initial: int = 0) -> tqdm:
        """:func:`progress`, shown on the main rank only."""
        return progress(total, initial, disable=not self.is_main)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _write_image(self, step: int, tag: str, hwc: np.ndarray) -> None:
        if self._writer is not None:
            self._writer.add_image(tag, hwc, global_step=int(step), dataformats="HWC")
            return
        from PIL import Image

        Image.fromarray(hwc).save(self._media_path(step, tag, ".png"))

    def _media_path(self, step: int, tag: str, suffix: str) -> Path:
        folder = self.out_dir / MEDIA_DIR
        folder.mkdir(parents=True, exist_ok=True)
        safe_tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
        return folder / f"{safe_tag}-step={int(step):08d}{suffix}"
