"""TCNN: the small image classifiers whose un-pooled conv outputs become a pseudo-video.

A TCNN has two uses. As a classifier (``forward``) it is trained on the six BOPD classes,
and its predicted class conditions the generator. As a feature extractor
(``time_features``) its convolutions are run again in sequence *without* pooling or
activation, so every block keeps the full image resolution; Algorithm 1
(:mod:`conchshell.models.pseudo_video`) turns those blocks into the frames that I3D sees.

Two networks share that interface:

* :class:`TCNN6`, the paper's main model, exactly as the released code (``TCNN_ablation``):
  six dilated/plain convs. 2,284,686 parameters and 827,507,200 MACs at [1,3,224,224],
  which are the paper's Table 1 figures (2.285M / 827.507M).

* :class:`TCNN18`, Baseline-3: a VGG-like stack of eighteen 3x3 convs (padding 1, with
  bias) of widths 16x3, 32x3, 64x3, 128x3, 256x3, 512x3, ReLU after every conv and a
  2x2 max-pool after every third one (224 -> 3), then global average pooling,
  dropout 0.4 and ``Linear(512, num_classes)``.
  Measured: **7,867,782 parameters, 1,697,958,912 MACs** at [1,3,224,224].
  The paper reports 7.543M / 1.443G, and the original repository's TCNN18 has 22.55M;
  no released code matches the paper. The gap cannot be closed with these widths: the
  eighteen convs alone hold 7,864,704 parameters (already 4.3% above the paper) and
  cost 1,697,955,840 MACs (17.7% above), so the head was chosen as the smallest
  reasonable one (3,078 parameters). A TCNN-6-style MLP head on the flattened
  512x3x3 map (4608 -> 1000 -> 256 -> 6) would add 4.87M parameters and move further
  away. Its time features run all eighteen convs at 224x224 (about 395 G-MACs per
  image), which is why Baseline-3 is far costlier to featurise than TCNN-6.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from conchshell.constants import NUM_CLASSES
from conchshell.errors import ConfigError

__all__ = ["TCNN", "TCNN6", "TCNN18", "build_tcnn", "TCNN_NAMES"]


class TCNN(nn.Module):
    """What every TCNN shares: a conv stack, a classifier head, and the time features.

    Subclasses fill ``self.convs`` (run in order by both paths) and ``self.head``
    (pooled feature map -> logits), and define :meth:`pooled_features`, the classifier
    path's trunk (where pooling, activation and dropout go).
    """

    #: How many times each time-feature block is repeated in the pseudo-video.
    frames_per_block: int = 1

    convs: nn.ModuleList
    head: nn.Module

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"TCNN num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes

    @property
    def num_frames(self) -> int:
        """Length T of the pseudo-video built from this network's time features."""
        return len(self.convs) * self.frames_per_block

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier trunk: [B,3,H,W] image -> pooled feature map fed to ``head``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] normalised image -> class logits [B,num_classes] (no softmax/sigmoid)."""
        return self.head(self.pooled_features(x))

    @torch.no_grad()
    def predict_class(self, x: torch.Tensor) -> torch.Tensor:
        """Most likely class id per image, LongTensor [B]."""
        return self.forward(x).argmax(dim=1)

    def iter_time_features(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield each conv's output in turn, convs chained without pooling or activation.

        Every block keeps the input's spatial size ("same" padding). Yielding instead of
        returning a list lets a caller reduce each block before the next one exists,
        which matters for TCNN18 (its blocks total ~3000 channels at 224x224).
        """
        for conv in self.convs:
            x = conv(x)
            yield x

    def time_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All time-feature blocks [B,C_i,H,W], one per conv, in order."""
        return list(self.iter_time_features(x))


class TCNN6(TCNN):
    """The paper's TCNN-6 (the released code's ``TCNN_ablation``), 6 blocks x 3 frames."""

    frames_per_block = 3

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__(num_classes)
        # (in, out, kernel, dilation); padding = dilation * (kernel - 1) / 2 keeps the size.
        layout = [(3, 16, 7, 2), (16, 32, 7, 1), (32, 64, 5, 2),
                  (64, 128, 5, 1), (128, 256, 3, 2), (256, 128, 3, 1)]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, k, dilation=d, padding=d * (k - 1) // 2)
            for c_in, c_out, k, d in layout
        )
        self.dropout2d = nn.Dropout2d(0.5)
        # 224 halved six times -> 3, so the flattened map is 128 * 3 * 3 = 1152.
        # The original also applies a sigmoid to the logits before CrossEntropy, which
        # squashes them into (0,1) and stalls training; that bug is not reproduced:
        # this head returns raw logits. (The released head is also ordered Dropout ->
        # Sigmoid -> Linear, i.e. with a sigmoid on the flattened ReLU map too; DESIGN.md's
        # Linear -> Sigmoid -> Dropout order is followed here. No TCNN weights were
        # released, so neither choice affects loading a checkpoint.)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 3 * 3, 1000), nn.Sigmoid(), nn.Dropout(0.4),
            nn.Linear(1000, 256), nn.Sigmoid(), nn.Dropout(0.4),
            nn.Linear(256, num_classes),
        )

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i == last:
                x = self.dropout2d(x)
            x = F.relu(F.max_pool2d(x, 2))
        return x


class TCNN18(TCNN):
    """Baseline-3: eighteen 3x3 convs, VGG-style; 18 blocks x 1 frame (see module doc)."""

    frames_per_block = 1
    widths: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    convs_per_stage = 3

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__(num_classes)
        convs = []
        c_in = 3
        for width in self.widths:
            for _ in range(self.convs_per_stage):
                convs.append(nn.Conv2d(c_in, width, 3, padding=1))
                c_in = width
        self.convs = nn.ModuleList(convs)
        # Global average pooling keeps the head tiny: the convs alone already exceed the
        # paper's parameter count, so a wide MLP head would only widen the gap.
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.4),
            nn.Linear(self.widths[-1], num_classes),
        )

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if (i + 1) % self.convs_per_stage == 0:
                x = F.max_pool2d(x, 2)
        return x


_REGISTRY: dict[str, type[TCNN]] = {"tcnn6": TCNN6, "tcnn18": TCNN18}
TCNN_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_tcnn(name: str, num_classes: int = NUM_CLASSES) -> TCNN:
    """Build a TCNN by config name: ``"tcnn6"`` (paper) or ``"tcnn18"`` (Baseline-3)."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in _REGISTRY:
        raise ConfigError(f"unknown TCNN {name!r}; expected one of {', '.join(TCNN_NAMES)}")
    return _REGISTRY[key](num_classes)
