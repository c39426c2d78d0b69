"""The composed filter of an affine convolution stack: its kernels, and the FFT interior."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conchshell.nn.composed_filter import circular_spectra, filter_interior, impulse_response

# (in, out, kernel, dilation) of a small affine stack; its receptive radius is 2 + 2 + 1.
LAYERS = [(2, 5, 3, 2), (5, 4, 5, 1), (4, 3, 3, 1)]
RADIUS = 5


def _stack(dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(out, inp, k, k, generator=generator, dtype=dtype),
             torch.randn(out, generator=generator, dtype=dtype), d) for inp, out, k, d in LAYERS]


def _apply(stack: list[tuple[torch.Tensor, torch.Tensor, int]], x: torch.Tensor) -> torch.Tensor:
    for weight, bias, dilation in stack:
        x = F.conv2d(x, weight, bias, padding=dilation * (weight.shape[-1] - 1) // 2, dilation=dilation)
    return x


def test_the_interior_equals_the_stack_and_the_border_does_not() -> None:
    stack = _stack()
    kernels, constant = impulse_response(lambda x: _apply(stack, x), channels=2, radius=RADIUS)
    assert kernels.shape == (2, 3, 2 * RADIUS + 1, 2 * RADIUS + 1) and constant.shape == (3,)
    x = torch.randn(2, 2, 23, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = _apply(stack, x).float()
    got = filter_interior(x.float(), circular_spectra(kernels, 23, 30), constant)
    inner = (..., slice(RADIUS, 23 - RADIUS), slice(RADIUS, 30 - RADIUS))
    # float32 transforms: errors of a few 1e-7 of the largest value.
    torch.testing.assert_close(got[inner], expected[inner], rtol=0, atol=2e-6 * expected.abs().max().item())
    # Within the radius of an edge the stack's zero padding differs from the wrapped input.
    assert not torch.allclose(got[..., :RADIUS, :], expected[..., :RADIUS, :], atol=1e-2)


def test_the_constant_is_the_response_to_zero_away_from_the_edges() -> None:
    stack = _stack()
    _, constant = impulse_response(lambda x: _apply(stack, x), channels=2, radius=RADIUS)
    zero_response = _apply(stack, torch.zeros(1, 2, 31, 31, dtype=torch.float64))
    torch.testing.assert_close(constant, zero_response[0, :, 15, 15])


def test_several_output_dimensions_keep_their_shape() -> None:
    stack = _stack()
    def two_views(x: torch.Tensor) -> torch.Tensor:  # [N, 2, 3, S, S]: the output and its double
        y = _apply(stack, x)
        return torch.stack([y, 2 * y], dim=1)
    kernels, constant = impulse_response(two_views, channels=2, radius=RADIUS)
    assert kernels.shape[:3] == (2, 2, 3) and constant.shape == (2, 3)
    x = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    out = filter_interior(x, circular_spectra(kernels, 16, 16), constant)
    assert out.shape == (1, 2, 3, 16, 16)
    torch.testing.assert_close(out[:, 1], 2 * out[:, 0], rtol=0, atol=2e-6 * out.abs().max().item())


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="odd size"):
        circular_spectra(torch.zeros(1, 1, 4, 4), 8, 8)
    with pytest.raises(ValueError, match="smaller than"):
        circular_spectra(torch.zeros(1, 1, 5, 5), 4, 8)
    spectra = circular_spectra(torch.zeros(2, 3, 5, 5), 8, 8)
    with pytest.raises(ValueError, match="do not fit"):
        filter_interior(torch.zeros(1, 2, 8, 10), spectra, torch.zeros(3))
