"""The demo model shipped in weights/demo/: intact, loadable, and the README's first command works.

These run the real trained weights on CPU (no seeded stand-ins except the documented I3D),
so they check exactly what a new user gets from ``python inference.py``.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conchshell.constants import CLASS_NAMES
from conchshell.inference import ImageToMusic

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "demo"
EXAMPLES = ROOT / "examples"
WEIGHT_FILES = ("tcnn.pt", "codec.pt", "generator.pt")


def checksums() -> dict[str, str]:
    lines = (DEMO / "SHA256SUMS").read_text().splitlines()
    return {name.strip(): digest for digest, name in (line.split(maxsplit=1) for line in lines if line.strip())}


def test_shipped_weights_match_their_checksums_and_the_size_limit():
    listed = checksums()
    assert sorted(listed) == sorted(WEIGHT_FILES)
    for name, digest in listed.items():
        assert hashlib.sha256((DEMO / name).read_bytes()).hexdigest() == digest, f"{name} does not match SHA256SUMS"
    assert sum((DEMO / name).stat().st_size for name in WEIGHT_FILES) <= 25_000_000


def test_shipped_weights_are_weights_only_files():
    for name in WEIGHT_FILES:
        data = torch.load(DEMO / name, map_location="cpu", weights_only=True)
        assert isinstance(data["state_dict"], dict) and data["state_dict"]


def test_shipped_config_rebuilds_i3d_from_its_seed_and_names_the_shipped_files():
    model = ImageToMusic.from_checkpoint(DEMO / "generator.pt", device="cpu")
    image, codec = model.config.image, model.config.codec
    assert image.i3d_checkpoint is None and image.i3d_seed is not None
    assert Path(image.tcnn_checkpoint) == DEMO / "tcnn.pt"
    assert Path(codec.checkpoint) == DEMO / "codec.pt"


def test_demo_model_turns_an_example_image_into_8_s_of_16_khz_audio(tmp_path):
    model = ImageToMusic.from_checkpoint(DEMO / "generator.pt", device="cpu")
    result = model.run(EXAMPLES / "coast.jpg")
    assert result.sample_rate == 16_000
    assert result.waveform.shape == (128_000,)
    assert np.isfinite(result.waveform).all() and np.abs(result.waveform).max() > 1e-3


def test_readme_first_command_writes_a_wav_and_a_spectrogram_per_example(tmp_path):
    """``python inference.py`` with no arguments, from any folder."""
    done = subprocess.run([sys.executable, str(ROOT / "inference.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "generated"
    assert str(out.resolve()) in done.stdout  # it says where the files are
    for name in CLASS_NAMES:
        audio, rate = sf.read(out / f"{name}.wav")
        assert rate == 16_000 and audio.shape == (128_000,)
        assert (out / f"{name}.png").stat().st_size > 0


@pytest.mark.parametrize("name", WEIGHT_FILES)
def test_a_corrupt_shipped_file_is_reported_by_name(tmp_path, name):
    import shutil

    copy = tmp_path / "demo"
    shutil.copytree(DEMO, copy)
    (copy / name).write_bytes(b"not a torch file")
    done = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--img_path", str(EXAMPLES / "deep.jpg"),
                           "--checkpoint", str(copy / "generator.pt"), "--out", str(tmp_path / "x.wav")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error:") and name in done.stderr
    assert not (tmp_path / "x.wav").exists()
