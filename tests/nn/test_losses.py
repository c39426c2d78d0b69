"""GAN losses on hand-made discriminator outputs with values worked out by hand."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conchshell.nn.losses import (
    LossWeights,
    discriminator_hinge_loss,
    feature_matching_loss,
    feature_matching_weight,
    generator_hinge_loss,
    generator_objective,
    mean_absolute_difference,
)

NUM_SCALES = 3


def outputs_with_scores(score: float, num_scales: int = NUM_SCALES, feature: float = 0.0,
                        requires_grad: bool = False) -> list[list[torch.Tensor]]:
    """Six constant feature maps and a constant score map per scale, shaped like the real D's."""
    scales = []
    for scale in range(num_scales):
        length = 64 >> scale
        maps = [torch.full((2, 4, length), feature, requires_grad=requires_grad) for _ in range(6)]
        maps.append(torch.full((2, 1, length), score, requires_grad=requires_grad))
        scales.append(maps)
    return scales


def test_discriminator_hinge_is_zero_for_confident_correct_scores():
    loss = discriminator_hinge_loss(outputs_with_scores(2.0), outputs_with_scores(-2.0))
    assert loss.item() == 0.0


def test_discriminator_hinge_is_two_per_scale_at_zero_scores():
    # relu(1 - 0) + relu(1 + 0) = 2 at every scale.
    loss = discriminator_hinge_loss(outputs_with_scores(0.0), outputs_with_scores(0.0))
    assert loss.item() == pytest.approx(2.0 * NUM_SCALES)


def test_discriminator_hinge_only_penalises_the_wrong_side_of_the_margin():
    real = outputs_with_scores(0.5)  # relu(1 - 0.5) = 0.5 per scale
    fake = outputs_with_scores(-3.0)  # relu(1 - 3) = 0
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx(0.5 * NUM_SCALES)
    # A mixed score map: mean(relu(1 - [2, -1])) = mean([0, 2]) = 1 per scale.
    mixed = [[*scale[:-1], torch.tensor([[[2.0, -1.0]]])] for scale in outputs_with_scores(0.0)]
    assert discriminator_hinge_loss(mixed, outputs_with_scores(-1.0)).item() == pytest.approx(NUM_SCALES)


def test_generator_hinge_is_minus_the_summed_mean_score():
    assert generator_hinge_loss(outputs_with_scores(0.0)).item() == 0.0
    assert generator_hinge_loss(outputs_with_scores(2.0)).item() == pytest.approx(-2.0 * NUM_SCALES)
    fake = outputs_with_scores(0.0)
    fake[1][-1] = torch.tensor([[[1.0, 3.0]]])  # mean 2 at one scale only
    assert generator_hinge_loss(fake).item() == pytest.approx(-2.0)


def test_feature_matching_weight_is_melgans():
    assert feature_matching_weight(3, 4) == pytest.approx(4.0 / 5.0 / 3.0)


def test_feature_matching_value_and_weighting():
    real = outputs_with_scores(0.0, feature=1.0)
    fake = outputs_with_scores(0.0, feature=0.25)
    # 3 scales x 6 maps, each |1 - 0.25| = 0.75, each weighted 4/5/3.
    expected = NUM_SCALES * 6 * 0.75 * (4.0 / 5.0 / 3.0)
    assert feature_matching_loss(real, fake).item() == pytest.approx(expected)
    # The score map (last entry) must not count, however far apart it is.
    real[0][-1] = torch.full_like(real[0][-1], 100.0)
    assert feature_matching_loss(real, fake).item() == pytest.approx(expected)
    # Fewer layers, fewer terms.
    assert feature_matching_loss(real, fake, num_layers=2).item() == pytest.approx(expected / 3)


def test_feature_matching_trains_only_the_generator_side():
    real = outputs_with_scores(0.0, feature=1.0, requires_grad=True)
    fake = outputs_with_scores(0.0, feature=0.0, requires_grad=True)
    feature_matching_loss(real, fake).backward()
    assert all(t.grad is None for scale in real for t in scale)
    first = fake[0][0]
    # d/dx mean|x - 1| = -1/numel at x = 0, times the layer weight.
    expected = -(4.0 / 5.0 / 3.0) / first.numel()
    torch.testing.assert_close(first.grad, torch.full_like(first, expected))


def test_feature_matching_on_bf16_maps_is_float32_and_matches_float32_maps():
    torch.manual_seed(0)
    real = [[torch.randn(2, 8, 512 >> s).bfloat16() for _ in range(7)] for s in range(NUM_SCALES)]
    fake = [[t + 0.1 * torch.randn_like(t) for t in scale] for scale in real]
    loss = feature_matching_loss(real, fake)
    assert loss.dtype == torch.float32
    as_float = [[t.float() for t in scale] for scale in fake], [[t.float() for t in scale] for scale in real]
    expected = feature_matching_loss(as_float[1], as_float[0])
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=0)


