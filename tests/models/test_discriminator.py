"""Multi-scale discriminator: the paper's size, output layout, flattening, tiny widths."""
from __future__ import annotations

import pytest
import torch

import conchshell.models.discriminator as discriminator_module
from conchshell.errors import ConfigError
from conchshell.models.discriminator import MultiScaleDiscriminator
from conchshell.utils.profile import count_macs, count_params

PAPER_PARAMS = 9_212_358
# latent frames -> exact conv MACs at batch 1 (latent [1, 64, T])
EXACT_MACS = {1000: 2_733_464_064, 4000: 10_975_492_608, 16000: 43_949_188_608}
# DESIGN.md / paper Table 1 to five digits (G-MACs), which also count the AvgPool outputs.
PAPER_GMACS = {1000: 2.7335, 4000: 10.9757, 16000: 43.9501}
# Per-scale score lengths for [1, 64, T]: T=1000 worked out by hand from the layer table.
SCORE_LENGTHS = {1000: [248, 123, 61], 4000: [998, 498, 248], 16000: [3998, 1998, 998]}
FEATURE_CHANNELS = [32, 128, 512, 1024, 1024, 512, 1]


def _meta_macs(frames: int) -> tuple[int, list[list[torch.Tensor]]]:
    with torch.device("meta"):
        model = MultiScaleDiscriminator()
        latent = torch.empty(1, 64, frames)
    return count_macs(model, latent), model(latent)


def test_param_count_matches_the_paper() -> None:
    assert count_params(MultiScaleDiscriminator()) == PAPER_PARAMS


def test_group_counts_are_four_input_channels_per_group() -> None:
    scale = MultiScaleDiscriminator().scales[0]
    assert [scale.layers[i][0].groups for i in range(1, 5)] == [8, 32, 128, 256]
    assert scale.layers[5][0].kernel_size == (5,) and scale.layers[5][0].padding == (1,)


@pytest.mark.parametrize("frames", list(EXACT_MACS))
def test_macs_and_layout_at_paper_sizes(frames: int) -> None:
    macs, outputs = _meta_macs(frames)
    assert macs == EXACT_MACS[frames]
    assert len(outputs) == 3 and all(len(scale) == 7 for scale in outputs)
    assert [scale[-1].shape[-1] for scale in outputs] == SCORE_LENGTHS[frames]
    assert [t.shape[1] for t in outputs[0]] == FEATURE_CHANNELS
    # Table 1's five-digit figures = these conv MACs + one per AvgPool output over the three
    # downsamplings the released forward runs (0.5 + 0.25 + 0.125 of the 64T samples).
    assert round((macs + 0.875 * 64 * frames) / 1e9, 4) == PAPER_GMACS[frames]


def test_docstring_states_the_measured_figures() -> None:
    doc = discriminator_module.__doc__
    assert f"{PAPER_PARAMS:,}" in doc
    assert all(f"{macs:,}" in doc for macs in EXACT_MACS.values())


@pytest.mark.heavy
@pytest.mark.parametrize("frames", list(EXACT_MACS))
def test_full_size_on_cpu_matches_the_meta_count(frames: int) -> None:
    torch.manual_seed(0)
    model = MultiScaleDiscriminator().eval()
    latent = torch.randn(1, 64, frames)
    assert count_macs(model, latent) == EXACT_MACS[frames]
    with torch.no_grad():
        outputs = model(latent)
    assert [scale[-1].shape[-1] for scale in outputs] == SCORE_LENGTHS[frames]


def test_flattening_is_channel_major_and_free() -> None:
    model = MultiScaleDiscriminator(width=0.0625)
    latent = torch.randn(2, 64, 40)
    seen = {}
    model.scales[0].register_forward_pre_hook(lambda module, args: seen.setdefault("signal", args[0]))
    model(latent)
    signal = seen["signal"]
    assert signal.shape == (2, 1, 64 * 40)
    assert signal.data_ptr() == latent.data_ptr()  # a view, not a copy
    torch.testing.assert_close(signal[1, 0, 40:80], latent[1, 1])  # channel 1 follows channel 0


