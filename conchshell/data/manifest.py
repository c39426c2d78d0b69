"""Dataset manifests: which image goes with which piece, its class and its split.

Two on-disk forms are read, and both become the same list of :class:`Record`:

**BOPD layout** (the paper's dataset, as the original code reads it)::

    ROOT/Img/{train_set,val_set}/<img_type>/<image>     img_type like coast-1 ... ocean_wave-6
    ROOT/Wav/<genre>/<piece>.wav                         genre is a sub-folder, not the class
    ROOT/Label/Label.xlsx                                Sheet1: img_type, img_npy_name, genre, muse_wav_name

The class is the trailing digit of ``img_type`` (1..6 -> ``CLASS_NAMES[d - 1]``). The image
is looked up as ``Img/<split>/<img_type>/<img_npy_name>`` in both split folders and the
folder it is found in gives its split. When ``img_npy_name`` has no extension or ends in
``.npy`` (the original stored feature arrays under that name) the same stem with an image
extension is accepted. ``muse_wav_name`` without an extension means ``.wav``.

**CSV manifest** with the header ``image,audio,class,split``:

- ``image``, ``audio``: paths relative to the CSV's folder, or absolute.
- ``class``: a class name from :data:`~conchshell.constants.CLASS_NAMES` (``sand_beach``),
  or a BOPD ``img_type`` ``<prefix>-<d>`` whose trailing digit ``d`` (1..6) names the class,
  exactly as in the BOPD folders. Bare numbers are rejected: ``2`` could mean a 0-based
  id or a 1-based BOPD suffix, and guessing wrong silently mislabels a class.
- ``split``: ``train``, ``val``, or empty; the column itself is optional.

Rows without a split are assigned one by :func:`assign_splits`: 85 % train / 15 % val,
stratified by class, deterministic by seed, and augmented copies of an image (``name-1.jpg``
.. ``name-5.jpg`` beside ``name.jpg``) always land in the same split, so validation never
sees a near-duplicate of a training image.

:func:`parse_manifest` never stops at the first problem: it returns every row it could
read plus a :class:`Problem` for each thing wrong, which is what the validator reports.
:func:`read_manifest` is the strict entry point for training: any problem raises.
"""
from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from conchshell.constants import CLASS_NAMES, NUM_CLASSES
from conchshell.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val")
VAL_FRACTION = 0.15

CSV_COLUMNS: tuple[str, ...] = ("image", "audio", "class", "split")
CSV_REQUIRED: tuple[str, ...] = ("image", "audio", "class")
XLSX_COLUMNS: tuple[str, ...] = ("img_type", "img_npy_name", "genre", "muse_wav_name")

# BOPD split folder -> split name.
BOPD_SPLIT_FOLDERS: dict[str, str] = {"train_set": "train", "val_set": "val"}
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPG", ".JPEG", ".PNG")

_IMG_TYPE = re.compile(r"^(?P<prefix>.*\S)-(?P<digit>\d+)$")
_AUGMENTED_STEM = re.compile(r"^(?P<base>.+)-[1-5]$")
_SPLIT_FOLDER_NAMES = frozenset(BOPD_SPLIT_FOLDERS) | frozenset(SPLITS)


