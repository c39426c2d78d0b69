"""The 3-D convolution I3D runs: ``F.conv3d``, with CPU float32 inference sent to oneDNN.

PyTorch picks a CPU float32 convolution's kernel by a heuristic written for 2-D ones: at
batch 1, a kernel at most 3 wide and ``channels x the first spatial size`` at most 20480
(for a 3-D input, channels x frames x height), it takes its own im2col + matmul fallback
(``slow_conv3d_forward``), "for some case, native is faster". For I3D's Inception blocks
it is not: the fallback zeroes and fills an unfolded copy of the input and returns a
channels-first result in a channels-last network, whose later layers then copy it back.
The same convolutions through oneDNN, 2 CPU cores (AMD EPYC, AVX-512), channels-last:
160 -> 320 channels at 5 x 14 x 14 19.9 -> 10.0 ms, 32 -> 96 at 9 x 28 x 28 15.1 -> 4.7 ms,
192 -> 384 at 3 x 7 x 7 6.7 -> 2.1 ms, the results the same to float32 rounding (2.5e-6 of
their peak). bf16 always takes oneDNN, and so does anything with autograd on here: this
form is only for frozen inference.

Inside :func:`conchshell.nn.direct.direct_convolutions` (FLOP counting: the counter knows
``F.conv3d``, not oneDNN's op) the plain call runs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from conchshell.nn.conv import compute_dtype
from conchshell.nn.direct import rewritten_forms_allowed


def _triple(value: int | Sequence[int]) -> list[int]:
    return [value] * 3 if isinstance(value, int) else list(value)


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`conv3d` sends this convolution to oneDNN itself (see the module docstring)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and compute_dtype(x) == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and hasattr(torch, "mkldnn_convolution")
            and rewritten_forms_allowed()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def conv3d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | Sequence[int] = 1,
           padding: int | Sequence[int] = 0) -> Tensor:
    """``F.conv3d(x, weight, bias, stride, padding)`` (no dilation, one group)."""
    if uses_onednn(x, weight):
        return torch.mkldnn_convolution(x, weight, bias, _triple(padding), _triple(stride), [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, stride, padding)
