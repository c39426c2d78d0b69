"""A tiny BOPD-style dataset written into a temporary folder, in both manifest forms.

Layout (as the paper's dataset)::

    root/Img/{train_set,val_set}/<class>-<d>/<name>.jpg   (+ augmented <name>-1.jpg ...)
    root/Wav/{beach,ocean}/<piece>.wav
    root/Label/Label.xlsx                                 Sheet1: img_type, img_npy_name, genre, muse_wav_name
    root/manifest.csv                                     image,audio,class,split (relative paths)

Images are small solid-colour JPEGs and pieces short sines, so a test builds one in
well under a second.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openpyxl
import soundfile as sf
from PIL import Image

from conchshell.constants import CLASS_NAMES

GENRES = ("beach", "ocean")


@dataclass(frozen=True)
class Pair:
    image: Path
    audio: Path
    class_id: int
    split: str


@dataclass(frozen=True)
class BopdFixture:
    root: Path
    xlsx: Path
    csv: Path
    pairs: list[Pair]

    def pair_set(self) -> set[tuple[Path, Path, int, str]]:
        return {(p.image, p.audio, p.class_id, p.split) for p in self.pairs}


def write_wav(path: Path, seconds: float = 0.25, sample_rate: int = 16000, freq: float = 440.0, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tone = 0.5 * np.sin(2 * np.pi * freq * t)
    data = np.stack([tone * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else tone
    sf.write(path, data.astype(np.float32), sample_rate)
    return path


def write_jpeg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, quality=95)
    return path


def make_bopd(
    root: Path,
    *,
    train_per_class: int = 2,
    val_per_class: int = 1,
    augmented_copies: int = 2,
    pieces_per_genre: int = 3,
    audio_seconds: float = 0.25,
) -> BopdFixture:
    """Write the dataset; every image (and augmented copy) names one piece."""
    root = Path(root).absolute()
    pieces = []
    for g, genre in enumerate(GENRES):
        for k in range(pieces_per_genre):
            name = f"{genre}_{k:02d}.wav"
            write_wav(root / "Wav" / genre / name, seconds=audio_seconds, freq=220.0 * (1 + k + 3 * g))
            pieces.append((genre, name))

    rows: list[tuple[str, str, str, str]] = []
    pairs: list[Pair] = []
    for class_id, class_name in enumerate(CLASS_NAMES):
        img_type = f"{class_name}-{class_id + 1}"
        for split, folder, count in (("train", "train_set", train_per_class), ("val", "val_set", val_per_class)):
            for i in range(count):
                base = f"{class_name}_{split}_{i:02d}"
                genre, wav = pieces[(class_id + i) % len(pieces)]
                names = [f"{base}.jpg"] + [f"{base}-{k}.jpg" for k in range(1, augmented_copies + 1)]
                for n, name in enumerate(names):
                    color = (40 * class_id % 256, 60 + 20 * i, 30 * n)
                    image = write_jpeg(root / "Img" / folder / img_type / name, color)
                    rows.append((img_type, name, genre, wav))
                    pairs.append(Pair(image, root / "Wav" / genre / wav, class_id, split))

    xlsx = root / "Label" / "Label.xlsx"
    write_label_xlsx(xlsx, rows)
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "audio", "class", "split"])
        for pair in pairs:
            writer.writerow(
                [pair.image.relative_to(root).as_posix(), pair.audio.relative_to(root).as_posix(), CLASS_NAMES[pair.class_id], pair.split]
            )
    return BopdFixture(root, xlsx, manifest, pairs)


def write_label_xlsx(path: Path, rows: list[tuple[str, str, str, str]], header: tuple[str, ...] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.title = "Sheet1"
    sheet.append(list(header or ("img_type", "img_npy_name", "genre", "muse_wav_name")))
    for row in rows:
        sheet.append(list(row))
    workbook.save(path)
    return path


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("image", "audio", "class", "split")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path
