"""Numeric precision of a run: fp32, or bf16 autocast where the device has it (never fp16)."""
from __future__ import annotations

import contextlib

import torch

from conchshell.constants import PRECISIONS
from conchshell.errors import ConfigError


def check_precision(precision: str, setting: str) -> None:
    """ConfigError unless ``precision`` (the value of ``setting``) is one we offer."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r} for {setting}; expected one of "
                          f"{', '.join(PRECISIONS)} (fp16 is not offered: it is ~70x slower than fp32 on CPU)")


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast runs on every CPU torch supports; on CUDA it needs Ampere or newer."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision == "bf16"``, else a context that changes nothing."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
