"""scripts/prepare_dataset.py, run as a user would: a subprocess with the project's Python."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conchshell.constants import CLASS_NAMES
from conchshell.data.manifest import read_manifest
from data_pipeline.fixtures import make_bopd, write_label_xlsx

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare_dataset.py"


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_good_dataset_writes_manifest_and_summary(tmp_path):
    fixture = make_bopd(tmp_path / "ds")
    out = tmp_path / "out" / "prepared.csv"
    result = run(fixture.root, "--out", out, "--seed", 1, "--check-decode")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    table = result.stdout.splitlines()[1:]
    assert table[0].split() == ["class", "train", "val", "total"]
    assert [line.split()[0] for line in table[1:]] == [*CLASS_NAMES, "total"]
    assert table[-1].split() == ["total", "36", "18", "54"]  # 6 classes x (2 train + 1 val) x 3 copies
    records = read_manifest(out)
    assert {(r.image, r.audio, r.class_id, r.split) for r in records} == fixture.pair_set()


def test_default_output_is_manifest_csv_in_the_root(tmp_path):
    fixture = make_bopd(tmp_path, train_per_class=1, val_per_class=0, augmented_copies=0)
    fixture.csv.unlink()
    result = run(fixture.xlsx)
    assert result.returncode == 0, result.stderr
    assert (fixture.root / "manifest.csv").is_file()


def test_broken_dataset_lists_every_problem_and_exits_1(tmp_path):
    fixture = make_bopd(tmp_path, train_per_class=1, val_per_class=0, augmented_copies=0)
    fixture.pairs[0].image.write_bytes(b"garbage")
    fixture.pairs[1].audio.unlink()
    rows = [(f"{CLASS_NAMES[p.class_id]}-{p.class_id + 1}", p.image.name, p.audio.parent.name, p.audio.name) for p in fixture.pairs]
    rows.append(("coast-1", "not_there.jpg", "beach", "beach_00.wav"))
    write_label_xlsx(fixture.xlsx, rows)
    result = run(fixture.root, "--out", tmp_path / "m.csv")
    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if ": " in line and not line.startswith(str(fixture.xlsx))]
    kinds = sorted(line.split(":")[0] for line in problems)
    assert kinds == ["corrupt-image", "missing-audio", "missing-image"], result.stderr
    assert any(fixture.pairs[0].image.name in line for line in problems)
    assert any(fixture.pairs[1].audio.name in line for line in problems)
    assert any("not_there.jpg" in line for line in problems)
    assert not (tmp_path / "m.csv").exists()
    assert "Traceback" not in result.stderr


def test_unreadable_input_is_one_line_and_exit_2(tmp_path):
    missing = run(tmp_path / "no_such_dataset")
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "no_such_dataset" in missing.stderr
    (tmp_path / "Label").mkdir()
    (tmp_path / "Label" / "Label.xlsx").write_text("not a spreadsheet")
    broken = run(tmp_path)
    assert broken.returncode == 2
    assert broken.stderr.strip().count("\n") == 0 and "Label.xlsx" in broken.stderr
    assert "Traceback" not in missing.stderr + broken.stderr
