"""Deterministic "seeded" weights, reproducible from a module's own state-dict names.

Two implementations of one architecture that use identical parameter names get identical
tensors from this rule, so their outputs can be compared without any pretrained file.
The rule (shared with the reference outputs in ``tests/data``) draws every entry from its
own generator, seeded by ``seed * 1_000_003 + crc32(name)``, so the result does not depend
on the order of the entries:

- integer buffers (``num_batches_tracked``)  -> zeros
- ``*running_var``                           -> U(0, 1) + 0.5   (strictly positive)
- ``*running_mean``                          -> N(0, 1) * 0.1
- weights with >= 2 dims (conv, linear, codebook) -> N(0, 1) * sqrt(gain / fan_in),
  fan_in = prod(shape[1:]) (He scaling with gain 2 for ReLU nets keeps activations O(1))
- ``*bn.weight``                             -> 1 + 0.1 * N(0, 1)
- any other 0/1-dim float (biases)           -> 0.1 * N(0, 1)

The demo uses it to rebuild a frozen network when the official weights are unavailable.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

_SEED_STRIDE = 1_000_003


def seeded_tensor(name: str, shape: tuple[int, ...], seed: int, gain: float, floating: bool = True) -> torch.Tensor:
    """The seeded value of one state-dict entry (float32, or int64 zeros if not ``floating``)."""
    if not floating:
        return torch.zeros(shape, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed * _SEED_STRIDE + zlib.crc32(name.encode()))
    if name.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    if name.endswith("running_mean"):
        return torch.randn(shape, generator=gen) * 0.1
    if len(shape) >= 2:
        return torch.randn(shape, generator=gen) * math.sqrt(gain / math.prod(shape[1:]))
    if name.endswith("bn.weight"):
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    return 0.1 * torch.randn(shape, generator=gen)


def seeded_state_dict_for(module: nn.Module, seed: int, gain: float) -> dict[str, torch.Tensor]:
    """A full state dict for ``module`` following the seeded rule, in its own key order.

    Names and shapes come from ``module.state_dict()``; floating entries keep the module's
    dtype (the values are drawn in float32 first, so the draw does not depend on it) and
    integer entries are zeros of the module's integer dtype.
    """
    state = {}
    for name, own in module.state_dict().items():
        floating = own.is_floating_point()
        value = seeded_tensor(name, tuple(own.shape), seed, gain, floating)
        state[name] = value.to(own.dtype)
    return state
