"""Safe reading of weight files and strict, explained loading into modules."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from conchshell.errors import CheckpointError


def read_weights(path: str | os.PathLike) -> Any:
    """Load a torch file with ``weights_only=True`` onto the CPU.

    Raises CheckpointError (one line, naming the file) for a missing, truncated or
    non-torch file, or one that needs arbitrary code execution to unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from exc


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that has it (e.g. DDP's ``module.``)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    optional_suffixes: tuple[str, ...] = (),
    allow_missing: bool = False,
) -> list[str]:
    """Load ``state`` into ``module`` with exact names and shapes.

    Keys of the module ending in one of ``optional_suffixes`` may be absent from
    ``state`` (e.g. ``num_batches_tracked`` in old BatchNorm checkpoints), and with
    ``allow_missing`` any key may be (it keeps the module's own value: a layer added
    since the checkpoint was written). Any other missing, unexpected or mis-shaped
    entry raises CheckpointError that lists them. Returns the keys left as they were.
    """
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} does not hold a state dict of tensors")
    own = module.state_dict()
    absent = [k for k in own if k not in state]
    missing = [] if allow_missing else [k for k in absent if not k.endswith(optional_suffixes)]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"{source} does not match {type(module).__name__}: "
            + "; ".join(
                part
                for part in (
                    _listing("missing", missing),
                    _listing("unexpected", unexpected),
                    _listing("wrong shape", wrong_shape),
                )
                if part
            )
        )
    merged = dict(own)
    merged.update({k: v for k, v in state.items()})
    module.load_state_dict(merged, strict=True)
    return absent


def _listing(label: str, keys: list[str], limit: int = 8) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} {label} keys: {shown}{more}"
