"""Check a whole dataset and report every problem at once, each with its file.

A dataset with thirty broken files should cost one run to fix, not thirty. The checks:

- the manifest itself (see :func:`conchshell.data.manifest.parse_manifest`): missing
  columns, empty manifest, unknown classes, malformed ``img_type``, bad split values,
  duplicate and ambiguous rows, image and audio files that do not exist;
- every distinct image once: by default PIL reads its header and ``verify()`` checks its
  structure (cheap: no pixel decoding); with ``check_decode=True`` it is decoded fully by
  the same function training uses, which also catches truncated JPEG data;
- every distinct audio file once: by default ``soundfile.info`` must open it and report
  samples; with ``check_decode=True`` it is decoded and resampled by the training loader,
  which also catches NaN/inf samples.

Warnings do not fail validation: augmented copies of one image given different splits
(a leak of near-duplicates from train into val), and a class with no validation item.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
from PIL import Image, UnidentifiedImageError

from conchshell.constants import CLASS_NAMES, SAMPLE_RATE
from conchshell.data.audio import load_audio
from conchshell.data.image import DEFAULT_MAX_PIXELS, load_image
from conchshell.data.manifest import (
    ManifestRow,
    Problem,
    Record,
    VAL_FRACTION,
    assign_splits,
    augmentation_group,
    parse_manifest,
)
from conchshell.errors import DataError


@dataclass
class ValidationReport:
    """What :func:`validate_dataset` found. ``records`` has splits assigned; use it only when ``ok``."""

    source: Path
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """One line per problem, then one per warning (prefixed ``warning:``)."""
        return [str(p) for p in self.problems] + [f"warning: {w}" for w in self.warnings]

    def __str__(self) -> str:
        head = f"{self.source}: {len(self.records)} items, {len(self.problems)} problem(s), {len(self.warnings)} warning(s)"
        return "\n".join([head, *self.lines()])


def validate_dataset(
    path: str | os.PathLike,
    *,
    check_decode: bool = False,
    seed: int = 0,
    val_fraction: float = VAL_FRACTION,
    sample_rate: int = SAMPLE_RATE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ValidationReport:
    """Validate a ``.csv`` manifest, a BOPD ``Label.xlsx`` or a BOPD root folder.

    Raises :class:`DataError` only when the manifest cannot be read at all (the path does
    not exist, is not a supported kind, or the spreadsheet is broken); everything else is
    collected into the report.
    """
    parsed = parse_manifest(path)
    report = ValidationReport(source=parsed.source, problems=list(parsed.problems))
    checked_images: set[Path] = set()
    checked_audio: set[Path] = set()
    for row in parsed.rows:
        # Missing files are already reported by parse_manifest; each file is checked once.
        if row.image not in checked_images and row.image.is_file():
            checked_images.add(row.image)
            problem = check_image(row.image, check_decode=check_decode, max_pixels=max_pixels)
            if problem:
                report.problems.append(Problem(problem[0], str(row.image), problem[1], row.row))
        if row.audio not in checked_audio and row.audio.is_file():
            checked_audio.add(row.audio)
            problem = check_audio(row.audio, check_decode=check_decode, sample_rate=sample_rate)
            if problem:
                report.problems.append(Problem(problem[0], str(row.audio), problem[1], row.row))

    report.warnings.extend(_split_leaks(parsed.rows))
    if report.ok:
        records = [Record(r.image, r.audio, r.class_id, r.split) for r in parsed.rows if r.class_id is not None]
        report.records = assign_splits(records, seed=seed, val_fraction=val_fraction)
        report.warnings.extend(_classes_without_val(report.records))
    return report


def check_image(path: Path, *, check_decode: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, str] | None:
    """``(kind, detail)`` when the image is unusable, else None."""
    if check_decode:
        try:
            load_image(path, max_pixels=max_pixels)
        except DataError as exc:
            return "corrupt-image", str(exc).replace(str(path), path.name)
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    return "corrupt-image", f"{width}x{height} pixels, above the limit of {max_pixels}"
                img.verify()
    except UnidentifiedImageError:
        return "corrupt-image", "not an image PIL can read"
    except Exception as exc:  # verify() raises many types for damaged files
        return "corrupt-image", _first_line(exc)
    return None


def check_audio(path: Path, *, check_decode: bool = False, sample_rate: int = SAMPLE_RATE) -> tuple[str, str] | None:
    """``(kind, detail)`` when the audio file is unusable, else None."""
    try:
        info = sf.info(str(path))
    except Exception as exc:  # libsndfile's error for anything it cannot parse
        return "unreadable-audio", _first_line(exc)
    if info.frames <= 0:
        return "unreadable-audio", "holds no samples"
    if info.samplerate <= 0 or info.channels <= 0:
        return "unreadable-audio", f"bad header: {info.samplerate} Hz, {info.channels} channel(s)"
    if check_decode:
        try:
            load_audio(path, sample_rate)
        except DataError as exc:
            return "unreadable-audio", str(exc).replace(str(path), path.name)
    return None


def _split_leaks(rows: list[ManifestRow]) -> list[Problem]:
    splits_of: dict[tuple[str, str], dict[str, ManifestRow]] = {}
    for row in rows:
        if row.split:
            splits_of.setdefault(augmentation_group(row.image), {}).setdefault(row.split, row)
    leaks = []
    for (folder, base), by_split in sorted(splits_of.items()):
        if len(by_split) > 1:
            names = ", ".join(f"{row.image.name} in {split}" for split, row in sorted(by_split.items()))
            leaks.append(Problem("split-leak", str(Path(folder) / base), f"augmented copies in both splits: {names}"))
    return leaks


def _classes_without_val(records: list[Record]) -> list[Problem]:
    return [
        Problem("no-val-items", name, "this class has no validation item")
        for class_id, name in enumerate(CLASS_NAMES)
        if any(r.class_id == class_id for r in records) and not any(r.class_id == class_id and r.split == "val" for r in records)
    ]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
