"""A small audio classifier for the class-consistency score: does a clip sound like its class?

It is trained by the project on the reference clips of a dataset's train split (never on
generated audio), then asked which of the six classes each generated clip belongs to.

Model: multinomial logistic regression on log-mel statistics.

- Each clip is peak-normalised (so the generator's output level does not matter), turned
  into a log10 mel spectrogram (64 Slaney mels, 1024-point FFT, hop 256, up to 8 kHz),
  and summarised per mel band by the mean over time (timbre and register), the standard
  deviation (dynamics) and the mean absolute frame-to-frame change (note density, attack
  rate): 3 x 64 = 192 numbers. Those are the traits the classes differ by (see
  :mod:`conchshell.data.demo.music`: register, tempo, density, velocity, mode).
- Features are standardised with the training set's mean and standard deviation (kept
  as buffers, so they travel with the weights); a Linear layer maps them to 6 logits.
- Training: full-batch L-BFGS on cross-entropy plus an L2 penalty on the weights,
  from zero weights: deterministic and seconds on CPU for thousands of clips.

Saved weights-only (``torch.load(weights_only=True)``) as ``{"format", "hparams",
"state_dict", "train_accuracy", "num_train_clips"}``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conchshell.constants import NUM_CLASSES
from conchshell.errors import CheckpointError, DataError
from conchshell.nn.spectral import LogMelSpectrogram
from conchshell.training.checkpointing import export_weights
from conchshell.utils.checkpoint import load_strict, read_weights

CLASSIFIER_FORMAT = "conchshell-audio-classifier-v1"
_PEAK_FLOOR = 1e-6  # below this a clip is silence: leave it, do not amplify noise


@dataclass(frozen=True)
class ClassifierHparams:
    sample_rate: int = 16_000
    n_mels: int = 64
    n_fft: int = 1024
    hop_length: int = 256
    fmax: float = 8000.0
    num_classes: int = NUM_CLASSES


class AudioClassifier(nn.Module):
    """Mono clips [B,T] (or [B,1,T]) at ``sample_rate`` -> class logits [B, num_classes]."""

    def __init__(self, hparams: ClassifierHparams = ClassifierHparams()) -> None:
        super().__init__()
        self.hparams = hparams
        fmax = min(hparams.fmax, hparams.sample_rate / 2)
        self.mel = LogMelSpectrogram(hparams.sample_rate, hparams.n_fft, hparams.hop_length,
                                     hparams.n_fft, hparams.n_mels, 0.0, fmax)
        num_features = 3 * hparams.n_mels
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        self.linear = nn.Linear(num_features, hparams.num_classes)

    def features(self, audio: Tensor) -> Tensor:
        """Un-standardised log-mel statistics [B, 3 * n_mels]."""
        audio = audio.reshape(audio.shape[0], -1).float()
        peak = audio.abs().amax(dim=1, keepdim=True)
        audio = torch.where(peak > _PEAK_FLOOR, audio / peak.clamp(min=_PEAK_FLOOR), audio)
        log_mel = self.mel(audio)  # [B, n_mels, frames]
        change = log_mel.diff(dim=-1).abs().mean(dim=-1) if log_mel.shape[-1] > 1 else torch.zeros_like(log_mel[..., 0])
        return torch.cat([log_mel.mean(dim=-1), log_mel.std(dim=-1, unbiased=False), change], dim=1)

    def classify_features(self, features: Tensor) -> Tensor:
        return self.linear((features - self.feature_mean) / self.feature_std)

    def forward(self, audio: Tensor) -> Tensor:
        return self.classify_features(self.features(audio))

    @torch.no_grad()
    def predict(self, audio: Tensor | np.ndarray, batch_size: int = 32) -> Tensor:
        """Class ids [B] for clips [B,T]; computed in batches to bound memory."""
        audio = torch.as_tensor(np.asarray(audio, dtype=np.float32)) if isinstance(audio, np.ndarray) else audio
        audio = audio.reshape(audio.shape[0], -1)
        return torch.cat([self(chunk).argmax(dim=1) for chunk in audio.split(batch_size)]) if len(audio) else \
            torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def _batched_features(model: AudioClassifier, clips: Tensor, batch_size: int = 32) -> Tensor:
    return torch.cat([model.features(chunk) for chunk in clips.split(batch_size)])


def fit_audio_classifier(clips: Tensor | np.ndarray, labels: Sequence[int] | Tensor,
                         hparams: ClassifierHparams = ClassifierHparams(), l2: float = 1e-3,
                         max_iter: int = 200) -> tuple[AudioClassifier, float]:
    """Train on clips [N,T] with class ids [N]; returns (model in eval mode, training accuracy)."""
    clips = torch.as_tensor(np.asarray(clips, dtype=np.float32)) if isinstance(clips, np.ndarray) else clips.float()
    clips = clips.reshape(clips.shape[0], -1)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(clips) != len(labels) or len(clips) == 0:
        raise DataError(f"need as many labels as clips (and at least one): {len(clips)} clips, {len(labels)} labels")
    if len(labels.unique()) < 2:
        raise DataError("the audio classifier needs reference clips of at least two classes")
    model = AudioClassifier(hparams)
    features = _batched_features(model, clips)
    model.feature_mean.copy_(features.mean(dim=0))
    # A constant feature (e.g. a band above every clip's content) would divide by zero.
    model.feature_std.copy_(features.std(dim=0, unbiased=False).clamp(min=1e-4))
    standardised = (features - model.feature_mean) / model.feature_std
    nn.init.zeros_(model.linear.weight)
    nn.init.zeros_(model.linear.bias)
    optimizer = torch.optim.LBFGS(model.linear.parameters(), lr=1.0, max_iter=max_iter,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model.linear(standardised), labels) + l2 * model.linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    model.eval()
    with torch.no_grad():
        accuracy = float((model.linear(standardised).argmax(dim=1) == labels).float().mean())
    return model, accuracy


def save_audio_classifier(model: AudioClassifier, path: str | os.PathLike, train_accuracy: float | None = None,
                          num_train_clips: int | None = None) -> Path:
    """Write a weights-only classifier file atomically."""
    path = Path(path)
    extra: dict[str, Any] = {"format": CLASSIFIER_FORMAT, "hparams": asdict(model.hparams)}
    if train_accuracy is not None:
        extra["train_accuracy"] = float(train_accuracy)
    if num_train_clips is not None:
        extra["num_train_clips"] = int(num_train_clips)
    export_weights(model.state_dict(), path, extra)
    return path


def load_audio_classifier(path: str | os.PathLike) -> AudioClassifier:
    """Load a classifier written by :func:`save_audio_classifier` (weights only, strict)."""
    data = read_weights(path)
    if not isinstance(data, dict) or data.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path} is not a ConchShell audio classifier (expected one written by "
                              "scripts/evaluate.py)")
    try:
        hparams = ClassifierHparams(**data["hparams"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad or missing classifier hparams: {exc}") from exc
    model = AudioClassifier(hparams)
    load_strict(model, data.get("state_dict", {}), path)
    return model.eval()


def reference_windows(audio: np.ndarray, clip_samples: int, max_windows: int = 3) -> list[np.ndarray]:
    """Up to ``max_windows`` evenly spaced clip-length windows of a piece (zero-padded if shorter).

    A piece longer than a clip yields several training examples; the first and last
    windows touch its ends.
    """
    if len(audio) <= clip_samples:
        return [np.pad(audio, (0, clip_samples - len(audio))).astype(np.float32)]
    count = min(max_windows, int(np.ceil(len(audio) / clip_samples)))
    starts = np.linspace(0, len(audio) - clip_samples, count).round().astype(int)
    return [audio[s:s + clip_samples].astype(np.float32) for s in starts]
