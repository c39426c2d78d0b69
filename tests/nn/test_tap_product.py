"""Few-output convolutions of one input as one product, against torch's own."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conchshell.nn.direct import direct_convolutions
from conchshell.nn.tap_product import SameSizeConv, shared_input_convs


def channels_last(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


def plain(x, convs):
    return [F.conv2d(x, c.weight, c.bias, padding=c.padding, dilation=c.dilation) for c in convs]


@pytest.mark.parametrize("kernels", [
    [(1, 1, False), (3, 1, True)],   # TCNN-6: the block's frame and the last layer's filters
    [(3, 2, True)],                  # dilated
    [(5, 1, False), (7, 2, True)],   # wider than the image in one dimension
])
def test_equals_the_convolutions(kernels):
    torch.manual_seed(0)
    x = channels_last(2, 8, 9, 6)
    convs = [SameSizeConv(torch.randn(3, 8, k, k, dtype=torch.float64),
                          torch.randn(3, dtype=torch.float64) if bias else None, dilation)
             for k, dilation, bias in kernels]
    got = shared_input_convs(x, convs)
    for out, expected in zip(got, plain(x, convs), strict=True):
        assert out.shape == expected.shape
        # The shifted sums are float32: compare at float32 precision.
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_rounds_once():
    torch.manual_seed(1)
    x = channels_last(1, 64, 32, 32, dtype=torch.float32)
    conv = SameSizeConv(torch.randn(3, 64, 3, 3) / 24, torch.randn(3))
    reference = plain(x.double(), [SameSizeConv(conv.weight.double(), conv.bias.double())])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, = shared_input_convs(x.bfloat16(), [conv])
        direct, = plain(x.bfloat16(), [conv])
    assert got.dtype == direct.dtype == torch.bfloat16

    def error(y):
        return float((y.double() - reference).norm() / reference.norm())

    assert error(got) <= 1.2 * error(direct)


def test_plain_path_off_the_fast_layout_and_inside_direct_convolutions():
    x = channels_last(1, 4, 8, 8, dtype=torch.float32)
    convs = [SameSizeConv(torch.randn(3, 4, 3, 3), None)]

    def ops(fn):
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_flop_counts()["Global"]

    assert set(ops(lambda: shared_input_convs(x, convs))) == {torch.ops.aten.mm}
    with direct_convolutions():
        assert set(ops(lambda: shared_input_convs(x, convs))) == {torch.ops.aten.convolution}
    assert set(ops(lambda: shared_input_convs(x.contiguous(), convs))) == {torch.ops.aten.convolution}
    # The product does the convolution's multiply-adds, no more.
    with direct_convolutions():
        direct = FlopCounterMode(display=False)
        with direct:
            shared_input_convs(x, convs)
    fast = FlopCounterMode(display=False)
    with fast:
        shared_input_convs(x, convs)
    assert fast.get_total_flops() == direct.get_total_flops()


def test_rejects_kernels_it_cannot_keep_the_size_of():
    x = channels_last(1, 4, 8, 8)
    with pytest.raises(ValueError, match="square and of odd size"):
        shared_input_convs(x, [SameSizeConv(torch.randn(3, 4, 2, 2, dtype=torch.float64), None)])
    with pytest.raises(ValueError, match="reads 5 channels"):
        shared_input_convs(x, [SameSizeConv(torch.randn(3, 5, 3, 3, dtype=torch.float64), None)])
