"""The demo corpus: layout, audio and image format, pairing rule, traits and determinism."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from conchshell.constants import CLASS_NAMES, SAMPLE_RATE
from conchshell.data.demo import CLASS_TRAITS, TINY, build_demo_corpus, draw_example_scenes, draw_scene
from conchshell.data.demo.corpus import IMAGE_SIZE_WH, LABEL_HEADER, img_type
from conchshell.data.demo.music import estimate_key
from conchshell.errors import DataError

SEED = 7


def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "corpus"
    manifest = build_demo_corpus(out, clips_per_class=TINY.clips_per_class, images_per_class=TINY.images_per_class, seed=SEED)
    assert manifest == out / "manifest.csv"
    return out


def test_counts_per_class_and_split(corpus: Path) -> None:
    for c, name in enumerate(CLASS_NAMES):
        train = sorted((corpus / "Img" / "train_set" / img_type(c)).glob("*.jpg"))
        val = sorted((corpus / "Img" / "val_set" / img_type(c)).glob("*.jpg"))
        assert len(train) + len(val) == TINY.images_per_class
        assert len(val) == 1  # 15 % of 4, at least one
        assert len(sorted((corpus / "Wav" / "piano").glob(f"{name}_*.wav"))) == TINY.clips_per_class
    assert img_type(0) == "coast-1" and img_type(5) == "ocean_wave-6"


def test_wavs_are_16k_mono_8s_pcm16_and_not_silent(corpus: Path) -> None:
    wavs = sorted((corpus / "Wav" / "piano").glob("*.wav"))
    assert len(wavs) == len(CLASS_NAMES) * TINY.clips_per_class
    for path in wavs:
        info = soundfile.info(str(path))
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (SAMPLE_RATE, 1, 128_000, "PCM_16")
        wave, _ = soundfile.read(str(path), dtype="float32")
        assert 0.9 < np.abs(wave).max() <= 1.0  # peak-normalised
        assert np.sqrt(np.mean(wave**2)) > 0.02
        # Sound throughout the clip, not only at its start.
        quarters = np.array_split(wave, 4)
        assert all(np.sqrt(np.mean(q**2)) > 0.005 for q in quarters)


def test_images_open_at_the_stored_size(corpus: Path) -> None:
    images = sorted((corpus / "Img").rglob("*.jpg"))
    assert len(images) == len(CLASS_NAMES) * TINY.images_per_class
    for path in images:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == IMAGE_SIZE_WH


def test_manifest_references_existing_files_and_pairs_within_class(corpus: Path) -> None:
    with (corpus / "manifest.csv").open(encoding="utf-8") as handle:
        assert handle.readline().strip() == "image,audio,class,split"
    rows = _read_csv(corpus / "manifest.csv")
    assert len(rows) == len(CLASS_NAMES) * TINY.images_per_class
    used = Counter()
    for row in rows:
        assert "\\" not in row["image"] and not row["image"].startswith("/")
        assert (corpus / row["image"]).is_file() and (corpus / row["audio"]).is_file()
        assert row["split"] in {"train", "val"}
        assert row["image"].split("/")[1] == f"{row['split']}_set"
        assert row["image"].split("/")[2] == img_type(CLASS_NAMES.index(row["class"]))
        assert Path(row["audio"]).name.startswith(row["class"] + "_")
        used[row["audio"]] += 1
    # Every clip is heard by at least one image; with 4 images and 2 clips, by exactly two.
    assert sorted(used.values()) == [2] * (len(CLASS_NAMES) * TINY.clips_per_class)


def test_label_xlsx_matches_manifest(corpus: Path) -> None:
    from openpyxl import load_workbook

    sheet = load_workbook(corpus / "Label" / "Label.xlsx", read_only=True)["Sheet1"]
    table = [tuple(r) for r in sheet.iter_rows(values_only=True)]
    assert table[0] == LABEL_HEADER
    expected = [(Path(r["image"]).parent.name, Path(r["image"]).name, "piano", Path(r["audio"]).name) for r in _read_csv(corpus / "manifest.csv")]
    assert table[1:] == expected


def test_clip_traits_follow_the_class_rule(corpus: Path) -> None:
    clips = _read_csv(corpus / "clips.csv")
    assert len(clips) == len(CLASS_NAMES) * TINY.clips_per_class
    assert len({c["source"] for c in clips}) == len(clips)  # no piece is used twice
    for clip in clips:
        target = CLASS_TRAITS[clip["class"]]
        assert clip["mode"] == target.mode
        assert abs(float(clip["mean_pitch"]) - target.register_centre) <= 1.0
        assert target.density[0] <= float(clip["notes_per_second"]) < target.density[1]
        assert float(clip["tempo_bpm"]) == target.tempo_bpm
    # Register alone orders the classes as their centres do.
    mean_pitch = {n: np.mean([float(c["mean_pitch"]) for c in clips if c["class"] == n]) for n in CLASS_NAMES}
    by_centre = sorted(CLASS_NAMES, key=lambda n: CLASS_TRAITS[n].register_centre)
    assert [mean_pitch[n] for n in by_centre] == sorted(mean_pitch.values())
    density = {n: np.mean([float(c["notes_per_second"]) for c in clips if c["class"] == n]) for n in CLASS_NAMES}
    assert density["ocean_wave"] > density["coast"] > density["deep"]


def test_register_is_audible_in_the_waveform(corpus: Path) -> None:
    """Spectral centroid of the rendered audio: deep (G2) clips sit far below coral reef (G#5) clips."""

    def centroid(path: Path) -> float:
        wave, rate = soundfile.read(str(path), dtype="float32")
        power = np.abs(np.fft.rfft(wave)) ** 2
        freqs = np.fft.rfftfreq(len(wave), 1 / rate)
        return float((freqs * power).sum() / power.sum())

    wavs = corpus / "Wav" / "piano"
    deep = max(centroid(p) for p in wavs.glob("deep_*.wav"))
    reef = min(centroid(p) for p in wavs.glob("coral_reef_*.wav"))
    assert reef > 2 * deep


def test_same_seed_is_byte_identical_and_another_seed_differs(corpus: Path, tmp_path: Path) -> None:
    reference = _tree_hashes(corpus)
    again = build_demo_corpus(tmp_path / "again", clips_per_class=TINY.clips_per_class, images_per_class=TINY.images_per_class, seed=SEED)
    assert _tree_hashes(again.parent) == reference
    other = build_demo_corpus(tmp_path / "other", clips_per_class=TINY.clips_per_class, images_per_class=TINY.images_per_class, seed=SEED + 1)
    # File names do not depend on the seed, but the val split, music and pictures do.
    by_name = {Path(k).name: v for k, v in reference.items()}
    other_by_name = {Path(k).name: v for k, v in _tree_hashes(other.parent).items()}
    assert other_by_name.keys() == by_name.keys()
    changed = [name for name in by_name if by_name[name] != other_by_name[name]]
    assert any(n.endswith(".wav") for n in changed) and any(n.endswith(".jpg") for n in changed)


def test_rebuild_replaces_a_demo_build_but_refuses_a_foreign_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        build_demo_corpus(foreign, clips_per_class=1, images_per_class=1)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="images_per_class"):
        build_demo_corpus(tmp_path / "x", clips_per_class=2, images_per_class=1)