def test_mean_absolute_difference_is_l1_loss_with_its_gradient():
    torch.manual_seed(0)
    a = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    value = mean_absolute_difference(a, b)
    assert value.dtype == torch.float32
    (grad_a,) = torch.autograd.grad(value, a)
    expected = torch.nn.functional.l1_loss(a, b.detach())
    (expected_a,) = torch.autograd.grad(expected, a)
    torch.testing.assert_close(value, expected.float())
    torch.testing.assert_close(grad_a, expected_a)
    mean_absolute_difference(a, b).backward()
    assert b.grad is None, "the second argument is a constant"
    with pytest.raises(ValueError, match="shapes differ"):
        mean_absolute_difference(a, b[:1])


def test_mean_absolute_difference_stays_accurate_on_a_long_bf16_map():
    # 26M values: a float32 running sum (as torch.linalg.vector_norm's was) drifts by percents.
    torch.manual_seed(0)
    a = torch.randn(2, 64, 200_000).bfloat16()
    b = torch.randn(2, 64, 200_000).bfloat16()
    expected = (a.double() - b.double()).abs().mean()
    assert float(mean_absolute_difference(a, b)) == pytest.approx(float(expected), rel=1e-3)


def test_feature_matching_rejects_too_few_feature_maps():
    real = outputs_with_scores(0.0)
    fake = outputs_with_scores(0.0)
    with pytest.raises(ValueError, match="feature maps"):
        feature_matching_loss(real, fake, num_layers=8)


def test_scale_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="scales"):
        discriminator_hinge_loss(outputs_with_scores(0.0, num_scales=3), outputs_with_scores(0.0, num_scales=2))


def test_loss_weight_defaults_are_the_papers_and_original_code_differs():
    paper = LossWeights()
    assert (paper.lambda_g, paper.lambda_fm, paper.lambda_wave, paper.lambda_mel) == (0.5, 3.0, 40.0, 15.0)
    assert paper.lambda_latent == paper.lambda_quantized_latent == 0.0
    assert paper.lambda_commitment == 0.0  # not in the paper
    original = LossWeights.original_code()
    assert (original.lambda_g, original.lambda_latent, original.lambda_quantized_latent) == (1.0, 5.0, 8.0)
    assert (original.lambda_fm, original.lambda_wave, original.lambda_mel) == (3.0, 40.0, 15.0)
    # Every field maps to exactly one named term.
    assert sorted(paper.by_term().values()) == sorted(dataclasses.astuple(paper))


def test_generator_objective_weighted_sum_with_paper_weights():
    terms = {name: torch.tensor(value) for name, value in
             {"adversarial": -2.0, "feature_matching": 0.5, "wave": 0.1, "mel": 1.0}.items()}
    # 0.5 * -2 + 3 * 0.5 + 40 * 0.1 + 15 * 1 = 19.5; the latent terms are absent and weigh 0.
    assert generator_objective(terms, LossWeights()).item() == pytest.approx(19.5)


def test_generator_objective_ignores_zero_weight_terms_even_when_given():
    terms = {"adversarial": torch.tensor(1.0), "feature_matching": torch.tensor(0.0),
             "wave": torch.tensor(0.0), "mel": torch.tensor(0.0),
             "latent": torch.tensor(float("nan"))}  # would poison the sum if it were used
    assert generator_objective(terms, LossWeights()).item() == pytest.approx(0.5)


def test_generator_objective_original_code_weights_and_gradients():
    pred = torch.tensor(2.0, requires_grad=True)
    terms = {"adversarial": pred, "feature_matching": pred * 0, "wave": pred * 0, "mel": pred * 0,
             "latent": pred * 1.0, "quantized_latent": pred * 0.5}
    total = generator_objective(terms, LossWeights.original_code())
    assert total.item() == pytest.approx(1.0 * 2 + 5.0 * 2 + 8.0 * 1)
    total.backward()
    assert pred.grad.item() == pytest.approx(1.0 + 5.0 + 4.0)


def test_generator_objective_reports_missing_and_unknown_terms():
    with pytest.raises(KeyError, match="mel"):
        generator_objective({"adversarial": torch.tensor(1.0), "feature_matching": torch.tensor(1.0),
                             "wave": torch.tensor(1.0)}, LossWeights())
    with pytest.raises(KeyError, match="unknown"):
        generator_objective({"adverserial": torch.tensor(1.0)}, LossWeights())
    with pytest.raises(ValueError, match="every loss weight"):
        generator_objective({}, LossWeights(0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
