"""Algorithm 1: channel groupings, frame order and repetition, and the TCNN shortcut."""
from __future__ import annotations

import itertools

import pytest
import torch

from conchshell.errors import ConfigError
from conchshell.models.pseudo_video import (
    block_to_frame,
    build_pseudo_video,
    channel_groups,
    image_to_block_frames,
    image_to_pseudo_video,
)
from conchshell.models.tcnn import TCNN6, TCNN18
from conchshell.nn.direct import direct_convolutions

# Larger than four receptive radii (18 for both TCNNs) on each side: the composed-filter form.
COMPOSED_SIZE = (80, 96)


def _channel_index_block(channels: int, batch: int = 2, size: int = 4, offset: float = 0.0) -> torch.Tensor:
    """A block whose channel c holds the constant value c + offset everywhere."""
    values = torch.arange(channels, dtype=torch.float32) + offset
    return values.view(1, channels, 1, 1).expand(batch, channels, size, size).contiguous()


def test_even_groups_are_tensor_split() -> None:
    assert channel_groups(16, "even") == [(0, 6), (6, 11), (11, 16)]
    for channels in (3, 16, 32, 64, 128, 256, 512, 100):
        sizes = [stop - start for start, stop in channel_groups(channels, "even")]
        assert sizes == [len(part) for part in torch.tensor_split(torch.arange(channels), 3)]


def test_original_groups_skip_two_channels() -> None:
    assert channel_groups(16, "original") == [(0, 5), (6, 11), (12, 16)]
    groups = channel_groups(128, "original")
    assert groups == [(0, 42), (43, 85), (86, 128)]
    covered = {c for start, stop in groups for c in range(start, stop)}
    assert set(range(128)) - covered == {42, 85}


def test_group_means_on_a_known_block() -> None:
    block = _channel_index_block(16)
    even = block_to_frame(block, "even")
    original = block_to_frame(block, "original")
    assert even.shape == original.shape == (2, 3, 4, 4)
    # even: channels 0-5, 6-10, 11-15; original: 0-4, 6-10, 12-15.
    torch.testing.assert_close(even[0, :, 0, 0], torch.tensor([2.5, 8.0, 13.0]))
    torch.testing.assert_close(original[0, :, 0, 0], torch.tensor([2.0, 8.0, 13.5]))
    assert (even == even[:1, :, :1, :1]).all(), "a constant block gives constant frames"


