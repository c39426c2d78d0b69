"""Algorithm 1 of the paper: turn a TCNN's time-feature blocks into a pseudo-video for I3D.

Each block [B,C,H,W] is averaged over three groups of its channels into a 3-channel "RGB"
frame [B,3,H,W]; that frame is repeated ``frames_per_block`` times, and the frames of all
blocks, in order, form the clip [B,3,T,H,W] (TCNN-6: 6 blocks x 3 = 18 frames).

Two channel groupings are offered:

* ``"even"`` (default): three contiguous groups of near-equal size that cover every
  channel (``torch.tensor_split``; C=16 -> 6/5/5).
* ``"original"``: the released code's slicing, ``iv = C // 3`` and group k =
  channels ``[k*(iv+1) : k*(iv+1)+iv]``. It silently drops channels ``iv`` and
  ``2*iv+1`` of every block (and, Python slicing being lenient, the last group can
  be shorter: C=16 -> 5/5/4). Kept for exact reproduction of the original features.
"""
from __future__ import annotations

import weakref
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from conchshell.errors import ConfigError
from conchshell.models.tcnn import TCNN
from conchshell.nn.composed_filter import circular_spectra, filter_interior, impulse_response
from conchshell.nn.conv import compute_dtype
from conchshell.nn.direct import rewritten_forms_allowed, weights_key
from conchshell.nn.repeated_frames import repeat_frames
from conchshell.nn.tap_product import SameSizeConv, shared_input_convs

__all__ = [
    "GROUPINGS",
    "check_grouping",
    "channel_groups",
    "group_average_matrix",
    "block_to_frame",
    "build_pseudo_video",
    "image_to_block_frames",
    "image_to_pseudo_video",
    "time_feature_layers",
]

GROUPINGS: tuple[str, ...] = ("even", "original")


def check_grouping(grouping: str) -> None:
    """Raise ConfigError unless ``grouping`` is one of :data:`GROUPINGS`."""
    if grouping not in GROUPINGS:
        raise ConfigError(f"unknown pseudo-video grouping {grouping!r}; "
                          f"expected one of {', '.join(GROUPINGS)}")


def channel_groups(num_channels: int, grouping: str = "even") -> list[tuple[int, int]]:
    """The three ``(start, stop)`` channel ranges averaged into R, G and B."""
    check_grouping(grouping)
    if grouping == "even":
        # Same split as torch.tensor_split(C, 3): the first C % 3 groups get one extra.
        base, extra = divmod(num_channels, 3)
        sizes = [base + (1 if k < extra else 0) for k in range(3)]
        starts = [sum(sizes[:k]) for k in range(3)]
        groups = [(s, s + n) for s, n in zip(starts, sizes)]
    else:  # "original"
        interval = num_channels // 3
        groups = [(k * (interval + 1), min(k * (interval + 1) + interval, num_channels))
                  for k in range(3)]
    if any(stop <= start for start, stop in groups):
        raise ValueError(f"a block of {num_channels} channels is too small for the "
                         f"{grouping!r} grouping (groups {groups})")
    return groups


def group_average_matrix(num_channels: int, grouping: str = "even") -> torch.Tensor:
    """``[3, C]`` float32 matrix whose rows average the three channel groups."""
    matrix = torch.zeros(3, num_channels)
    for row, (start, stop) in enumerate(channel_groups(num_channels, grouping)):
        matrix[row, start:stop] = 1.0 / (stop - start)
    return matrix


def block_to_frame(block: torch.Tensor, grouping: str = "even") -> torch.Tensor:
    """One time-feature block [B,C,H,W] -> its "RGB" frame [B,3,H,W] of group means."""
    if block.dim() != 4:
        raise ValueError(f"a time-feature block must be [B,C,H,W], got shape {tuple(block.shape)}")
    # One 1x1 conv reads the block once; per-group means of a bf16 channels-last block
    # each made an fp32 copy of their slice first (TCNN-6 time features, bf16: ~8 ms less).
    return F.conv2d(block, _frame_filter(block.shape[1], grouping, block).weight)


def _frame_filter(channels: int, grouping: str, like: torch.Tensor) -> SameSizeConv:
    """The 1x1 filters whose outputs are a block's three group means (``like``'s device and dtype)."""
    average = group_average_matrix(channels, grouping).to(like.device, like.dtype)
    return SameSizeConv(average[:, :, None, None], None)


