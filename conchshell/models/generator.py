"""The ConchShell generators: image features + class -> continuous Jukebox latent.

Input: the frozen I3D feature vector (2048) concatenated with a learned class embedding
(6 classes x 256), i.e. 2304 numbers. A Linear layer turns them into a one-channel
"signal" that a 1-D conv stack (with MelGAN-style residual blocks) turns into a
``[latent_channels, latent_length]`` latent, squashed by ``tanh`` and scaled by 100.

Three levels, one per Jukebox VQ-VAE level (paper Table 1):

* ``high`` (level 2, hop 128, latent [64, 1000]): Linear 2304->4800, six convs with
  padding 1 (1->64 k10 s2, 64->128 k20 s2, 128->256 k40, 256->512 k60, 512->256 k60,
  256->64 k42), LeakyReLU(0.2) before all but the first and two residual blocks
  (dilations 1, 3) after all but the last, then tanh x 100.
  33,108,800 parameters, 23,800,072,320 MACs at batch 1: the paper's 33.109M / 23.800G.
* ``low`` (level 1, hop 32, latent [64, 4000]): Linear 2304->4096, seven stages of
  ReflectionPad(16/32/64/64/64/64/64) -> Conv k40 p1 -> MaxPool1d(k10, p1, stride s) with
  channels 1->32->64->128->256->512->1024->256 and pool strides 2,2,2,2,1,1,1 (residual
  blocks after the first six, LeakyReLU before stages 2..7), then ReflectionPad 64 ->
  Conv 256->64 k40 p1 -> tanh -> Linear over time (664 -> 4000) -> x 100.
  65,182,528 parameters, 27,205,457,664 MACs: the paper's 65.183M / 27.205G.
* ``deep`` (level 0, hop 8, latent [64, 16000], the paper's main model): as ``low`` with
  pool strides 2,2,2,1,1,1,1 (time 985) and a Linear 985 -> 16000.
  78,298,528 parameters, 44,453,017,344 MACs. This is the architecture of the RELEASED code.
  The paper's Table 1 claims 100.420M / 59.197G for G-Deep, and no variant of the
  released code reproduces those figures, so we build what was released.

Exact MAC figures are asserted in ``tests/models/test_generator.py``. Parameter counts
exclude the class embedding (6 x 256 = 1,536 parameters), as the paper's do; the embedding
still lives inside the generator (``class_embedding``) so an exported generator needs no
other module to run.

Note for ``low``/``deep``: the final Linear over time comes *after* the tanh (as released),
so their output is not strictly bounded by 100; only ``high`` is.

The latent length follows the caller (``seconds * sample_rate / hop``), never a literal:
``low``/``deep`` size their time Linear to it; ``high`` has no such layer, so the width of
its input Linear is derived as ``4 * latent_length + 800`` (its conv stack maps any of
``4T+798 .. 4T+801`` samples to exactly ``T`` frames; ``+800`` gives the paper's 4800 at T=1000).

Two optional input scalings (both off in the paper, whose Kinetics I3D features are O(1)):
``normalize_features`` scales each item's features to unit RMS; ``standardize_features``
subtracts the training set's per-dimension mean and divides by its standard deviation
(buffers ``feature_mean``/``feature_std``, set by :meth:`set_feature_statistics` when a GAN
run starts and saved with the weights). Frozen I3D features are non-negative and nearly
parallel, so only centring tells images apart: the demo's seeded I3D gives a cosine
similarity of 0.997 between any two images, which unit-RMS scaling leaves unchanged.

``init`` picks the conv stack's initialisation. ``"released"`` (the default) is the
released code's: plain convs N(0, 0.02), weight-normalised ones torch's default, biases
torch's default. Through that stack the input-dependent part of the signal shrinks 2-10x at
every conv and residual block while the biases set the output: at initialisation the demo's
narrow Low generator's output varies across inputs by ~2e-6 of its size, and training has
to grow that part from almost nothing (demo runs make one output for every input for their
first ~1500 steps). ``"variance_preserving"`` draws every conv weight (plain and
weight-normalised) from N(0, 1/fan_in), the last one (before the tanh) ``FINAL_CONV_GAIN``
times smaller, and zeroes every conv bias: the input's variation reaches the output (5 %
of its size for the demo's nearly parallel image features) and the tanh is not saturated.

``width`` scales every hidden channel count (not the 1-channel input signal nor the
``latent_channels`` output), for narrow demo and test generators. ``signal_length``
(``low``/``deep`` only) shrinks the one-channel signal for fast tiny configs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from conchshell.errors import ConfigError
from conchshell.nn.fft_conv import FFTConv1d
from conchshell.nn.layers import MaxPool1d, ResnetBlock1d

LEVELS = ("high", "low", "deep")
LATENT_SCALE = 100.0
RESBLOCK_DILATIONS = (1, 3)

# High: (out_channels, kernel, stride) of the hidden convs; all use padding 1. The final
# conv to latent_channels has kernel HIGH_FINAL_KERNEL.
HIGH_STAGES = ((64, 10, 2), (128, 20, 2), (256, 40, 1), (512, 60, 1), (256, 60, 1))
HIGH_FINAL_KERNEL = 42
HIGH_SIGNAL_PER_FRAME = 4  # product of the strides
HIGH_SIGNAL_OFFSET = 800

# Low / Deep: seven [ReflectionPad -> Conv k40 p1 -> MaxPool k10 p1 stride s] stages.
POOLED_CHANNELS = (32, 64, 128, 256, 512, 1024, 256)
POOLED_REFLECTION = (16, 32, 64, 64, 64, 64, 64)
POOLED_KERNEL = 40
POOL_KERNEL = 10
POOL_STRIDES = {"low": (2, 2, 2, 2, 1, 1, 1), "deep": (2, 2, 2, 1, 1, 1, 1)}
POOLED_FINAL_REFLECTION = 64
POOLED_SIGNAL_LENGTH = 4096
RESIDUAL_STAGES = 6  # residual blocks follow the first six stages only
INITS = ("released", "variance_preserving")
# variance_preserving: the conv before the tanh starts this much smaller, so the tanh stays
# near its linear range and the latent starts near the released init's scale.
FINAL_CONV_GAIN = 0.2


def _conv_length(length: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    return (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def high_time_length(signal_length: int) -> int:
    """Frames the High conv stack makes from a signal of ``signal_length`` samples (< 1: too short)."""
    length = signal_length
    for _, kernel, stride in HIGH_STAGES:
        length = _conv_length(length, kernel, stride, padding=1)
        # The residual blocks reflect-pad by their dilation, which needs a longer input.
        if length <= max(RESBLOCK_DILATIONS):
            return 0
    return _conv_length(length, HIGH_FINAL_KERNEL, padding=1)


def pooled_time_length(signal_length: int, pool_strides: tuple[int, ...]) -> int:
    """Frames the Low/Deep conv stack makes from ``signal_length`` samples (0: too short)."""
    length = signal_length
    for index, (reflection, stride) in enumerate(zip(POOLED_REFLECTION, pool_strides)):
        if length <= reflection:  # ReflectionPad1d needs pad < length
            return 0
        length = _conv_length(length + 2 * reflection, POOLED_KERNEL, padding=1)
        length = _conv_length(length, POOL_KERNEL, stride, padding=1)
        if length < 1 or (index < RESIDUAL_STAGES and length <= max(RESBLOCK_DILATIONS)):
            return 0
    if length <= POOLED_FINAL_REFLECTION:
        return 0
    return max(0, _conv_length(length + 2 * POOLED_FINAL_REFLECTION, POOLED_KERNEL, padding=1))


def _min_pooled_signal_length(pool_strides: tuple[int, ...]) -> int:
    length = 1
    while pooled_time_length(length, pool_strides) < 1:
        length += 1
    return length


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _residual_pair(channels: int) -> list[nn.Module]:
    return [ResnetBlock1d(channels, dilation) for dilation in RESBLOCK_DILATIONS]


def _build_high_body(width: float, latent_channels: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    in_channels = 1
    for index, (out_channels, kernel, stride) in enumerate(HIGH_STAGES):
        out_channels = _scaled(out_channels, width)
        if index > 0:
            layers.append(nn.LeakyReLU(0.2))
        layers.append(FFTConv1d(in_channels, out_channels, kernel, stride=stride, padding=1))
        layers += _residual_pair(out_channels)
        in_channels = out_channels
    layers += [nn.LeakyReLU(0.2), FFTConv1d(in_channels, latent_channels, HIGH_FINAL_KERNEL, padding=1)]
    return layers


def _build_pooled_body(width: float, latent_channels: int, pool_strides: tuple[int, ...]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    in_channels = 1
    for index, (out_channels, reflection, stride) in enumerate(
        zip(POOLED_CHANNELS, POOLED_REFLECTION, pool_strides)
    ):
        out_channels = _scaled(out_channels, width)
        if index > 0:
            layers.append(nn.LeakyReLU(0.2))
        layers += [
            nn.ReflectionPad1d(reflection),
            FFTConv1d(in_channels, out_channels, POOLED_KERNEL, padding=1),
            MaxPool1d(POOL_KERNEL, stride=stride, padding=1),
        ]
        if index < RESIDUAL_STAGES:
            layers += _residual_pair(out_channels)
        in_channels = out_channels
    layers += [
        nn.ReflectionPad1d(POOLED_FINAL_REFLECTION),
        FFTConv1d(in_channels, latent_channels, POOLED_KERNEL, padding=1),
    ]
    return layers


def _init_plain_convs(module: nn.Module) -> None:
    # The released code draws plain conv weights from N(0, 0.02). Its init also "touched"
    # the weight-normalised convs, but that had no effect (their weight is recomputed from
    # g and v), so those keep torch's default init here too.
    if isinstance(module, nn.Conv1d) and not parametrize.is_parametrized(module):
        nn.init.normal_(module.weight, 0.0, 0.02)


@torch.no_grad()
def _init_variance_preserving(body: nn.Sequential) -> None:
    last = [m for m in body if isinstance(m, nn.Conv1d)][-1]
    for module in body.modules():
        if isinstance(module, nn.Conv1d):
            weight = torch.empty_like(module.weight)
            nn.init.kaiming_normal_(weight, nonlinearity="linear")
            if module is last:
                weight *= FINAL_CONV_GAIN
            if parametrize.is_parametrized(module, "weight"):
                module.weight = weight  # weight norm's right_inverse sets magnitude and direction
            else:
                module.weight.copy_(weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class ConchShellGenerator(nn.Module):
    """Maps ``(features [B, feature_dim], class_ids [B])`` to a latent ``[B, latent_channels, latent_length]``.

    Build it with :func:`build_generator`; the constructor takes the same arguments.
    Sub-modules: ``class_embedding``, ``input_projection`` (Linear to the 1-channel signal),
    ``body`` (the conv stack, one flat ``nn.Sequential`` in the released layer order) and,
    for ``low``/``deep``, ``time_projection`` (Linear over time to ``latent_length``).
    """

    def __init__(
        self,
        level: str,
        *,
        latent_length: int,
        feature_dim: int = 2048,
        num_classes: int = 6,
        class_dim: int = 256,
        latent_channels: int = 64,
        width: float = 1.0,
        signal_length: int | None = None,
        normalize_features: bool = False,
        standardize_features: bool = False,
        init: str = "released",
    ) -> None:
        super().__init__()
        level = level.lower() if isinstance(level, str) else level
        if level not in LEVELS:
            raise ConfigError(f"unknown generator level {level!r}; expected one of {', '.join(LEVELS)}")
        for name, value in (
            ("latent_length", latent_length),
            ("feature_dim", feature_dim),
            ("num_classes", num_classes),
            ("class_dim", class_dim),
            ("latent_channels", latent_channels),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"generator {name} must be a positive integer, got {value!r}")
        if not width > 0:
            raise ConfigError(f"generator width must be > 0, got {width!r}")
        if normalize_features and standardize_features:
            raise ConfigError("generator normalize_features and standardize_features exclude each other")
        if init not in INITS:
            raise ConfigError(f"unknown generator init {init!r}; expected one of {', '.join(INITS)}")

        self.level = level
        self.latent_length = latent_length
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.class_dim = class_dim
        self.latent_channels = latent_channels
        self.width = float(width)
        self.normalize_features = bool(normalize_features)
        self.standardize_features = bool(standardize_features)
        self.init = init
        if self.standardize_features:
            # Set from training features by set_feature_statistics; saved with the weights.
            self.register_buffer("feature_mean", torch.zeros(feature_dim))
            self.register_buffer("feature_std", torch.ones(feature_dim))

        if level == "high":
            derived = HIGH_SIGNAL_PER_FRAME * latent_length + HIGH_SIGNAL_OFFSET
            if signal_length is not None and signal_length != derived:
                raise ConfigError(
                    f"the high generator's signal length follows latent_length "
                    f"({HIGH_SIGNAL_PER_FRAME} * {latent_length} + {HIGH_SIGNAL_OFFSET} = {derived}); "
                    f"got signal_length={signal_length}"
                )
            self.signal_length = derived
            # Guards the arithmetic above against future edits of HIGH_STAGES.
            assert high_time_length(derived) == latent_length, "high signal length formula is stale"
            body = _build_high_body(self.width, latent_channels)
            self.time_projection: nn.Linear | None = None
        else:
            strides = POOL_STRIDES[level]
            self.signal_length = POOLED_SIGNAL_LENGTH if signal_length is None else signal_length
            frames = pooled_time_length(self.signal_length, strides)
            if frames < 1:
                raise ConfigError(
                    f"generator signal_length {self.signal_length} is too short for the {level} conv "
                    f"stack; the minimum is {_min_pooled_signal_length(strides)}"
                )
            self.time_frames = frames
            body = _build_pooled_body(self.width, latent_channels, strides)
            self.time_projection = nn.Linear(frames, latent_length)

        self.class_embedding = nn.Embedding(num_classes, class_dim)
        self.input_projection = nn.Linear(feature_dim + class_dim, self.signal_length)
        self.body = nn.Sequential(*body)
        if init == "released":
            self.body.apply(_init_plain_convs)
        else:
            _init_variance_preserving(self.body)

    @property
    def hparams(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture with :func:`build_generator`."""
        return {
            "level": self.level,
            "latent_length": self.latent_length,
            "feature_dim": self.feature_dim,
            "num_classes": self.num_classes,
            "class_dim": self.class_dim,
            "latent_channels": self.latent_channels,
            "width": self.width,
            "signal_length": None if self.level == "high" else self.signal_length,
            "normalize_features": self.normalize_features,
            "standardize_features": self.standardize_features,
            "init": self.init,
        }

    @torch.no_grad()
    def set_feature_statistics(self, features: Tensor) -> None:
        """Standardise inputs with the per-dimension mean and standard deviation of these
        training features ``[N, feature_dim]``. Dimensions that (almost) never vary are only
        centred: dividing by a near-zero spread would blow up noise."""
        if not self.standardize_features:
            raise ConfigError("set_feature_statistics needs a generator built with standardize_features")
        if features.ndim != 2 or features.shape[1] != self.feature_dim or features.shape[0] < 2:
            raise ValueError(f"need features [N >= 2, {self.feature_dim}], got {tuple(features.shape)}")
        features = features.double()
        std = features.std(dim=0, unbiased=False)
        varies = std > std.max() * 1e-6
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(torch.where(varies, std, torch.ones_like(std)))

    def condition(self, features: Tensor, class_ids: Tensor) -> Tensor:
        """Concatenate features and class embeddings: ``[B, feature_dim + class_dim]``."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be [B, {self.feature_dim}], got {tuple(features.shape)}")
        if class_ids.shape != features.shape[:1]:
            raise ValueError(f"class_ids must be [B] = [{features.shape[0]}], got {tuple(class_ids.shape)}")
        embedding = self.class_embedding(class_ids.long())
        if self.normalize_features:
            features = features.float()
            features = features * torch.rsqrt(features.pow(2).mean(dim=1, keepdim=True).clamp_min(1e-12))
        if self.standardize_features:
            features = (features.float() - self.feature_mean) / self.feature_std
        return torch.cat([features.to(embedding.dtype), embedding], dim=1)

    def body_forward(self, conditioning: Tensor) -> Tensor:
        """Everything after the class embedding: ``[B, feature_dim + class_dim]`` -> latent."""
        signal = self.input_projection(conditioning).unsqueeze(1)  # one-channel signal [B, 1, L]
        latent = torch.tanh(self.body(signal))
        if self.time_projection is not None:
            latent = self.time_projection(latent)
        return latent * LATENT_SCALE

    def forward(self, features: Tensor, class_ids: Tensor) -> Tensor:
        return self.body_forward(self.condition(features, class_ids))


def build_generator(level: str, **hparams: Any) -> ConchShellGenerator:
    """Build the ``high``, ``low`` or ``deep`` generator; the defaults reproduce the paper.

    Keyword arguments are those of :class:`ConchShellGenerator` (``latent_length`` is
    required: ``clip_seconds * sample_rate / hop`` of the codec level, i.e. 1000, 4000 and
    16000 frames for 8 s at 16 kHz). Raises ConfigError for an unknown level or sizes the
    architecture cannot honour (the message gives the minimum).
    """
    return ConchShellGenerator(level, **hparams)


@torch.no_grad()
def freeze_for_inference(generator: ConchShellGenerator, precision: str) -> ConchShellGenerator:
    """Turn ``generator`` (in place) into a frozen network for generation only, and return it.

    Weight normalisation is folded into plain weights, computed once instead of on every
    call. Frozen, the long-kernel stage convolutions run through the DFT
    (:class:`~conchshell.nn.fft_conv.FFTConv1d`: in float32, or as bf16 matrix products
    under bf16 autocast; faster than the direct form in either precision), from spectra
    made in float64, so they keep float32 weights. For ``"bf16"`` every other
    conv and linear layer is stored in bf16, which bf16 autocast would otherwise cast from
    fp32 on every call (Deep, batch 1, 2 CPU cores: 238 -> 193 ms). Inside
    :func:`~conchshell.nn.direct.direct_convolutions`, under the matching precision (fp32,
    or bf16 autocast), the outputs are bit-identical to the unfrozen network's. The result
    cannot be trained, and its state dict has plain ``weight`` entries: export generators
    before freezing them.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; expected fp32 or bf16")
    for module in generator.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    generator.eval().requires_grad_(False)
    if precision == "bf16":
        for module in generator.modules():
            if isinstance(module, FFTConv1d) and module.applies():
                continue
            if isinstance(module, (nn.Conv1d, nn.Linear)):
                module.to(torch.bfloat16)
    return generator