def test_scales_see_the_signal_at_halved_rates() -> None:
    model = MultiScaleDiscriminator(width=0.0625)
    latent = torch.randn(1, 64, 40)
    inputs = []
    for scale in model.scales:
        scale.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    model(latent)
    flat = latent.reshape(1, 1, -1)
    once = torch.nn.functional.avg_pool1d(flat, 4, 2, 1, count_include_pad=False)
    twice = torch.nn.functional.avg_pool1d(once, 4, 2, 1, count_include_pad=False)
    for actual, expected in zip(inputs, (flat, once, twice)):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("width", [0.0625, 0.3, 0.5])
def test_tiny_widths_build_run_and_train(width: float) -> None:
    torch.manual_seed(0)
    model = MultiScaleDiscriminator(width=width)
    for scale in model.scales:
        for layer in scale.layers[1:5]:
            conv = layer[0]
            assert conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0
    latent = torch.randn(2, 64, 48, requires_grad=True)
    outputs = model(latent)
    assert [scale[-1].shape for scale in outputs] == [
        (2, 1, n) for n in model.score_lengths(64 * 48)
    ]
    sum(scale[-1].mean() for scale in outputs).backward()
    assert latent.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("num_scales", [1, 2, 4])
def test_number_of_scales(num_scales: int) -> None:
    model = MultiScaleDiscriminator(num_scales=num_scales, latent_channels=8, width=0.0625)
    outputs = model(torch.randn(1, 8, 1024))
    assert len(outputs) == num_scales and all(len(scale) == 7 for scale in outputs)


def test_too_short_latent_names_the_minimum() -> None:
    model = MultiScaleDiscriminator(width=0.0625)
    minimum = model.min_latent_length()
    assert min(model.score_lengths(64 * minimum)) == 1
    with pytest.raises(ConfigError, match=f"the minimum is {minimum} frames"):
        model(torch.randn(1, 64, minimum - 1))
    assert model(torch.randn(1, 64, minimum))[-1][-1].shape == (1, 1, 1)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="num_scales"):
        MultiScaleDiscriminator(num_scales=0)
    with pytest.raises(ConfigError, match="width"):
        MultiScaleDiscriminator(width=0.0)
    with pytest.raises(ValueError, match=r"latent must be \[B, 64, T\]"):
        MultiScaleDiscriminator(width=0.0625)(torch.randn(1, 32, 100))


def test_class_conditional_discriminator_starts_as_the_unconditional_one_and_learns_per_class() -> None:
    torch.manual_seed(0)
    plain = MultiScaleDiscriminator(latent_channels=8, width=0.0625)
    conditional = MultiScaleDiscriminator(latent_channels=8, width=0.0625, num_classes=6)
    missing = conditional.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [f"scales.{i}.class_projection.weight" for i in range(3)]
    latent, classes = torch.randn(2, 8, 300), torch.tensor([0, 5])
    for a, b in zip(plain(latent), conditional(latent, classes)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    # Only the score moves with the class, by <embedding, last feature map> at each position.
    with torch.no_grad():
        for scale in conditional.scales:
            scale.class_projection.weight.normal_()
    first, second = conditional(latent, torch.tensor([0, 0])), conditional(latent, torch.tensor([1, 1]))
    for a, b in zip(first, second):
        for x, y in zip(a[:-1], b[:-1]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert not torch.allclose(a[-1], b[-1])
    features = first[0][-2]
    expected = plain(latent)[0][-1] + (conditional.scales[0].class_projection.weight[0][None, :, None]
                                       * features).sum(1, keepdim=True)
    torch.testing.assert_close(first[0][-1], expected)
    (sum(scale[-1].mean() for scale in second)).backward()
    assert all(scale.class_projection.weight.grad[1].abs().sum() > 0 for scale in conditional.scales)


def test_auxiliary_classifier_reads_the_last_feature_maps_and_leaves_the_scores_alone() -> None:
    torch.manual_seed(0)
    plain = MultiScaleDiscriminator(latent_channels=8, width=0.0625)
    auxiliary = MultiScaleDiscriminator(latent_channels=8, width=0.0625, auxiliary_classes=6)
    missing = auxiliary.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"scales.{i}.class_head.{p}" for i in range(3) for p in ("weight", "bias"))
    latent = torch.randn(2, 8, 300)
    outputs = auxiliary(latent)
    for a, b in zip(plain(latent), outputs):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    logits = auxiliary.class_logits(outputs)
    assert logits.shape == (2, 6) and logits.dtype == torch.float32
    expected = torch.stack([scale.class_head(out[-2].mean(dim=2)) for scale, out in zip(auxiliary.scales, outputs)])
    torch.testing.assert_close(logits, expected.mean(dim=0))
    # Gradients reach the heads and, through the feature maps, the convolutions.
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 5])).backward()
    assert all(scale.class_head.weight.grad.abs().sum() > 0 for scale in auxiliary.scales)
    assert auxiliary.scales[0].layers[0][1].parametrizations.weight.original1.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="auxiliary_classes"):
        plain.class_logits(plain(latent))
    with pytest.raises(ConfigError, match="auxiliary_classes"):
        MultiScaleDiscriminator(auxiliary_classes=0)


