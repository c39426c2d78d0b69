"""The seeded-weights rule of the compatibility references (tests/data/*_keys.tsv).

Every entry of a state-dict manifest gets a deterministic tensor from a generator seeded
by the entry's name, so two implementations with identical names compute the same
function. The reference outputs in tests/data were produced with this rule.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def read_manifest(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    entries = []
    for line in (DATA / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        entries.append((key, tuple(int(s) for s in shape.split(",")) if shape else (), dtype))
    return entries


def seeded_tensor(key: str, shape: tuple[int, ...], dtype: str, seed: int, gain: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    if dtype == "int":
        return torch.zeros(shape, dtype=torch.long)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    if key.endswith("running_mean"):
        return torch.randn(shape, generator=gen) * 0.1
    if len(shape) >= 2:
        return torch.randn(shape, generator=gen) * math.sqrt(gain / math.prod(shape[1:]))
    if key.endswith("bn.weight"):
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    return 0.1 * torch.randn(shape, generator=gen)


def seeded_state_dict(manifest: str, seed: int, gain: float) -> dict[str, torch.Tensor]:
    return {k: seeded_tensor(k, s, d, seed, gain) for k, s, d in read_manifest(manifest)}


def seeded_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())
