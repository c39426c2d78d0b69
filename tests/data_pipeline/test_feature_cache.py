"""Frozen-feature cache: scripts/extract_features.py and conchshell.data.feature_cache.

The real tiny frontend (seeded TCNN + I3D at 224 x 224) costs seconds per image on CPU, so
one module-scoped extraction over two good images and a corrupt one serves the tests
that need real features; the mechanics (resume, atomic writes, corrupt entries) use a
cheap stand-in frontend.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conchshell.config import load_config
from conchshell.data.dataset import ImageMusicDataset
from conchshell.data.feature_cache import (
    FeatureCache,
    LatentCache,
    codec_fingerprint,
    collate_cached,
    extract_image_features,
    frontend_fingerprint,
    load_validation_clip,
    open_for_config,
    open_latents_for_config,
)
from conchshell.data.image import load_image
from conchshell.data.manifest import read_manifest
from conchshell.models.factory import build_codec, build_frontend
from conchshell.models.frontend import ImageFrontend
from data_pipeline.fixtures import write_csv, write_jpeg, write_wav

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def load_script():
    spec = importlib.util.spec_from_file_location("extract_features_script", REPO / "scripts" / "extract_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = load_script()


def run_script(*args: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = SCRIPT.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def count_calls(monkeypatch, cls: type) -> list[int]:
    """Count forward calls of every instance of ``cls``."""
    calls = [0]
    original = cls.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counted)
    return calls


@pytest.fixture(scope="module")
def config():
    return load_config(TINY)


@pytest.fixture(scope="module")
def frontend(config):
    return build_frontend(config)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """One real extraction: images a, b (good), c (corrupt); pieces x (val), y (train)."""
    root = tmp_path_factory.mktemp("feature_cache")
    data = root / "data"
    write_jpeg(data / "a.jpg", (200, 40, 30), size=(64, 48))
    write_jpeg(data / "b.jpg", (20, 90, 210), size=(48, 64))
    (data / "c.jpg").write_bytes(b"not a jpeg at all")
    write_wav(data / "x.wav", seconds=0.8, freq=330.0)
    write_wav(data / "y.wav", seconds=0.3, freq=550.0)
    rows = [["a.jpg", "x.wav", "coast", "val"], ["b.jpg", "y.wav", "deep", "train"], ["c.jpg", "x.wav", "island", "val"]]
    manifest = write_csv(data / "with_corrupt.csv", rows)
    good_manifest = write_csv(data / "good.csv", rows[:2])
    cache_root = root / "cache"
    code, stdout, stderr = run_script("--config", TINY, "--manifest", manifest, "--out", cache_root, "--latents", "--batch-size", 2)
    return dict(data=data, manifest=manifest, good_manifest=good_manifest, cache_root=cache_root,
                code=code, stdout=stdout, stderr=stderr)


# ----------------------------------------------------------------------------- real frontend


def test_first_run_stores_what_the_frontend_computes_and_reports_the_corrupt_image(extracted, config, frontend):
    assert extracted["code"] == 1
    corrupt = str(extracted["data"] / "c.jpg")
    assert any(line.startswith("unreadable: ") and corrupt in line for line in extracted["stderr"].splitlines())
    assert "Traceback" not in extracted["stderr"]

    # The work done before and after the corrupt file is kept.
    cache = FeatureCache(extracted["cache_root"], frontend_fingerprint(config, frontend))
    assert cache.exists() and len(cache) == 2 and extracted["data"] / "c.jpg" not in cache
    paths = [extracted["data"] / "a.jpg", extracted["data"] / "b.jpg"]
    direct_features, direct_classes = frontend(torch.stack([load_image(p) for p in paths]))
    for path, features, pred in zip(paths, direct_features, direct_classes):
        cached_features, cached_pred = cache.get(path)
        assert cached_features.dtype == torch.float32 and cached_features.shape == (2048,)
        assert cached_pred.dtype == torch.int64 and cached_pred.ndim == 0
        torch.testing.assert_close(cached_features, features, rtol=1e-5, atol=1e-5)
        assert int(cached_pred) == int(pred)


def test_second_run_computes_nothing(extracted, monkeypatch):
    calls = count_calls(monkeypatch, ImageFrontend)
    code, stdout, stderr = run_script("--config", TINY, "--manifest", extracted["good_manifest"], "--out", extracted["cache_root"])
    assert code == 0, stderr
    assert calls[0] == 0
    assert "features: 2 distinct file(s), 2 already cached, 0 computed, 0 failed" in stdout


def test_renamed_and_copied_images_hit_the_cache(extracted, config, frontend, tmp_path, monkeypatch):
    cache = FeatureCache(extracted["cache_root"], frontend_fingerprint(config, frontend))
    original = extracted["data"] / "a.jpg"
    renamed = tmp_path / "elsewhere" / "renamed.jpg"
    renamed.parent.mkdir()
    shutil.copy(original, tmp_path / "moving.jpg")
    (tmp_path / "moving.jpg").rename(renamed)
    assert renamed in cache
    torch.testing.assert_close(cache.get(renamed)[0], cache.get(original)[0], rtol=0, atol=0)

    shutil.copy(extracted["data"] / "x.wav", tmp_path / "x.wav")
    manifest = write_csv(tmp_path / "m.csv", [[str(renamed), "x.wav", "coast", "train"]])
    calls = count_calls(monkeypatch, ImageFrontend)
    code, stdout, _ = run_script("--config", TINY, "--manifest", manifest, "--out", extracted["cache_root"])
    assert code == 0 and calls[0] == 0
    assert "1 already cached, 0 computed" in stdout


def test_latents_are_the_codec_encoding_of_the_validation_crop(extracted, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        codec = build_codec(config)
    cache = LatentCache(extracted["cache_root"], codec_fingerprint(config, codec))
    piece = extracted["data"] / "x.wav"
    assert len(cache) == 1 and extracted["data"] / "y.wav" not in cache  # y is only in a training row
    # The same clip a validation dataset item holds.
    record = read_manifest(extracted["good_manifest"])[0]
    item = ImageMusicDataset([record], sample_rate=config.data.sample_rate, clip_seconds=config.data.clip_seconds, train=False)[0]
    clip = load_validation_clip(piece, sample_rate=config.data.sample_rate, clip_samples=config.clip_samples)
    torch.testing.assert_close(clip, item["audio"], rtol=0, atol=0)
    with torch.inference_mode():
        expected = codec.encode(clip.unsqueeze(0))[0]
    latent = cache.get(piece)
    assert latent.shape == (config.codec.emb_width, config.latent_length)
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)


def test_changing_a_frozen_model_changes_the_fingerprint(extracted, config, frontend):
    fingerprint = frontend_fingerprint(config, frontend)
    assert fingerprint.startswith("frontend-")
    assert frontend_fingerprint(config) == fingerprint  # rebuilt from the config: same weights, same folder
    changed = {
        "image.i3d_seed=2": load_config(TINY, ["image.i3d_seed=2"]),
        "image.tcnn_seed=2": load_config(TINY, ["image.tcnn_seed=2"]),
        "image.grouping=original": load_config(TINY, ["image.grouping=original"]),
    }
    fingerprints = {name: frontend_fingerprint(cfg) for name, cfg in changed.items()}
    assert len(set(fingerprints.values()) | {fingerprint}) == 4, fingerprints

    # A config whose model changed finds no cache, and says why in one line.
    stale = load_config(TINY, ["image.i3d_seed=2", f"data.feature_cache={extracted['cache_root']}"])
    with pytest.warns(UserWarning, match="other models") as caught:
        assert open_for_config(stale) is None
    assert all("\n" not in str(w.message) for w in caught)
    # The current models find it.
    current = load_config(TINY, [f"data.feature_cache={extracted['cache_root']}"])
    assert open_for_config(current, frontend).directory == extracted["cache_root"] / fingerprint
    assert open_latents_for_config(current) is not None

    other_codec = load_config(TINY, ["codec.seed=3"])
    assert codec_fingerprint(other_codec) != codec_fingerprint(config)
    assert codec_fingerprint(load_config(TINY, ["data.clip_seconds=0.25"])) != codec_fingerprint(config)


def test_dataset_items_carry_cached_features(extracted, config, frontend, tmp_path):
    cache = open_for_config(load_config(TINY, [f"data.feature_cache={extracted['cache_root']}"]), frontend)
    write_jpeg(tmp_path / "new.jpg", (1, 2, 3))
    rows = [
        [str(extracted["data"] / "a.jpg"), str(extracted["data"] / "x.wav"), "coast", "train"],
        [str(extracted["data"] / "b.jpg"), str(extracted["data"] / "y.wav"), "deep", "train"],
        [str(tmp_path / "new.jpg"), str(extracted["data"] / "y.wav"), "deep", "train"],
    ]
    records = read_manifest(write_csv(tmp_path / "m.csv", rows))
    dataset = ImageMusicDataset(records, clip_seconds=config.data.clip_seconds, train=True, feature_cache=cache)
    items = [dataset[i] for i in range(3)]
    for item, record in zip(items[:2], records[:2]):
        features, pred = cache.get(record.image)
        assert item["features"].dtype == torch.float32 and item["features"].shape == (2048,)
        assert item["pred_class"].dtype == torch.int64 and item["pred_class"].ndim == 0
        torch.testing.assert_close(item["features"], features, rtol=0, atol=0)
        assert int(item["pred_class"]) == int(pred)
    assert "features" not in items[2] and "pred_class" not in items[2]  # not cached: computed on the fly

    complete = collate_cached(items[:2])
    assert complete["features"].shape == (2, 2048) and complete["pred_class"].shape == (2,)
    mixed = collate_cached(items)
    assert "features" not in mixed and "pred_class" not in mixed and mixed["image"].shape == (3, 3, 224, 224)


# ----------------------------------------------------------------------------- mechanics (stand-in frontend)


class StandInFrontend(nn.Module):
    """Cheap deterministic images -> (features [B,2048], class) with the frontend's interface."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.fail_on_call = fail_on_call

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # what Ctrl-C looks like inside the loop
        features = images.flatten(1)[:, ::7][:, :2048].float()
        return features, (images.mean(dim=(1, 2, 3)) > 0).long()


