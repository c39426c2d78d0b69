"""scripts/package_demo.py on tiny exports written by the stages' own export code."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conchshell.config import load_config
from conchshell.errors import ConchShellError
from conchshell.export import load_generator_export, save_generator_export
from conchshell.inference import ImageToMusic
from conchshell.models.factory import build_generator_from_config
from conchshell.training.distributed import DistInfo
from conchshell.training.stages import build_stage

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("package_demo", ROOT / "scripts" / "package_demo.py")
package_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(package_demo)
CPU = DistInfo(rank=0, local_rank=0, world_size=1, is_main=True, device=torch.device("cpu"), backend=None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three stage folders as train.py leaves them: a best export and a metrics.jsonl each."""
    root = tmp_path_factory.mktemp("runs")
    folders = {name: root / name for name in ("tcnn", "vqvae", "gan")}
    for folder in folders.values():
        folder.mkdir()
    tiny = ROOT / "configs" / "tiny.yaml"
    for stage_name, folder in (("tcnn", folders["tcnn"]), ("vqvae", folders["vqvae"])):
        stage = build_stage(load_config(tiny, ["train.device=cpu", f"train.stage={stage_name}"]), CPU)
        stage.export(folder / f"{stage.export_prefix}-best.pt", step=5)
    config = load_config(tiny, [f"image.tcnn_checkpoint={folders['tcnn'] / 'TCNN-best.pt'}",
                                f"codec.checkpoint={folders['vqvae'] / 'codec-best.pt'}",
                                f"data.feature_cache={root / 'features'}"])
    save_generator_export(folders["gan"] / "G-best.pt", build_generator_from_config(config), config, step=7)
    rows = {"tcnn": [{"step": 5, "tcnn/cross_entropy": 1.2}, {"step": 5, "val/cross_entropy": 1.4}],
            "vqvae": [{"step": 5, "vqvae/loss": 3.0}, {"step": 5, "val/reconstruction": 2.9}],
            "gan": [{"step": 7, "g/mel": 1.1, "d/loss": 2.0, "g/adversarial": 0.3}, {"step": 7, "val/mel_l1": 1.0}]}
    for name, lines in rows.items():
        (folders[name] / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folders["tcnn"] / "config.yaml").write_text("name: tiny\n")
    return folders


def test_package_holds_loadable_checksummed_weights_that_name_each_other(runs, tmp_path):
    out = tmp_path / "demo"
    package_demo.package(runs["tcnn"], runs["vqvae"], runs["gan"], out, limit_mb=25)
    listed = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert sorted(listed) == ["codec.pt", "generator.pt", "tcnn.pt"]
    for name, digest in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert (out / "training_curves.png").stat().st_size > 0 and (out / "config.yaml").is_file()
    assert not list(out.glob(".staging*"))
    assert (out / "runs" / "tcnn.yaml").read_text() == "name: tiny\n"

    model = ImageToMusic.from_checkpoint(out / "generator.pt", device="cpu")
    assert Path(model.config.image.tcnn_checkpoint) == out / "tcnn.pt"
    assert Path(model.config.codec.checkpoint) == out / "codec.pt"
    assert model.config.data.feature_cache is None
    shipped = torch.load(out / "tcnn.pt", weights_only=True)["state_dict"]
    trained = torch.load(runs["tcnn"] / "TCNN-best.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(shipped[k], trained[k]) for k in trained)


def test_over_the_size_limit_nothing_is_replaced(runs, tmp_path):
    out = tmp_path / "demo"
    package_demo.package(runs["tcnn"], runs["vqvae"], runs["gan"], out, limit_mb=25)
    before = (out / "SHA256SUMS").read_bytes()
    with pytest.raises(ConchShellError, match="over the 0.001 MB limit"):
        package_demo.package(runs["tcnn"], runs["vqvae"], runs["gan"], out, limit_mb=0.001)
    assert (out / "SHA256SUMS").read_bytes() == before and not list(out.glob(".staging*"))


def test_a_missing_export_is_named(runs, tmp_path):
    assert package_demo.main(["--tcnn", str(tmp_path / "nowhere"), "--codec", str(runs["vqvae"]),
                              "--gan", str(runs["gan"]), "--out", str(tmp_path / "demo")]) == 1


def test_a_run_started_from_another_continues_its_curve_and_keeps_both_configs(runs, tmp_path):
    first, second = tmp_path / "gan_first", tmp_path / "gan_second"
    first.mkdir()
    second.mkdir()
    (first / "config.yaml").write_text("name: first\n")
    rows = [{"step": 5, "g/mel": 1.5}, {"step": 10, "g/mel": 1.2}, {"step": 10, "val/mel_l1": 1.3},
            {"step": 15, "g/mel": 1.0}]  # after the checkpoint the second run started from
    (first / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (second / "config.yaml").write_text(f"name: second\ntrain:\n  init_from: {first}/ckpt-step=00000010.pt\n")
    (second / "metrics.jsonl").write_text(json.dumps({"step": 7, "g/mel": 0.9}) + "\n")
    generator, config, _ = load_generator_export(runs["gan"] / "G-best.pt")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=str(first / "x.pt")))
    save_generator_export(second / "G-best.pt", generator, config, step=7)

    assert package_demo.run_phases(second) == [(first, 0), (second, 10)]
    points = package_demo.curve_points("gan", package_demo.run_phases(second))
    assert points["g/mel"] == [(5, 1.5), (10, 1.2), (17, 0.9)] and points["val/mel_l1"] == [(10, 1.3)]

    out = tmp_path / "demo"
    package_demo.package(runs["tcnn"], runs["vqvae"], second, out, limit_mb=25)
    assert ImageToMusic.from_checkpoint(out / "generator.pt", device="cpu").config.train.init_from is None
    assert (out / "runs" / "gan.yaml").read_text().startswith("name: second")
    assert (out / "runs" / "gan.phase1.yaml").read_text() == "name: first\n"
