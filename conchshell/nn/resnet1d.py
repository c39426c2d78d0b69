"""Dilated 1-D residual stacks and the strided conv blocks of the Jukebox VQ-VAE.

Attribute names (``model``, nested ``nn.Sequential`` indices) mirror openai/jukebox so that
its ``vqvae.pth.tar`` state dict loads with strict names; see
``tests/data/jukebox_vqvae_keys.tsv``. The convolutions take channels-first ``[B, C, T]``
or, faster on CPU, channels-last ``[B, C, 1, T]`` (see ``conchshell.nn.channels_last``).
"""
from __future__ import annotations

from torch import Tensor, nn

from conchshell.nn.channels_last import ConvTranspose1d, phase_grid_applies, relu_conv_on_phase_grid
from conchshell.nn.conv import Conv1d


class ResidualConvBlock1d(nn.Module):
    """``x + Conv1x1(ReLU(DilatedConv3(ReLU(x))))``: length-preserving residual unit."""

    def __init__(self, channels: int, hidden: int, dilation: int = 1) -> None:
        super().__init__()
        self.dilation = dilation
        # Index layout (ReLU, Conv, ReLU, Conv) fixes the checkpoint names model.1 / model.3.
        self.model = nn.Sequential(
            nn.ReLU(),
            Conv1d(channels, hidden, kernel_size=3, stride=1, padding=dilation, dilation=dilation),
            nn.ReLU(),
            Conv1d(hidden, channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        relu, conv, _, conv_1x1 = self.model
        hidden = relu_conv_on_phase_grid(x, conv) if phase_grid_applies(x, conv) else conv(relu(x))
        # The second ReLU and the residual sum in place, on tensors only this unit holds (no
        # convolution keeps its output for the backward): the same values, and the Deep
        # decode in fp32 on 2 cores (AMX) 155-163 -> 144-149 ms, alternated (bf16 unchanged).
        return conv_1x1(hidden.relu_()).add_(x)


class DilatedResnet1d(nn.Module):
    """``depth`` residual units with dilations ``growth**0 .. growth**(depth-1)``.

    ``dilation_cycle`` restarts the dilation pattern every that many units (Jukebox's
    option; ``None`` means never). ``reverse_dilation`` runs the widest dilation first,
    which the Jukebox decoders use so that they mirror their encoders.
    """

    def __init__(
        self,
        channels: int,
        depth: int,
        m_conv: float = 1.0,
        dilation_growth_rate: int = 1,
        dilation_cycle: int | None = None,
        reverse_dilation: bool = False,
    ) -> None:
        super().__init__()
        hidden = int(m_conv * channels)
        blocks = [
            ResidualConvBlock1d(
                channels,
                hidden,
                dilation=dilation_growth_rate ** (d if dilation_cycle is None else d % dilation_cycle),
            )
            for d in range(depth)
        ]
        if reverse_dilation:
            blocks = blocks[::-1]
        self.model = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class EncoderConvBlock(nn.Module):
    """``down_t`` x [strided Conv1d (k=2s, p=s//2) + DilatedResnet1d], then Conv1d k3 to ``out_channels``.

    Each stride-``s`` step divides the length by exactly ``s`` when it is divisible.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        down_t: int,
        stride_t: int,
        width: int,
        depth: int,
        m_conv: float = 1.0,
        dilation_growth_rate: int = 1,
        dilation_cycle: int | None = None,
    ) -> None:
        super().__init__()
        if down_t < 1:
            raise ValueError(f"down_t must be >= 1, got {down_t}")
        kernel, padding = 2 * stride_t, stride_t // 2
        blocks: list[nn.Module] = [
            nn.Sequential(
                Conv1d(in_channels if i == 0 else width, width, kernel, stride_t, padding),
                DilatedResnet1d(width, depth, m_conv, dilation_growth_rate, dilation_cycle),
            )
            for i in range(down_t)
        ]
        blocks.append(Conv1d(width, out_channels, kernel_size=3, stride=1, padding=1))
        self.model = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class DecoderConvBlock(nn.Module):
    """Conv1d k3 to ``width``, then ``down_t`` x [DilatedResnet1d + ConvTranspose1d (k=2s, s, p=s//2)].

    The last transposed conv maps back to ``out_channels``; each one multiplies the
    length by ``s``, inverting :class:`EncoderConvBlock`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        down_t: int,
        stride_t: int,
        width: int,
        depth: int,
        m_conv: float = 1.0,
        dilation_growth_rate: int = 1,
        dilation_cycle: int | None = None,
        reverse_dilation: bool = False,
    ) -> None:
        super().__init__()
        if down_t < 1:
            raise ValueError(f"down_t must be >= 1, got {down_t}")
        kernel, padding = 2 * stride_t, stride_t // 2
        blocks: list[nn.Module] = [Conv1d(in_channels, width, kernel_size=3, stride=1, padding=1)]
        for i in range(down_t):
            last = i == down_t - 1
            blocks.append(
                nn.Sequential(
                    DilatedResnet1d(
                        width, depth, m_conv, dilation_growth_rate, dilation_cycle, reverse_dilation
                    ),
                    ConvTranspose1d(width, out_channels if last else width, kernel, stride_t, padding),
                )
            )
        self.model = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
