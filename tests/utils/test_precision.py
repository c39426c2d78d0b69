"""Which precision each part of a run uses."""
from __future__ import annotations

import pytest
import torch

from conchshell.errors import ConfigError
from conchshell.utils import precision
from conchshell.utils.precision import (autocast_for, bf16_supported, bf16_unsupported_reason, check_precision,
                                        cpu_has_bf16_kernels, frontend_precision, synthesis_precision, use_ieee_fp32)


def test_inference_precisions_split_into_the_frontends_and_the_synthesis_share():
    assert [frontend_precision(p) for p in ("fp32", "bf16", "mixed")] == ["fp32", "bf16", "bf16"]
    assert [synthesis_precision(p) for p in ("fp32", "bf16", "mixed")] == ["fp32", "bf16", "fp32"]
    for split in (frontend_precision, synthesis_precision):
        with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
            split("fp16")


def test_training_precisions_do_not_include_mixed():
    check_precision("bf16", "train.precision")
    with pytest.raises(ConfigError, match="unknown precision 'mixed' for train.precision"):
        check_precision("mixed", "train.precision")


def test_autocast_for_switches_matmul_dtype_only_for_bf16():
    a = torch.randn(4, 4)
    with autocast_for(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_for(torch.device("cpu"), "fp32"):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_for(torch.device("cpu"), "fp16")


def test_bf16_counts_as_supported_on_cpu_only_where_onednn_has_bf16_kernels(monkeypatch):
    cpu = torch.device("cpu")
    assert isinstance(cpu_has_bf16_kernels(), bool)
    assert bf16_supported(cpu) == cpu_has_bf16_kernels()
    for has_kernels in (True, False):
        monkeypatch.setattr(precision, "cpu_has_bf16_kernels", lambda: has_kernels)
        assert bf16_supported(cpu) is has_kernels
    assert not bf16_supported(torch.device("meta"))
    reason = bf16_unsupported_reason(cpu)
    assert "no bf16 kernels" in reason and torch.backends.cpu.get_cpu_capability() in reason


@pytest.mark.parametrize("capability, supported", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_on_cuda_needs_ampere_on_the_device_asked_about(monkeypatch, capability, supported):
    asked = []

    def capability_of(device=None):
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    assert bf16_supported(torch.device("cuda", 1)) is supported
    assert asked == [torch.device("cuda", 1)]


def test_ieee_fp32_turns_off_tf32_for_matmuls_and_cudnn_convolutions():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        use_ieee_fp32()
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_amx_is_read_from_the_cpu():
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), [])
    assert precision.cpu_has_amx() == ("amx_tile" in flags)
