"""Jukebox's hierarchical VQ-VAE, CPU-friendly and trainable by this project.

The default constructor builds the 5b ``vqvae`` hyper-parameters (3 levels, hops 8/32/128,
64-d latents, 2048-entry codebooks) with parameter and buffer names identical to the
official ``vqvae.pth.tar`` (``tests/data/jukebox_vqvae_keys.tsv``). Every hyper-parameter is
a keyword argument, so a smaller or other-rate codec can be trained with ``forward``.

Each level is an independent autoencoder: ``encoders[L]`` stacks the strided blocks of
levels 0..L (hop = product of all their strides) and ``decoders[L]`` mirrors it. Only the
requested level's encoder or decoder runs, internally in the channels-last layout of
conchshell.nn.channels_last (faster convolutions on CPU; inputs and outputs stay [B, C, T]).

Audio is ``[B, 1, T]`` in [-1, 1] (Jukebox itself uses ``[B, T, 1]``). The official weights
were trained at 44.1 kHz; ``sample_rate`` records the rate a codec expects, and callers
decide whether to resample (see conchshell.nn.resample) or feed audio as-is (the paper).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from conchshell.errors import CheckpointError
from conchshell.nn.channels_last import from_channels_last_2d, to_channels_last_2d
from conchshell.nn.conv import Conv1d
from conchshell.nn.quantizer import Bottleneck
from conchshell.nn.resnet1d import DecoderConvBlock, EncoderConvBlock
from conchshell.utils.checkpoint import load_strict, read_weights, strip_prefix

JUKEBOX_SAMPLE_RATE = 44100


class LevelEncoder(nn.Module):
    """Audio [B, C_in, T] -> latent [B, emb_width, T / prod(strides**downs)] through ``level_blocks``."""

    def __init__(
        self,
        in_channels: int,
        emb_width: int,
        downs_t: Sequence[int],
        strides_t: Sequence[int],
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.level_blocks = nn.ModuleList(
            EncoderConvBlock(in_channels if i == 0 else emb_width, emb_width, down, stride, **block_kwargs)
            for i, (down, stride) in enumerate(zip(downs_t, strides_t))
        )

    def forward(self, x: Tensor) -> Tensor:
        x = to_channels_last_2d(x)
        for block in self.level_blocks:
            x = block(x)
        return from_channels_last_2d(x)


class LevelDecoder(nn.Module):
    """Latent [B, emb_width, T'] -> audio [B, C_out, T' * hop]: ``level_blocks`` from the top, then ``out``."""

    def __init__(
        self,
        out_channels: int,
        emb_width: int,
        downs_t: Sequence[int],
        strides_t: Sequence[int],
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.level_blocks = nn.ModuleList(
            DecoderConvBlock(emb_width, emb_width, down, stride, **block_kwargs)
            for down, stride in zip(downs_t, strides_t)
        )
        self.out = Conv1d(emb_width, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, latent: Tensor) -> Tensor:
        x = to_channels_last_2d(latent)
        for block in reversed(self.level_blocks):
            x = block(x)
        return from_channels_last_2d(self.out(x))


class VQVAE(nn.Module):
    """Hierarchical VQ-VAE (Jukebox). Defaults: the 5b ``vqvae`` hyper-parameters."""

    def __init__(
        self,
        *,
        levels: int = 3,
        downs_t: Sequence[int] = (3, 2, 2),
        strides_t: Sequence[int] = (2, 2, 2),
        emb_width: int = 64,
        l_bins: int = 2048,
        width: int = 32,
        depth: int = 4,
        m_conv: float = 1.0,
        dilation_growth_rate: int = 3,
        dilation_cycle: int | None = None,
        multipliers: Sequence[int] | None = (2, 1, 1),
        reverse_decoder_dilation: bool = True,
        mu: float = 0.99,
        threshold: float = 1.0,
        audio_channels: int = 1,
        sample_rate: int = JUKEBOX_SAMPLE_RATE,
    ) -> None:
        super().__init__()
        if not (len(downs_t) == len(strides_t) == levels):
            raise ValueError(f"downs_t {tuple(downs_t)} and strides_t {tuple(strides_t)} need {levels} entries")
        multipliers = tuple(multipliers) if multipliers is not None else (1,) * levels
        if len(multipliers) != levels:
            raise ValueError(f"multipliers {multipliers} need {levels} entries")
        self.levels = levels
        self.emb_width = emb_width
        self.l_bins = l_bins
        self.audio_channels = audio_channels
        self.sample_rate = sample_rate
        self.downs_t = tuple(downs_t)
        self.strides_t = tuple(strides_t)
        self.hop_lengths: tuple[int, ...] = tuple(
            math.prod(s**d for s, d in zip(self.strides_t[: level + 1], self.downs_t[: level + 1]))
            for level in range(levels)
        )

        def block_kwargs(level: int) -> dict[str, Any]:
            # Jukebox widens *and* deepens the lower levels by the same multiplier.
            return dict(
                width=width * multipliers[level],
                depth=depth * multipliers[level],
                m_conv=m_conv,
                dilation_growth_rate=dilation_growth_rate,
                dilation_cycle=dilation_cycle,
            )

        self.encoders = nn.ModuleList(
            LevelEncoder(audio_channels, emb_width, downs_t[: L + 1], strides_t[: L + 1], **block_kwargs(L))
            for L in range(levels)
        )
        self.decoders = nn.ModuleList(
            LevelDecoder(
                audio_channels,
                emb_width,
                downs_t[: L + 1],
                strides_t[: L + 1],
                reverse_dilation=reverse_decoder_dilation,
                **block_kwargs(L),
            )
            for L in range(levels)
        )
        self.bottleneck = Bottleneck(levels, l_bins, emb_width, mu, threshold)
        self._frozen = False

    # ------------------------------------------------------------------ checks
    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.levels:
            raise ValueError(f"level must be in 0..{self.levels - 1}, got {level}")

    def _check_audio(self, x: Tensor, level: int) -> None:
        if x.dim() != 3 or x.shape[1] != self.audio_channels:
            raise ValueError(f"expected audio [B, {self.audio_channels}, T], got {tuple(x.shape)}")
        hop = self.hop_lengths[level]
        if x.shape[-1] % hop:
            raise ValueError(f"audio length {x.shape[-1]} is not a multiple of the level-{level} hop {hop}")

    def latent_length(self, num_samples: int, level: int) -> int:
        """Latent frames for ``num_samples`` audio samples at ``level``."""
        self._check_level(level)
        return num_samples // self.hop_lengths[level]

    # ------------------------------------------------------------- inference API
    def encode(self, x: Tensor, level: int) -> Tensor:
        """Audio [B, 1, T] -> continuous latent [B, emb_width, T / hop] (only this level's encoder runs)."""
        self._check_level(level)
        self._check_audio(x, level)
        return self.encoders[level](x)

    def quantize(self, latent: Tensor, level: int) -> Tensor:
        """Continuous latent [B, emb_width, T'] -> nearest codebook indices [B, T'] (long)."""
        self._check_level(level)
        return self.bottleneck[level].quantize(latent)

    def dequantize(self, codes: Tensor, level: int) -> Tensor:
        """Codes [B, T'] -> codebook vectors [B, emb_width, T']."""
        self._check_level(level)
        return self.bottleneck[level].dequantize(codes)

    def quantize_straight_through(self, latent: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """(quantised latent, codes): codebook values forward, identity gradient back to ``latent``.

        Never updates the codebook, whatever the mode: it is meant for training models that
        *produce* latents (the GAN generator) through a fixed codec.
        """
        self._check_level(level)
        return self.bottleneck[level].straight_through(latent)

    def decode_latent(self, latent: Tensor, level: int) -> Tensor:
        """Latent [B, emb_width, T'] -> audio [B, 1, T' * hop]; differentiable w.r.t. ``latent``."""
        self._check_level(level)
        if latent.dim() != 3 or latent.shape[1] != self.emb_width:
            raise ValueError(f"expected a latent [B, {self.emb_width}, T'], got {tuple(latent.shape)}")
        return self.decoders[level](latent)

    def decode(self, codes: Tensor, level: int) -> Tensor:
        """Codes [B, T'] -> audio [B, 1, T' * hop]."""
        return self.decode_latent(self.dequantize(codes, level), level)

    # ------------------------------------------------------------- training API
    def forward(self, x: Tensor, levels: Sequence[int] | None = None) -> dict[str, Any]:
        """Encode, quantise (EMA codebook update in training mode) and decode ``x`` [B, 1, T].

        ``levels`` selects the levels to run (default: all). Returns a dict of per-level
        dicts keyed by level:

        - ``reconstructions``: audio [B, 1, T] decoded from the straight-through latent
          (gradients reach the encoder through the straight-through estimator);
        - ``latents``: continuous encoder outputs [B, emb_width, T / hop];
        - ``codes``: [B, T / hop];
        - ``commit_losses``: scalar ``mean((latent - sg(quantised))^2)``;
        - ``metrics``: detached codebook metrics: ``fit`` (mean squared distance to the
          chosen code), ``pn`` (latent spread), ``entropy`` and ``used_curr`` (batch code
          usage), and in training ``usage`` (live codes) and ``dk`` (codebook change).

        The reconstruction loss and the commitment weight (Jukebox 5b: 0.02) are the
        trainer's choice.
        """
        selected = list(range(self.levels)) if levels is None else list(levels)
        keys = ("reconstructions", "latents", "codes", "commit_losses", "metrics")
        out: dict[str, Any] = {key: {} for key in keys}
        for level in selected:
            latent = self.encode(x, level)
            result = self.bottleneck[level](latent, update_codebook=self.training)
            out["latents"][level] = latent
            out["codes"][level] = result.codes
            out["commit_losses"][level] = result.commit_loss
            out["metrics"][level] = {k: v.detach() for k, v in result.metrics.items()}
            out["reconstructions"][level] = self.decoders[level](result.quantised)
        return out

    # ------------------------------------------------------------- freezing
    @property
    def frozen(self) -> bool:
        return self._frozen

    def freeze(self) -> "VQVAE":
        """No gradients for the weights and eval mode for good, even if a parent calls ``.train()``.

        Gradients still flow *through* the decoder to its input (``decode_latent``).
        """
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        return self.eval()

    def unfreeze(self) -> "VQVAE":
        """Undo :meth:`freeze` (weights trainable again; mode is left to the caller)."""
        for p in self.parameters():
            p.requires_grad_(True)
        self._frozen = False
        return self

    def train(self, mode: bool = True) -> "VQVAE":
        return super().train(mode and not self._frozen)

    # ------------------------------------------------------------- codebook statistics
    def codebook_statistics(self) -> dict[str, Tensor]:
        """EMA statistics of every level (not in the state dict, which matches the official file)."""
        stats: dict[str, Tensor] = {}
        for level, block in enumerate(self.bottleneck.level_blocks):
            stats[f"{level}.k_sum"] = block.k_sum.clone()
            stats[f"{level}.k_elem"] = block.k_elem.clone()
            stats[f"{level}.initialised"] = torch.tensor(block.initialised)
        return stats

    def load_codebook_statistics(self, stats: dict[str, Tensor]) -> None:
        """Restore what :meth:`codebook_statistics` saved, so a resumed run continues the EMA exactly."""
        for level, block in enumerate(self.bottleneck.level_blocks):
            block.k_sum.copy_(stats[f"{level}.k_sum"])
            block.k_elem.copy_(stats[f"{level}.k_elem"])
            block.initialised = bool(stats[f"{level}.initialised"])


def _extract_state_dict(obj: Any, path: str | os.PathLike) -> dict[str, Tensor]:
    """The official file holds ``{'model': state_dict, 'hps': ..., ...}``; D2M-style files are
    bare; this project's exports hold ``{'state_dict': ..., 'hparams': ...}``."""
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a VQ-VAE state dict")
    if obj and all(k.startswith("module.") for k in obj):
        obj = strip_prefix(obj, "module.")
    return obj


def load_jukebox_checkpoint(path: str | os.PathLike, **hparams: Any) -> VQVAE:
    """Build ``VQVAE(**hparams)`` and load ``path`` strictly; returns it frozen, in eval mode.

    Accepts the official ``vqvae.pth.tar`` (state dict under ``'model'``, keys possibly
    prefixed ``module.``) and a bare state dict. Raises CheckpointError naming the file
    and listing missing/unexpected/mis-shaped keys otherwise.
    """
    state = _extract_state_dict(read_weights(path), path)
    model = VQVAE(**hparams)
    load_strict(model, state, path)
    return model.freeze()
