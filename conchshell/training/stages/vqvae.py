"""The VQ-VAE stage: train the project's own Jukebox-architecture codec at its own rate.

The official Jukebox weights are 44.1 kHz and carry a non-commercial licence; this stage
trains the same architecture (any subset of levels, ``train.vqvae_levels``) on the
dataset's clips. Loss per trained level, as in Jukebox: reconstruction (L2, optionally
L1) + a multi-resolution spectral distance + 0.02 x the commitment loss. The codebook
itself is not learnt by gradient but by EMA inside the model's forward pass (Jukebox's
scheme); its EMA statistics are not in the state dict, so the checkpoint stores them
separately for an exact resume.

The export ``codec-*.pt`` holds ``{'state_dict': ...}`` with the official key names, so
``codec.checkpoint`` can point at it in the GAN stage (``factory.build_vqvae``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conchshell.config import Config
from conchshell.errors import ConfigError
from conchshell.models.factory import build_vqvae, codec_hparams
from conchshell.nn.resample import Resample
from conchshell.nn.spectral import MultiResolutionSTFTDistance
from conchshell.training.checkpointing import export_weights, git_commit
from conchshell.training.distributed import DistInfo
from conchshell.training.optim import DEFAULT_BETAS, adamw, clip_gradients, trainable_parameters
from conchshell.training.stages import Batch, Stage, take_windows, to_device
from conchshell.training.stages.gan import log_mel_for

EXPORT_FORMAT = "conchshell-codec-v1"


class VqvaeStage(Stage):
    name = "vqvae"
    export_prefix = "codec"
    metric_name = "val/reconstruction"

    def __init__(self, config: Config, dist_info: DistInfo) -> None:
        super().__init__(config, dist_info)
        # The nearest-codebook search and the EMA updates need float32 distances: bf16 would
        # assign latents to the wrong codes, so this stage always trains in float32.
        self.use_bf16 = False
        self.vqvae = build_vqvae(config, load_weights=False).to(self.device).train()
        self.levels = self._check_levels(config)
        segment = config.train.vqvae_segment_seconds
        self.segment_samples = round(segment * config.codec_rate) if segment is not None else None
        # Levels that are not trained get no gradients: DDP and the optimiser skip them.
        for level in range(self.vqvae.levels):
            if level not in self.levels:
                self.vqvae.encoders[level].requires_grad_(False)
                self.vqvae.decoders[level].requires_grad_(False)
        self.to_codec: nn.Module = (Resample(config.data.sample_rate, config.codec_rate).to(self.device)
                                    if config.codec_rate != config.data.sample_rate else nn.Identity())
        self.models = {"vqvae": self.vqvae}
        # The quantiser all-reduces its own EMA statistics, so every replica's codebook is
        # identical already; broadcasting buffers every forward would only cost time.
        self.model = self.wrap(self.vqvae, broadcast_buffers=False)
        optimizer = adamw(trainable_parameters(self.vqvae), config.optim.vqvae_lr, config.optim, DEFAULT_BETAS)
        self.optimizers = {"vqvae": optimizer}
        # Constant rate (Jukebox trains its VQ-VAE without decay); kept as a scheduler so the
        # checkpoint layout is the same in every stage.
        self.schedulers = {"vqvae": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)}
        self.spectral = MultiResolutionSTFTDistance().to(self.device)
        self.mel = log_mel_for(config).to(self.device)

    @staticmethod
    def _check_levels(config: Config) -> list[int]:
        levels = list(config.train.vqvae_levels)
        if not levels or len(set(levels)) != len(levels) or not all(0 <= L < config.codec.levels for L in levels):
            raise ConfigError(f"train.vqvae_levels must be distinct levels of the codec's "
                              f"{config.codec.levels} (0..{config.codec.levels - 1}), got {levels}")
        for level in levels:
            hop = config.level_hop(level)
            for name, samples in VqvaeStage._sample_counts(config).items():
                if samples % hop:
                    raise ConfigError(f"{name} gives {samples} codec samples, not a multiple of "
                                      f"the level-{level} hop {hop}")
        return sorted(levels)

    @staticmethod
    def _sample_counts(config: Config) -> dict[str, int]:
        counts = {"data.clip_seconds": round(config.data.clip_seconds * config.codec_rate)}
        segment = config.train.vqvae_segment_seconds
        if segment is not None:
            if not 0 < segment <= config.data.clip_seconds:
                raise ConfigError(f"train.vqvae_segment_seconds must be in (0, data.clip_seconds="
                                  f"{config.data.clip_seconds}], got {segment}")
            counts["train.vqvae_segment_seconds"] = round(segment * config.codec_rate)
        return counts

    def training_audio(self, batch: Batch) -> Tensor:
        """The batch's clips at the codec rate, cut to random training windows when
        ``train.vqvae_segment_seconds`` is set (window starts on a multiple of the coarsest
        trained hop, drawn from the checkpointed torch RNG so resumes repeat them)."""
        audio = self.to_codec(to_device(batch, self.device)["audio"])
        if self.segment_samples is None or self.segment_samples >= audio.shape[-1]:
            return audio
        hop = self.config.level_hop(max(self.levels))
        starts = torch.randint(0, (audio.shape[-1] - self.segment_samples) // hop + 1, (audio.shape[0],)) * hop
        return take_windows(audio, starts, self.segment_samples)

    def reconstruction_terms(self, reconstruction: Tensor, audio: Tensor) -> dict[str, Tensor]:
        loss = self.config.loss
        terms: dict[str, Tensor] = {}
        if loss.vqvae_l2:
            terms["l2"] = F.mse_loss(reconstruction, audio)
        if loss.vqvae_l1:
            terms["l1"] = F.l1_loss(reconstruction, audio)
        if loss.vqvae_spectral:
            terms["spectral"] = self.spectral(reconstruction, audio)
        return terms

    def reconstruction_loss(self, terms: Mapping[str, Tensor]) -> Tensor:
        loss = self.config.loss
        weights = {"l2": loss.vqvae_l2, "l1": loss.vqvae_l1, "spectral": loss.vqvae_spectral}
        return sum((weights[name] * value for name, value in terms.items()), torch.zeros((), device=self.device))

    def train_step(self, micro_batches: list[Batch]) -> dict[str, Tensor]:
        accum = len(micro_batches)
        self.zero_grad()
        logged: dict[str, Tensor] = {}

        def add(name: str, value: Tensor) -> None:
            logged[name] = logged.get(name, 0.0) + value.detach() / accum

        for index, batch in enumerate(micro_batches):
            audio = self.training_audio(batch)
            with self.sync_gradients(self.model, index == accum - 1):
                out = self.model(audio, levels=self.levels)
                total = torch.zeros((), device=self.device)
                for level in self.levels:
                    terms = self.reconstruction_terms(out["reconstructions"][level], audio)
                    commit = out["commit_losses"][level]
                    total = total + self.reconstruction_loss(terms) + self.config.loss.vqvae_commit * commit
                    for name, value in terms.items():
                        add(f"vqvae/L{level}/{name}", value)
                    add(f"vqvae/L{level}/commit", commit)
                    for name in ("usage", "entropy", "fit"):
                        if name in out["metrics"][level]:
                            add(f"vqvae/L{level}/{name}", out["metrics"][level][name].float())
                (total / accum).backward()
            add("vqvae/loss", total)
        self.check_finite({"loss": logged["vqvae/loss"]})
        clip_gradients(self.vqvae, self.config.optim.grad_clip)
        self.optimizers["vqvae"].step()
        self.schedulers["vqvae"].step()
        return logged

    @torch.no_grad()
    def validate(self, batches: Iterable[Batch], num_media: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Weighted reconstruction loss (no commitment term) on centre-cropped clips, summed over levels."""
        self.vqvae.eval()  # eval mode: the codebook is not updated by validation data
        totals: dict[str, float] = {self.metric_name: 0.0}
        count = 0
        media: list[dict[str, Any]] = []
        for batch in batches:
            audio = self.to_codec(to_device(batch, self.device)["audio"])
            out = self.vqvae(audio, levels=self.levels)
            size = audio.shape[0]
            for level in self.levels:
                terms = self.reconstruction_terms(out["reconstructions"][level], audio)
                totals[self.metric_name] += self.reconstruction_loss(terms).item() * size
                for name, value in terms.items():
                    key = f"val/L{level}/{name}"
                    totals[key] = totals.get(key, 0.0) + value.item() * size
            count += size
            for i in range(size):
                if len(media) < num_media:
                    item: dict[str, Any] = {"image": batch["image"][i].cpu(), "audio/real": audio[i].cpu(),
                                            "mel/real": self.mel(audio[i:i + 1])[0].cpu()}
                    for level in self.levels:
                        recon = out["reconstructions"][level][i:i + 1]
                        item[f"audio/L{level}"] = recon[0].cpu()
                        item[f"mel/L{level}"] = self.mel(recon)[0].cpu()
                    media.append(item)
        self.vqvae.train()
        return {name: value / max(count, 1) for name, value in totals.items()}, media

    def extra_state(self) -> dict[str, Any]:
        return {"codebook_statistics": self.vqvae.codebook_statistics()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "codebook_statistics" in state:
            self.vqvae.load_codebook_statistics(
                {k: v.to(self.device) for k, v in state["codebook_statistics"].items()})

    def export(self, path: Path, step: int) -> None:
        hparams = {k: list(v) if isinstance(v, tuple) else v for k, v in codec_hparams(self.config).items()}
        export_weights(self.vqvae.state_dict(), path, extra={
            "format": EXPORT_FORMAT, "hparams": hparams, "trained_levels": list(self.levels),
            "step": int(step), "git_commit": git_commit() or "",
        })
