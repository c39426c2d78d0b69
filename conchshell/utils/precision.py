"""Numeric precision of a run: fp32, or bf16 autocast where the device has it (never fp16)."""
from __future__ import annotations

import contextlib

import torch

from conchshell.constants import INFERENCE_PRECISIONS, PRECISIONS
from conchshell.errors import ConfigError


def check_precision(precision: str, setting: str, allowed: tuple[str, ...] = PRECISIONS) -> None:
    """ConfigError unless ``precision`` (the value of ``setting``) is one of ``allowed``."""
    if precision not in allowed:
        raise ConfigError(f"unknown precision {precision!r} for {setting}; expected one of "
                          f"{', '.join(allowed)} (fp16 is not offered: it is ~70x slower than fp32 on CPU)")


def frontend_precision(precision: str) -> str:
    """The image networks' (TCNN, I3D) share of an inference precision: bf16 in bf16 and ``mixed``."""
    check_precision(precision, "generation", INFERENCE_PRECISIONS)
    return "bf16" if precision == "mixed" else precision


def synthesis_precision(precision: str) -> str:
    """The generator's and the decoder's share of an inference precision: bf16 only in bf16
    (``mixed`` keeps both in fp32)."""
    check_precision(precision, "generation", INFERENCE_PRECISIONS)
    return "fp32" if precision == "mixed" else precision


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