def stand_in_images(folder: Path, count: int) -> list[Path]:
    return [write_jpeg(folder / f"img{i}.jpg", (40 * i, 255 - 30 * i, 17 * i)) for i in range(count)]


def test_interrupted_run_resumes_where_it_stopped(tmp_path):
    images = stand_in_images(tmp_path / "img", 5)
    cache = FeatureCache(tmp_path / "cache", "frontend-test")
    with pytest.raises(KeyboardInterrupt):
        extract_image_features(StandInFrontend(fail_on_call=2), cache, images, batch_size=2)
    assert len(cache) == 2 and [p in cache for p in images] == [True, True, False, False, False]
    assert not list(cache.directory.rglob(".tmp-*"))

    resumed = StandInFrontend()
    report = extract_image_features(resumed, cache, images, batch_size=2)
    assert (report.total, report.reused, report.computed, report.failures) == (5, 2, 3, [])
    assert resumed.calls == 2  # only the three missing images, in batches of two
    expected, classes = StandInFrontend()(torch.stack([load_image(p) for p in images]))
    for path, features, pred in zip(images, expected, classes):
        got = cache.get(path)
        torch.testing.assert_close(got[0], features, rtol=0, atol=0)
        assert int(got[1]) == int(pred)


def test_identical_images_are_computed_once_and_a_killed_write_leaves_nothing(tmp_path, monkeypatch):
    images = stand_in_images(tmp_path / "img", 2)
    shutil.copy(images[0], tmp_path / "img" / "copy_of_0.jpg")
    cache = FeatureCache(tmp_path / "cache", "frontend-test")

    def killed_save(obj, handle):
        handle.write(b"half a file")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", killed_save)
        with pytest.raises(KeyboardInterrupt):
            extract_image_features(StandInFrontend(), cache, images + [tmp_path / "img" / "copy_of_0.jpg"])
    assert len(cache) == 0 and not [p for p in cache.directory.rglob("*") if p.is_file()]

    frontend = StandInFrontend()
    report = extract_image_features(frontend, cache, images + [tmp_path / "img" / "copy_of_0.jpg"], batch_size=8)
    assert (report.total, report.computed, frontend.calls) == (2, 2, 1)
    assert tmp_path / "img" / "copy_of_0.jpg" in cache