def test_group_means_of_a_bf16_channels_last_block() -> None:
    torch.manual_seed(0)
    block = torch.randn(2, 16, 8, 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    frame = block_to_frame(block)
    assert frame.dtype == torch.bfloat16
    expected = torch.stack([block[:, a:b].float().mean(dim=1) for a, b in channel_groups(16)], dim=1)
    torch.testing.assert_close(frame.float(), expected, rtol=1e-2, atol=1e-2)


def test_frames_repeat_block_by_block() -> None:
    # Block i has channels valued 100*i + c, so every frame names its block.
    blocks = [_channel_index_block(c, offset=100.0 * i) for i, c in enumerate((16, 32, 9))]
    video = build_pseudo_video(blocks, frames_per_block=3)
    assert video.shape == (2, 3, 9, 4, 4)
    assert video.is_contiguous()
    for t in range(9):
        torch.testing.assert_close(video[:, :, t], block_to_frame(blocks[t // 3]))
    assert video[0, 0, :, 0, 0].tolist() == [2.5] * 3 + [105.0] * 3 + [201.0] * 3


def test_single_frame_per_block() -> None:
    blocks = [torch.randn(1, c, 5, 6) for c in (5, 7, 8, 9)]
    video = build_pseudo_video(blocks, frames_per_block=1, grouping="original")
    assert video.shape == (1, 3, 4, 5, 6)
    for t, block in enumerate(blocks):
        torch.testing.assert_close(video[:, :, t], block_to_frame(block, "original"))


def test_gradient_reaches_every_grouped_channel() -> None:
    block = torch.randn(1, 16, 3, 3, requires_grad=True)
    build_pseudo_video([block], frames_per_block=3, grouping="even").sum().backward()
    # d(sum)/d(channel) = repeats / group size: 3/6 for the first group, 3/5 for the others.
    expected = torch.tensor([0.5] * 6 + [0.6] * 10)
    torch.testing.assert_close(block.grad[0, :, 0, 0], expected)


def test_original_grouping_ignores_the_skipped_channels() -> None:
    block = torch.randn(1, 16, 3, 3, requires_grad=True)
    build_pseudo_video([block], frames_per_block=2, grouping="original").sum().backward()
    per_channel = block.grad[0, :, 0, 0]
    assert per_channel[5] == 0 and per_channel[11] == 0
    assert (per_channel[[0, 4, 6, 10, 12, 15]] > 0).all()


def test_bad_inputs_are_rejected() -> None:
    block = torch.randn(1, 16, 4, 4)
    with pytest.raises(ConfigError, match="'thirds'"):
        build_pseudo_video([block], 3, grouping="thirds")
    with pytest.raises(ValueError, match="shape"):
        build_pseudo_video([block, torch.randn(1, 16, 4, 5)], 3)
    with pytest.raises(ValueError):
        build_pseudo_video([], 3)
    with pytest.raises(ValueError):
        build_pseudo_video([block], 0)
    with pytest.raises(ValueError, match="too small"):
        block_to_frame(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="too small"):
        block_to_frame(torch.randn(1, 4, 4, 4), "original")
    with pytest.raises(ValueError, match=r"\[B,C,H,W\]"):
        block_to_frame(torch.randn(16, 4, 4))


# Both TCNNs, both frame groupings, both memory layouts.
EVERY_TCNN_GROUPING_AND_LAYOUT = pytest.mark.parametrize("cls,grouping,layout", list(itertools.product(
    [TCNN6, TCNN18], ["even", "original"], [torch.contiguous_format, torch.channels_last])))


@EVERY_TCNN_GROUPING_AND_LAYOUT
def test_image_to_pseudo_video_matches_the_two_step_path(cls: type, grouping: str,
                                                         layout: torch.memory_format) -> None:
    # Channels-last images take the one-product path for the last two frames.
    torch.manual_seed(0)
    model = cls().eval().to(memory_format=layout)
    images = torch.randn(2, 3, 20, 20).contiguous(memory_format=layout)
    with torch.no_grad():
        video = image_to_pseudo_video(model, images, grouping=grouping)
        frames = image_to_block_frames(model, images, grouping=grouping)
        expected = build_pseudo_video(model.time_features(images), model.frames_per_block, grouping)
    assert video.shape == (2, 3, 18, 20, 20)
    torch.testing.assert_close(video, expected)
    assert frames.shape == (2, 3, len(model.convs), 20, 20)
    torch.testing.assert_close(frames.repeat_interleave(model.frames_per_block, dim=2), video)


def _chain_frames(model: torch.nn.Module, images: torch.Tensor, grouping: str = "even") -> torch.Tensor:
    with torch.no_grad(), direct_convolutions():
        return image_to_block_frames(model, images, grouping=grouping)


@EVERY_TCNN_GROUPING_AND_LAYOUT
def test_composed_filter_frames_match_the_convolutions(cls: type, grouping: str,
                                                       layout: torch.memory_format) -> None:
    torch.manual_seed(0)
    model = cls().eval().to(memory_format=layout)
    images = torch.randn(2, 3, *COMPOSED_SIZE).contiguous(memory_format=layout)
    expected = _chain_frames(model, images, grouping)
    with torch.no_grad():
        frames = image_to_block_frames(model, images, grouping=grouping)
    assert frames.shape == expected.shape and frames.dtype == torch.float32
    scale = expected.abs().max().item()
    # The border band (strips through the convolutions) and the interior (the FFT) alike.
    torch.testing.assert_close(frames, expected, rtol=1e-4, atol=1e-5 * scale)


def test_composed_filter_frames_under_bf16() -> None:
    torch.manual_seed(0)
    model = TCNN6().eval().to(memory_format=torch.channels_last)
    images = torch.randn(1, 3, *COMPOSED_SIZE).contiguous(memory_format=torch.channels_last)
    reference = _chain_frames(model, images)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        frames = image_to_block_frames(model, images)
        chain = _chain_frames(model, images)
    assert frames.dtype == chain.dtype == torch.bfloat16
    inner = (..., slice(18, -18), slice(18, -18))
    # The interior is computed in float32 and only rounded to bf16 at the end: within half a
    # bf16 step of float32's frames, where the bf16 convolutions drift further.
    half_step = reference[inner].abs() * 2.0 ** -8 + 1e-5 * reference.abs().max()
    assert ((frames[inner].float() - reference[inner]).abs() <= half_step).all()
    assert ((chain[inner].float() - reference[inner]).abs() > half_step).float().mean() > 0.1
    torch.testing.assert_close(frames.float(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


def test_composed_filters_follow_the_weights() -> None:
    torch.manual_seed(0)
    model = TCNN6().eval()
    images = torch.randn(1, 3, *COMPOSED_SIZE)
    with torch.no_grad():
        image_to_block_frames(model, images)
        model.convs[2].weight.mul_(-0.5)  # in place: the kept spectra must not be reused
        model.convs[4].bias.add_(1.0)
        frames = image_to_block_frames(model, images)
    expected = _chain_frames(model, images)
    torch.testing.assert_close(frames, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_a_tcnn_built_under_inference_mode() -> None:
    # Its weights are inference tensors, which keep no version counter.
    torch.manual_seed(0)
    with torch.inference_mode():
        model = TCNN6().eval()
        images = torch.randn(1, 3, *COMPOSED_SIZE)
        first = image_to_block_frames(model, images)
        again = image_to_block_frames(model, images)
        with direct_convolutions():
            expected = image_to_block_frames(model, images)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_gradients_take_the_convolutions() -> None:
    torch.manual_seed(0)
    model = TCNN6().eval()
    images = torch.randn(1, 3, *COMPOSED_SIZE, requires_grad=True)
    frames = image_to_block_frames(model, images)
    frames.square().sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert model.convs[0].weight.grad is not None


def test_time_feature_convs_must_keep_the_image_size() -> None:
    model = TCNN6().eval()
    model.convs[-1].stride = (2, 2)
    with pytest.raises(ValueError, match="keep the image size"):
        image_to_pseudo_video(model, torch.randn(1, 3, 20, 20))


def test_tcnn6_pseudo_video_at_paper_size() -> None:
    model = TCNN6().eval()
    with torch.no_grad():
        video = image_to_pseudo_video(model, torch.randn(1, 3, 224, 224))
    assert video.shape == (1, 3, 18, 224, 224)
    assert torch.isfinite(video).all()


@pytest.mark.heavy
def test_tcnn18_pseudo_video_at_paper_size() -> None:
    model = TCNN18().eval()
    with torch.no_grad():
        video = image_to_pseudo_video(model, torch.randn(1, 3, 224, 224))
    assert video.shape == (1, 3, 18, 224, 224)
    assert torch.isfinite(video).all()
