"""Shapes through the whole chain, and gradients through the straight-through decode."""
import pytest
import torch

from conchshell.config import Config, load_config
from conchshell.models.codec import quantized_audio
from conchshell.models.factory import (
    build_codec,
    build_frontend,
    build_generator_from_config,
)
from conchshell.models.i3d import i3d_embedding
from conchshell.models.pseudo_video import image_to_pseudo_video

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def offline_config(level: int) -> Config:
    """The paper's model with seeded stand-ins for every pretrained file."""
    config = load_config(ROOT / "configs" / "conchshell.yaml")
    config.image.tcnn_checkpoint = None
    config.image.i3d_checkpoint = None
    config.codec.checkpoint = None
    config.codec.level = level
    return config


@pytest.fixture(scope="module")
def image_features():
    config = offline_config(0)
    frontend = build_frontend(config)
    images = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        video = image_to_pseudo_video(frontend.tcnn, images, config.image.grouping)
        assert video.shape == (1, 3, 18, 224, 224)
        features = i3d_embedding(frontend.i3d, video)
        assert features.shape == (1, 2048)
        same_features, class_ids = frontend(images)
    torch.testing.assert_close(same_features, features)
    assert class_ids.shape == (1,) and class_ids.dtype == torch.int64
    return features.clone(), class_ids.clone()


@pytest.mark.filterwarnings("ignore:codec.checkpoint is null")
@pytest.mark.parametrize("level, latent_length", [(0, 16_000), (1, 4_000), (2, 1_000)])
def test_image_to_audio_shapes_for_every_generator(image_features, level, latent_length):
    config = offline_config(level)
    generator = build_generator_from_config(config).eval()
    codec = build_codec(config)
    features, class_ids = image_features
    with torch.inference_mode():
        latent = generator(features, class_ids)
        assert latent.shape == (1, 64, latent_length)
        codes = codec.quantize(latent)
        assert codes.shape == (1, latent_length) and codes.dtype == torch.int64
        audio = codec.decode(codes, config.clip_samples)
    assert audio.shape == (1, 1, 128_000)
    assert torch.isfinite(audio).all()


@pytest.mark.filterwarnings("ignore:codec.checkpoint is null")
@pytest.mark.parametrize("straight_through", [True, False])
def test_wave_loss_gradient_reaches_generator_only_with_straight_through(straight_through):
    config = load_config(ROOT / "configs" / "tiny.yaml")
    generator = build_generator_from_config(config)
    codec = build_codec(config)
    features, class_ids = torch.randn(2, 2048), torch.tensor([1, 4])
    target = torch.randn(2, 1, config.clip_samples) * 0.1
    latent = generator(features, class_ids)
    audio = quantized_audio(codec, latent, config.clip_samples, straight_through)
    loss = (audio - target).abs().mean()
    if not straight_through:
        assert not loss.requires_grad  # the released code's wave loss trains nothing
        return
    loss.backward()
    first_layer = generator.input_projection.weight
    assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0
    assert all(p.grad is None for p in codec.parameters())
