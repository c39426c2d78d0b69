"""ConchShell generators and the shared 1-D layers: sizes against the paper, shapes, limits."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import conchshell.models.generator as generator_module
from conchshell.errors import ConfigError
from conchshell.models.generator import ConchShellGenerator, build_generator, high_time_length
from conchshell.nn.direct import direct_convolutions
from conchshell.nn.fft_conv import FFTConv1d
from conchshell.nn.layers import ResnetBlock1d, WNConv1d
from conchshell.utils.profile import count_macs, count_params

# level -> (paper latent length, params without the class embedding, exact MACs at batch 1)
PAPER = {
    "high": (1000, 33_108_800, 23_800_072_320),
    "low": (4000, 65_182_528, 27_205_457_664),
    "deep": (16000, 78_298_528, 44_453_017_344),
}
# Paper Table 1 in G-MACs (Deep: the released architecture, not the paper's 59.197G).
PAPER_GMACS = {"high": 23.800, "low": 27.205, "deep": 44.453}


def _meta_generator(level: str, **kwargs) -> ConchShellGenerator:
    # Shapes alone fix params and MACs; the meta device makes full-size checks instant.
    with torch.device("meta"):
        return build_generator(level, latent_length=kwargs.pop("latent_length", PAPER[level][0]), **kwargs)


def _meta_inputs(batch: int = 1, feature_dim: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(batch, feature_dim, device="meta"), torch.zeros(batch, dtype=torch.long, device="meta")


# ---------------------------------------------------------------- layers


def test_wnconv1d_is_weight_normalised_and_loads_old_style_weights() -> None:
    conv = WNConv1d(4, 8, 3)
    assert set(conv.state_dict()) == {
        "bias",
        "parametrizations.weight.original0",
        "parametrizations.weight.original1",
    }
    g, v = torch.rand(8, 1, 1) + 0.5, torch.randn(8, 4, 3)
    # torch maps the deprecated weight_g / weight_v names (the original repo's) on load.
    conv.load_state_dict({"weight_g": g, "weight_v": v, "bias": torch.zeros(8)})
    expected = g * v / v.norm(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(conv.weight, expected)
    # Each output filter's norm is its g, whatever the scale of v.
    torch.testing.assert_close(conv.weight.norm(dim=(1, 2)), g.flatten())


def test_resnet_block_preserves_shape_and_weight_norm_adds_no_macs() -> None:
    channels, length = 8, 50
    for dilation in (1, 3):
        block = ResnetBlock1d(channels, dilation)
        x = torch.randn(2, channels, length)
        assert block(x).shape == x.shape
        # k3 + k1 + k1 shortcut convs = 5 C^2 L per item; the g*v/|v| reparametrisation is free.
        assert count_macs(block, x) == 2 * 5 * channels**2 * length
    assert count_params(ResnetBlock1d(channels)) == 5 * channels**2 + 6 * channels


def test_resnet_block_is_shortcut_plus_residual_branch() -> None:
    torch.manual_seed(0)
    block = ResnetBlock1d(4, dilation=3)
    x = torch.randn(1, 4, 20)
    branch = nn.functional.leaky_relu(x, 0.2)
    branch = nn.functional.pad(branch, (3, 3), mode="reflect")
    branch = nn.functional.conv1d(branch, block.block[2].weight, block.block[2].bias, dilation=3)
    branch = nn.functional.leaky_relu(branch, 0.2)
    branch = nn.functional.conv1d(branch, block.block[4].weight, block.block[4].bias)
    shortcut = nn.functional.conv1d(x, block.shortcut.weight, block.shortcut.bias)
    torch.testing.assert_close(block(x), shortcut + branch)


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("level", list(PAPER))
def test_param_counts_match_the_paper(level: str) -> None:
    model = _meta_generator(level)
    _, params, _ = PAPER[level]
    assert count_params(model, exclude=(model.class_embedding,)) == params
    assert count_params(model) == params + 6 * 256


@pytest.mark.parametrize("level", list(PAPER))
def test_macs_and_output_shape_at_paper_size(level: str) -> None:
    model = _meta_generator(level)
    latent_length, _, macs = PAPER[level]
    features, class_ids = _meta_inputs()
    assert count_macs(model, features, class_ids) == macs
    assert round(macs / 1e9, 3) == PAPER_GMACS[level]
    assert model(features, class_ids).shape == (1, 64, latent_length)


def test_module_docstring_states_the_measured_figures() -> None:
    doc = generator_module.__doc__
    for _, params, macs in PAPER.values():
        assert f"{params:,}" in doc and f"{macs:,}" in doc
    assert "100.420M" in doc and "59.197G" in doc


def test_released_layer_geometry() -> None:
    assert _meta_generator("high").signal_length == 4800
    assert high_time_length(4800) == 1000
    low, deep = _meta_generator("low"), _meta_generator("deep")
    assert (low.signal_length, low.time_frames) == (4096, 664)
    assert (deep.signal_length, deep.time_frames) == (4096, 985)
    assert deep.time_projection.in_features == 985 and deep.time_projection.out_features == 16000


@pytest.mark.heavy
@pytest.mark.parametrize("level", list(PAPER))
def test_full_size_on_cpu_matches_the_meta_count(level: str) -> None:
    latent_length, params, macs = PAPER[level]
    torch.manual_seed(0)
    model = build_generator(level, latent_length=latent_length).eval()
    assert count_params(model, exclude=(model.class_embedding,)) == params
    features, class_ids = torch.randn(1, 2048), torch.tensor([3])
    assert count_macs(model, features, class_ids) == macs
    with torch.no_grad():
        latent = model(features, class_ids)
    assert latent.shape == (1, 64, latent_length) and torch.isfinite(latent).all()


# ---------------------------------------------------------------- latent length follows the caller


@pytest.mark.parametrize("level,latent_length", [("high", 250), ("high", 1), ("low", 1000), ("deep", 2000)])
def test_custom_latent_length(level: str, latent_length: int) -> None:
    model = _meta_generator(level, latent_length=latent_length)
    assert model(*_meta_inputs(batch=2)).shape == (2, 64, latent_length)


def test_high_signal_length_yields_exactly_the_requested_frames() -> None:
    for frames in (1, 7, 100, 999, 1000, 1001, 4321):
        assert high_time_length(4 * frames + 800) == frames


def test_tiny_custom_length_runs_on_cpu_for_every_level() -> None:
    for level in PAPER:
        model = build_generator(level, latent_length=37, feature_dim=16, class_dim=8, width=0.0625,
                                signal_length=None if level == "high" else 300)
        assert model(torch.randn(3, 16), torch.tensor([0, 1, 5])).shape == (3, 64, 37)


# ---------------------------------------------------------------- training behaviour


@pytest.mark.parametrize("level", list(PAPER))
def test_tiny_width_forward_backward_is_fast_and_reaches_embedding_and_first_layer(level: str) -> None:
    torch.manual_seed(0)
    model = build_generator(level, latent_length=64, width=0.0625, signal_length=None if level == "high" else 256)
    features, class_ids = torch.randn(2, 2048), torch.tensor([1, 4])
    model(features, class_ids).square().mean().backward()  # warm-up: first calls allocate
    model.zero_grad(set_to_none=True)

    start = time.perf_counter()
    model(features, class_ids).square().mean().backward()
    assert time.perf_counter() - start < 1.0

    grad = model.class_embedding.weight.grad
    assert grad[[1, 4]].abs().sum() > 0
    assert grad[[0, 2, 3, 5]].abs().sum() == 0  # unused classes get nothing
    assert model.input_projection.weight.grad.abs().sum() > 0
    first_conv = model.body[0] if level == "high" else model.body[1]
    assert isinstance(first_conv, nn.Conv1d) and first_conv.in_channels == 1
    assert first_conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_high_output_is_tanh_times_100() -> None:
    torch.manual_seed(0)
    model = build_generator("high", latent_length=40, width=0.125).eval()
    features, class_ids = torch.randn(2, 2048), torch.tensor([0, 1])
    with torch.no_grad():
        signal = model.input_projection(model.condition(features, class_ids)).unsqueeze(1)
        torch.testing.assert_close(model(features, class_ids), 100.0 * torch.tanh(model.body(signal)))
        model.body[-1].weight.mul_(1e4)  # drive the last conv far into the tanh's saturation
        latent = model(features, class_ids)
    assert latent.abs().max() <= 100.0
    assert latent.abs().max() > 99.0


@pytest.mark.parametrize("level", ["low", "deep"])
def test_low_and_deep_apply_the_time_linear_after_tanh(level: str) -> None:
    # As released: tanh -> Linear over time -> x100, so |out| <= 100 * (|W| row sum + |b|).
    torch.manual_seed(0)
    model = build_generator(level, latent_length=30, width=0.0625, signal_length=256).eval()
    with torch.no_grad():
        latent = model(1e4 * torch.randn(2, 2048), torch.tensor([2, 3]))
        projection = model.time_projection
        bound = 100.0 * (projection.weight.abs().sum(dim=1) + projection.bias.abs())
    assert (latent.abs() <= bound + 1e-3).all()


def test_forward_is_body_forward_of_the_concatenated_conditioning() -> None:
    torch.manual_seed(0)
    model = build_generator("deep", latent_length=20, feature_dim=12, class_dim=4, width=0.0625,
                            signal_length=256).eval()
    features, class_ids = torch.randn(2, 12), torch.tensor([5, 0])
    conditioning = torch.cat([features, model.class_embedding.weight[[5, 0]]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(features, class_ids), model.body_forward(conditioning))


def test_normalize_features_scales_each_item_to_unit_rms_without_parameters() -> None:
    torch.manual_seed(0)
    plain = build_generator("low", latent_length=20, feature_dim=12, class_dim=4, width=0.0625,
                            signal_length=256).eval()
    scaled = build_generator(**{**plain.hparams, "normalize_features": True}).eval()
    assert scaled.state_dict().keys() == plain.state_dict().keys()
    scaled.load_state_dict(plain.state_dict())
    features, class_ids = torch.randn(2, 12) * torch.tensor([[3e5], [2.0]]), torch.tensor([1, 4])
    unit = features / features.pow(2).mean(dim=1, keepdim=True).sqrt()
    with torch.no_grad():
        torch.testing.assert_close(scaled(features, class_ids), plain(unit, class_ids))
        # Only the direction of an item's features matters, not their scale.
        torch.testing.assert_close(scaled(features * 7.0, class_ids), scaled(features, class_ids), rtol=1e-5, atol=1e-4)
    assert build_generator(**scaled.hparams).normalize_features


def test_standardize_features_uses_the_training_statistics_saved_with_the_weights() -> None:
    torch.manual_seed(0)
    plain = build_generator("low", latent_length=20, feature_dim=12, class_dim=4, width=0.0625,
                            signal_length=256).eval()
    standard = build_generator(**{**plain.hparams, "standardize_features": True}).eval()
    assert set(standard.state_dict()) - set(plain.state_dict()) == {"feature_mean", "feature_std"}
    standard.load_state_dict(plain.state_dict(), strict=False)
    # Non-negative, nearly parallel features like a frozen I3D's; one dimension never varies.
    training = 1e5 * (1.0 + 0.01 * torch.rand(50, 12))
    training[:, 3] = 7.0
    standard.set_feature_statistics(training)
    mean, std = training.double().mean(0), training.double().std(0, unbiased=False)
    std[3] = 1.0  # constant dimensions are only centred
    torch.testing.assert_close(standard.feature_mean, mean.float())
    torch.testing.assert_close(standard.feature_std, std.float())
    features, class_ids = training[:2], torch.tensor([1, 4])
    with torch.no_grad():
        expected = plain(((features.double() - mean) / std).float(), class_ids)
        torch.testing.assert_close(standard(features, class_ids), expected, rtol=1e-4, atol=1e-3)
    rebuilt = build_generator(**standard.hparams)
    rebuilt.load_state_dict(standard.state_dict())
    torch.testing.assert_close(rebuilt.feature_mean, standard.feature_mean)
    with pytest.raises(ValueError, match=r"N >= 2"):
        standard.set_feature_statistics(training[:1])
    with pytest.raises(ConfigError, match="standardize_features"):
        plain.set_feature_statistics(training)
    with pytest.raises(ConfigError, match="exclude each other"):
        build_generator(**{**plain.hparams, "normalize_features": True, "standardize_features": True})


def test_hparams_rebuild_the_same_architecture() -> None:
    for level in PAPER:
        model = build_generator(level, latent_length=24, feature_dim=10, num_classes=3, class_dim=5,
                                latent_channels=8, width=0.0625,
                                signal_length=None if level == "high" else 240)
        rebuilt = build_generator(**model.hparams)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}


def _relative_input_dependence(init: str) -> float:
    """Spread of the output across inputs, relative to its size, for the demo's narrow Low."""
    torch.manual_seed(0)
    model = build_generator("low", latent_length=4000, latent_channels=32, class_dim=64, width=0.125,
                            signal_length=384, normalize_features=True, init=init).eval()
    with torch.no_grad():
        out = model(torch.rand(6, 2048), torch.arange(6))
    return float(out.std(dim=0).mean() / out.std())


