"""Atomic checkpoint writes, crash safety, rotation, best tracking, exports and provenance."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conchshell.errors import CheckpointError
from conchshell.training.checkpointing import (
    BEST_JSON,
    BEST_NAME,
    CheckpointManager,
    export_weights,
    git_commit,
    save_checkpoint,
    save_config_next_to,
)
from conchshell.training.distributed import capture_rng_state
from conchshell.utils.checkpoint import read_weights

REPO_ROOT = Path(__file__).resolve().parents[2]


def _training_state(step: int) -> dict:
    """A state shaped like the real loop's: model, optimizer, scheduler, config, rng, commit."""
    torch.manual_seed(step)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.5, 0.999), eps=1e-5,
                                  weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20_000, gamma=0.8)
    model(torch.randn(2, 2, 8)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": {"train": {"batch_size": 2, "lr": 1e-5}, "codec": {"downs_t": [3, 2, 2]}},
        "git_commit": "abc123-dirty",
        "rng": [capture_rng_state()],
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _tiny(step: int) -> dict:
    return {"step": step, "w": torch.full((4,), float(step))}


def test_full_training_state_round_trips_with_weights_only(tmp_path):
    state = _training_state(7)
    path = tmp_path / "run" / "ckpt.pt"
    save_checkpoint(state, path)
    _assert_same(state, CheckpointManager.load(path))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp left behind


@pytest.mark.parametrize("bad, where", [
    ({"lr": np.float64(0.1)}, "state['lr']"),
    ({"nested": [1, {"path": Path("x")}]}, "state['nested'][1]['path']"),
    ({"arr": np.zeros(3)}, "state['arr']"),
    ({(1, 2): 3}, "key (1, 2)"),
])
def test_save_rejects_values_weights_only_cannot_load(tmp_path, bad, where):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(CheckpointError, match=re.escape(where)):
        save_checkpoint(bad, path)
    assert list(tmp_path.iterdir()) == []


def test_exception_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt-step=00000001.pt"
    save_checkpoint(_tiny(1), path)
    real_save = torch.save

    def half_then_fail(obj, handle, *args, **kwargs):
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_tiny(2), path)
    monkeypatch.undo()
    _assert_same(CheckpointManager.load(path), _tiny(1))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_killed_mid_write_leaves_old_version_and_a_temp_the_manager_removes(tmp_path):
    out_dir = tmp_path / "run"
    manager = CheckpointManager(out_dir)
    old = manager.save(1, _tiny(1))
    # A child process starts overwriting step 1, gets half the bytes out, then dies by SIGKILL:
    # no Python cleanup runs, exactly like an OOM kill or a pre-empted node.
    script = textwrap.dedent(f"""
        import io, os, signal, torch
        from conchshell.training.checkpointing import save_checkpoint
        real_save = torch.save
        def half_then_die(obj, handle, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = half_then_die
        save_checkpoint({{"step": 2, "w": torch.zeros(100_000)}}, {str(old)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()

    temps = [p for p in out_dir.iterdir() if p.name.startswith(".tmp-")]
    assert len(temps) == 1 and temps[0].stat().st_size > 0
    _assert_same(CheckpointManager.load(old), _tiny(1))  # final name still the complete old one
    assert manager.latest() == old  # the temp is never mistaken for a checkpoint
    CheckpointManager(out_dir)  # a restarted run cleans up
    assert sorted(p.name for p in out_dir.iterdir()) == [old.name]


def test_keep_last_prunes_oldest_after_writing_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    paths = [manager.save(step, _tiny(step)) for step in (100, 200, 300, 400, 500)]
    assert paths[-1].name == "ckpt-step=00000500.pt"
    assert [s for s, _ in manager.checkpoints()] == [400, 500]
    assert manager.latest() == paths[-1]
    _assert_same(manager.load(manager.latest()), _tiny(500))
    # Resumed from an earlier step: the new file is kept even though it has the lowest step.
    manager.save(450, _tiny(450))
    assert [s for s, _ in manager.checkpoints()] == [450, 500]


def test_best_checkpoint_tracks_improvements_only(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1, metric_mode="min")
    for step, metric in [(1, 3.0), (2, 2.0), (3, 2.5), (4, float("nan")), (5, None)]:
        manager.save(step, _tiny(step), metric=metric)
    assert (manager.best_metric, manager.best_step) == (2.0, 2)
    assert json.loads((tmp_path / BEST_JSON).read_text()) == {"metric": 2.0, "step": 2, "mode": "min"}
    best = manager.load(manager.best_path)
    assert best["best"] == {"metric": 2.0, "step": 2, "mode": "min"}
    assert torch.equal(best["w"], _tiny(2)["w"])  # survives pruning of ckpt-step=2
    assert [s for s, _ in manager.checkpoints()] == [5]

    # A resumed run continues from the recorded best instead of overwriting it with a worse one.
    resumed = CheckpointManager(tmp_path, keep_last=1, metric_mode="min")
    assert resumed.best_metric == 2.0
    resumed.save(6, _tiny(6), metric=2.1)
    assert resumed.load(resumed.best_path)["best"]["step"] == 2
    resumed.save(7, _tiny(7), metric=1.5)
    assert resumed.load(resumed.best_path)["best"]["step"] == 7
    with pytest.raises(CheckpointError, match="metric_mode"):
        CheckpointManager(tmp_path, metric_mode="max")


def test_best_checkpoint_max_mode(tmp_path):
    manager = CheckpointManager(tmp_path, metric_mode="max")
    for step, metric in [(1, 0.2), (2, 0.1), (3, 0.9)]:
        manager.save(step, _tiny(step), metric=metric)
    assert (manager.best_metric, manager.best_step) == (0.9, 3)
    assert (tmp_path / BEST_NAME).is_file()


def test_latest_ignores_temps_junk_and_truncated_files(tmp_path):
    manager = CheckpointManager(tmp_path)
    assert manager.latest() is None
    good = manager.save(10, _tiny(10))
    (tmp_path / ".tmp-ckpt-step=00000099.pt-4242").write_bytes(b"partial")
    (tmp_path / "ckpt-step=abc.pt").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_text("hello")
    truncated = manager.path_for(20)
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.warns(UserWarning, match="incomplete"):
        assert manager.latest() == good


def test_load_of_truncated_file_raises_checkpoint_error_naming_it(tmp_path):
    path = tmp_path / "ckpt-step=00000001.pt"
    save_checkpoint(_tiny(1), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        CheckpointManager.load(path)
    with pytest.raises(CheckpointError, match="not found"):
        CheckpointManager.load(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        CheckpointManager.load(tmp_path / "list.pt")


def test_export_weights_is_loadable_weights_only(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "G-step=12.pt"
    export_weights(model.state_dict(), path, {"step": 12, "git_commit": "abc"})
    loaded = read_weights(path)
    assert loaded["step"] == 12 and loaded["git_commit"] == "abc"
    fresh = nn.Linear(3, 2)
    fresh.load_state_dict(loaded["state_dict"])
    assert torch.equal(fresh.weight, model.weight)
    with pytest.raises(CheckpointError, match="reserved"):
        export_weights(model.state_dict(), path, {"state_dict": 1})
    with pytest.raises(CheckpointError, match="not tensors"):
        export_weights({"w": 1.0}, path)


def test_config_yaml_keeps_key_order(tmp_path):
    config = {"train": {"steps": 10, "lr": 1e-5}, "data": {"manifest": "m.csv"}, "a": [1, 2]}
    path = save_config_next_to(config, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert yaml.safe_load(path.read_text()) == config
    assert list(yaml.safe_load(path.read_text())) == ["train", "data", "a"]
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]


def test_git_commit_inside_and_outside_git(tmp_path):
    commit = git_commit()
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert git_commit(tmp_path) is None
