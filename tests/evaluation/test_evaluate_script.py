"""scripts/evaluate.py end to end: directory mode against direct pesq/pystoi, and checkpoint mode."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pesq
import pytest
import soundfile as sf
from PIL import Image
from pystoi import stoi
import torch

from conchshell.config import load_config
from conchshell.constants import CLASS_NAMES
from conchshell.evaluation import spectral_pitch
from conchshell.export import save_generator_export
from conchshell.inference import ImageToMusic
from conchshell.models.factory import build_generator_from_config
from conchshell.models.generator import build_generator

ROOT = Path(__file__).resolve().parents[2]
RATE = 16_000
_spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
evaluate = importlib.util.module_from_spec(_spec)
sys.modules["evaluate_script"] = evaluate  # dataclasses look their module up while being defined
_spec.loader.exec_module(evaluate)


def phrase(seed: int, seconds: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    gate = ((t * 4) % 1.0 < 0.8).astype(np.float64)
    pitch = 200.0 * 2 ** (seed / 12)
    return (0.5 * np.sin(2 * np.pi * pitch * t) * gate + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture
def folders(tmp_path):
    generated, reference = tmp_path / "generated", tmp_path / "reference"
    generated.mkdir()
    reference.mkdir()
    for seed in range(3):
        clean = phrase(seed)
        sf.write(reference / f"clip{seed}.wav", clean, RATE, subtype="PCM_16")
        degraded = clean + 0.05 * np.random.default_rng(seed + 7).standard_normal(clean.size)
        sf.write(generated / f"clip{seed}.wav", np.clip(degraded, -1, 1), RATE, subtype="PCM_16")
    sf.write(reference / "quiet.wav", phrase(5), RATE, subtype="PCM_16")
    sf.write(generated / "quiet.wav", np.zeros(2 * RATE, np.float32), RATE, subtype="PCM_16")
    sf.write(generated / "extra.wav", phrase(6), RATE)  # no reference: reported, not scored
    return generated, reference


def test_directory_mode_reproduces_direct_pesq_and_stoi(folders, tmp_path, capsys):
    generated, reference = folders
    out = tmp_path / "report"
    assert evaluate.main(["--generated", str(generated), "--reference", str(reference), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    items = {row["name"]: row for row in csv.DictReader(open(out / "items.csv"))}

    direct_pesq = {}
    for name in ("clip0.wav", "clip1.wav", "clip2.wav"):
        ref, _ = sf.read(reference / name)
        deg, _ = sf.read(generated / name)
        direct_pesq[name] = pesq.pesq(RATE, ref, deg, "wb")
        assert float(items[name]["pesq"]) == pytest.approx(direct_pesq[name], abs=1e-3)
        assert float(items[name]["stoi"]) == pytest.approx(stoi(ref, deg, RATE), abs=1e-4)

    # The silent output cannot be scored by PESQ: counted, named, and kept out of the mean.
    scores = report["systems"]["generated"]["pesq"]
    assert (scores["n_valid"], scores["n_total"], scores["n_failed"]) == (3, 4, 1)
    assert scores["mean"] == pytest.approx(np.mean(list(direct_pesq.values())), abs=1e-3)
    assert items["quiet.wav"]["pesq"] == "" and items["quiet.wav"]["pesq_error"]
    assert report["failures"]["generated"]["pesq"][0][0] == "quiet.wav"
    assert report["unpaired"]["generated_only"] == ["extra.wav"]
    summary = list(csv.DictReader(open(out / "metrics.csv")))
    assert {(r["system"], r["metric"]) for r in summary} >= {("generated", m) for m in (
        "pesq", "stoi", "mel_l1", "mrstft", "register", "register_r")}
    register = report["systems"]["generated"]["register"]
    assert register["n_valid"] == 3 and register["failure_reasons"] == {"silent clip": 1}
    for name in ("clip0.wav", "clip1.wav"):
        ref, _ = sf.read(reference / name)
        deg, _ = sf.read(generated / name)
        assert float(items[name]["reference_register"]) == pytest.approx(spectral_pitch(ref, RATE), abs=1e-6)
        assert float(items[name]["register"]) == pytest.approx(spectral_pitch(deg, RATE), abs=1e-6)

    table = capsys.readouterr().out
    assert "PESQ" in table and "(3/4)" in table and "could not score 1 of 4" in table
    assert "register r (MAE)" in table and " st)" in table
    assert "class consistency: skipped" in table


def test_directory_mode_untrained_folder_pairs_by_name(folders, tmp_path, capsys):
    generated, reference = folders
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    for name in ("clip0.wav", "clip1.wav", "quiet.wav", "stray.wav"):  # clip2.wav missing
        sf.write(untrained / name, 0.3 * phrase(9), RATE, subtype="PCM_16")
    out = tmp_path / "report"
    code = evaluate.main(["--generated", str(generated), "--reference", str(reference),
                          "--untrained", str(untrained), "--out", str(out)])
    assert code == 1  # an item without its untrained clip is an error, the report is still written
    assert "clip2.wav: no untrained generator clip" in capsys.readouterr().err
    report = json.loads((out / "metrics.json").read_text())
    assert report["unpaired"]["untrained_only"] == ["stray.wav"]
    assert report["systems"]["untrained_generator"]["stoi"]["n_total"] == 3
    assert report["systems"]["generated"]["stoi"]["n_total"] == 4
    items = {row["name"]: row for row in csv.DictReader(open(out / "items.csv"))}
    assert items["clip0.wav"]["untrained_stoi"] and items["clip2.wav"]["untrained_stoi"] == ""

    with pytest.raises(SystemExit):
        evaluate.parse_args(["--generated", str(generated), "--reference", str(reference), "--untrained-baseline"])


def test_directory_mode_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sf.write(tmp_path / "a" / "x.wav", phrase(0), RATE)
    sf.write(tmp_path / "b" / "y.wav", phrase(0), RATE)
    assert evaluate.main(["--generated", str(tmp_path / "a"), "--reference", str(tmp_path / "b"),
                          "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no file name is in both")


def _tiny_dataset(root: Path) -> Path:
    """Two classes x (2 train + 1 val) images with 1 s class-specific tunes."""
    rows = []
    for class_id in (0, 3):
        name = CLASS_NAMES[class_id]
        for k in range(3):
            t = np.arange(RATE) / RATE
            tune = 0.6 * np.sin(2 * np.pi * 130 * 2 ** class_id * (1 + 0.03 * k) * t) * ((t * (2 + class_id)) % 1 < 0.7)
            sf.write(root / f"{name}_{k}.wav", tune.astype(np.float32), RATE)
            Image.new("RGB", (40, 30), (60 * class_id, 120, 40 * k)).save(root / f"{name}_{k}.jpg")
            rows.append((f"{name}_{k}.jpg", f"{name}_{k}.wav", name, "val" if k == 2 else "train"))
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("image", "audio", "class", "split"))
        writer.writerows(rows)
    return root / "manifest.csv"


def test_checkpoint_mode_generates_scores_and_rescores_identically(tmp_path, capsys):
    config = load_config(ROOT / "configs" / "tiny.yaml")
    export = save_generator_export(tmp_path / "G.pt", build_generator_from_config(config), config, step=1)
    manifest = _tiny_dataset(tmp_path)
    out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        code = evaluate.main(["--checkpoint", str(export), "--data", str(manifest), "--split", "val",
                              "--out", str(out), "--device", "cpu"])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["n_items"] == 2 and report["class_target"] == "label"
    for kind in ("generated", "reference", "codec"):
        wavs = sorted((out / kind).glob("*.wav"))
        assert len(wavs) == 2 and all(sf.info(str(w)).frames == config.clip_samples for w in wavs)
    assert set(report["systems"]) == {"generated", "codec_ceiling", "reference"}
    consistency = report["systems"]["generated"]["class_consistency"]
    assert consistency["n_total"] == 2 and consistency["chance"] == pytest.approx(1 / 6)
    assert report["classifier"]["num_train_pieces"] == 4 and (out / "audio_classifier.pt").is_file()
    assert "codec ceiling" in capsys.readouterr().out

    # The written files and labels, scored in directory mode, give the same numbers.
    again = tmp_path / "again"
    assert evaluate.main(["--generated", str(out / "generated"), "--reference", str(out / "reference"),
                          "--labels", str(out / "labels.csv"), "--classifier", str(out / "audio_classifier.pt"),
                          "--out", str(again)]) == 0
    rescored = json.loads((again / "metrics.json").read_text())
    for key in ("pesq", "stoi", "mel_l1", "mrstft", "class_consistency"):
        assert rescored["systems"]["generated"][key] == report["systems"]["generated"][key]


@pytest.mark.needs_bf16_kernels
def test_checkpoint_mode_generates_at_the_requested_precision(tmp_path, monkeypatch):
    config = load_config(ROOT / "configs" / "tiny.yaml")
    export = save_generator_export(tmp_path / "G.pt", build_generator_from_config(config), config, step=1)
    manifest = _tiny_dataset(tmp_path)
    precisions = []
    load = ImageToMusic.from_checkpoint
    monkeypatch.setattr(ImageToMusic, "from_checkpoint",
                        lambda *args, **kwargs: precisions.append(kwargs.get("precision")) or load(*args, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert evaluate.main(["--checkpoint", str(export), "--data", str(manifest), "--limit", "1",
                              "--precision", "mixed", "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert precisions == ["mixed"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["precision"] == "mixed"


def test_untrained_baseline_is_the_seeded_architecture_and_rescores_identically(tmp_path, capsys, monkeypatch):
    config = load_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(1)  # the "trained" weights: any draw but the baseline's seed
    trained = build_generator_from_config(config)
    export = save_generator_export(tmp_path / "G.pt", trained, config, step=1)
    manifest = _tiny_dataset(tmp_path)
    out = tmp_path / "eval"
    frontend_calls = []
    original_features = ImageToMusic.image_features
    monkeypatch.setattr(ImageToMusic, "image_features",
                        lambda self, images: frontend_calls.append(len(images)) or original_features(self, images))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        code = evaluate.main(["--checkpoint", str(export), "--data", str(manifest), "--split", "val",
                              "--untrained-baseline", "--seed", "0", "--out", str(out), "--device", "cpu"])
        assert frontend_calls == [1, 1]  # two images, each through TCNN and I3D once for both generators
        # The baseline must be exactly build_generator(**hparams) seeded with --seed, behind the
        # checkpoint's frontend and codec: the same weights saved as an export generate the same clips.
        torch.manual_seed(0)
        twin = build_generator(**trained.hparams)
        twin_model = ImageToMusic.from_checkpoint(save_generator_export(tmp_path / "U.pt", twin, config, 1), "cpu")
    assert code == 0
    names = sorted(p.name for p in (out / "untrained").glob("*.wav"))
    assert names == sorted(p.name for p in (out / "generated").glob("*.wav")) and len(names) == 2
    for name in names:
        untrained, _ = sf.read(out / "untrained" / name, dtype="float32")
        generated, _ = sf.read(out / "generated" / name, dtype="float32")
        expected = twin_model.generate(tmp_path / f"{name.split('_', 1)[1][:-4]}.jpg")[0]
        assert untrained.shape == (config.clip_samples,)
        np.testing.assert_allclose(untrained, expected, atol=1.5 / 32768)  # 16-bit wav rounding
        assert not np.allclose(untrained, generated, atol=1e-3)

    report = json.loads((out / "metrics.json").read_text())
    assert list(report["systems"]) == ["generated", "untrained_generator", "codec_ceiling", "reference"]
    baseline = report["systems"]["untrained_generator"]
    assert {k: baseline[k]["n_total"] for k in ("pesq", "stoi", "mel_l1", "mrstft", "class_consistency")} == \
        dict.fromkeys(("pesq", "stoi", "mel_l1", "mrstft", "class_consistency"), 2)
    assert baseline["mel_l1"]["mean"] != report["systems"]["generated"]["mel_l1"]["mean"]
    assert report["untrained_baseline"] == {"seed": 0, "generator_hparams": trained.hparams}
    summary = {(r["system"], r["metric"]) for r in csv.DictReader(open(out / "metrics.csv"))}
    assert summary >= {("untrained_generator", m) for m in ("pesq", "stoi", "mel_l1", "mrstft", "class_accuracy")}
    columns = next(csv.reader(open(out / "items.csv")))
    assert {"untrained_pesq", "untrained_stoi", "untrained_mel_l1", "untrained_mrstft",
            "class_untrained_generator"} <= set(columns)
    assert "untrained generator" in capsys.readouterr().out

    again = tmp_path / "again"
    assert evaluate.main(["--generated", str(out / "generated"), "--reference", str(out / "reference"),
                          "--untrained", str(out / "untrained"), "--labels", str(out / "labels.csv"),
                          "--classifier", str(out / "audio_classifier.pt"), "--out", str(again)]) == 0
    rescored = json.loads((again / "metrics.json").read_text())
    for system in ("generated", "untrained_generator"):
        for key in ("pesq", "stoi", "mel_l1", "mrstft", "class_consistency"):
            assert rescored["systems"][system][key] == report["systems"][system][key]


def test_codec_domain_classifier_learns_from_the_codecs_reconstructions(tmp_path, monkeypatch):
    import conchshell.evaluation
    from conchshell.data.audio import load_audio
    from conchshell.data.manifest import read_manifest
    from conchshell.evaluation import reference_windows

    config = load_config(ROOT / "configs" / "tiny.yaml")
    export = save_generator_export(tmp_path / "G.pt", build_generator_from_config(config), config, step=1)
    records = read_manifest(_tiny_dataset(tmp_path))
    heard = []
    real_fit = conchshell.evaluation.fit_audio_classifier

    def recording_fit(clips, labels):
        heard.append(np.array(clips))
        return real_fit(clips, labels)

    monkeypatch.setattr(conchshell.evaluation, "fit_audio_classifier", recording_fit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = ImageToMusic.from_checkpoint(export, device="cpu")
        _, info = evaluate.classifier_from_manifest(records, config.data.clip_seconds, tmp_path / "c", model)
    assert info["domain"] == "codec" and info["num_train_pieces"] == 4
    # Every training clip is the codec's reconstruction of a train piece's window, not the window.
    windows = [w for path in sorted({r.audio for r in records if r.split == "train"})
               for w in reference_windows(load_audio(path, RATE), config.clip_samples)]
    assert len(heard[0]) == len(windows) == info["num_train_clips"]
    for clip, window in zip(heard[0], windows):
        np.testing.assert_allclose(clip, model.reconstruct(window), atol=1e-6)
        assert not np.allclose(clip, window, atol=1e-3)


def test_codec_domain_needs_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--generated", str(tmp_path), "--reference", str(tmp_path), "--classifier-domain", "codec"])
    assert "--classifier-domain codec" in capsys.readouterr().err
