"""Assemble the demo corpus: scenes + piano clips in the BOPD layout, with a CSV manifest.

Layout written under ``out_dir`` (BOPD as the original code reads it, plus two CSVs)::

    Img/{train_set,val_set}/<class>-<k>/<class>_<i>.jpg   k = class index + 1
    Wav/piano/<class>_<j>.wav                             16 kHz mono PCM-16, 128000 samples
    Label/Label.xlsx                                      Sheet1: img_type, img_npy_name, genre, muse_wav_name
    manifest.csv                                          image,audio,class,split (paths relative to out_dir)
    clips.csv                                             per clip: source, shaping and measured traits

Pairing rule: image ``i`` of a class plays clip ``i mod clips_per_class`` of the same class,
so every clip is heard by at least one image and, as in BOPD, several images share a
piece. Each clip carries its class's musical traits (see :mod:`conchshell.data.demo.music`).
About 15 % of each class's images go to ``val_set`` (at least one), chosen by the seed.

The output is byte-identical for the same arguments: every random draw comes from a
generator keyed by (seed, purpose, class, item), iteration orders are fixed, and the
xlsx's document times and zip-entry times are pinned.
"""

from __future__ import annotations

import csv
import datetime
import io
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from conchshell.constants import CLASS_NAMES, CLIP_SECONDS, SAMPLE_RATE
from conchshell.data.demo.music import CLASS_TRAITS, ClipPlan, PianoRenderer, ScoreNote, plan_class_clips
from conchshell.data.demo.scenes import draw_scene
from conchshell.errors import DataError

GENRE = "piano"  # the Wav/ sub-folder, which BOPD's Label.xlsx calls "genre"
IMAGE_SIZE_WH = (320, 240)  # deliberately not 224x224, so loaders must resize
JPEG_QUALITY = 90
VAL_FRACTION = 0.15
LABEL_HEADER = ("img_type", "img_npy_name", "genre", "muse_wav_name")
MANIFEST_HEADER = ("image", "audio", "class", "split")
CLIPS_HEADER = (
    "clip", "class", "source", "start_quarter", "transpose", "tempo_bpm", "velocity",
    "mean_pitch", "notes_per_second", "mode", "tonic", "key_correlation",
)  # fmt: skip
_FIXED_TIME = datetime.datetime(2000, 1, 1)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry

# Purposes of the seeded generators; a new purpose gets a new number, never a reused one.
_MUSIC, _SCENE, _SPLIT, _EXAMPLE = 1, 2, 3, 4


@dataclass(frozen=True)
class CorpusSize:
    """How many clips and images each class gets."""

    clips_per_class: int
    images_per_class: int


TINY = CorpusSize(clips_per_class=2, images_per_class=4)  # seconds; for tests
DEFAULT = CorpusSize(clips_per_class=12, images_per_class=24)  # about a minute on 2 cores


def img_type(class_index: int) -> str:
    """BOPD image folder name of a class, e.g. 0 -> "coast-1"."""
    return f"{CLASS_NAMES[class_index]}-{class_index + 1}"