def test_a_damaged_entry_is_a_miss_with_a_warning(tmp_path):
    images = stand_in_images(tmp_path / "img", 1)
    cache = FeatureCache(tmp_path / "cache", "frontend-test")
    extract_image_features(StandInFrontend(), cache, images)
    cache.item_path(cache.digest(images[0])).write_bytes(b"\x00" * 10)
    with pytest.warns(UserWarning, match="treating it as missing"):
        assert cache.get(images[0]) is None


def test_unset_or_empty_cache_folder_means_compute_on_the_fly(tmp_path, config, frontend):
    assert open_for_config(config, frontend) is None  # data.feature_cache unset: silent
    empty = load_config(TINY, [f"data.feature_cache={tmp_path / 'nothing'}"])
    with pytest.warns(UserWarning, match="no frontend entries"):
        assert open_for_config(empty, frontend) is None


def test_script_without_a_cache_folder_or_with_a_broken_manifest_exits_2(tmp_path):
    code, _, stderr = run_script("--config", TINY, "--manifest", tmp_path / "none.csv")
    assert code == 2 and "--out" in stderr
    code, _, stderr = run_script("--config", TINY, "--manifest", tmp_path / "none.csv", "--out", tmp_path / "c")
    assert code == 2 and "none.csv" in stderr and "Traceback" not in stderr
