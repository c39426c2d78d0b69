"""ImageMusicDataset: item layout, reproducible per-item randomness, validation determinism."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from conchshell.data.audio import load_audio
from conchshell.data.dataset import ImageMusicDataset
from conchshell.data.image import load_image
from conchshell.data.manifest import Record, read_manifest
from conchshell.errors import DataError
from data_pipeline.fixtures import make_bopd, write_jpeg

RATE = 16000
CLIP_SECONDS = 0.1  # 1600 samples: the fixture's pieces are 0.25 s, so crops have room to move
CLIP = 1600


@pytest.fixture()
def records(tmp_path):
    return read_manifest(make_bopd(tmp_path, train_per_class=1, val_per_class=0, augmented_copies=1).csv)


def test_item_layout(records):
    dataset = ImageMusicDataset(records, sample_rate=RATE, clip_seconds=CLIP_SECONDS, train=True)
    item = dataset[3]
    assert item["image"].shape == (3, 224, 224) and item["image"].dtype == torch.float32
    assert item["audio"].shape == (1, CLIP) and item["audio"].dtype == torch.float32
    assert item["class_id"].dtype == torch.int64 and item["class_id"].ndim == 0
    assert int(item["class_id"]) == records[3].class_id and item["index"] == 3
    torch.testing.assert_close(item["image"], load_image(records[3].image))
    assert len(dataset) == len(records) == 12


def test_default_clip_is_eight_seconds_at_16k(records):
    dataset = ImageMusicDataset(records, train=False)
    assert dataset.clip_samples == 128000
    audio = dataset[0]["audio"]
    assert audio.shape == (1, 128000)
    assert torch.all(audio[0, 4000:] == 0)  # a 0.25 s piece is zero-padded at the end


def test_train_items_are_reproducible_per_seed_epoch_index_and_change_with_epoch(records):
    def clips(dataset, epoch, order):
        dataset.set_epoch(epoch)
        return {i: dataset[i]["audio"] for i in order}

    a = ImageMusicDataset(records, sample_rate=RATE, clip_seconds=CLIP_SECONDS, train=True, seed=5)
    b = ImageMusicDataset(records, sample_rate=RATE, clip_seconds=CLIP_SECONDS, train=True, seed=5)
    forward = clips(a, 1, range(len(records)))
    backward = clips(b, 1, reversed(range(len(records))))  # access order must not matter
    for i in forward:
        torch.testing.assert_close(forward[i], backward[i], atol=0, rtol=0)
    next_epoch = clips(a, 2, range(len(records)))
    assert sum(not torch.equal(forward[i], next_epoch[i]) for i in forward) >= len(records) - 1
    other_seed = ImageMusicDataset(records, sample_rate=RATE, clip_seconds=CLIP_SECONDS, train=True, seed=6)
    other_seed.set_epoch(1)
    assert not torch.equal(other_seed[0]["audio"], forward[0])


def test_train_crop_is_a_window_of_the_piece_with_gain_in_range(records):
    dataset = ImageMusicDataset(records, sample_rate=RATE, clip_seconds=CLIP_SECONDS, train=True)
    full = load_audio(records[0].audio, RATE)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        clip = dataset[0]["audio"][0].numpy()
        # Find the window: the gain is one scalar, so clip / full[offset:] is constant.
        ratios = []
        for offset in range(len(full) - CLIP + 1):
            window = full[offset : offset + CLIP]
            gain = float(np.dot(clip, window) / np.dot(window, window))
            if np.allclose(clip, gain * window, atol=1e-5):
                ratios.append(gain)
        assert ratios and all(0.5 <= g < 1.0 for g in ratios)


def test_validation_is_deterministic_centre_crop_at_gain_one(records):
    dataset = ImageMusicDataset(records, sample_rate=RATE, clip_seconds=CLIP_SECONDS, train=False, seed=1)
    first = dataset[2]["audio"]
    dataset.set_epoch(7)
    torch.testing.assert_close(dataset[2]["audio"], first, atol=0, rtol=0)
    full = load_audio(records[2].audio, RATE)
    offset = (len(full) - CLIP) // 2
    np.testing.assert_array_equal(first[0].numpy(), full[offset : offset + CLIP])


def test_epoch_index_keys_let_persistent_workers_follow_the_epochs(records):
    dataset = ImageMusicDataset(records, sample_rate=RATE, clip_seconds=CLIP_SECONDS, train=True, seed=2)
    dataset.set_epoch(4)
    torch.testing.assert_close(dataset[(4, 1)]["audio"], dataset[1]["audio"], atol=0, rtol=0)
    assert dataset[(4, 1)]["index"] == 1 and not torch.equal(dataset[(5, 1)]["audio"], dataset[1]["audio"])

    class EpochKeys:  # what the trainer's sampler does: the epoch travels with each index
        epoch = 0

        def __iter__(self):
            return iter([(self.epoch, index) for index in range(len(records))])

        def __len__(self):
            return len(records)

    keys = EpochKeys()
    loader = DataLoader(dataset, batch_size=len(records), sampler=keys, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        keys.epoch = epoch
        (batch,) = list(loader)
        expected = torch.stack([dataset[(epoch, index)]["audio"] for index in range(len(records))])
        torch.testing.assert_close(batch["audio"], expected, atol=0, rtol=0)


def test_worker_count_does_not_change_batches(records):
    def batches(workers):
        dataset = ImageMusicDataset(records, sample_rate=RATE, clip_seconds=CLIP_SECONDS, train=True, seed=2)
        dataset.set_epoch(3)
        loader = DataLoader(dataset, batch_size=4, num_workers=workers, shuffle=False)
        return [batch["audio"] for batch in loader]

    for x, y in zip(batches(0), batches(2)):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_audio_cache_gives_identical_items(records):
    plain = ImageMusicDataset(records, sample_rate=RATE, clip_seconds=CLIP_SECONDS, train=True)
    cached = ImageMusicDataset(records, sample_rate=RATE, clip_seconds=CLIP_SECONDS, train=True, cache_audio=True)
    for _ in range(2):  # second pass reads from the cache
        for i in (0, 1, 0):
            torch.testing.assert_close(plain[i]["audio"], cached[i]["audio"], atol=0, rtol=0)
    assert len(cached._audio_cache) == len({r.audio for r in records[:2]})


def test_short_and_stereo_44k_pieces(tmp_path):
    image = write_jpeg(tmp_path / "a.jpg", (1, 2, 3))
    t = np.arange(2205) / 44100  # 0.05 s, stereo, 44.1 kHz
    sf.write(tmp_path / "s.wav", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1).astype(np.float32), 44100)
    dataset = ImageMusicDataset([Record(image, tmp_path / "s.wav", 0, "train")], sample_rate=RATE, clip_seconds=CLIP_SECONDS, train=True)
    audio = dataset[0]["audio"][0]
    assert audio.shape == (CLIP,)
    assert torch.all(audio[800:] == 0) and torch.any(audio[:800] != 0)


def test_broken_file_names_itself(tmp_path):
    image = write_jpeg(tmp_path / "a.jpg", (1, 2, 3))
    dataset = ImageMusicDataset([Record(image, tmp_path / "gone.wav", 0, "train")], train=True)
    with pytest.raises(DataError, match="gone.wav"):
        dataset[0]
