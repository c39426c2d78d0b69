"""A 3-D convolution of repeated frames, against the convolution of the repeated clip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conchshell.models.i3d import same_padding
from conchshell.nn.direct import direct_convolutions
from conchshell.nn.repeated_frames import repeat_frames, repeated_frames_conv3d, temporal_tap_groups


def same(sizes, kernel, stride):
    return [same_padding(size, k, s) for size, k, s in zip(sizes, kernel, stride)]


def plain(frames, repeats, weight, bias, stride, padding):
    (tb, ta), (hb, ha), (wb, wa) = padding
    clip = F.pad(repeat_frames(frames, repeats), (wb, wa, hb, ha, tb, ta))
    return F.conv3d(clip, weight, bias, stride)


@pytest.mark.parametrize("batch, frames, repeats, kernel, stride, size", [
    (1, 6, 3, (7, 7, 7), (2, 2, 2), (32, 32)),  # the I3D stem on TCNN-6's clip
    (2, 6, 3, (7, 7, 7), (2, 2, 2), (17, 20)),  # odd sizes: asymmetric padding everywhere
    (2, 4, 2, (3, 3, 3), (1, 1, 1), (9, 9)),    # stride 1, every window on two frames
    (1, 3, 5, (3, 1, 5), (2, 1, 3), (8, 13)),   # windows inside one run of copies
    (1, 2, 4, (1, 3, 3), (1, 2, 2), (10, 10)),  # no temporal extent
])
def test_equals_the_convolution_of_the_repeated_clip(batch, frames, repeats, kernel, stride, size):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, frames, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(8, 3, *kernel, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    padding = same((frames * repeats, *size), kernel, stride)
    got = repeated_frames_conv3d(x, repeats, weight, bias, stride, padding)
    expected = plain(x, repeats, weight, bias, stride, padding)
    assert got.shape == expected.shape
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_bf16_autocast_stays_as_close_to_fp32_as_the_plain_form():
    torch.manual_seed(1)
    x = torch.randn(1, 3, 6, 40, 40)
    weight, stride = torch.randn(16, 3, 7, 7, 7) * 0.05, (2, 2, 2)
    padding = same((18, 40, 40), (7, 7, 7), stride)
    reference = plain(x, 3, weight, None, stride, padding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = repeated_frames_conv3d(x.bfloat16(), 3, weight, None, stride, padding)
        direct = plain(x.bfloat16(), 3, weight, None, stride, padding)
    assert got.dtype == torch.bfloat16

    def error(y):
        return float((y.float() - reference).norm() / reference.norm())

    assert error(got) < 1.5 * error(direct) + 1e-4


def test_taps_are_grouped_by_the_frame_they_fall_on():
    # The I3D stem on 6 frames x 3: padding (2, 3); step 0 covers clip frames -2..4.
    steps = temporal_tap_groups(6, 3, kernel=7, stride=2, padding=(2, 3))
    assert len(steps) == 9
    assert steps[0] == [(0, [2, 3, 4]), (1, [5, 6])]
    assert steps[1] == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6])]
    assert steps[8] == [(4, [0]), (5, [1, 2, 3])]  # taps 4-6 fall on the trailing padding
    assert sum(len(step) for step in steps) == 24  # frame-kernel pairs, against 63 frame taps


def test_gradients_reach_the_frames():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 2, 3, 3, 3, dtype=torch.float64)
    padding = same((6, 6, 6), (3, 3, 3), (1, 1, 1))
    grad, = torch.autograd.grad(repeated_frames_conv3d(x, 2, weight, None, (1, 1, 1), padding).sum(), x)
    expected, = torch.autograd.grad(plain(x, 2, weight, None, (1, 1, 1), padding).sum(), x)
    torch.testing.assert_close(grad, expected)


def test_counts_the_flops_of_the_repeated_clip_inside_direct_convolutions():
    x = torch.randn(1, 3, 6, 16, 16)
    weight = torch.randn(8, 3, 7, 7, 7)
    padding = same((18, 16, 16), (7, 7, 7), (2, 2, 2))

    def flops(fn):
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops()

    expected = flops(lambda: plain(x, 3, weight, None, (2, 2, 2), padding))
    with direct_convolutions():
        assert flops(lambda: repeated_frames_conv3d(x, 3, weight, None, (2, 2, 2), padding)) == expected
    assert flops(lambda: repeated_frames_conv3d(x, 3, weight, None, (2, 2, 2), padding)) < expected / 2


def test_refuses_a_window_on_padding_only_and_a_clip_shorter_than_the_kernel():
    with pytest.raises(ValueError, match="padding only"):
        repeated_frames_conv3d(torch.randn(1, 1, 1, 4, 4), 2, torch.randn(1, 1, 3, 1, 1), None,
                               (1, 1, 1), [(4, 0), (0, 0), (0, 0)])
    with pytest.raises(ValueError, match="shorter than the kernel"):
        repeated_frames_conv3d(torch.randn(1, 1, 1, 4, 4), 2, torch.randn(1, 1, 7, 1, 1), None,
                               (1, 1, 1), [(0, 0), (0, 0), (0, 0)])


def test_repeat_frames_checks_its_count():
    x = torch.randn(1, 3, 2, 4, 4)
    assert repeat_frames(x, 1) is x
    assert torch.equal(repeat_frames(x, 3)[:, :, 3:6], x[:, :, 1:2].expand(-1, -1, 3, -1, -1))
    with pytest.raises(ValueError, match="repeats"):
        repeat_frames(x, 0)
