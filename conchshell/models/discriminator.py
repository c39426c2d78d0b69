"""MelGAN-style multi-scale discriminator over a flattened Jukebox latent.

The latent ``[B, 64, T]`` is read channel-major as a one-channel signal ``[B, 1, 64*T]``
(a view, no copy, when the latent is contiguous). Three identical sub-discriminators see it
at full, half and quarter rate (AvgPool1d(4, stride 2, padding 1, count_include_pad=False)
between scales). Each one is seven weight-normalised convs, LeakyReLU(0.2) after all but
the last:

    ReflectionPad 7 + 1->32 k16
    32->128 k41 s4 p20 groups 8
    128->512 k41 s4 p20 groups 32
    512->1024 k41 s4 p20 groups 128
    1024->1024 k41 s4 p20 groups 256
    1024->512 k5 p1
    512->1 k3 p1 (the score)

This is the paper's model: 9,212,358 parameters (Table 1: 9.212M) and 2,733,464,064 /
10,975,492,608 / 43,949,188,608 MACs (convs only) for High / Low / Deep latents
([1,64,1000] / [1,64,4000] / [1,64,16000]). Table 1's 2.734G / 10.976G / 43.950G
(2.7335 / 10.9757 / 43.9501 G to five digits) are these plus exactly 0.875 * 64T: one
"MAC" per output of the AvgPool (a profiler convention), counted over the three downsamplings the
released forward runs, the last of which feeds nothing. We count convolutions and matmuls
only and skip that unused pooling. The original repo uses kernel 10 for the 1024->512
conv, which gives 17.08M parameters: not the model the paper reports, so we build k5 p1.
The strided layers run on CPU as stride-1 convolutions of the phase-split input
(``conchshell.nn.polyphase``: the same convolution, about 3x faster there), the first as a
matrix product with its unfolded input (``conchshell.nn.unfolded``: 2-3x faster).

The LeakyReLUs run in place: no convolution keeps its output for its backward, so
each map is stored once instead of twice (a Deep bf16 training step at batch 2 peaks at
7.6 instead of 8.9 GB).

``forward`` returns, per scale, all seven outputs (six feature maps, then the score), the
layout that feature matching and the hinge losses in ``conchshell.nn.losses`` expect.
``width`` scales every channel count (except the 1-channel input and score) for tiny
configs; group counts keep the "4 input channels per group" rule, lowered where needed
so that they divide both channel counts.

``num_classes`` (off in the paper) makes it a projection discriminator (Miyato & Koyama,
2018): every scale adds ``<embed(class), h_t>`` to its score at each position ``t``, where
``h`` is its last feature map, so real latents are judged against their own class. The
embeddings start at zero: a fresh conditional discriminator scores like the unconditional one.

``auxiliary_classes`` (off in the paper) adds an auxiliary classifier (AC-GAN, Odena et al.,
2017): every scale maps the time average of its last feature map to class logits through a
Linear head, and :meth:`MultiScaleDiscriminator.class_logits` averages them over scales. The
heads read the feature maps ``forward`` returns, so the adversarial outputs keep their layout.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from conchshell.errors import ConfigError
from conchshell.nn import channels_last
from conchshell.nn.conv import compute_dtype
from conchshell.nn.direct import rewritten_forms_allowed
from conchshell.nn.layers import WNConv1d
from conchshell.nn.polyphase import PolyphaseConv1d
from conchshell.nn.unfolded import UnfoldedConv1d
from conchshell.utils.precision import cpu_has_amx

FIRST_KERNEL = 16
FIRST_REFLECTION = 7
# Channels after each layer before the score. The strided layers use k41 s4 p20.
CHANNELS = (32, 128, 512, 1024, 1024, 512)
STRIDED_KERNEL, STRIDE, STRIDED_PADDING = 41, 4, 20
CHANNELS_PER_GROUP = 4
PENULTIMATE_KERNEL, PENULTIMATE_PADDING = 5, 1
SCORE_KERNEL, SCORE_PADDING = 3, 1
CHANNELS_LAST_DTYPES = (torch.bfloat16,)


def runs_channels_last(signal: Tensor) -> bool:
    """Whether the layers run as channels-last ``[B, C, 1, L]`` 2-D convolutions
    (``conchshell.nn.polyphase``, ``conchshell.nn.channels_last``; the feature maps returned
    are their 3-D views): on a CPU with AMX under bf16. There oneDNN's bf16 kernels compute in
    channels-last and reorder channels-first inputs, outputs and gradients to it and back,
    through transposing copies at about 1 GB/s. The phase-split layers' three passes (forward,
    input and weight gradient), Deep batch of 4, 2 cores of an Intel Xeon with AMX:
    32->128 2.68 -> 0.70 s, 128->512 3.02 -> 1.19 s, 512->1024 3.16 -> 1.05 s, 1024->1024
    1.56 -> 0.36 s; the 1024->512 k5 layer 353 -> 127 ms. The first layer (1->32 k16) runs
    there as the plain 2-D convolution, not unfolded: its three passes take about as long
    (199 against 186 ms at Deep batch 4), and the phase split's gradient after it no longer
    transposes back to channels-first (197 -> 35 ms).

    Without AMX the layers stay channels-first: on 2 cores of an AMD EPYC with AVX-512 bf16,
    oneDNN's channels-first grouped kernels are the faster ones (the Deep bf16 GAN step at
    batch 2, alternated in one process: 8.6-9.2 s channels-first against 12.5-13.1 s
    channels-last; High 1.64-1.75 against 1.86-1.91 s). float32 keeps channels-first
    everywhere: there the weight gradients ran 1.4-4x slower channels-last."""
    return (rewritten_forms_allowed() and signal.device.type == "cpu"
            and compute_dtype(signal) in CHANNELS_LAST_DTYPES and cpu_has_amx())


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _groups(in_channels: int, out_channels: int) -> int:
    # Largest group count <= in/4 that divides both sides, so tiny widths still build.
    groups = max(1, in_channels // CHANNELS_PER_GROUP)
    while in_channels % groups or out_channels % groups:
        groups -= 1
    return groups


def _conv_length(length: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (length + 2 * padding - kernel) // stride + 1


def scale_score_length(num_samples: int) -> int:
    """Score length of one sub-discriminator for a ``num_samples`` signal (< 1: too short)."""
    if num_samples <= FIRST_REFLECTION:  # ReflectionPad1d needs pad < length
        return 0
    length = _conv_length(num_samples + 2 * FIRST_REFLECTION, FIRST_KERNEL)
    for _ in range(len(CHANNELS) - 2):
        length = _conv_length(length, STRIDED_KERNEL, STRIDE, STRIDED_PADDING)
    length = _conv_length(length, PENULTIMATE_KERNEL, padding=PENULTIMATE_PADDING)
    return _conv_length(length, SCORE_KERNEL, padding=SCORE_PADDING)


def downsampled_length(num_samples: int) -> int:
    """Length after the AvgPool1d(4, 2, 1) between scales."""
    return _conv_length(num_samples, 4, 2, 1)


class ScaleDiscriminator(nn.Module):
    """One MelGAN sub-discriminator: ``[B, 1, N]`` -> seven outputs, the score last."""

    def __init__(self, width: float = 1.0, num_classes: int | None = None,
                 auxiliary_classes: int | None = None) -> None:
        super().__init__()
        channels = [_scaled(c, width) for c in CHANNELS]
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.ReflectionPad1d(FIRST_REFLECTION),
                WNConv1d(1, channels[0], FIRST_KERNEL, conv_type=UnfoldedConv1d),
                nn.LeakyReLU(0.2, inplace=True),
            )
        ]
        for in_channels, out_channels in zip(channels[:4], channels[1:5]):
            layers.append(
                nn.Sequential(
                    WNConv1d(
                        in_channels,
                        out_channels,
                        STRIDED_KERNEL,
                        stride=STRIDE,
                        padding=STRIDED_PADDING,
                        groups=_groups(in_channels, out_channels),
                        conv_type=PolyphaseConv1d,
                    ),
                    nn.LeakyReLU(0.2, inplace=True),
                )
            )
        layers.append(
            nn.Sequential(
                WNConv1d(channels[4], channels[5], PENULTIMATE_KERNEL, padding=PENULTIMATE_PADDING),
                nn.LeakyReLU(0.2, inplace=True),
            )
        )
        layers.append(WNConv1d(channels[5], 1, SCORE_KERNEL, padding=SCORE_PADDING))
        self.layers = nn.ModuleList(layers)
        self.class_projection: nn.Embedding | None = None
        if num_classes is not None:
            self.class_projection = nn.Embedding(num_classes, channels[5])
            nn.init.zeros_(self.class_projection.weight)
        self.class_head: nn.Linear | None = None
        if auxiliary_classes is not None:
            self.class_head = nn.Linear(channels[5], auxiliary_classes)

    def forward(self, signal: Tensor, class_ids: Tensor | None = None) -> list[Tensor]:
        outputs = []
        x = signal
        as_2d = runs_channels_last(signal)
        for index, layer in enumerate(self.layers):
            if as_2d and index == 0:  # channels-last from the padded signal on
                reflection, conv, activation = layer
                x = activation(conv(channels_last.to_channels_last_2d(reflection(x))))
            else:
                x = layer(x)
            outputs.append(x.squeeze(2) if x.dim() == 4 else x)
        if self.class_projection is not None:
            features = outputs[-2]
            projection = (self.class_projection(class_ids).to(features.dtype)[:, :, None] * features).sum(1, keepdim=True)
            outputs[-1] = outputs[-1] + projection
        return outputs


class MultiScaleDiscriminator(nn.Module):
    """``num_scales`` sub-discriminators on the flattened latent at successively halved rates."""

    def __init__(self, num_scales: int = 3, latent_channels: int = 64, width: float = 1.0,
                 num_classes: int | None = None, auxiliary_classes: int | None = None) -> None:
        super().__init__()
        if not isinstance(num_scales, int) or num_scales < 1:
            raise ConfigError(f"discriminator num_scales must be a positive integer, got {num_scales!r}")
        if not isinstance(latent_channels, int) or latent_channels < 1:
            raise ConfigError(f"discriminator latent_channels must be a positive integer, got {latent_channels!r}")
        if not width > 0:
            raise ConfigError(f"discriminator width must be > 0, got {width!r}")
        for name, value in (("num_classes", num_classes), ("auxiliary_classes", auxiliary_classes)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"discriminator {name} must be a positive integer or None, got {value!r}")
        self.num_scales = num_scales
        self.num_classes = num_classes
        self.auxiliary_classes = auxiliary_classes
        self.latent_channels = latent_channels
        self.width = float(width)
        self.scales = nn.ModuleList(ScaleDiscriminator(width, num_classes, auxiliary_classes)
                                    for _ in range(num_scales))
        self.downsample = nn.AvgPool1d(4, stride=2, padding=1, count_include_pad=False)

    def min_latent_length(self) -> int:
        """Shortest latent (in frames) whose every scale still yields a score."""
        frames = 1
        while min(self.score_lengths(frames * self.latent_channels)) < 1:
            frames += 1
        return frames

    def score_lengths(self, num_samples: int) -> list[int]:
        """Length of each scale's score for a flattened signal of ``num_samples``."""
        lengths = []
        for _ in range(self.num_scales):
            lengths.append(scale_score_length(num_samples) if num_samples >= 1 else 0)
            num_samples = downsampled_length(num_samples)
        return lengths

    def forward(self, latent: Tensor, class_ids: Tensor | None = None) -> list[list[Tensor]]:
        """``latent [B, latent_channels, T]`` (and, when conditional, ``class_ids [B]``) -> per
        scale, six feature maps then the score."""
        if latent.ndim != 3 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be [B, {self.latent_channels}, T], got {tuple(latent.shape)}")
        if (class_ids is None) != (self.num_classes is None):
            raise ValueError("a class-conditional discriminator needs class_ids, an unconditional one takes none")
        if class_ids is not None and class_ids.shape != latent.shape[:1]:
            raise ValueError(f"class_ids must be [{latent.shape[0]}], got {tuple(class_ids.shape)}")
        if min(self.score_lengths(math.prod(latent.shape[1:]))) < 1:
            raise ConfigError(
                f"latent length {latent.shape[2]} is too short for a {self.num_scales}-scale "
                f"discriminator; the minimum is {self.min_latent_length()} frames"
            )
        # Channel-major flattening: a free view of a contiguous latent.
        signal = latent.reshape(latent.shape[0], 1, -1)
        results = []
        for index, scale in enumerate(self.scales):
            if index > 0:
                signal = self.downsample(signal)
            results.append(scale(signal, class_ids))
        return results

    def class_logits(self, outputs: list[list[Tensor]]) -> Tensor:
        """Auxiliary classifier: the outputs of :meth:`forward` -> class logits ``[B, classes]``
        (float32), the mean over scales of each scale's head on its time-averaged last feature map."""
        if self.auxiliary_classes is None:
            raise ConfigError("class_logits needs a discriminator built with auxiliary_classes")
        if len(outputs) != self.num_scales:
            raise ValueError(f"expected the outputs of {self.num_scales} scales, got {len(outputs)}")
        logits = [scale.class_head(scale_outputs[-2].float().mean(dim=2))
                  for scale, scale_outputs in zip(self.scales, outputs)]
        return torch.stack(logits).mean(dim=0)
