"""fetch_pretrained verifies and places files; exercised offline through file:// URLs."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from compat import seeded_state_dict
from conchshell.errors import CheckpointError, ConchShellError
from conchshell.utils.files import file_sha256

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fetch(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fetch_pretrained", ROOT / "scripts" / "fetch_pretrained.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fetch_pretrained", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "CHECKSUMS", tmp_path / "pretrained.sha256")
    return module


def official_jukebox_file(tmp_path: Path) -> Path:
    state = {"module." + k: v for k, v in seeded_state_dict("jukebox_vqvae_keys.tsv", 1, 1.0).items()}
    path = tmp_path / "served" / "vqvae.pth.tar"
    path.parent.mkdir()
    torch.save({"model": state}, path)
    return path


def item(fetch, source: Path, destination: Path, name="jukebox"):
    return fetch.Pretrained(name, source.as_uri(), destination, fetch.FILES[name].loader)


def test_download_is_verified_recorded_and_then_enforced(fetch, tmp_path):
    source = official_jukebox_file(tmp_path)
    destination = tmp_path / "checkpoints" / "jukebox" / "vqvae.pth.tar"
    fetch.fetch(item(fetch, source, destination))
    assert destination.read_bytes() == source.read_bytes()
    assert fetch.read_pinned() == {"jukebox": file_sha256(source)}

    # Same pinned hash, different bytes: refused, and the good file stays in place.
    torch.save({"model": {}, "junk": torch.zeros(1)}, source)
    with pytest.raises(ConchShellError, match="checksum mismatch"):
        fetch.fetch(item(fetch, source, destination), force=True)
    assert file_sha256(destination) == fetch.read_pinned()["jukebox"]
    assert not list(destination.parent.glob(".vqvae*"))


def test_wrong_network_is_rejected_and_nothing_is_placed(fetch, tmp_path):
    source = official_jukebox_file(tmp_path)
    destination = tmp_path / "I3D" / "rgb_imagenet.pt"
    with pytest.raises(CheckpointError, match="missing"):
        fetch.fetch(item(fetch, source, destination, name="i3d"))
    assert not destination.exists()
    assert fetch.read_pinned() == {}
    assert list(destination.parent.iterdir()) == []


def test_cli_reports_one_line_on_failure(fetch, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nowhere.pt"
    monkeypatch.setitem(fetch.FILES, "jukebox", item(fetch, missing, tmp_path / "out.pt"))
    assert fetch.main(["--only", "jukebox"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