@dataclass(frozen=True)
class Record:
    """One training pair: an image, the piece it is paired with, its class and split."""

    image: Path
    audio: Path
    class_id: int
    split: str


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, printed as ``<kind>: <file>: <detail> (row N)``."""

    kind: str
    file: str
    detail: str
    row: int | None = None

    def __str__(self) -> str:
        where = f" (row {self.row})" if self.row is not None else ""
        return f"{self.kind}: {self.file}: {self.detail}{where}"


@dataclass
class ManifestRow:
    """A manifest row as read, before it is known to be valid.

    ``row`` is the spreadsheet row number (the header is row 1). ``class_id`` is None when
    the class could not be read; ``split`` is ``""`` when the row names none. For a BOPD
    row whose image is in neither split folder, ``image`` is the searched pattern
    ``Img/{train_set,val_set}/...``: it does not exist, so the missing-file check names it.
    """

    row: int
    image: Path
    audio: Path
    class_id: int | None
    split: str


@dataclass
class ParsedManifest:
    """Everything :func:`parse_manifest` could read from one manifest, and what was wrong."""

    source: Path
    rows: list[ManifestRow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


# ----------------------------------------------------------------------------- classes


def class_from_img_type(img_type: str) -> int | None:
    """BOPD ``img_type`` (``coast-1``) -> class id (0), or None when malformed."""
    match = _IMG_TYPE.match(img_type.strip())
    if match is None:
        return None
    digit = int(match.group("digit"))
    return digit - 1 if 1 <= digit <= NUM_CLASSES else None


def parse_class(value: str) -> int | None:
    """CSV ``class`` cell -> class id, or None. See the module docstring for the rule."""
    value = value.strip()
    if value in CLASS_NAMES:
        return CLASS_NAMES.index(value)
    if value.isdigit():
        return None
    return class_from_img_type(value)


def _class_hint() -> str:
    return f"expected one of {', '.join(CLASS_NAMES)} or a BOPD img_type like coast-1 .. ocean_wave-6"


# ----------------------------------------------------------------------------- readers


def parse_manifest(path: str | os.PathLike) -> ParsedManifest:
    """Read a ``.csv`` manifest, a BOPD ``Label.xlsx`` or a BOPD root folder.

    Collects every problem of the manifest itself (missing columns, empty manifest, bad
    class or split values, duplicate and ambiguous rows, files that do not exist) instead
    of stopping at the first. Raises :class:`DataError` only when the manifest cannot be
    read at all: a path that does not exist, an unsupported file type, a broken xlsx.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    if path.is_dir():
        label = path / "Label" / "Label.xlsx"
        if not label.is_file():
            raise DataError(
                f"{path} is not a BOPD dataset folder: {label} not found "
                "(pass a BOPD root, its Label.xlsx, or a .csv manifest)"
            )
        parsed = _parse_xlsx(label, root=path)
    elif path.suffix.lower() == ".csv":
        parsed = _parse_csv(path)
    elif path.suffix.lower() == ".xlsx":
        root = path.parent.parent if path.parent.name == "Label" else path.parent
        parsed = _parse_xlsx(path, root=root)
    else:
        raise DataError(f"unsupported manifest {path}: expected a .csv, a .xlsx or a BOPD dataset folder")
    parsed.problems.extend(row_problems(parsed))
    return parsed


def read_manifest(
    path: str | os.PathLike, *, seed: int = 0, val_fraction: float = VAL_FRACTION
) -> list[Record]:
    """Strictly read a manifest into records, assigning splits to rows that have none.

    Raises :class:`DataError` on the first line of the first problem (with a count of
    the others); ``scripts/prepare_dataset.py`` lists them all.
    """
    parsed = parse_manifest(path)
    if parsed.problems:
        more = len(parsed.problems) - 1
        suffix = f" (+{more} more; run scripts/prepare_dataset.py {path} to list them all)" if more else ""
        raise DataError(f"invalid dataset {parsed.source}: {parsed.problems[0]}{suffix}")
    return assign_splits(_to_records(parsed.rows), seed=seed, val_fraction=val_fraction)


def _to_records(rows: Iterable[ManifestRow]) -> list[Record]:
    records = []
    for row in rows:
        assert row.class_id is not None, "rows with problems never reach _to_records"
        records.append(Record(row.image, row.audio, row.class_id, row.split))
    return records


def _resolve(base: Path, value: str) -> Path:
    candidate = Path(value)
    if not candidate.is_absolute():
        candidate = base / candidate
    return Path(os.path.normpath(candidate))


def _parse_csv(path: Path) -> ParsedManifest:
    parsed = ParsedManifest(source=path)
    base = path.absolute().parent
    try:
        # utf-8-sig: spreadsheet programs often prepend a byte-order mark to the header.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            table = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from exc
    table = [line for line in table if any(cell.strip() for cell in line)]
    column = _column_index(parsed, path, [[cell.strip() for cell in line] for line in table], CSV_REQUIRED, CSV_COLUMNS)
    if column is None:
        return parsed
    for number, line in enumerate(table[1:], start=2):
        cells = {name: (line[i].strip() if i < len(line) else "") for name, i in column.items()}
        blank = [name for name in CSV_REQUIRED if not cells[name]]
        if blank:
            parsed.problems.append(Problem("missing-value", str(path), f"empty {', '.join(blank)}", number))
            continue
        image = _resolve(base, cells["image"])
        class_id = parse_class(cells["class"])
        if class_id is None:
            parsed.problems.append(
                Problem("unknown-class", str(image), f"class {cells['class']!r}: {_class_hint()}", number)
            )
        split = cells.get("split", "").lower()
        if split and split not in SPLITS:
            parsed.problems.append(Problem("bad-split", str(image), f"split {split!r}: expected train, val or empty", number))
            split = ""
        parsed.rows.append(ManifestRow(number, image, _resolve(base, cells["audio"]), class_id, split))
    return parsed


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # spreadsheets turn a file named 12 into 12.0
    return str(value).strip()


