"""Manifests (BOPD xlsx and CSV), the train/val split, and whole-dataset validation."""
from __future__ import annotations

import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conchshell.constants import CLASS_NAMES
from conchshell.data.manifest import (
    Record,
    assign_splits,
    augmentation_group,
    parse_class,
    parse_manifest,
    read_manifest,
    select_split,
    write_manifest_csv,
)
from conchshell.data.validate import validate_dataset
from conchshell.errors import DataError
from data_pipeline.fixtures import make_bopd, write_csv, write_jpeg, write_label_xlsx, write_wav


def as_set(records: list[Record]) -> set[tuple[Path, Path, int, str]]:
    return {(r.image, r.audio, r.class_id, r.split) for r in records}


# ----------------------------------------------------------------------------- reading


def test_xlsx_csv_and_root_folder_give_the_same_pairs(tmp_path):
    fixture = make_bopd(tmp_path)
    from_xlsx = read_manifest(fixture.xlsx)
    from_csv = read_manifest(fixture.csv)
    from_root = read_manifest(fixture.root)
    assert len(from_xlsx) == len(fixture.pairs) == 6 * 3 * 3
    assert as_set(from_xlsx) == as_set(from_csv) == as_set(from_root) == fixture.pair_set()


def test_bopd_split_comes_from_the_folder_and_class_from_the_img_type_digit(tmp_path):
    fixture = make_bopd(tmp_path, train_per_class=1, val_per_class=1, augmented_copies=0)
    for record in read_manifest(fixture.xlsx):
        folder = record.image.parents[1].name
        assert record.split == {"train_set": "train", "val_set": "val"}[folder]
        assert record.image.parent.name == f"{CLASS_NAMES[record.class_id]}-{record.class_id + 1}"


def test_bopd_npy_names_and_wav_names_without_extension_are_resolved(tmp_path):
    image = write_jpeg(tmp_path / "Img" / "train_set" / "deep-5" / "a.jpg", (1, 2, 3))
    audio = write_wav(tmp_path / "Wav" / "ocean" / "p1.wav")
    write_label_xlsx(tmp_path / "Label" / "Label.xlsx", [("deep-5", "a.npy", "ocean", "p1")])
    assert read_manifest(tmp_path) == [Record(image, audio, 4, "train")]


def test_class_rule():
    assert parse_class("sand_beach") == 2
    assert parse_class("coast-1") == 0
    assert parse_class("anything-6") == 5  # the BOPD digit decides, as in the folders
    assert parse_class("2") is None  # bare numbers are ambiguous (0- or 1-based)
    assert parse_class("coast-7") is None
    assert parse_class("volcano") is None


def test_csv_paths_relative_to_its_folder_or_absolute_and_split_optional(tmp_path):
    image = write_jpeg(tmp_path / "data" / "x.jpg", (5, 5, 5))
    audio = write_wav(tmp_path / "audio" / "y.wav")
    manifest = write_csv(tmp_path / "data" / "m.csv", [["x.jpg", str(audio), "island"]], header=("image", "audio", "class"))
    records = read_manifest(manifest)
    assert [(r.image, r.audio, r.class_id) for r in records] == [(image, audio, 1)]
    assert records[0].split in ("train", "val")


def test_write_manifest_round_trip(tmp_path):
    fixture = make_bopd(tmp_path)
    records = read_manifest(fixture.xlsx)
    out = write_manifest_csv(records, tmp_path / "out" / "manifest.csv")
    text = out.read_text()
    assert text.splitlines()[0] == "image,audio,class,split"
    assert "../Img/" in text  # relative to the CSV's own folder
    assert read_manifest(out) == records


def test_read_manifest_raises_on_problems_and_bad_paths(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="not a BOPD"):
        read_manifest(tmp_path)
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported"):
        read_manifest(tmp_path / "m.txt")
    (tmp_path / "Label").mkdir()
    (tmp_path / "Label" / "Label.xlsx").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="cannot read spreadsheet"):
        read_manifest(tmp_path)
    bad = write_csv(tmp_path / "bad.csv", [["a.jpg", "b.wav", "coast", ""], ["c.jpg", "d.wav", "coast", ""]])
    with pytest.raises(DataError, match=r"a\.jpg.*\+3 more"):
        read_manifest(bad)


# ----------------------------------------------------------------------------- splits