def _prepare_output(out_dir: Path) -> None:
    """Create `out_dir`; clear a previous demo build there, refuse anything else."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "clips.csv").is_file():
            raise DataError(f"{out_dir}: folder is not empty and holds no demo corpus; choose another --out")
        # A rebuild must not keep files of a larger earlier build.
        for name in ("Img", "Wav", "Label"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        for name in ("manifest.csv", "clips.csv"):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _val_indices(class_index: int, images: int, seed: int) -> list[int]:
    if images < 2:
        return []
    count = max(1, int(round(VAL_FRACTION * images)))
    order = np.random.default_rng([seed, _SPLIT, class_index]).permutation(images)
    return sorted(int(i) for i in order[:count])


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_label_xlsx(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    """BOPD's Label.xlsx (Sheet1 with LABEL_HEADER), byte-identical for the same rows."""
    from openpyxl import Workbook
    from openpyxl.writer.excel import ExcelWriter

    workbook = Workbook()
    sheet = workbook.active
    sheet.title = "Sheet1"
    sheet.append(LABEL_HEADER)
    for row in rows:
        sheet.append(row)
    # openpyxl stamps "now" into docProps/core.xml (save_workbook) and into every zip
    # entry; write through ExcelWriter directly with pinned times, then re-stamp entries.
    workbook.properties.created = _FIXED_TIME
    workbook.properties.modified = _FIXED_TIME
    workbook.properties.creator = "ConchShell demo corpus"
    raw = io.BytesIO()
    ExcelWriter(workbook, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED)).save()
    pinned = io.BytesIO()
    with zipfile.ZipFile(raw) as source, zipfile.ZipFile(pinned, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            entry = zipfile.ZipInfo(info.filename, date_time=_ZIP_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            target.writestr(entry, source.read(info.filename))
    path.write_bytes(pinned.getvalue())


def _clip_rows(plans: list[ClipPlan], clip_paths: list[str]) -> list[tuple]:
    rows = []
    for plan, clip in zip(plans, clip_paths):
        t = plan.traits
        rows.append((
            clip, plan.class_name, plan.source, f"{plan.start_quarter:g}", plan.transpose, f"{plan.tempo_bpm:g}",
            CLASS_TRAITS[plan.class_name].velocity, f"{t.mean_pitch:.3f}", f"{t.notes_per_second:.3f}",
            t.mode, t.tonic, f"{t.key_correlation:.4f}",
        ))  # fmt: skip
    return rows


def build_demo_corpus(out_dir: Path, *, clips_per_class: int, images_per_class: int, seed: int = 0) -> Path:
    """Build the demo corpus under `out_dir` and return the path of its manifest.csv."""
    if clips_per_class < 1:
        raise ValueError("clips_per_class must be at least 1")
    if images_per_class < clips_per_class:
        raise ValueError("images_per_class must be >= clips_per_class, so every clip is paired with an image")
    out_dir = Path(out_dir)
    _prepare_output(out_dir)
    wav_dir = out_dir / "Wav" / GENRE
    wav_dir.mkdir(parents=True)
    (out_dir / "Label").mkdir()

    renderer = PianoRenderer()
    num_samples = int(round(CLIP_SECONDS * SAMPLE_RATE))
    used_sources: set[str] = set()
    score_cache: dict[str, list[ScoreNote]] = {}
    manifest_rows: list[tuple[str, str, str, str]] = []
    label_rows: list[tuple[str, str, str, str]] = []
    clip_rows: list[tuple] = []

    for c, class_name in enumerate(CLASS_NAMES):
        plans = plan_class_clips(
            class_name, clips_per_class, np.random.default_rng([seed, _MUSIC, c]), used_sources, score_cache
        )
        clip_names = [f"{class_name}_{j:03d}.wav" for j in range(clips_per_class)]
        for plan, name in zip(plans, clip_names):
            wave = renderer.render(plan.events, num_samples)
            soundfile.write(str(wav_dir / name), wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        clip_rows.extend(_clip_rows(plans, [f"Wav/{GENRE}/{name}" for name in clip_names]))

        val = set(_val_indices(c, images_per_class, seed))
        for i in range(images_per_class):
            split = "val" if i in val else "train"
            folder = Path("Img") / f"{split}_set" / img_type(c)
            (out_dir / folder).mkdir(parents=True, exist_ok=True)
            image_name = f"{class_name}_{i:04d}.jpg"
            scene = draw_scene(class_name, np.random.default_rng([seed, _SCENE, c, i]), IMAGE_SIZE_WH)
            scene.save(out_dir / folder / image_name, "JPEG", quality=JPEG_QUALITY)
            clip_name = clip_names[i % clips_per_class]
            manifest_rows.append(((folder / image_name).as_posix(), f"Wav/{GENRE}/{clip_name}", class_name, split))
            label_rows.append((img_type(c), image_name, GENRE, clip_name))

    manifest = out_dir / "manifest.csv"
    _write_csv(manifest, MANIFEST_HEADER, manifest_rows)
    _write_csv(out_dir / "clips.csv", CLIPS_HEADER, clip_rows)
    write_label_xlsx(out_dir / "Label" / "Label.xlsx", label_rows)
    return manifest


def draw_example_scenes(out_dir: Path, seed: int = 0) -> list[Path]:
    """One held-out scene per class, ``<out_dir>/<class>.jpg``: drawn like the corpus's
    images but from random generators of their own, so no example is a corpus image."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for c, class_name in enumerate(CLASS_NAMES):
        path = out_dir / f"{class_name}.jpg"
        draw_scene(class_name, np.random.default_rng([seed, _EXAMPLE, c]), IMAGE_SIZE_WH).save(
            path, "JPEG", quality=JPEG_QUALITY)
        paths.append(path)
    return paths
