from pathlib import Path

import pytest
import torch

from conchshell.config import load_config
from conchshell.errors import CheckpointError
from conchshell.models.factory import build_codec, build_frontend, build_tcnn_from_config, load_module_weights

ROOT = Path(__file__).resolve().parents[2]


def test_missing_pretrained_file_says_how_to_get_it(tmp_path):
    config = load_config(ROOT / "configs" / "conchshell.yaml")
    config.codec.checkpoint = str(tmp_path / "vqvae.pth.tar")
    with pytest.raises(CheckpointError, match=r"codec weights not found: .*vqvae.pth.tar .*fetch_pretrained"):
        build_codec(config)
    config.image.tcnn_checkpoint = str(tmp_path / "TCNN.pt")
    with pytest.raises(CheckpointError, match=r"tcnn weights not found: .*TCNN.pt .*train.stage=tcnn"):
        build_frontend(config)


def test_project_tcnn_weights_round_trip(tmp_path):
    config = load_config(ROOT / "configs" / "tiny.yaml")
    tcnn = build_tcnn_from_config(config)
    path = tmp_path / "TCNN.pt"
    torch.save({"state_dict": tcnn.state_dict()}, path)
    config.image.tcnn_checkpoint = str(path)
    loaded = build_tcnn_from_config(config)
    for key, value in tcnn.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    torch.save({"state_dict": {"bogus": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="TCNN.pt does not match TCNN6"):
        load_module_weights(build_tcnn_from_config(config, load_weights=False), path)
