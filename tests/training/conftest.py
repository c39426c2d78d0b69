"""Session fixtures of the training tests: a tiny demo corpus and its frozen-feature cache.

The frontend (full-size I3D, seeded) costs ~1.2 s per image on CPU, so the corpus used by
the GAN runs is cut to 6 training and 2 validation images and their features are
extracted once per session; runs then read them from the cache like a real training run
would. One test runs without the cache to cover the on-the-fly path.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conchshell.data.demo import TINY, build_demo_corpus

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TRAIN_ITEMS = 6
VAL_ITEMS = 2


@dataclass(frozen=True)
class TinyCorpus:
    manifest: Path  # TRAIN_ITEMS train rows (every class represented where possible) + VAL_ITEMS val rows
    feature_cache: Path  # features of every image of `manifest` for configs/tiny.yaml's frozen nets


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: no launcher variables, 2 threads at most."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = str(REPO)
    return env


def _small_manifest(full: Path, out: Path) -> Path:
    with open(full, newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    # Round-robin over classes so the few rows still cover several classes.
    by_class: dict[str, list[dict[str, str]]] = {}
    for row in train:
        by_class.setdefault(row["class"], []).append(row)
    picked: list[dict[str, str]] = []
    while len(picked) < TRAIN_ITEMS:
        for rows_of_class in by_class.values():
            if rows_of_class and len(picked) < TRAIN_ITEMS:
                picked.append(rows_of_class.pop(0))
    picked += val[:VAL_ITEMS]
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "audio", "class", "split"])
        writer.writeheader()
        for row in picked:
            writer.writerow({**row, "image": str((full.parent / row["image"]).resolve()),
                             "audio": str((full.parent / row["audio"]).resolve())})
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> TinyCorpus:
    root = tmp_path_factory.mktemp("tiny_corpus")
    full = build_demo_corpus(root / "corpus", clips_per_class=TINY.clips_per_class,
                             images_per_class=TINY.images_per_class, seed=0)
    manifest = _small_manifest(full, root / "small.csv")
    cache = root / "features"
    result = subprocess.run(
        [PYTHON, "scripts/extract_features.py", "--config", "configs/tiny.yaml", "--manifest", str(manifest),
         "--out", str(cache), "--device", "cpu"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return TinyCorpus(manifest=manifest, feature_cache=cache)
