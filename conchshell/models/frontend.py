"""The frozen image side of ConchShell: image -> (I3D features, predicted class)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from conchshell.models.i3d import InceptionI3d, i3d_embedding
from conchshell.models.pseudo_video import check_grouping, image_to_pseudo_video
from conchshell.models.tcnn import TCNN


class ImageFrontend(nn.Module):
    """TCNN time features -> Algorithm-1 pseudo-video -> frozen I3D, plus the TCNN's class.

    Both networks are frozen: this module never trains and always runs in eval mode, so
    training and inference see identical features (the original mixed train/eval modes).
    """

    def __init__(self, tcnn: TCNN, i3d: InceptionI3d, grouping: str = "even") -> None:
        super().__init__()
        check_grouping(grouping)
        self.tcnn = tcnn.requires_grad_(False).eval()
        self.i3d = i3d.requires_grad_(False).eval()
        self.grouping = grouping

    def train(self, mode: bool = True) -> "ImageFrontend":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised images [B,3,224,224] -> (features [B,2048] float32, class ids [B] int64)."""
        class_ids = self.tcnn.predict_class(images)
        video = image_to_pseudo_video(self.tcnn, images, self.grouping)
        return i3d_embedding(self.i3d, video).float(), class_ids
