"""Build every network of the pipeline from a Config: one place that knows the files."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from conchshell.config import Config
from conchshell.constants import LEVEL_NAMES, NUM_CLASSES
from conchshell.errors import CheckpointError
from conchshell.models.codec import AudioCodec
from conchshell.models.discriminator import MultiScaleDiscriminator
from conchshell.models.frontend import ImageFrontend
from conchshell.models.generator import ConchShellGenerator, build_generator
from conchshell.models.i3d import InceptionI3d, load_i3d_checkpoint, seeded_i3d, unwrap_state_dict
from conchshell.models.tcnn import TCNN, build_tcnn
from conchshell.models.vqvae import VQVAE, load_jukebox_checkpoint
from conchshell.utils.checkpoint import load_strict, read_weights
from conchshell.utils.seeded import seeded_state_dict_for

HOW_TO_GET = {
    "tcnn": "train it with `python train.py --config <config> --out <dir> train.stage=tcnn`",
    "i3d": "run `python scripts/fetch_pretrained.py --only i3d`, or set image.i3d_checkpoint: null for the seeded I3D",
    "codec": "run `python scripts/fetch_pretrained.py --only jukebox`, or train one with train.stage=vqvae",
}


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it exists, else CheckpointError saying how to get it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} weights not found: {path} ({HOW_TO_GET[what]})")
    return path


def load_module_weights(module: nn.Module, path: str | Path) -> nn.Module:
    """Strictly load a project weights file (bare, or ``{'state_dict': ...}``) into ``module``."""
    load_strict(module, unwrap_state_dict(read_weights(path), path), path)
    return module


def build_tcnn_from_config(config: Config, load_weights: bool = True) -> TCNN:
    tcnn = build_tcnn(config.image.tcnn, NUM_CLASSES)
    if not load_weights:
        return tcnn
    if config.image.tcnn_checkpoint is None:
        tcnn.load_state_dict(seeded_state_dict_for(tcnn, config.image.tcnn_seed, gain=2.0))
    else:
        load_module_weights(tcnn, require_file(config.image.tcnn_checkpoint, "tcnn"))
    return tcnn


def build_i3d_from_config(config: Config) -> InceptionI3d:
    if config.image.i3d_checkpoint is None:
        return seeded_i3d(config.image.i3d_seed)
    return load_i3d_checkpoint(require_file(config.image.i3d_checkpoint, "i3d"))


def build_frontend(config: Config) -> ImageFrontend:
    return ImageFrontend(build_tcnn_from_config(config), build_i3d_from_config(config), config.image.grouping)


def codec_hparams(config: Config) -> dict[str, Any]:
    c = config.codec
    return dict(
        levels=c.levels,
        downs_t=tuple(c.downs_t),
        strides_t=tuple(c.strides_t),
        emb_width=c.emb_width,
        l_bins=c.l_bins,
        width=c.width,
        depth=c.depth,
        multipliers=tuple(c.multipliers),
        dilation_growth_rate=c.dilation_growth_rate,
        sample_rate=c.sample_rate,
    )


def build_vqvae(config: Config, load_weights: bool = True) -> VQVAE:
    """The codec network; loaded (frozen) from ``codec.checkpoint`` when ``load_weights``."""
    hparams = codec_hparams(config)
    if not load_weights:
        return VQVAE(**hparams)
    if config.codec.checkpoint is None:
        warnings.warn("codec.checkpoint is null: using a seeded, untrained codec (smoke tests only)")
        vqvae = VQVAE(**hparams)
        vqvae.load_state_dict(seeded_state_dict_for(vqvae, config.codec.seed, gain=1.0))
        return vqvae.freeze()
    return load_jukebox_checkpoint(require_file(config.codec.checkpoint, "codec"), **hparams)


def build_codec(config: Config) -> AudioCodec:
    if not 0 <= config.codec.level < config.codec.levels:
        raise CheckpointError(f"codec.level {config.codec.level} is not one of the codec's {config.codec.levels} levels")
    return AudioCodec(build_vqvae(config), config.codec.level, config.data.sample_rate, config.codec.resample)


def build_generator_from_config(config: Config) -> ConchShellGenerator:
    return build_generator(
        LEVEL_NAMES[config.codec.level],
        latent_length=config.latent_length,
        num_classes=NUM_CLASSES,
        class_dim=config.generator.class_dim,
        latent_channels=config.codec.emb_width,
        width=config.generator.width,
        signal_length=config.generator.signal_length,
        normalize_features=config.generator.normalize_features,
        standardize_features=config.generator.standardize_features,
        init=config.generator.init,
    )


def build_discriminator_from_config(config: Config) -> MultiScaleDiscriminator:
    return MultiScaleDiscriminator(
        num_scales=config.discriminator.num_scales,
        latent_channels=config.codec.emb_width,
        width=config.discriminator.width,
        num_classes=NUM_CLASSES if config.discriminator.class_conditional else None,
        auxiliary_classes=NUM_CLASSES if config.discriminator.auxiliary_classifier else None,
    )
