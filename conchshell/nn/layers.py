"""Weight-normalised 1-D convolutions and the MelGAN-style residual block.

These are shared by the ConchShell generators and the multi-scale discriminator. Weight
normalisation uses ``torch.nn.utils.parametrizations.weight_norm`` (the non-deprecated
API): the state dict then holds ``parametrizations.weight.original0`` (the magnitude g)
and ``parametrizations.weight.original1`` (the direction v). torch converts old-style
``weight_g`` / ``weight_v`` entries to these names when ``load_state_dict`` is called.

The normalisation is an element-wise product and a norm, so it adds no multiply-accumulates
to ``conchshell.utils.profile.count_macs`` (which counts convolutions and matmuls only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from conchshell.nn.channels_last import from_channels_last_2d, to_channels_last_2d
from conchshell.nn.conv import Conv1d, compute_dtype


def WNConv1d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = True,
    conv_type: type[nn.Conv1d] = Conv1d,
) -> nn.Conv1d:
    """A ``conv_type`` (:class:`~conchshell.nn.conv.Conv1d` or another ``nn.Conv1d`` with its
    parameters) whose weight is
    reparametrised as ``g * v / ||v||`` (one g per output channel)."""
    conv = conv_type(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
    )
    return weight_norm(conv)


class ReflectionPad1d(nn.ReflectionPad1d):
    """``nn.ReflectionPad1d`` that also pads the time axis of a channels-last ``[B, C, 1, T]``
    input (and keeps it channels-last)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            return F.pad(x, (*self.padding, 0, 0), mode="reflect")
        return super().forward(x)


class ResnetBlock1d(nn.Module):
    """Length-preserving residual unit: ``shortcut(x) + block(x)``.

    ``block`` = LeakyReLU(0.2) -> ReflectionPad(dilation) -> WN-Conv(k3, dilation)
    -> LeakyReLU(0.2) -> WN-Conv(k1). The shortcut is a learned WN k1 conv rather than the
    identity, as in the released ConchShell code (it costs ``channels**2 + 2*channels``
    parameters per block and is part of the paper's parameter counts).

    A frozen block on CPU computing in bf16 runs channels-last (as ``1 x k`` 2-D
    convolutions, :mod:`conchshell.nn.channels_last`), which oneDNN's bf16 kernels run
    faster, with the same output: the frozen Deep generator on 2 cores (AMX), alternated,
    70-75 -> 65-70 ms at batch 1, 204-220 -> 177-186 ms at batch 4. In float32 it was
    slower (162-168 against 175-178 ms at batch 1), and trainable blocks keep the layout
    their training was measured in.
    """

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.dilation = dilation
        self.block = nn.Sequential(
            nn.LeakyReLU(0.2),
            # Reflection (not zero) padding keeps the edges of the latent free of a DC step.
            ReflectionPad1d(dilation),
            WNConv1d(channels, channels, kernel_size=3, dilation=dilation),
            nn.LeakyReLU(0.2),
            WNConv1d(channels, channels, kernel_size=1),
        )
        self.shortcut = WNConv1d(channels, channels, kernel_size=1)

    def runs_channels_last(self, x: Tensor) -> bool:
        return (x.dim() == 3 and x.device.type == "cpu" and compute_dtype(x) == torch.bfloat16
                and not self.shortcut.weight.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        if self.runs_channels_last(x):
            x = to_channels_last_2d(x)
            return from_channels_last_2d(self.shortcut(x) + self.block(x))
        return self.shortcut(x) + self.block(x)


class MaxPool1d(nn.MaxPool1d):
    """``nn.MaxPool1d`` that pools a CPU bf16 input in float32 and returns it in bf16: the same
    values (rounding to bf16 keeps the order), but torch's bf16 kernel without indices (the
    one inference runs) is about 8x slower than its float32 one (Deep's 1024 x 817 frames on
    2 cores: 5.3 ms against 0.7 ms with both casts; with gradients both take the same time)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            return super().forward(x.float()).to(torch.bfloat16)
        return super().forward(x)