def synthetic_records(bases_per_class: int, copies: int) -> list[Record]:
    records = []
    for class_id, name in enumerate(CLASS_NAMES):
        folder = Path("/data") / f"{name}-{class_id + 1}"
        for b in range(bases_per_class):
            stems = [f"img{b:03d}"] + [f"img{b:03d}-{k}" for k in range(1, copies + 1)]
            records += [Record(folder / f"{s}.jpg", Path(f"/wav/{b}.wav"), class_id, "") for s in stems]
    return records


def test_split_is_85_15_stratified_and_keeps_augmented_copies_together():
    records = assign_splits(synthetic_records(bases_per_class=40, copies=5), seed=0)
    for class_id in range(len(CLASS_NAMES)):
        of_class = [r for r in records if r.class_id == class_id]
        val = sum(r.split == "val" for r in of_class)
        assert abs(val / len(of_class) - 0.15) <= 0.5 * 6 / len(of_class)  # within half a group of 15 %
    splits_of_group = defaultdict(set)
    for r in records:
        splits_of_group[augmentation_group(r.image)].add(r.split)
    assert len(splits_of_group) == 6 * 40
    assert all(len(s) == 1 for s in splits_of_group.values())
    assert Counter(r.split for r in records)["val"] == len(select_split(records, "val"))


def test_split_is_deterministic_by_seed_and_independent_of_row_order():
    records = synthetic_records(bases_per_class=20, copies=2)
    first = assign_splits(records, seed=3)
    assert first == assign_splits(records, seed=3)
    shuffled = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
    assert as_set(assign_splits(shuffled, seed=3)) == as_set(first)
    assert as_set(assign_splits(records, seed=4)) != as_set(first)


def test_given_splits_are_kept_and_pull_their_augmented_copies_along():
    records = synthetic_records(bases_per_class=10, copies=2)
    records[0] = Record(records[0].image, records[0].audio, records[0].class_id, "val")  # img000.jpg of coast
    result = assign_splits(records, seed=0)
    assert [r.split for r in result[:3]] == ["val", "val", "val"]


def test_tiny_classes_still_get_one_val_group():
    records = assign_splits(synthetic_records(bases_per_class=2, copies=0), seed=0)
    for class_id in range(len(CLASS_NAMES)):
        assert [r.split for r in records if r.class_id == class_id].count("val") == 1


# ----------------------------------------------------------------------------- validation


def test_good_dataset_validates_with_no_problems(tmp_path):
    fixture = make_bopd(tmp_path)
    for source in (fixture.root, fixture.csv):
        report = validate_dataset(source, check_decode=True)
        assert report.ok, report.lines()
        assert as_set(report.records) == fixture.pair_set()


