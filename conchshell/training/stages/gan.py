"""The GAN stage: the ConchShell generator against the multi-scale latent discriminator.

Frozen around the two trained networks: the image frontend (TCNN + pseudo-video + I3D),
skipped when the batch carries cached ``features``, and the codec (only the level the
generator targets is ever encoded). One step (DESIGN.md section 3):

1. discriminator: hinge loss on the real level latent ``codec.encode(audio)`` and on
   ``fake.detach()``; AdamW step;
2. generator: ``generator_objective`` over the adversarial hinge loss, feature matching
   (against the real latent's feature maps from step 1, detached, as in MelGAN's training
   loop: no second forward of the reals),
   wave and mel L1 of ``quantized_audio(codec, fake)`` against the real clip, the
   released code's latent L1 terms and the optional commitment of the latent to its nearest
   codes; terms whose weight is 0 are not computed.

With ``discriminator.class_conditional`` the discriminator also sees the class: the real
latent its clip's label, the fake the class the generator was asked for. With
``discriminator.auxiliary_classifier`` it also learns to classify real latents (cross-entropy
against their label, added to its hinge loss; fakes are never its examples), and
``loss.lambda_class`` asks the generator for latents that classifier puts in the class they
were generated for (AC-GAN).

With ``train.gan_segment_seconds`` both steps see one random window per item (same
frames of the real latent, the fake latent and the clip) instead of whole clips; the
generator still produces whole latents and validation scores whole clips.

With ``loss.straight_through`` the wave/mel terms reach the generator through the
straight-through quantiser and the frozen decoder; without it they reproduce the released
code, where they carry no gradient.
"""
from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from conchshell.config import Config
from conchshell.errors import ConfigError
from conchshell.export import save_generator_export
from conchshell.models.codec import nearest_codes_latent, quantized_audio
from conchshell.models.factory import (
    build_codec,
    build_discriminator_from_config,
    build_frontend,
    build_generator_from_config,
)
from conchshell.models.frontend import ImageFrontend
from conchshell.nn.losses import (
    LossWeights,
    discriminator_hinge_loss,
    feature_matching_loss,
    generator_hinge_loss,
    generator_objective,
)
from conchshell.nn.spectral import LogMelSpectrogram, mel_l1
from conchshell.training.distributed import DistInfo
from conchshell.training.optim import clip_gradients, gan_optimisers
from conchshell.training.stages import Batch, Stage, take_windows, to_device

CLASS_SOURCES = ("label", "tcnn")
# Training items whose image features set the generator's standardisation (first ones, in
# manifest order: the same on every rank).
FEATURE_STATISTICS_ITEMS = 1024


def loss_weights(config: Config) -> LossWeights:
    """The objective's weights from ``config.loss`` (same field names)."""
    return LossWeights(**{f.name: getattr(config.loss, f.name) for f in dataclasses.fields(LossWeights)})


def split_scales(outputs: list[list[Tensor]], first: int) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """Discriminator outputs of a concatenated batch -> (first ``first`` items, the rest)."""
    return ([[t[:first] for t in scale] for scale in outputs],
            [[t[first:] for t in scale] for scale in outputs])


def log_mel_for(config: Config) -> LogMelSpectrogram:
    loss = config.loss
    return LogMelSpectrogram(sample_rate=config.data.sample_rate, n_fft=loss.mel_n_fft,
                             hop_length=loss.mel_hop, win_length=loss.mel_win, n_mels=loss.mel_bins,
                             fmin=loss.mel_fmin, fmax=loss.mel_fmax)