def _assemble(frames: Iterable[torch.Tensor], num_blocks: int, frames_per_block: int) -> torch.Tensor:
    """Write frames [B,3,H,W] into one preallocated clip, each repeated ``frames_per_block``.

    The clip is the big tensor here ([B,3,18,224,224]); filling it slot by slot writes it
    exactly once instead of stacking and then repeating (two full-size copies).
    """
    if frames_per_block < 1:
        raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
    clip: torch.Tensor | None = None
    count = 0
    for index, frame in enumerate(frames):
        if index >= num_blocks:
            raise ValueError(f"got more than the expected {num_blocks} blocks")
        if clip is None:
            batch, _, height, width = frame.shape
            clip = frame.new_empty(batch, 3, num_blocks, frames_per_block, height, width)
        elif frame.shape != clip[:, :, 0, 0].shape:
            raise ValueError(f"block {index} gives a frame of shape {tuple(frame.shape)}, "
                             f"but block 0 gave {tuple(clip[:, :, 0, 0].shape)}")
        # Broadcasting over the repeat axis fills all copies of this frame in one write.
        clip[:, :, index] = frame.unsqueeze(2)
        count += 1
    if clip is None or count != num_blocks:
        raise ValueError(f"expected {num_blocks} time-feature blocks, got {count}")
    batch, _, _, _, height, width = clip.shape
    return clip.view(batch, 3, num_blocks * frames_per_block, height, width)


def build_pseudo_video(features: Sequence[torch.Tensor], frames_per_block: int,
                       grouping: str = "even") -> torch.Tensor:
    """Time-feature blocks -> pseudo-video [B,3,T,H,W], T = len(features) * frames_per_block.

    Frame order is block 0 repeated ``frames_per_block`` times, then block 1, and so on.
    All blocks must share B, H and W; their channel counts may differ.
    """
    check_grouping(grouping)  # reject a bad name before any work
    return _assemble((block_to_frame(block, grouping) for block in features),
                     len(features), frames_per_block)


def image_to_pseudo_video(tcnn: TCNN, images: torch.Tensor, grouping: str = "even") -> torch.Tensor:
    """Run ``tcnn``'s time features on normalised images [B,3,H,W] and build the clip.

    Equal to ``build_pseudo_video(tcnn.time_features(images), ...)``, computed as
    :func:`image_to_block_frames` computes the distinct frames.
    """
    return repeat_frames(image_to_block_frames(tcnn, images, grouping), tcnn.frames_per_block)


def image_to_block_frames(tcnn: TCNN, images: torch.Tensor, grouping: str = "even") -> torch.Tensor:
    """The pseudo-video's distinct frames, one per time-feature block: [B,3,len(tcnn.convs),H,W].

    :func:`image_to_pseudo_video` is this with every frame repeated ``tcnn.frames_per_block``
    times; I3D can take it as it is (``frame_repeats``), without the repeated copies.

    Two shortcuts, both exact in exact arithmetic:

    - Each block is reduced to its frame as soon as it exists, and the last conv is never
      run in full: its output is only ever averaged into three channel groups, and
      averaging commutes with a conv, so three group-averaged filters give the frame
      directly (TCNN-6: 3 instead of 128 output channels at 224x224, a third of the
      time-feature MACs).
    - The time features have no activation, so every frame is one affine function of the
      image: a composed convolution (TCNN-6: 37x37) plus a constant, wherever no layer's
      zero padding is in reach. On CPU, for images more than four receptive radii wide,
      that interior comes from the FFT in float32 (:mod:`conchshell.nn.composed_filter`,
      the filters' spectra computed once per image size and kept until the weights
      change) and only the border band, 18 pixels wide for TCNN-6, from the convolutions,
      on four strips of the image. TCNN-6 at 224x224, batch 1, 2 CPU cores, alternated in
      one process: fp32 307-311 -> 141-144 ms, bf16 162-165 -> 83-84 ms; the fp32 frames
      within 1.1e-5 of the chain's (of a peak of 5.3), and under bf16 the interior is
      float32's. Inside
      :func:`conchshell.nn.direct.direct_convolutions` (FLOP counts) and with autograd the
      convolutions run over the whole image.
    """
    check_grouping(grouping)
    layers = time_feature_layers(tcnn)
    if _composed_form_applies(layers, images):
        return _composed_frames(tcnn, layers, images, grouping)
    return _assemble(_frames(layers, images, grouping), len(layers), 1)