def _load_sheet(path: Path) -> list[tuple[object, ...]]:
    try:
        import openpyxl
    except ImportError as exc:  # pragma: no cover - openpyxl is in requirements.txt
        raise DataError(f"reading {path} needs openpyxl (pip install openpyxl)") from exc
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises zipfile, KeyError and XML errors for broken files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read spreadsheet {path}: {reason}") from exc
    try:
        sheet = workbook["Sheet1"] if "Sheet1" in workbook.sheetnames else workbook.worksheets[0]
        return [tuple(row) for row in sheet.iter_rows(values_only=True)]
    finally:
        workbook.close()


def _find_bopd_image(root: Path, img_type: str, name: str) -> tuple[list[tuple[Path, str]], Path]:
    """All (path, split) where the image exists, and the pattern that was searched."""
    names = [name]
    stem, suffix = os.path.splitext(name)
    if suffix.lower() in ("", ".npy"):
        names += [stem + ext for ext in IMAGE_EXTENSIONS]
    found = []
    for folder, split in BOPD_SPLIT_FOLDERS.items():
        for candidate in names:
            image = root / "Img" / folder / img_type / candidate
            if image.is_file():
                found.append((image, split))
                break
    searched = root / "Img" / ("{" + ",".join(BOPD_SPLIT_FOLDERS) + "}") / img_type / name
    return found, searched


def _parse_xlsx(path: Path, root: Path) -> ParsedManifest:
    parsed = ParsedManifest(source=path)
    root = root.absolute()
    table = [row for row in _load_sheet(path) if any(_cell_text(v) for v in row)]
    column = _column_index(parsed, path, [[_cell_text(v) for v in row] for row in table[:1]] + table[1:],
                           XLSX_COLUMNS, XLSX_COLUMNS)
    if column is None:
        return parsed
    for number, values in enumerate(table[1:], start=2):
        cells = {name: _cell_text(values[i]) if i < len(values) else "" for name, i in column.items()}
        blank = [name for name in ("img_type", "img_npy_name", "muse_wav_name") if not cells[name]]
        if blank:
            parsed.problems.append(Problem("missing-value", str(path), f"empty {', '.join(blank)}", number))
            continue
        img_type, name = cells["img_type"], cells["img_npy_name"]
        class_id = class_from_img_type(img_type)
        found, searched = _find_bopd_image(root, img_type, name)
        if class_id is None:
            parsed.problems.append(
                Problem(
                    "malformed-img_type",
                    str(found[0][0] if found else searched),
                    f"img_type {img_type!r} does not end in -1 .. -{NUM_CLASSES}",
                    number,
                )
            )
        if len(found) > 1:
            parsed.problems.append(
                Problem("ambiguous-row", str(found[0][0]), f"image also in {found[1][0]}: its split is ambiguous", number)
            )
        image, split = found[0] if found else (searched, "")
        wav_name = cells["muse_wav_name"]
        if not os.path.splitext(wav_name)[1]:
            wav_name += ".wav"
        audio = root / "Wav" / cells["genre"] / wav_name if cells["genre"] else root / "Wav" / wav_name
        parsed.rows.append(ManifestRow(number, image, audio, class_id, split))
    return parsed


# ----------------------------------------------------------------------------- checks


def row_problems(parsed: ParsedManifest) -> list[Problem]:
    """Duplicate and ambiguous rows, and image/audio files that do not exist.

    A duplicate repeats an earlier row exactly; an ambiguous row names an image already
    seen with a different piece, class or split, so the pairing cannot be trusted.
    """
    problems: list[Problem] = []
    first_seen: dict[Path, ManifestRow] = {}
    for row in parsed.rows:
        earlier = first_seen.get(row.image)
        if earlier is None:
            first_seen[row.image] = row
        elif (earlier.audio, earlier.class_id, earlier.split) == (row.audio, row.class_id, row.split):
            problems.append(Problem("duplicate-row", str(row.image), f"repeats row {earlier.row}", row.row))
        else:
            differences = []
            if earlier.audio != row.audio:
                differences.append(f"paired with {row.audio} here but with {earlier.audio} in row {earlier.row}")
            if earlier.class_id != row.class_id:
                differences.append(f"class differs from row {earlier.row}")
            if earlier.split != row.split:
                differences.append(f"split {row.split or '(none)'} here but {earlier.split or '(none)'} in row {earlier.row}")
            problems.append(Problem("ambiguous-row", str(row.image), "; ".join(differences), row.row))

    # One line per missing file (at its first row), however many rows name it.
    uses: dict[Path, int] = defaultdict(int)
    for row in parsed.rows:
        uses[row.image] += 1
        uses[row.audio] += 1
    reported: set[Path] = set()
    for row in parsed.rows:
        for kind, file in (("missing-image", row.image), ("missing-audio", row.audio)):
            if file not in reported and not file.is_file():
                reported.add(file)
                others = uses[file] - 1
                detail = "file not found" + (f", also named by {others} later row(s)" if others else "")
                problems.append(Problem(kind, str(file), detail, row.row))
    return problems


