"""Crash-safe checkpoints: atomic writes, rotation, best-by-validation tracking, resume.

Every file is written to a temporary name in the destination folder, flushed to disk and
renamed over the final name (``os.replace`` is atomic on POSIX and Windows). A run killed
mid-write therefore leaves the previous complete file untouched plus, at worst, a stale
``.tmp-*`` file that :class:`CheckpointManager` removes when it starts.

Checkpoints are read back with ``torch.load(weights_only=True)``, which only unpickles
tensors, dicts, lists, tuples, str, int, float, bool and None. The training state must be
built from those alone: module/optimizer/scheduler ``state_dict()`` results, the config as a
plain dict (``dataclasses.asdict``), the git commit as a str, RNG states from
:func:`conchshell.training.distributed.capture_rng_state`. ``save_checkpoint`` checks this
before writing, so a numpy scalar or a ``Path`` fails at save time, not at resume time.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from conchshell.errors import CheckpointError
from conchshell.utils.checkpoint import read_weights
from conchshell.utils.files import TEMP_PREFIX, atomic_write

STEP_PATTERN = re.compile(r"^ckpt-step=(\d+)\.pt$")
BEST_NAME = "ckpt-best.pt"
BEST_JSON = "best.json"

_SCALARS = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def _check_serialisable(obj: Any, where: str = "state") -> None:
    """Raise CheckpointError naming the first entry ``torch.load(weights_only=True)`` would refuse."""
    kind = type(obj)
    if kind in _SCALARS or kind in (torch.Tensor, torch.nn.Parameter):
        return
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise CheckpointError(f"cannot checkpoint {where}: key {key!r} is a {type(key).__name__}, "
                                      "use str or int keys")
            _check_serialisable(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple):
        for index, value in enumerate(obj):
            _check_serialisable(value, f"{where}[{index}]")
        return
    # Exact type checks on purpose: numpy.float64 subclasses float but is pickled as numpy.
    raise CheckpointError(f"cannot checkpoint {where}: {kind.__module__}.{kind.__qualname__} is not "
                          "loadable with weights_only=True; convert it to a tensor or a python scalar")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically (complete old file or complete new file, never half)."""
    _check_serialisable(state)
    atomic_write(Path(path), lambda handle: torch.save(state, handle))


def export_weights(module_state: Mapping[str, torch.Tensor], path: Path,
                   extra: Mapping[str, Any] | None = None) -> None:
    """Atomically write a weights-only file ``{"state_dict": module_state, **extra}``.

    Used for deployable exports such as ``G-step=N.pt``: the model's weights without the
    optimizer or discriminator, plus small metadata in ``extra`` (step, config, git commit).
    """
    extra = dict(extra or {})
    if "state_dict" in extra:
        raise CheckpointError(f"export {path}: 'state_dict' is reserved for the weights")
    bad = [k for k, v in module_state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"export {path}: state dict entries are not tensors: {', '.join(bad[:8])}")
    save_checkpoint({"state_dict": dict(module_state), **extra}, Path(path))