def test_scenes_are_seeded_and_differ_between_classes() -> None:
    first = [np.asarray(draw_scene(n, np.random.default_rng(3), (160, 120)), np.float32) for n in CLASS_NAMES]
    again = np.asarray(draw_scene("coast", np.random.default_rng(3), (160, 120)), np.float32)
    assert np.array_equal(first[0], again)
    assert not np.array_equal(first[0], np.asarray(draw_scene("coast", np.random.default_rng(4), (160, 120)), np.float32))
    # The deep sea is far darker than every other class.
    brightness = {n: img.mean() for n, img in zip(CLASS_NAMES, first)}
    assert brightness["deep"] < 0.5 * min(v for n, v in brightness.items() if n != "deep")
    with pytest.raises(ValueError, match="unknown class"):
        draw_scene("lake", np.random.default_rng(0))


def test_key_estimate_recognises_major_and_minor() -> None:
    c_major = [60, 62, 64, 65, 67, 69, 71, 72, 64, 67, 60]
    a_minor = [57, 59, 60, 62, 64, 65, 68, 69, 60, 64, 57]
    assert estimate_key(c_major, [1.0] * len(c_major))[:2] == ("C", "major")
    assert estimate_key(a_minor, [1.0] * len(a_minor))[:2] == ("A", "minor")


def test_project_loader_reads_all_three_manifest_forms(corpus: Path) -> None:
    """The demo corpus is what conchshell.data.manifest reads: CSV, Label.xlsx and bare root agree."""
    from conchshell.data.manifest import read_manifest
    from conchshell.data.validate import validate_dataset

    pairs = [
        {(r.image.resolve(), r.audio.resolve(), r.class_id, r.split) for r in read_manifest(source)}
        for source in (corpus / "manifest.csv", corpus / "Label" / "Label.xlsx", corpus)
    ]
    assert len(pairs[0]) == len(CLASS_NAMES) * TINY.images_per_class
    assert pairs[0] == pairs[1] == pairs[2]
    report = validate_dataset(corpus / "manifest.csv", check_decode=True)
    assert report.ok and not report.warnings, report.lines()


def test_committed_examples_are_the_held_out_scenes_and_not_corpus_images(corpus: Path, tmp_path: Path) -> None:
    """examples/ is what `build_demo_corpus.py --examples examples` draws; no corpus image is one of them."""
    drawn = draw_example_scenes(tmp_path / "examples")
    assert [p.name for p in drawn] == [f"{name}.jpg" for name in CLASS_NAMES]
    committed = Path(__file__).resolve().parents[2] / "examples"
    for path in drawn:
        assert path.read_bytes() == (committed / path.name).read_bytes(), f"examples/{path.name} is stale"
    corpus_images = {hashlib.sha256(p.read_bytes()).hexdigest() for p in corpus.rglob("*.jpg")}
    assert not corpus_images & {hashlib.sha256(p.read_bytes()).hexdigest() for p in drawn}