# ----------------------------------------------------------------------------- splits


def augmentation_group(image: Path) -> tuple[str, str]:
    """Key shared by an image and its augmented copies (``x-1.jpg`` .. ``x-5.jpg`` of ``x.jpg``).

    The key is (folder, base name), with split folder names masked out of the folder so
    that ``Img/train_set/coast-1/x.jpg`` and ``Img/val_set/coast-1/x-2.jpg`` share a key
    and a leak of one image's copies across the splits can be seen.
    """
    stem = image.stem
    match = _AUGMENTED_STEM.match(stem)
    base = match.group("base") if match else stem
    folder = "/".join("*" if part in _SPLIT_FOLDER_NAMES else part for part in image.parent.parts)
    return folder, base


def assign_splits(
    records: Sequence[Record], *, seed: int = 0, val_fraction: float = VAL_FRACTION
) -> list[Record]:
    """Give a split to every record that has none; records with a split keep it.

    Unassigned records are grouped by :func:`augmentation_group`; a group whose other
    members already have a split joins that split. The remaining groups are shuffled per
    class with a generator seeded by ``(seed, class_id)`` and added to val while that moves
    the class's val count closer to ``val_fraction`` of its images (at least one group
    when the class has two or more), so small classes still get a validation example and
    the result does not depend on the order of the manifest rows.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    known_split: dict[tuple[str, str], str] = {}
    for record in records:
        if record.split:
            known_split.setdefault(augmentation_group(record.image), record.split)

    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if not record.split and augmentation_group(record.image) not in known_split:
            groups[augmentation_group(record.image)].append(index)

    by_class: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for key, members in groups.items():
        # A group that mixes classes (should not happen) goes with its most common class.
        classes = [records[i].class_id for i in members]
        by_class[max(set(classes), key=classes.count)].append(key)

    chosen: dict[tuple[str, str], str] = dict(known_split)
    for class_id, keys in by_class.items():
        keys.sort()  # a fixed order before shuffling makes the result independent of row order
        order = np.random.default_rng([seed, class_id]).permutation(len(keys))
        total = sum(len(groups[k]) for k in keys)
        target = val_fraction * total
        val_count = 0
        for position, i in enumerate(order):
            key, size = keys[i], len(groups[keys[i]])
            need_one = position == 0 and len(keys) >= 2 and val_fraction > 0
            if need_one or abs(val_count + size - target) < abs(val_count - target):
                chosen[key] = "val"
                val_count += size
            else:
                chosen[key] = "train"

    return [
        record if record.split else Record(record.image, record.audio, record.class_id, chosen[augmentation_group(record.image)])
        for record in records
    ]


def select_split(records: Iterable[Record], split: str) -> list[Record]:
    """The records of one split (``train`` or ``val``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [record for record in records if record.split == split]


# ----------------------------------------------------------------------------- writing


def _relative_or_absolute(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(path.absolute(), base)).as_posix()
    except ValueError:  # different drives on Windows
        return path.absolute().as_posix()


def write_manifest_csv(records: Iterable[Record], path: str | os.PathLike) -> Path:
    """Write records as a CSV manifest (paths relative to its folder), atomically."""
    path = Path(path)
    base = path.absolute().parent
    base.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for record in records:
            writer.writerow(
                [
                    _relative_or_absolute(record.image, base),
                    _relative_or_absolute(record.audio, base),
                    CLASS_NAMES[record.class_id],
                    record.split,
                ]
            )
    os.replace(tmp, path)
    return path


def _column_index(parsed: ParsedManifest, path: Path, table: list[list[Any]],
                  required: Sequence[str], known: Sequence[str]) -> dict[str, int] | None:
    """Column positions from the header row of a non-blank ``table``, or None after recording
    why the table has no usable rows (empty, a required column missing, header only)."""
    if not table:
        parsed.problems.append(Problem("empty-manifest", str(path), "no header and no rows"))
        return None
    header = [str(cell).lower() for cell in table[0]]
    missing = [name for name in required if name not in header]
    if missing:
        parsed.problems.append(
            Problem("missing-column", str(path), f"missing column(s) {', '.join(missing)}; header is {','.join(header)}")
        )
        return None
    if len(table) == 1:
        parsed.problems.append(Problem("empty-manifest", str(path), "header only, no rows"))
        return None
    return {name: header.index(name) for name in known if name in header}
