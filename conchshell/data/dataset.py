"""The torch Dataset of (image, 8-second piece, class) items."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from conchshell.constants import CLIP_SECONDS, SAMPLE_RATE
from conchshell.data.audio import center_crop_or_pad, load_audio, random_crop_or_pad, random_gain
from conchshell.data.image import DEFAULT_MAX_PIXELS, load_image
from conchshell.data.manifest import Record

if TYPE_CHECKING:  # only for the annotation: the dataset works with any object that has get()
    from conchshell.data.feature_cache import FeatureCache


def item_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one item in one epoch.

    Seeding from ``(seed, epoch, index)`` rather than from a per-worker stream makes each
    item's crop and gain independent of worker count, rank, batch order and of what
    was drawn before it, which is what lets a resumed run replay an epoch exactly.
    """
    return np.random.default_rng([seed, epoch, index])


class ImageMusicDataset(Dataset):
    """Image -> music pairs for training (random crop and gain) or validation (centre crop).

    Each item is a dict:

    - ``image``: float32 [3, 224, 224], normalised (see :mod:`conchshell.data.image`);
    - ``audio``: float32 [1, clip_samples], mono, peak-normalised, then for training a
      random gain in U(0.5, 1.0) and a random window; for validation the centre window
      at gain 1; zero-padded at the end when the piece is shorter than the clip;
    - ``class_id``: int64 scalar tensor;
    - ``index``: the item's position in ``records``;
    - ``features`` (float32 [2048]) and ``pred_class`` (int64 scalar): the frozen frontend's
      outputs for the image, only when ``feature_cache`` is given and holds the image
      (see :mod:`conchshell.data.feature_cache`); an item without them must have its
      features computed on the fly. Batch such items with
      :func:`~conchshell.data.feature_cache.collate_cached`.

    Training crops change from epoch to epoch: index it with ``(epoch, index)`` keys (what
    the trainer's sampler yields, so DataLoader workers can persist across epochs), or
    call :meth:`set_epoch` and index it with plain integers. ``cache_audio`` keeps decoded pieces
    in memory (one copy per DataLoader worker process); useful when many images share a
    piece and resampling dominates, off by default to keep memory flat.
    """

    def __init__(
        self,
        records: Sequence[Record],
        *,
        sample_rate: int = SAMPLE_RATE,
        clip_seconds: float = CLIP_SECONDS,
        train: bool,
        seed: int = 0,
        cache_audio: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        gain_range: tuple[float, float] = (0.5, 1.0),
        feature_cache: "FeatureCache | None" = None,
    ) -> None:
        if not records:
            raise ValueError("ImageMusicDataset needs at least one record")
        self.records = list(records)
        self.sample_rate = int(sample_rate)
        self.clip_samples = int(round(sample_rate * clip_seconds))
        self.train = train
        self.seed = int(seed)
        self.epoch = 0
        self.cache_audio = cache_audio
        self.max_pixels = max_pixels
        self.gain_range = gain_range
        self._audio_cache: dict[str, np.ndarray] = {}
        self.feature_cache = feature_cache

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops and gains the next items use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        record = self.records[index]
        image = load_image(record.image, max_pixels=self.max_pixels)
        audio = self._audio(record)
        if self.train:
            rng = item_generator(self.seed, epoch, index)
            clip = random_crop_or_pad(audio, self.clip_samples, rng)
            clip = random_gain(clip, rng, *self.gain_range)
        else:
            clip = center_crop_or_pad(audio, self.clip_samples)
        item = {
            "image": image,
            "audio": torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32)).unsqueeze(0),
            "class_id": torch.tensor(record.class_id, dtype=torch.int64),
            "index": index,
        }
        if self.feature_cache is not None:
            cached = self.feature_cache.get(record.image)
            if cached is not None:
                item["features"], item["pred_class"] = cached
        return item

    def _audio(self, record: Record) -> np.ndarray:
        if not self.cache_audio:
            return load_audio(record.audio, self.sample_rate)
        key = str(record.audio)
        if key not in self._audio_cache:
            self._audio_cache[key] = load_audio(record.audio, self.sample_rate)
        return self._audio_cache[key]
