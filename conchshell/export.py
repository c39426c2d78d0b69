"""Generator exports (``G-step=N.pt``): the one file ``inference.py`` needs.

An export holds the generator's weights, its constructor arguments and the full resolved
config, which names the TCNN, I3D and codec it was trained with. It is weights-only
(loadable with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from conchshell.config import Config, config_from_dict, config_to_dict
from conchshell.errors import CheckpointError
from conchshell.models.generator import ConchShellGenerator, build_generator
from conchshell.training.checkpointing import export_weights, git_commit
from conchshell.utils.checkpoint import load_strict, read_weights

EXPORT_FORMAT = "conchshell-generator-v1"


def save_generator_export(path: str | os.PathLike, generator: ConchShellGenerator, config: Config, step: int) -> Path:
    path = Path(path)
    export_weights(
        generator.state_dict(),
        path,
        extra={
            "format": EXPORT_FORMAT,
            "generator_hparams": dict(generator.hparams),
            "config": config_to_dict(config),
            "step": int(step),
            "git_commit": git_commit() or "",
        },
    )
    return path


def load_generator_export(path: str | os.PathLike) -> tuple[ConchShellGenerator, Config, dict[str, Any]]:
    """(generator in eval mode, its config, metadata) from an export; CheckpointError if not one."""
    data = read_weights(path)
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{path} is not a ConchShell generator export (expected a G-step=N.pt written by train.py)"
        )
    for key in ("state_dict", "generator_hparams", "config"):
        if key not in data:
            raise CheckpointError(f"{path}: generator export lacks '{key}'")
    config = config_from_dict(data["config"], source=str(path))
    try:
        generator = build_generator(**data["generator_hparams"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad generator_hparams: {exc}") from exc
    load_strict(generator, data["state_dict"], path)
    meta = {"step": data.get("step"), "git_commit": data.get("git_commit")}
    return generator.eval(), config, meta
