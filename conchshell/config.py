"""Experiment configuration: YAML files mapped onto typed dataclasses.

Every key is declared below with its type and the paper's default. Loading is strict: an
unknown key, a wrong type or a malformed override raises ConfigError naming the dotted
key and the file, so a typo never silently falls back to a default.

A config file may name a parent with ``base: other.yaml`` (relative to itself); its keys
override the parent's. Command-line overrides use dotted keys: ``train.batch_size=4``.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from conchshell.errors import ConfigError

_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+")


@dataclass
class DataConfig:
    manifest: str = "dataset/BOPD/manifest.csv"
    sample_rate: int = 16_000
    clip_seconds: float = 8.0
    num_workers: int = 2
    split_seed: int = 0
    # Folder of precomputed frozen features (scripts/extract_features.py); None = compute on the fly.
    feature_cache: str | None = None


@dataclass
class ImageConfig:
    tcnn: str = "tcnn6"  # tcnn6 | tcnn18
    tcnn_checkpoint: str | None = "checkpoints/tcnn/TCNN-best.pt"
    # even: three near-equal channel groups; original: the released code's slicing (skips channels).
    grouping: str = "even"
    i3d_checkpoint: str | None = "I3D/I3D_models/rgb_imagenet.pt"
    # Used only when i3d_checkpoint is None: a frozen I3D rebuilt from this seed (demo model).
    i3d_seed: int = 1
    # Used only when tcnn_checkpoint is None (smoke tests): TCNN weights from this seed.
    tcnn_seed: int = 1
    # Class fed to the generator while training: "label" (ground truth) or "tcnn" (prediction).
    train_class_source: str = "label"


@dataclass
class CodecConfig:
    checkpoint: str | None = "checkpoints/jukebox/vqvae.pth.tar"
    level: int = 0  # 0 = Deep (hop 8), 1 = Low (hop 32), 2 = High (hop 128)
    # Rate the codec was trained at. The official Jukebox weights are 44.1 kHz; the paper feeds
    # 16 kHz audio to them unchanged. resample=True converts to this rate and back instead.
    sample_rate: int = 16_000
    resample: bool = False
    levels: int = 3
    downs_t: list[int] = field(default_factory=lambda: [3, 2, 2])
    strides_t: list[int] = field(default_factory=lambda: [2, 2, 2])
    emb_width: int = 64
    l_bins: int = 2048
    width: int = 32
    depth: int = 4
    multipliers: list[int] = field(default_factory=lambda: [2, 1, 1])
    dilation_growth_rate: int = 3
    # Used only when checkpoint is None (smoke tests): codec weights from this seed.
    seed: int = 1


@dataclass
class GeneratorConfig:
    width: float = 1.0  # scales every hidden channel count; 1.0 = the paper
    class_dim: int = 256
    # Low/Deep only: length of the 1-channel signal the input Linear makes (paper: 4096).
    # Smaller values make tiny test generators; None = the paper.
    signal_length: int | None = None
    # Scale each item's image features to unit RMS before the input Linear (no parameters).
    # Off in the paper (Kinetics I3D features are O(1)); the demo's seeded I3D gives
    # features of order 1e5, which saturate every tanh of an unnormalised generator.
    normalize_features: bool = False
    # Standardise image features per dimension with the training set's mean and standard
    # deviation (of the first 1024 training items, computed by the GAN stage when a run
    # starts, saved with the generator).
    # Frozen I3D features are non-negative and nearly parallel (cosine ~0.997 between images
    # for the demo's seeded I3D), so without centring every image looks alike to the generator.
    standardize_features: bool = False
    # "released": the released code's conv init (N(0, 0.02)), under which the generator's
    # output hardly depends on its input at first; "variance_preserving": N(0, 1/fan_in)
    # conv weights (the last one 0.2x) and zero biases (see conchshell.models.generator).
    init: str = "released"


@dataclass
class DiscriminatorConfig:
    num_scales: int = 3
    width: float = 1.0
    # A projection discriminator that also sees the class (real latents with their label,
    # fakes with the class they were generated for). Off in the paper, whose discriminator
    # is unconditional and so gives the generator no reason to sound like its class.
    class_conditional: bool = False
    # An auxiliary classifier head (AC-GAN) that learns the class of real latents; with
    # loss.lambda_class the generator is trained to make latents it classifies as their class.
    auxiliary_classifier: bool = False


@dataclass
class LossConfig:
    lambda_g: float = 0.5
    lambda_fm: float = 3.0
    lambda_wave: float = 40.0
    lambda_mel: float = 15.0
    lambda_latent: float = 0.0
    lambda_quantized_latent: float = 0.0
    # L1 between the generated latent and its own nearest codebook vectors (not in the
    # paper; VQ-VAE's commitment term, applied to the generator). Keeps the latent where the
    # codec's decoder was trained, so the straight-through gradient of the wave/mel losses
    # describes what changing the codes would do.
    lambda_commitment: float = 0.0
    # Cross-entropy of the discriminator's auxiliary classifier on the generated latent
    # against the class it was generated for (needs discriminator.auxiliary_classifier).
    lambda_class: float = 0.0
    # True: wave/mel losses decode through a straight-through quantiser with gradients.
    # False: the released code's behaviour (argmin codes decoded under no_grad: no gradient).
    straight_through: bool = True
    mel_n_fft: int = 2048
    mel_hop: int = 300
    mel_win: int = 1200
    mel_bins: int = 128
    mel_fmin: float = 0.0
    mel_fmax: float = 8000.0
    # vqvae stage (Jukebox's recipe): reconstruction L2 (and optional L1), multi-resolution
    # spectral distance, and the commitment loss weighted 0.02 as in the 5b vqvae.
    vqvae_l1: float = 0.0
    vqvae_l2: float = 1.0
    vqvae_spectral: float = 1.0
    vqvae_commit: float = 0.02


@dataclass
class OptimConfig:
    lr_g: float = 1e-5
    lr_d: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    eps: float = 1e-5
    weight_decay: float = 1e-5
    # Paper: G lr x0.8 and D lr x0.9 every 20k steps.
    decay_every: int = 20_000
    decay_g: float = 0.8
    decay_d: float = 0.9
    grad_clip: float | None = None
    # tcnn stage: AdamW with Adam's usual betas; multi-stage schedule: the lr is multiplied by
    # tcnn_gamma at each step in tcnn_milestones.
    tcnn_lr: float = 1e-3
    tcnn_milestones: list[int] = field(default_factory=lambda: [4_000, 8_000])
    tcnn_gamma: float = 0.1
    # vqvae stage: Jukebox's Adam learning rate.
    vqvae_lr: float = 3e-4


@dataclass
class TrainConfig:
    stage: str = "gan"  # tcnn | vqvae | gan
    batch_size: int = 2  # per GPU, as in the paper
    grad_accum: int = 1
    max_steps: int = 400_000
    seed: int = 1234
    precision: str = "bf16"  # bf16 | fp32 (fp16 is never used: it is ~70x slower on CPU)
    device: str = "auto"
    log_every: int = 50
    eval_every: int = 2_000
    ckpt_every: int = 2_000
    keep_last: int = 3
    num_eval_samples: int = 4
    # vqvae stage: which codec levels to train.
    vqvae_levels: list[int] = field(default_factory=lambda: [0])
    # vqvae stage: train on random windows of this many seconds of each clip (Jukebox trains
    # its VQ-VAE on short windows too); None = whole clips. Validation always sees whole clips.
    vqvae_segment_seconds: float | None = None
    # gan stage: the discriminator and the wave/mel losses see a random window of this many
    # seconds of each generated latent and its clip (HiFi-GAN-style segment training; the
    # generator still produces whole 8 s latents). None = whole clips, as in the paper.
    gan_segment_seconds: float | None = None
    # Validate on at most this many items of the val split (the first ones, in manifest
    # order); None = the whole split. Keeps smoke tests and CPU runs affordable.
    max_val_items: int | None = None
    # Start a new run from the network weights of a train.py checkpoint of the same stage,
    # with fresh optimisers, schedules and step count (fine-tuning under changed losses:
    # Adam's moments from the old objective would scale the new gradients wrongly), or with
    # layers the checkpoint lacks (they keep their initialisation). Only for a fresh
    # start: a run with a checkpoint of its own in --out resumes from that.
    init_from: str | None = None
    # How long a rank waits in a collective before the run fails. Validation runs on rank 0
    # alone while the others wait at a barrier, so this must cover the longest validation
    # (torch's NCCL default of 10 minutes would kill a run with a large val split).
    dist_timeout_minutes: float = 60.0


@dataclass
class Config:
    name: str = "conchshell"
    data: DataConfig = field(default_factory=DataConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def hop_length(self) -> int:
        """Audio samples per latent frame at the configured codec level."""
        return self.level_hop(self.codec.level)

    def level_hop(self, level: int) -> int:
        """Codec samples per latent frame of codec level ``level``."""
        hop = 1
        for down, stride in list(zip(self.codec.downs_t, self.codec.strides_t))[: level + 1]:
            hop *= stride**down
        return hop

    @property
    def clip_samples(self) -> int:
        return round(self.data.clip_seconds * self.data.sample_rate)

    @property
    def latent_length(self) -> int:
        """Generator output length: seconds x codec rate / hop (16000 for the paper's Deep)."""
        codec_samples = round(self.data.clip_seconds * self.codec_rate)
        if codec_samples % self.hop_length:
            raise ConfigError(
                f"data.clip_seconds={self.data.clip_seconds} gives {codec_samples} codec samples, "
                f"not a multiple of the level-{self.codec.level} hop {self.hop_length}"
            )
        return codec_samples // self.hop_length

    @property
    def codec_rate(self) -> int:
        """Rate of the audio the codec sees: its own rate when resampling, else the data rate."""
        return self.codec.sample_rate if self.codec.resample else self.data.sample_rate


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (following ``base:`` parents) and apply dotted overrides."""
    data = _read_yaml_tree(Path(path), seen=())
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
    return from_dict(Config, data, source=str(path))


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON/torch.save-safe) of a config."""
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any], source: str = "<checkpoint>") -> Config:
    return from_dict(Config, data, source=source)


def from_dict(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown config key '{prefix}{unknown[0]}'")
    values = {}
    for name, raw in data.items():
        values[name] = _coerce(hints[name], raw, source, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, prefix=f"{key}.")
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, source, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{source}: config key '{key}' has a value of the wrong type: {value!r}"
        )
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: config key '{key}' must be a list, got {value!r}")
        return [_coerce(item_type, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if hint in (int, float, str, bool) and (type(value) is hint):
        return value
    raise ConfigError(
        f"{source}: config key '{key}' must be {getattr(hint, '__name__', hint)}, got {value!r}"
    )


def _read_yaml_tree(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _read_yaml_tree(path.parent / base, seen + (path.resolve(),))
    return _deep_merge(parent, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"malformed override '{item}': expected dotted.key=value")
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed value in override '{item}'") from exc
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[leaf] = value