def test_class_ids_are_required_exactly_when_conditional() -> None:
    latent = torch.randn(2, 8, 300)
    with pytest.raises(ValueError, match="needs class_ids"):
        MultiScaleDiscriminator(latent_channels=8, width=0.0625, num_classes=6)(latent)
    with pytest.raises(ValueError, match="needs class_ids"):
        MultiScaleDiscriminator(latent_channels=8, width=0.0625)(latent, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class_ids must be \[2\]"):
        MultiScaleDiscriminator(latent_channels=8, width=0.0625, num_classes=6)(latent, torch.tensor([0]))
    with pytest.raises(ConfigError, match="num_classes"):
        MultiScaleDiscriminator(num_classes=0)


def test_bf16_cpu_runs_channels_last_only_with_amx(monkeypatch) -> None:
    latent = torch.randn(2, 64, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(discriminator_module, "cpu_has_amx", lambda: False)
        assert not discriminator_module.runs_channels_last(latent)
        monkeypatch.setattr(discriminator_module, "cpu_has_amx", lambda: True)
        assert discriminator_module.runs_channels_last(latent)
    assert not discriminator_module.runs_channels_last(latent)  # float32 stays channels-first


def test_bf16_cpu_runs_channels_last_with_the_same_outputs_and_gradients(monkeypatch) -> None:
    from conchshell.nn.direct import direct_convolutions

    # The AMX layout, checked on any CPU: only its speed depends on the machine.
    monkeypatch.setattr(discriminator_module, "cpu_has_amx", lambda: True)
    torch.manual_seed(0)
    model = MultiScaleDiscriminator(width=0.125, num_classes=6)
    latent = torch.randn(2, 64, 48)
    classes = torch.tensor([1, 4])
    assert not discriminator_module.runs_channels_last(latent)  # float32 stays channels-first
    results = []
    for plain in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if plain:
                with direct_convolutions():
                    assert not discriminator_module.runs_channels_last(latent)
                    outputs = model(latent, classes)
            else:
                assert discriminator_module.runs_channels_last(latent)
                outputs = model(latent, classes)
        sum(o.float().pow(2).mean() for scale in outputs for o in scale).backward()
        results.append(([o.float() for scale in outputs for o in scale],
                        [p.grad.clone() for p in model.parameters()]))
    (plain_maps, plain_grads), (maps, grads) = results
    assert [m.shape for m in maps] == [m.shape for m in plain_maps]  # 3-D feature maps either way
    for got, expected in zip(maps, plain_maps):
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
    # bf16 sums in another order: most gradients agree to 0.3 %, the first layer's to 3 %.
    for got, expected in zip(grads, plain_grads):
        assert (got - expected).norm() <= 0.1 * expected.norm() + 1e-6
