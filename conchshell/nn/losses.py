"""GAN objectives of ConchShell (paper section 3.4, DESIGN.md section 3).

A multi-scale discriminator returns ``list[list[Tensor]]``: one list per scale holding that
scale's intermediate feature maps followed by its final score map (last entry).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

DiscriminatorOutputs = list[list[Tensor]]


def _check_scales(real_outputs: DiscriminatorOutputs, fake_outputs: DiscriminatorOutputs) -> None:
    if len(real_outputs) != len(fake_outputs) or not real_outputs:
        raise ValueError(f"real and fake need the same, non-zero number of discriminator scales; "
                         f"got {len(real_outputs)} and {len(fake_outputs)}")


def discriminator_hinge_loss(real_outputs: DiscriminatorOutputs,
                             fake_outputs: DiscriminatorOutputs) -> Tensor:
    """Paper eq. 1: sum over scales of mean(relu(1 - D(real))) + mean(relu(1 + D(fake))).

    The caller passes fake outputs computed on ``fake.detach()`` so this step does not reach
    the generator.
    """
    _check_scales(real_outputs, fake_outputs)
    loss = real_outputs[0][-1].new_zeros(())
    for real, fake in zip(real_outputs, fake_outputs):
        loss = loss + F.relu(1.0 - real[-1]).mean() + F.relu(1.0 + fake[-1]).mean()
    return loss


def generator_hinge_loss(fake_outputs: DiscriminatorOutputs) -> Tensor:
    """Paper eq. 2: sum over scales of -mean(D(fake))."""
    if not fake_outputs:
        raise ValueError("need at least one discriminator scale")
    loss = fake_outputs[0][-1].new_zeros(())
    for fake in fake_outputs:
        loss = loss - fake[-1].mean()
    return loss


def feature_matching_weight(num_scales: int, num_downsampling_layers: int = 4) -> float:
    """MelGAN's per-feature-map weight, (1 / num_D) * (4 / (n_layers + 1)).

    ``n_layers`` counts the discriminator's strided (downsampling) convolutions, 4 here, so
    with num_D = 3 every feature map is weighted 4/5/3 = 0.2667 (DESIGN.md section 3).
    """
    return (1.0 / num_scales) * (4.0 / (num_downsampling_layers + 1))


class _MeanAbsoluteDifference(torch.autograd.Function):
    """``mean(|a - b|)`` for a constant ``b``, as float32, the differences taken in ``a``'s
    dtype. Its gradient ``sign(a - b) / N`` takes two passes over ``a``; autograd's
    ``(a - b).abs().mean()`` takes five, for bf16 maps with a float32 copy of each (the
    Deep generator step's feature matching: 18 maps of up to 65M values).

    Each row of the last dimension is summed in the maps' dtype (bf16 rounds each row sum:
    about 2e-4 of a Deep map's total), the rows in float32. ``torch.linalg.vector_norm(d, 1)``
    was 7 % low on a 65M-value bf16 map, and a float32 sum of the whole map is 2.5x slower."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        difference = a - b
        ctx.save_for_backward(difference)
        return difference.abs().sum(dim=-1).float().sum() / difference.numel()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (difference,) = ctx.saved_tensors
        return torch.sign(difference).mul_(grad / difference.numel()), None


def mean_absolute_difference(a: Tensor, b: Tensor) -> Tensor:
    """``F.l1_loss(a, b)`` as a float32 value, with gradients for ``a`` only (``b`` is
    treated as a constant)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    return _MeanAbsoluteDifference.apply(a, b.detach())


def feature_matching_loss(real_outputs: DiscriminatorOutputs, fake_outputs: DiscriminatorOutputs,
                          num_layers: int = 6, num_downsampling_layers: int = 4) -> Tensor:
    """Paper eq. 3: weighted L1 between real and fake discriminator features.

    Uses the first ``num_layers`` outputs of every scale (the six feature maps, never the
    score), each term the mean absolute difference times :func:`feature_matching_weight`.
    Real features are detached: this loss trains the generator only. Each difference is
    taken in the maps' own dtype (bf16 maps: no float32 copies; the sum accumulates in
    float32) by :func:`mean_absolute_difference`; the loss is float32.
    """
    _check_scales(real_outputs, fake_outputs)
    weight = feature_matching_weight(len(fake_outputs), num_downsampling_layers)
    loss = fake_outputs[0][0].new_zeros((), dtype=torch.float32)
    for scale, (real, fake) in enumerate(zip(real_outputs, fake_outputs)):
        if len(real) < num_layers or len(fake) < num_layers:
            raise ValueError(f"scale {scale}: need {num_layers} feature maps, got "
                             f"{len(real)} real and {len(fake)} fake outputs")
        for real_map, fake_map in zip(real[:num_layers], fake[:num_layers]):
            loss = loss + weight * mean_absolute_difference(fake_map, real_map)
    return loss


@dataclass(frozen=True)
class LossWeights:
    """Weights of the generator objective (paper eq. 6 plus the released code's latent terms).

    Defaults are the paper's. Term names used by :func:`generator_objective`:
    ``adversarial``, ``feature_matching``, ``wave``, ``mel``, ``latent``, ``quantized_latent``,
    ``commitment`` (not in the paper: the latent's L1 to its own nearest codes), ``class``
    (not in the paper: the auxiliary classifier's cross-entropy on the generated latent).
    """

    lambda_g: float = 0.5
    lambda_fm: float = 3.0
    lambda_wave: float = 40.0
    lambda_mel: float = 15.0
    lambda_latent: float = 0.0
    lambda_quantized_latent: float = 0.0
    lambda_commitment: float = 0.0
    lambda_class: float = 0.0

    @classmethod
    def original_code(cls) -> "LossWeights":
        """The released training script's weights: lambda_g 1, plus 5 * L1(gt latent, pred)
        and 8 * L1(quantised gt latent, pred)."""
        return cls(lambda_g=1.0, lambda_latent=5.0, lambda_quantized_latent=8.0)

    def by_term(self) -> dict[str, float]:
        """Weight of each named term of the objective."""
        return {name: getattr(self, field) for name, field in _TERM_FIELDS.items()}


_TERM_FIELDS = {
    "adversarial": "lambda_g",
    "feature_matching": "lambda_fm",
    "wave": "lambda_wave",
    "mel": "lambda_mel",
    "latent": "lambda_latent",
    "quantized_latent": "lambda_quantized_latent",
    "commitment": "lambda_commitment",
    "class": "lambda_class",
}


def generator_objective(terms: dict[str, Tensor], weights: LossWeights) -> Tensor:
    """Weighted sum of the generator's loss terms.

    A term with weight 0 is ignored and may be left out of ``terms`` (the training loop then
    need not compute it); a term with a non-zero weight must be present. Unknown names are
    an error, so a misspelt term cannot be silently dropped.
    """
    unknown = set(terms) - set(_TERM_FIELDS)
    if unknown:
        raise KeyError(f"unknown loss terms {sorted(unknown)}; expected some of {sorted(_TERM_FIELDS)}")
    total: Tensor | None = None
    for name, weight in weights.by_term().items():
        if weight == 0.0:
            continue
        if name not in terms:
            raise KeyError(f"loss term {name!r} has weight {weight} but was not computed")
        weighted = weight * terms[name]
        total = weighted if total is None else total + weighted
    if total is None:
        raise ValueError("every loss weight is 0: nothing to optimise")
    return total