def time_feature_layers(tcnn: TCNN) -> list[SameSizeConv]:
    """``tcnn``'s time-feature convolutions; each must keep the image size."""
    layers = []
    for conv in tcnn.convs:
        kernel, dilation = conv.kernel_size[0], conv.dilation[0]
        layer = SameSizeConv(conv.weight, conv.bias, dilation)
        if (conv.kernel_size[1] != kernel or kernel % 2 == 0 or conv.dilation[1] != dilation
                or conv.stride != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"
                or conv.padding != (layer.padding, layer.padding)):
            raise ValueError(f"a time-feature conv must keep the image size (square odd kernel, stride 1, "
                             f"'same' padding, no groups), got {conv}")
        layers.append(layer)
    return layers


def _receptive_radius(layers: Sequence[SameSizeConv]) -> int:
    """How far from an output pixel the chain reads: the sum of the layers' paddings."""
    return sum(layer.padding for layer in layers)


# Rows [top, bottom) and columns [left, right) of an image.
Box = tuple[int, int, int, int]


def _frames(layers: Sequence[SameSizeConv], images: torch.Tensor, grouping: str,
            box: Box | None = None) -> Iterator[torch.Tensor]:
    """Each block's frame on ``box`` of the image (default: all of it), as the layers compute it.

    Only the image within the layers' receptive radius of ``box`` is read. A layer run on
    such a crop pads it with zeros where the image goes on, so after each layer the
    region kept shrinks by its padding on every side that is not an edge of the image,
    and to what the remaining layers' radius around ``box`` still needs.
    """
    height, width = images.shape[-2:]
    box = (0, height, 0, width) if box is None else box
    remaining = _receptive_radius(layers)
    region = _grown(box, remaining, height, width)
    block = _dense(images[..., region[0]:region[1], region[2]:region[3]])
    *body, last = layers
    for index, layer in enumerate(body):
        block = F.conv2d(block, layer.weight, layer.bias, padding=layer.padding, dilation=layer.dilation)
        remaining -= layer.padding
        block, region = _shrunk(block, region, layer.padding, _grown(box, remaining, height, width), height, width)
        if index < len(body) - 1:
            yield _within(block_to_frame(block, grouping), region, box)
    filters = [_group_averaged_filters(last, grouping)]
    if body:  # the last block's own frame reads the same input as the last conv: one pass
        filters.insert(0, _frame_filter(block.shape[1], grouping, last.weight))
    *own_frame, last_frame = shared_input_convs(block, filters)
    for frame in own_frame:
        yield _within(frame, region, box)
    last_frame, region = _shrunk(last_frame, region, last.padding, box, height, width)
    yield _within(last_frame, region, box)


def _grown(box: Box, margin: int, height: int, width: int) -> Box:
    top, bottom, left, right = box
    return max(0, top - margin), min(height, bottom + margin), max(0, left - margin), min(width, right + margin)


def _shrunk(block: torch.Tensor, region: Box, margin: int, needed: Box, height: int,
            width: int) -> tuple[torch.Tensor, Box]:
    """``block`` (covering ``region``) cut by ``margin`` on the sides that are not image edges,
    and to ``needed``."""
    top, bottom, left, right = region
    kept = (max(needed[0], top if top == 0 else top + margin),
            min(needed[1], bottom if bottom == height else bottom - margin),
            max(needed[2], left if left == 0 else left + margin),
            min(needed[3], right if right == width else right - margin))
    if kept == region:
        return block, region
    return _dense(_within(block, region, kept)), kept


def _within(block: torch.Tensor, region: Box, box: Box) -> torch.Tensor:
    """The part of ``block`` (covering ``region``) that covers ``box``."""
    return block[..., box[0] - region[0]:box[1] - region[0], box[2] - region[2]:box[3] - region[2]]


