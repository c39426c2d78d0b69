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

from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from conchshell.errors import ConfigError
from conchshell.models.tcnn import TCNN
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

    Equal to ``build_pseudo_video(tcnn.time_features(images), ...)``, computed faster:
    each block is reduced to its frame as soon as it exists (at most two blocks alive), and
    the last conv is never run in full. Its output is only ever averaged into three
    channel groups, and averaging commutes with a conv, so three group-averaged filters
    give the frame directly (TCNN-6: 3 instead of 128 output channels at 224x224, a third
    of the time-feature MACs).
    """
    check_grouping(grouping)
    return _assemble(_frames(tcnn, images, grouping), len(tcnn.convs), tcnn.frames_per_block)


def image_to_block_frames(tcnn: TCNN, images: torch.Tensor, grouping: str = "even") -> torch.Tensor:
    """The pseudo-video's distinct frames, one per time-feature block: [B,3,len(tcnn.convs),H,W].

    :func:`image_to_pseudo_video` is this with every frame repeated ``tcnn.frames_per_block``
    times; I3D can take it as it is (``frame_repeats``), without the repeated copies.
    """
    check_grouping(grouping)
    return _assemble(_frames(tcnn, images, grouping), len(tcnn.convs), 1)


def _frames(tcnn: TCNN, images: torch.Tensor, grouping: str) -> Iterator[torch.Tensor]:
    *body, last = tcnn.convs
    block = images
    for index, conv in enumerate(body):
        block = conv(block)
        if index < len(body) - 1:
            yield block_to_frame(block, grouping)
    filters = [_group_averaged_filters(last, grouping)]
    if body:  # the last block's own frame reads the same input as the last conv: one pass
        filters.insert(0, _frame_filter(block.shape[1], grouping, last.weight))
    yield from shared_input_convs(block, filters)


def _group_averaged_filters(conv: nn.Conv2d, grouping: str) -> SameSizeConv:
    """``conv``'s filters averaged over each channel group: ``block_to_frame(conv(x))`` is one
    3-filter convolution with them (averaging commutes with a convolution)."""
    kernel, dilation = conv.kernel_size[0], conv.dilation[0]
    if (conv.kernel_size[1] != kernel or conv.dilation[1] != dilation or conv.stride != (1, 1)
            or conv.groups != 1 or conv.padding != (dilation * (kernel - 1) // 2,) * 2):
        raise ValueError(f"a time-feature conv must keep the image size (square odd kernel, stride 1, "
                         f"'same' padding, no groups), got {conv}")
    average = group_average_matrix(conv.out_channels, grouping).to(conv.weight.device, conv.weight.dtype)
    with torch.autocast(conv.weight.device.type, enabled=False):  # averaged in the weights' dtype
        weight = torch.einsum("gc,c...->g...", average, conv.weight)
        bias = None if conv.bias is None else average @ conv.bias
    return SameSizeConv(weight, bias, dilation)
