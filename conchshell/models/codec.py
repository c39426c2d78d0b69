"""The frozen audio codec as the rest of the pipeline sees it: one VQ-VAE level at the data rate.

The paper feeds 16 kHz audio straight into the 44.1 kHz Jukebox codec. ``resample=True``
instead converts to the codec's own rate before encoding and back after decoding, with a
differentiable resampler so wave/mel losses still reach the generator.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from conchshell.models.vqvae import VQVAE
from conchshell.nn.resample import Resample


class AudioCodec(nn.Module):
    """``vqvae`` restricted to ``level``, speaking audio at ``audio_rate``."""

    def __init__(self, vqvae: VQVAE, level: int, audio_rate: int, resample: bool) -> None:
        super().__init__()
        self.vqvae = vqvae
        self.level = level
        self.audio_rate = audio_rate
        codec_rate = vqvae.sample_rate if resample else audio_rate
        self.to_codec = Resample(audio_rate, codec_rate) if codec_rate != audio_rate else nn.Identity()
        self.from_codec = Resample(codec_rate, audio_rate) if codec_rate != audio_rate else nn.Identity()
        self.codec_rate = codec_rate

    @property
    def hop_length(self) -> int:
        return self.vqvae.hop_lengths[self.level]

    @property
    def emb_width(self) -> int:
        return self.vqvae.emb_width

    def encode(self, audio: Tensor) -> Tensor:
        """Audio [B,1,T] at ``audio_rate`` -> continuous latent [B,emb,T'] of this level."""
        return self.vqvae.encode(self.to_codec(audio), self.level)

    def quantize(self, latent: Tensor) -> Tensor:
        return self.vqvae.quantize(latent, self.level)

    def dequantize(self, codes: Tensor) -> Tensor:
        return self.vqvae.dequantize(codes, self.level)

    def decode_latent(self, latent: Tensor, num_samples: int | None = None) -> Tensor:
        """Latent -> audio [B,1,T] at ``audio_rate`` (differentiable), trimmed to ``num_samples``."""
        if latent.device.type == "cpu" and latent.shape[0] > 1:
            # On CPU the decoder's activations at audio rate outgrow the caches when batched:
            # one item at a time decodes a batch of 4 Deep latents in 0.8 s instead of 2.0 s.
            decoded = torch.cat([self.vqvae.decode_latent(item, self.level) for item in latent.split(1)])
        else:
            decoded = self.vqvae.decode_latent(latent, self.level)
        audio = self.from_codec(decoded)
        return audio[..., :num_samples] if num_samples is not None else audio

    def decode(self, codes: Tensor, num_samples: int | None = None) -> Tensor:
        return self.decode_latent(self.dequantize(codes), num_samples)

    def train(self, mode: bool = True) -> "AudioCodec":
        # The codec is frozen in every stage that uses this wrapper.
        return super().train(False)


def nearest_codes_latent(codec: AudioCodec, latent: Tensor) -> Tensor:
    """The codebook vectors nearest to ``latent`` (no gradient), in its dtype."""
    with torch.no_grad():
        return codec.dequantize(codec.quantize(latent.detach())).to(latent.dtype)


def quantized_audio(codec: AudioCodec, latent: Tensor, num_samples: int, straight_through: bool,
                    nearest: Tensor | None = None) -> Tensor:
    """Audio of the nearest-codebook version of ``latent``.

    straight_through=True: gradients pass the quantiser and the frozen decoder back to
    ``latent`` (what trains the generator). False reproduces the released code, which
    decoded argmin codes under no_grad, so its wave and mel losses trained nothing.
    ``nearest``: :func:`nearest_codes_latent` of ``latent`` when the caller has it already.
    """
    if nearest is None:
        nearest = nearest_codes_latent(codec, latent)
    if straight_through:
        return codec.decode_latent(latent + (nearest - latent).detach(), num_samples)
    with torch.no_grad():
        return codec.decode_latent(nearest, num_samples)