def _dense(block: torch.Tensor) -> torch.Tensor:
    """A crop made dense again (channels-last) for the convolutions; dense tensors as they are."""
    if block.is_contiguous() or block.is_contiguous(memory_format=torch.channels_last):
        return block
    return block.contiguous(memory_format=torch.channels_last)


def _group_averaged_filters(layer: SameSizeConv, grouping: str) -> SameSizeConv:
    """``layer``'s filters averaged over each channel group: ``block_to_frame(conv(x))`` is one
    3-filter convolution with them (averaging commutes with a convolution)."""
    weight, bias = layer.weight, layer.bias
    average = group_average_matrix(weight.shape[0], grouping).to(weight.device, weight.dtype)
    with torch.autocast(weight.device.type, enabled=False):  # averaged in the weights' dtype
        averaged = torch.einsum("gc,c...->g...", average, weight)
        averaged_bias = None if bias is None else average @ bias
    return SameSizeConv(averaged, averaged_bias, layer.dilation)


# ------------------------------------------------------------ the composed-filter form
# The FFT pays once the border band is a small part of the image (see image_to_block_frames).
MIN_SIZE_PER_RADIUS = 4


def _composed_form_applies(layers: Sequence[SameSizeConv], images: torch.Tensor) -> bool:
    radius = _receptive_radius(layers)
    height, width = images.shape[-2:]
    needs_grad = torch.is_grad_enabled() and (images.requires_grad or any(
        layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad) for layer in layers))
    return (rewritten_forms_allowed() and images.device.type == "cpu" and not needs_grad and radius > 0
            and min(height, width) > MIN_SIZE_PER_RADIUS * radius)


def _composed_frames(tcnn: TCNN, layers: Sequence[SameSizeConv], images: torch.Tensor,
                     grouping: str) -> torch.Tensor:
    """:func:`image_to_block_frames` as the composed filters' interior plus the convolutions'
    border band: four strips, the side ones trimmed layer by layer to the rows between the
    top and bottom strips."""
    batch, _, height, width = images.shape
    radius = _receptive_radius(layers)
    spectra, constant = _frame_filter_spectra(tcnn, layers, grouping, height, width)
    frames = torch.empty((batch, 3, len(layers), height, width), dtype=compute_dtype(images),
                         device=images.device, memory_format=torch.channels_last_3d)
    inner = slice(radius, height - radius), slice(radius, width - radius)
    frames[..., inner[0], inner[1]] = filter_interior(images, spectra, constant)[..., inner[0], inner[1]]
    strips = ((0, radius, 0, width), (height - radius, height, 0, width),
              (radius, height - radius, 0, radius), (radius, height - radius, width - radius, width))
    for top, bottom, left, right in strips:
        for index, frame in enumerate(_frames(layers, images, grouping, (top, bottom, left, right))):
            frames[:, :, index, top:bottom, left:right] = frame
    return frames


# Per TCNN: (what the spectra were computed from, spectra, constant). 11 MB for TCNN-6 at 224x224.
_FILTER_SPECTRA: "weakref.WeakKeyDictionary[TCNN, tuple[tuple, torch.Tensor, torch.Tensor]]" = \
    weakref.WeakKeyDictionary()


def _frame_filter_spectra(tcnn: TCNN, layers: Sequence[SameSizeConv], grouping: str, height: int,
                          width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frames' composed filters as ``height x width`` spectra ``[3, 3, frames, H, W/2+1]``
    and their constants ``[3, frames]``, computed again only when the weights have changed."""
    key = (grouping, height, width, weights_key(*(t for layer in layers for t in (layer.weight, layer.bias))))
    cached = _FILTER_SPECTRA.get(tcnn)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    radius = _receptive_radius(layers)
    exact = [SameSizeConv(layer.weight.detach().double(), None if layer.bias is None else layer.bias.detach().double(),
                          layer.dilation) for layer in layers]
    # Plain float64 tensors even when first called under inference_mode or autocast.
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(layers[0].weight.device.type, enabled=False):
        kernels, constant = impulse_response(
            lambda x: _assemble(_frames(exact, x, grouping), len(exact), 1), 3, radius)
        spectra = circular_spectra(kernels, height, width)
    _FILTER_SPECTRA[tcnn] = (key, spectra, constant)
    return spectra, constant