def test_released_init_hides_the_input_and_variance_preserving_passes_it() -> None:
    assert _relative_input_dependence("released") < 1e-4
    assert _relative_input_dependence("variance_preserving") > 1e-2


def test_variance_preserving_init_draws_unit_gain_weights_and_zero_biases() -> None:
    torch.manual_seed(0)
    model = build_generator("low", latent_length=400, width=0.25, signal_length=384, init="variance_preserving")
    convs = [m for m in model.body.modules() if isinstance(m, nn.Conv1d)]
    last = [m for m in model.body if isinstance(m, nn.Conv1d)][-1]
    assert any(parametrize.is_parametrized(m, "weight") for m in convs)  # weight-normalised ones too
    for conv in convs:
        fan_in = conv.weight[0].numel()
        gain = generator_module.FINAL_CONV_GAIN if conv is last else 1.0
        if conv.weight.numel() >= 4096:  # enough draws for a tight estimate
            assert float(conv.weight.std()) == pytest.approx(gain / fan_in ** 0.5, rel=0.1)
        assert conv.bias is None or not conv.bias.any()
    assert model.hparams["init"] == "variance_preserving"
    assert build_generator(**model.hparams).init == "variance_preserving"
    assert build_generator("low", latent_length=400, signal_length=384).hparams["init"] == "released"


