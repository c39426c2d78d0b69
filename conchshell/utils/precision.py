"""Numeric precision of a run: fp32, or bf16 autocast where the device has it (never fp16)."""
from __future__ import annotations

import contextlib
import functools

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


@functools.cache
def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (x86 with AVX-512 or AMX, Arm with its bf16
    extensions). Without them torch still computes bf16, through scalar fallbacks: on a
    2-core AMD EPYC with AVX2 only, a bf16 matmul ran at 0.9-1.4 GFLOP/s against 136 in fp32,
    a bf16 convolution under autocast at 0.7 GFLOP/s against 138."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon from Sapphire Rapids on), where oneDNN's bf16
    kernels differ from the AVX-512 ones enough to change which layout is faster (see
    :func:`conchshell.models.discriminator.runs_channels_last`)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: assume none
        return False


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs at speed on ``device``: on CUDA, Ampere or newer; on CPU,
    where oneDNN has bf16 kernels (:func:`cpu_has_bf16_kernels`; elsewhere bf16 is about 100x
    slower than fp32)."""
    if device.type == "cuda":
        # Asked of this device, not the current one; is_bf16_supported() would also count
        # pre-Ampere GPUs, which only emulate bf16.
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_has_bf16_kernels()


def bf16_unsupported_reason(device: torch.device) -> str:
    """Why :func:`bf16_supported` is False for ``device``, for error and warning lines."""
    if device.type == "cpu":
        return (f"this CPU has no bf16 kernels (oneDNN needs AVX-512 or AMX; it has "
                f"{torch.backends.cpu.get_cpu_capability()}), so bf16 would run about 100x slower than fp32")
    return f"bf16 is not supported on {device}"


def use_ieee_fp32() -> None:
    """Make fp32 mean IEEE fp32 on CUDA as on the CPU. cuDNN's convolutions default to TF32
    (a 10-bit mantissa) while matmuls default to full fp32, so an fp32 run would otherwise be
    neither: its audio would not be the reference the bf16 path is compared with, and its
    FLOP rate could exceed the fp32 matmul ceiling it is measured against. bf16 autocast is
    the fast path on GPUs; this only removes the silent third precision."""
    # The legacy flags, not fp32_precision: once the new API is used, reading the legacy ones
    # raises, and torch.compile's convolution templates still read them.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision == "bf16"``, else a context that changes nothing."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
