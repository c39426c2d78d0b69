"""Parameter and multiply-accumulate counts, with the paper's conventions.

MACs count the weight multiplications of convolutions and matrix products only (no bias,
normalisation, activation or pooling), which is what the paper's Table 1 reports. Layers
that compute a convolution another way (``conchshell.nn.polyphase``, ``conchshell.nn.unfolded``,
``conchshell.nn.fft_conv``) are counted as the plain convolution: the model's work, not the
zero taps or the spectra of a faster form.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conchshell.nn.direct import direct_convolutions


def count_params(module: nn.Module, exclude: tuple[nn.Module, ...] = ()) -> int:
    """Number of parameters of ``module``, leaving out those of the ``exclude`` submodules."""
    skip = {id(p) for m in exclude for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)


@torch.no_grad()
def count_macs(fn: Any, *args: Any, **kwargs: Any) -> int:
    """MACs of one call ``fn(*args, **kwargs)``: convolution and matmul FLOPs / 2."""
    counter = FlopCounterMode(display=False)
    with counter, direct_convolutions():
        fn(*args, **kwargs)
    return counter.get_total_flops() // 2