def test_csv_validation_reports_every_broken_case_at_once(tmp_path):
    fixture = make_bopd(tmp_path, train_per_class=1, val_per_class=1, augmented_copies=0)
    root = fixture.root
    good_image = fixture.pairs[0].image.relative_to(root).as_posix()
    good_audio = fixture.pairs[0].audio.relative_to(root).as_posix()
    write_jpeg(root / "extra" / "lonely.jpg", (9, 9, 9))
    write_jpeg(root / "extra" / "strange.jpg", (9, 9, 9))
    (root / "extra" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (root / "extra" / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    write_jpeg(root / "extra" / "with_broken.jpg", (9, 9, 9))
    other_audio = fixture.pairs[2].audio  # island's piece, not coast's.relative_to(root).as_posix()
    rows = [[p.image.relative_to(root).as_posix(), p.audio.relative_to(root).as_posix(), CLASS_NAMES[p.class_id], p.split] for p in fixture.pairs]
    rows += [
        ["Img/train_set/coast-1/missing_image.jpg", good_audio, "coast", "train"],
        ["extra/lonely.jpg", "Wav/beach/missing_piece.wav", "coast", "train"],
        ["extra/garbage.jpg", good_audio, "coast", "train"],
        ["extra/with_broken.jpg", "extra/broken.wav", "coast", "train"],
        rows[0],  # duplicate
        ["extra/strange.jpg", good_audio, "volcano", "train"],
        [good_image, other_audio, "coast", "train"],  # same image, other piece
    ]
    manifest = write_csv(root / "broken.csv", rows)
    n = len(fixture.pairs)

    report = validate_dataset(manifest)
    lines = report.lines()
    assert not report.ok and report.records == []

    def has(kind: str, name: str, row: int) -> bool:
        return any(line.startswith(f"{kind}: ") and name in line and line.endswith(f"(row {row})") for line in lines)

    assert has("missing-image", "missing_image.jpg", n + 2)
    assert has("missing-audio", "missing_piece.wav", n + 3)
    assert has("corrupt-image", "garbage.jpg", n + 4)
    assert has("unreadable-audio", "broken.wav", n + 5)
    assert has("duplicate-row", Path(good_image).name, n + 6)
    assert has("unknown-class", "strange.jpg", n + 7)
    assert has("ambiguous-row", Path(good_image).name, n + 8)
    assert len(report.problems) == 7, lines


def test_xlsx_validation_reports_layout_problems(tmp_path):
    fixture = make_bopd(tmp_path, train_per_class=1, val_per_class=1, augmented_copies=0)
    root = fixture.root
    # The same image in both split folders: which split is it?
    twin = fixture.pairs[0].image
    shutil.copy(twin, root / "Img" / "val_set" / twin.parent.name / twin.name)
    write_jpeg(root / "Img" / "train_set" / "coast" / "noclass.jpg", (1, 1, 1))
    sf.write(root / "Wav" / "beach" / "empty.wav", np.zeros(0, np.float32), 16000)
    write_jpeg(root / "Img" / "train_set" / "island-2" / "silent_pair.jpg", (1, 1, 1))
    nan_wav = root / "Wav" / "ocean" / "nan.wav"
    sf.write(nan_wav, np.full(100, np.nan, np.float32), 16000, subtype="FLOAT")
    write_jpeg(root / "Img" / "train_set" / "island-2" / "nan_pair.jpg", (1, 1, 1))
    rows = [(f"{CLASS_NAMES[p.class_id]}-{p.class_id + 1}", p.image.name, p.audio.parent.name, p.audio.name) for p in fixture.pairs]
    rows += [
        ("coast", "noclass.jpg", "beach", "beach_00.wav"),
        ("island-2", "silent_pair.jpg", "beach", "empty.wav"),
        ("island-2", "nan_pair.jpg", "ocean", "nan.wav"),
    ]
    write_label_xlsx(fixture.xlsx, rows)

    header_only = validate_dataset(root)
    assert any(l.startswith("ambiguous-row: ") and twin.name in l for l in header_only.lines())
    assert any(l.startswith("malformed-img_type: ") and "noclass.jpg" in l for l in header_only.lines())
    assert any(l.startswith("unreadable-audio: ") and "empty.wav" in l for l in header_only.lines())
    assert not any("nan.wav" in l for l in header_only.lines())  # headers are fine; only decoding finds NaN

    decoded = validate_dataset(root, check_decode=True)
    assert any(l.startswith("unreadable-audio: ") and "nan.wav" in l and "NaN" in l for l in decoded.lines())
    assert len(decoded.problems) == 4, decoded.lines()


@pytest.mark.parametrize(
    "header, rows, kind",
    [
        (("image", "audio"), [["a.jpg", "b.wav"]], "missing-column"),
        (("image", "audio", "class", "split"), [], "empty-manifest"),
    ],
)
def test_structural_problems(tmp_path, header, rows, kind):
    manifest = write_csv(tmp_path / "m.csv", rows, header=header)
    report = validate_dataset(manifest)
    assert [l.split(":")[0] for l in report.lines()] == [kind]
    assert str(manifest) in report.lines()[0]


def test_xlsx_missing_column_and_split_leak_warning(tmp_path):
    write_label_xlsx(tmp_path / "Label" / "Label.xlsx", [("coast-1", "a.jpg", "beach")], header=("img_type", "img_npy_name", "genre"))
    assert [p.kind for p in parse_manifest(tmp_path).problems] == ["missing-column"]

    fixture = make_bopd(tmp_path / "leak", train_per_class=1, val_per_class=1, augmented_copies=1)
    copy = next(p.image for p in fixture.pairs if p.image.name.endswith("-1.jpg") and p.split == "train")
    moved = fixture.root / "Img" / "val_set" / copy.parent.name / copy.name
    copy.rename(moved)
    report = validate_dataset(fixture.root)
    assert report.ok
    assert any(w.startswith("warning: split-leak: ") and copy.name in w for w in report.lines())