class GanStage(Stage):
    name = "gan"
    export_prefix = "G"
    metric_name = "val/mel_l1"

    def __init__(self, config: Config, dist_info: DistInfo) -> None:
        super().__init__(config, dist_info)
        if config.image.train_class_source not in CLASS_SOURCES:
            raise ConfigError(f"image.train_class_source must be one of {CLASS_SOURCES}, "
                              f"got {config.image.train_class_source!r}")
        self.weights = loss_weights(config)
        if all(weight == 0.0 for weight in self.weights.by_term().values()):
            raise ConfigError("every generator loss weight (loss.lambda_*) is 0: nothing to train")
        if self.weights.lambda_class and not config.discriminator.auxiliary_classifier:
            raise ConfigError("loss.lambda_class needs discriminator.auxiliary_classifier: true")
        self.clip_samples = config.clip_samples
        self.window_frames = self._window_frames(config)
        self.samples_per_frame = config.clip_samples // config.latent_length
        self.generator = build_generator_from_config(config).to(self.device)
        self.discriminator = build_discriminator_from_config(config).to(self.device)
        self.codec = build_codec(config).to(self.device)
        self.mel = log_mel_for(config).to(self.device)
        self.models = {"generator": self.generator, "discriminator": self.discriminator}
        self.g = self.wrap(self.generator)
        self.d = self.wrap(self.discriminator)
        self.optimizers, self.schedulers = gan_optimisers(self.generator, self.discriminator, config.optim)
        self._frontend: ImageFrontend | None = None
        # Validation images never change and the frontend is frozen: compute their features once.
        self._val_conditioning: dict[int, tuple[Tensor, Tensor]] = {}

    @staticmethod
    def _window_frames(config: Config) -> int | None:
        seconds = config.train.gan_segment_seconds
        if seconds is None:
            return None
        frames = seconds * config.latent_length / config.data.clip_seconds
        if not 0 < seconds <= config.data.clip_seconds or abs(frames - round(frames)) > 1e-6:
            raise ConfigError(f"train.gan_segment_seconds must be in (0, {config.data.clip_seconds}] and a whole "
                              f"number of latent frames ({config.data.clip_seconds / config.latent_length:g} s "
                              f"each), got {seconds}")
        if config.clip_samples % config.latent_length:
            raise ConfigError("train.gan_segment_seconds needs a whole number of clip samples per latent frame "
                              f"({config.clip_samples} samples, {config.latent_length} frames)")
        return round(frames)

    # ------------------------------------------------------------------ windows
    def draw_windows(self, batch_size: int) -> Tensor | None:
        """Start frame of each item's training window (None: whole clips). Drawn from the
        checkpointed torch RNG, so a resumed run draws the same windows."""
        if self.window_frames is None:
            return None
        return torch.randint(0, self.config.latent_length - self.window_frames + 1, (batch_size,))

    def window_latent(self, latent: Tensor, starts: Tensor | None) -> Tensor:
        return latent if starts is None else take_windows(latent, starts, self.window_frames)

    def window_audio(self, audio: Tensor, starts: Tensor | None) -> Tensor:
        if starts is None:
            return audio
        return take_windows(audio, starts * self.samples_per_frame, self.window_frames * self.samples_per_frame)

    def prepare(self, train_set: Dataset, collate: Callable[[list[Any]], Batch]) -> None:
        if not self.generator.standardize_features:
            return
        count = min(len(train_set), FEATURE_STATISTICS_ITEMS)
        loader = DataLoader(Subset(train_set, range(count)), batch_size=8, collate_fn=collate)
        features = torch.cat([self.image_features(to_device(batch, self.device))[0] for batch in loader])
        self.generator.set_feature_statistics(features)

    # ------------------------------------------------------------------ inputs
    @property
    def frontend(self) -> ImageFrontend:
        """Built on first use: a run whose batches all come from the feature cache never needs it."""
        if self._frontend is None:
            self._frontend = build_frontend(self.config).to(self.device)
        return self._frontend

    def image_features(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(I3D features [B,2048] float32, TCNN class ids [B]) from the cache or the frontend."""
        if "features" in batch and "pred_class" in batch:
            return batch["features"].float(), batch["pred_class"].long()
        with torch.inference_mode():
            features, predicted = self.frontend(batch["image"])
        # Inference tensors cannot take part in autograd: clone them into normal tensors.
        return features.clone(), predicted.clone()

    def conditioning(self, batch: Batch, class_source: str) -> tuple[Tensor, Tensor]:
        features, predicted = self.image_features(batch)
        return features, batch["class_id"].long() if class_source == "label" else predicted

    @torch.no_grad()
    def real_latent(self, audio: Tensor, at_run_precision: bool = False) -> Tensor:
        """The frozen codec's continuous latent of ``audio`` (float32). Encoded in float32
        unless ``at_run_precision``: under bf16 the latent moves by about 1 % (seeded Deep
        codec: 1.1 % relative, 1.9 % of frames to another code) and the encode takes 0.40
        instead of 0.66 s (Deep, batch 2, 2 CPU cores)."""
        precision = self.autocast() if at_run_precision else torch.autocast(self.device.type, enabled=False)
        with precision:
            return self.codec.encode(audio.float()).float()

    def real_latent_at_run_precision(self) -> bool:
        """Whether the training step may encode at the run's precision: when the real latent
        only feeds the discriminator, whose first layer rounds it to the run's dtype anyway.
        The latent terms read it (or its codes) directly and keep it in float32."""
        return not (self.weights.lambda_latent or self.weights.lambda_quantized_latent)

    # ------------------------------------------------------------------ losses
    def judge(self, discriminator: torch.nn.Module, latent: Tensor, classes: Tensor) -> list[list[Tensor]]:
        """Discriminator outputs for ``latent`` (``classes`` read only by a class-conditional
        discriminator): scores in float32, feature maps as computed (bf16 under bf16
        autocast: float32 copies of a Deep step's maps and their gradients moved 5 GB)."""
        with self.autocast():
            outputs = discriminator(latent, classes if self.config.discriminator.class_conditional else None)
        return [[*scale[:-1], scale[-1].float()] for scale in outputs]

    def discriminator_loss(self, real: Tensor, fake: Tensor, real_classes: Tensor, fake_classes: Tensor
                           ) -> tuple[Tensor, list[list[Tensor]] | None]:
        """(the discriminator's loss, the reals' outputs for feature matching: detached
        copies, None when its weight is 0)."""
        # Real and fake in one forward: DDP expects one forward per backward.
        outputs = self.judge(self.d, torch.cat([real, fake.detach().to(real.dtype)]),
                             torch.cat([real_classes, fake_classes]))
        real_out, fake_out = split_scales(outputs, real.shape[0])
        loss = discriminator_hinge_loss(real_out, fake_out)
        if self.config.discriminator.auxiliary_classifier:
            loss = loss + F.cross_entropy(self.discriminator.class_logits(real_out), real_classes)
        # Copies: the real halves as views would keep the fakes' maps alive too.
        if not self.weights.lambda_fm:
            return loss, None
        return loss, [[t.detach().clone() for t in scale] for scale in real_out]

    def generator_terms(self, fake: Tensor, real: Tensor, audio: Tensor, real_features: list[list[Tensor]] | None,
                        fake_classes: Tensor) -> dict[str, Tensor]:
        """Every generator loss term with a non-zero weight (unweighted). ``real_features``:
        the discriminator's outputs for ``real`` (from :meth:`discriminator_loss`), needed
        when feature matching is on."""
        w = self.weights
        terms: dict[str, Tensor] = {}
        if w.lambda_g or w.lambda_fm or w.lambda_class:
            # The unwrapped discriminator with frozen weights: gradients reach ``fake`` only,
            # and no discriminator all-reduce is spent on the generator's step.
            fake_out = self.judge(self.discriminator, fake.to(real.dtype), fake_classes)
            if w.lambda_g:
                terms["adversarial"] = generator_hinge_loss(fake_out)
            if w.lambda_fm:
                if real_features is None:
                    raise ValueError("feature matching needs the real latents' discriminator outputs")
                terms["feature_matching"] = feature_matching_loss(real_features, fake_out)
            if w.lambda_class:
                terms["class"] = F.cross_entropy(self.discriminator.class_logits(fake_out), fake_classes)
        # The nearest codes are searched once, in fp32 (bf16 flips codes), for the audio terms
        # and the commitment. The frozen decoder runs at the run's precision like the trained
        # networks: under bf16 its forward + backward takes half the time (Deep, batch 2, 2 CPU
        # cores: 1.1-1.4 s -> 0.5-0.7 s).
        fake_fp32 = fake.float()
        if w.lambda_wave or w.lambda_mel or w.lambda_commitment:
            with torch.autocast(device_type=self.device.type, enabled=False):
                nearest = nearest_codes_latent(self.codec, fake_fp32)
            if w.lambda_wave or w.lambda_mel:
                with self.autocast():
                    fake_audio = quantized_audio(self.codec, fake_fp32, audio.shape[-1],
                                                 self.config.loss.straight_through, nearest).float()
            if w.lambda_wave:
                terms["wave"] = F.l1_loss(fake_audio, audio)
            if w.lambda_mel:
                terms["mel"] = mel_l1(fake_audio, audio, self.mel)
            if w.lambda_commitment:
                terms["commitment"] = F.l1_loss(fake_fp32, nearest)
        if w.lambda_latent:
            terms["latent"] = F.l1_loss(fake_fp32, real)
        if w.lambda_quantized_latent:
            terms["quantized_latent"] = F.l1_loss(fake_fp32, nearest_codes_latent(self.codec, real))
        return terms

    # ------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[Batch]) -> dict[str, Tensor]:
        accum = len(micro_batches)
        self.zero_grad()
        # With one micro-batch the fake keeps its graph from the D phase to the G phase (one
        # generator forward per step, as in the paper's code). With several, keeping every
        # graph would defeat accumulation, so the D phase generates without a graph and the
        # G phase generates again. Each micro-batch's real feature maps are kept for the G
        # phase (Deep: 0.4 GB per item in bf16).
        keep_graph = accum == 1
        prepared = []
        d_total = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            batch = to_device(batch, self.device)
            features, class_ids = self.conditioning(batch, self.config.image.train_class_source)
            starts = self.draw_windows(batch["audio"].shape[0])
            real = self.window_latent(self.real_latent(batch["audio"], self.real_latent_at_run_precision()), starts)
            with self.autocast(), torch.set_grad_enabled(keep_graph):
                fake = self.window_latent((self.g if keep_graph else self.generator)(features, class_ids), starts)
            with self.sync_gradients(self.d, index == accum - 1):
                d_loss, real_features = self.discriminator_loss(real, fake, batch["class_id"].long(), class_ids)
                d_loss = d_loss / accum
                d_loss.backward()
            d_total += d_loss.detach()
            prepared.append((self.window_audio(batch["audio"], starts), features, class_ids,
                             real_features, real, fake if keep_graph else None, starts))
        self.check_finite({"discriminator": d_total})
        clip_gradients(self.discriminator, self.config.optim.grad_clip)
        self.optimizers["discriminator"].step()
        self.schedulers["discriminator"].step()

        sums: dict[str, Tensor] = {}
        g_total = torch.zeros((), device=self.device)
        self.discriminator.requires_grad_(False)
        try:
            for index, (audio, features, class_ids, real_features, real, fake, starts) in enumerate(prepared):
                with self.sync_gradients(self.g, index == accum - 1):
                    if fake is None:
                        with self.autocast():
                            fake = self.window_latent(self.g(features, class_ids), starts)
                    terms = self.generator_terms(fake, real, audio, real_features, class_ids)
                    g_loss = generator_objective(terms, self.weights) / accum
                    # All terms can be gradient-free (wave/mel only, straight_through off:
                    # the released code's behaviour); then there is nothing to back-propagate.
                    if g_loss.requires_grad:
                        g_loss.backward()
                g_total += g_loss.detach()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.detach() / accum
        finally:
            self.discriminator.requires_grad_(True)
        weight_of = self.weights.by_term()
        weighted = {name: weight_of[name] * value for name, value in sums.items()}
        self.check_finite({**weighted, "generator": g_total})
        clip_gradients(self.generator, self.config.optim.grad_clip)
        self.optimizers["generator"].step()
        self.schedulers["generator"].step()
        return {"d/loss": d_total, "g/loss": g_total, **{f"g/{name}": value for name, value in sums.items()}}

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, batches: Iterable[Batch], num_media: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Mel L1 (the best-checkpoint metric), wave L1 and latent L1 on centre-cropped clips.

        The class comes from the TCNN, as at inference, whatever ``train_class_source`` is.
        """
        self.generator.eval()
        totals = {"val/mel_l1": 0.0, "val/wave_l1": 0.0, "val/latent_l1": 0.0}
        count = 0
        media: list[dict[str, Any]] = []
        for batch in batches:
            batch = to_device(batch, self.device)
            features, class_ids = self._val_inputs(batch)
            with self.autocast():
                fake = self.generator(features, class_ids)
            fake = fake.float()
            real = self.real_latent(batch["audio"])
            fake_audio = self.codec.decode(self.codec.quantize(fake), self.clip_samples)
            size = fake.shape[0]
            mel_fake, mel_real = self.mel(fake_audio), self.mel(batch["audio"])
            totals["val/mel_l1"] += F.l1_loss(mel_fake, mel_real).item() * size
            totals["val/wave_l1"] += F.l1_loss(fake_audio, batch["audio"]).item() * size
            totals["val/latent_l1"] += F.l1_loss(fake, real).item() * size
            count += size
            for i in range(size):
                if len(media) < num_media:
                    media.append({"image": batch["image"][i].cpu(),
                                  "audio/generated": fake_audio[i].cpu(), "audio/real": batch["audio"][i].cpu(),
                                  "mel/generated": mel_fake[i].cpu(), "mel/real": mel_real[i].cpu()})
        self.generator.train()
        return {name: value / max(count, 1) for name, value in totals.items()}, media

    def _val_inputs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        indices = [int(i) for i in batch["index"]]
        if not all(i in self._val_conditioning for i in indices):
            features, predicted = self.image_features(batch)
            for row, i in enumerate(indices):
                self._val_conditioning[i] = (features[row], predicted[row])
        features = torch.stack([self._val_conditioning[i][0] for i in indices])
        return features, torch.stack([self._val_conditioning[i][1] for i in indices])

    def export(self, path: Path, step: int) -> None:
        save_generator_export(path, self.generator, self.config, step)