def save_config_next_to(config_dict: Mapping[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/config.yaml`` (keys in their given order) atomically; return its path."""
    text = yaml.safe_dump(dict(config_dict), sort_keys=False, default_flow_style=False)
    path = Path(out_dir) / "config.yaml"
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    return path


def git_commit(repo_dir: Path | None = None) -> str | None:
    """HEAD of the git checkout holding this package (or ``repo_dir``), ``-dirty`` if modified.

    Untracked files (run outputs) do not count as modifications. Returns None outside a git
    checkout or when git is unavailable: provenance must never stop a training run.
    """
    cwd = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        if not commit:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return None


class CheckpointManager:
    """Numbered training checkpoints in one folder, the last ``keep_last`` kept, plus the best.

    Layout of ``out_dir``::

        ckpt-step=00012000.pt   full training state, newest keep_last of them kept
        ckpt-best.pt            copy of the state with the best validation metric so far
        best.json               {"metric": ..., "step": ..., "mode": "min"|"max"}

    Create it on the main rank only: it deletes stale temp files from ``out_dir`` on start,
    which would race with another process writing there.
    """

    def __init__(self, out_dir: Path, keep_last: int = 3, metric_mode: str = "min") -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if metric_mode not in ("min", "max"):
            raise ValueError(f"metric_mode must be 'min' or 'max', got {metric_mode!r}")
        self.out_dir = Path(out_dir)
        self.keep_last = keep_last
        self.metric_mode = metric_mode
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self._read_best_record()

    # ----------------------------------------------------------------- public API

    def save(self, step: int, state: dict[str, Any], metric: float | None = None) -> Path:
        """Write ``ckpt-step=<step>.pt``; refresh ``ckpt-best.pt`` if ``metric`` improved; prune.

        Old checkpoints are deleted only after the new one is safely in place.
        """
        path = self.path_for(step)
        save_checkpoint(state, path)
        if metric is not None and self._improves(float(metric)):
            best = {"metric": float(metric), "step": int(step), "mode": self.metric_mode}
            save_checkpoint({**state, "best": best}, self.out_dir / BEST_NAME)
            atomic_write(self.out_dir / BEST_JSON,
                          lambda handle: handle.write(json.dumps(best, indent=2).encode("utf-8")))
            self.best_metric, self.best_step = best["metric"], best["step"]
        self._prune(path)
        return path

    def path_for(self, step: int) -> Path:
        return self.out_dir / f"ckpt-step={int(step):08d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of the numbered checkpoints, oldest first; temp files are never listed."""
        found = []
        for path in self.out_dir.iterdir():
            match = STEP_PATTERN.match(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        """The numbered checkpoint with the highest step that is a complete torch file, or None.

        Completeness is checked cheaply via the zip directory at the end of the file (torch
        files are zip archives), so a file truncated by a full disk or a copy is skipped with
        a warning rather than crashing the resume.
        """
        for _, path in reversed(self.checkpoints()):
            if zipfile.is_zipfile(path):
                return path
            warnings.warn(f"skipping incomplete checkpoint {path}", stacklevel=2)
        return None

    @property
    def best_path(self) -> Path | None:
        path = self.out_dir / BEST_NAME
        return path if path.is_file() else None

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        """Read a checkpoint onto the CPU with ``weights_only=True``; CheckpointError if unreadable."""
        state = read_weights(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} is not a training checkpoint (holds a {type(state).__name__})")
        return state

    # ----------------------------------------------------------------- internals

    def _improves(self, metric: float) -> bool:
        if math.isnan(metric):
            return False
        if self.best_metric is None:
            return True
        return metric < self.best_metric if self.metric_mode == "min" else metric > self.best_metric

    def _prune(self, just_saved: Path) -> None:
        # The file just written always survives, even when a run resumed from an earlier
        # step leaves higher-numbered checkpoints of the abandoned branch in the folder.
        older = [path for _, path in self.checkpoints() if path != just_saved]
        for path in older[: max(0, len(older) + 1 - self.keep_last)]:
            path.unlink(missing_ok=True)

    def _remove_stale_temps(self) -> None:
        for path in self.out_dir.glob(f"{TEMP_PREFIX}*"):
            if path.is_file():
                path.unlink(missing_ok=True)

    def _read_best_record(self) -> None:
        record_path = self.out_dir / BEST_JSON
        if not record_path.is_file():
            return
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            metric, step, mode = float(record["metric"]), int(record["step"]), record["mode"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read {record_path}: {exc}") from exc
        if mode != self.metric_mode:
            raise CheckpointError(f"{record_path} tracks metric_mode={mode!r} but this run uses "
                                  f"{self.metric_mode!r}; use a new output folder or delete the file")
        self.best_metric, self.best_step = metric, step