# ---------------------------------------------------------------- errors


def test_bad_configs_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown generator level 'middle'"):
        build_generator("middle", latent_length=10)
    with pytest.raises(ConfigError, match="latent_length"):
        build_generator("high", latent_length=0)
    with pytest.raises(ConfigError, match="width"):
        build_generator("low", latent_length=10, width=0.0)
    with pytest.raises(ConfigError, match="follows latent_length"):
        build_generator("high", latent_length=10, signal_length=4096)
    with pytest.raises(ConfigError, match="unknown generator init 'xavier'"):
        build_generator("low", latent_length=10, init="xavier")


@pytest.mark.parametrize("level", ["low", "deep"])
def test_too_short_signal_names_the_minimum(level: str) -> None:
    with pytest.raises(ConfigError, match="the minimum is 229"):
        build_generator(level, latent_length=10, width=0.0625, signal_length=228)
    model = build_generator(level, latent_length=10, width=0.0625, signal_length=229, feature_dim=8)
    assert model(torch.randn(1, 8), torch.tensor([0])).shape == (1, 64, 10)


def test_wrong_input_shapes_are_rejected() -> None:
    model = build_generator("high", latent_length=8, feature_dim=16, width=0.0625)
    with pytest.raises(ValueError, match=r"features must be \[B, 16\]"):
        model(torch.randn(2, 1, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_ids"):
        model(torch.randn(2, 16), torch.tensor([0]))


# ---------------------------------------------------------------- frozen for inference


@pytest.mark.parametrize("level", list(PAPER))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_freeze_for_inference_folds_weight_norm_casts_for_bf16_and_keeps_outputs_bit_identical(
        level: str, precision: str) -> None:
    def build() -> ConchShellGenerator:
        torch.manual_seed(0)
        return build_generator(level, latent_length=37, feature_dim=16, class_dim=8, width=0.0625,
                               signal_length=None if level == "high" else 300).eval()

    reference, frozen = build(), generator_module.freeze_for_inference(build(), precision)
    assert not any(parametrize.is_parametrized(m) for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    layers = [m for m in frozen.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    fft_layers = [m for m in layers if isinstance(m, FFTConv1d) and m.applies()]
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert fft_layers and all(m.weight.dtype == torch.float32 for m in fft_layers)
    assert all(m.weight.dtype == want for m in layers if m not in fft_layers)
    assert frozen.class_embedding.weight.dtype == torch.float32
    features, class_ids = torch.randn(3, 16), torch.tensor([0, 1, 5])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        with direct_convolutions():
            assert torch.equal(frozen(features, class_ids), reference(features, class_ids))
        if precision == "fp32":  # the FFT form: float32 rounding apart
            torch.testing.assert_close(frozen(features, class_ids), reference(features, class_ids),
                                       rtol=1e-4, atol=1e-4)


def test_freeze_for_inference_rejects_an_unknown_precision() -> None:
    with pytest.raises(ValueError, match="fp16"):
        generator_module.freeze_for_inference(build_generator("high", latent_length=37, width=0.0625), "fp16")
