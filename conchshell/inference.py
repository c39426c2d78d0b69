"""Image -> 8-second piano piece: the pipeline behind ``inference.py`` and ``scripts/evaluate.py``.

    from conchshell import ImageToMusic
    model = ImageToMusic.from_checkpoint("runs/demo/G-step=100000.pt")
    waveform, sample_rate = model.generate("beach.jpg")   # float32 [T], e.g. 16000

Pipeline, in order (every stage but the generator is frozen):

1. :func:`~conchshell.data.image.load_image` (or ``image_from_pil``): the exact preprocessing
   of training, 224 x 224, BOPD statistics;
2. :class:`~conchshell.models.frontend.ImageFrontend`: TCNN class + pseudo-video + I3D
   features, built from the config stored in the export (``factory.build_frontend``);
3. generator(features, class) -> continuous latent of the configured codec level;
4. nearest codebook entries -> frozen decoder -> audio at ``config.data.sample_rate``,
   trimmed to ``config.clip_samples``;
5. peak-safe output: samples are clipped to [-1, 1] so a 16-bit wav cannot wrap around.
   The level is otherwise left as the model made it: no normalisation, because loudness
   is part of what the model learnt (training audio is peak-normalised with a random gain).

The generator export names the TCNN, I3D and codec files it was trained with. A relative
name is looked up in the current folder, then next to the export, then in the repository
root; when it exists nowhere, the error names the file and how to obtain it.

The generators are deterministic in eval mode, so one image always gives the same piece;
``seed`` (see :func:`seed_all`) pins torch/numpy/python generators so that anything
stochastic added later (or cuDNN algorithm choice) stays reproducible too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from conchshell.config import Config
from conchshell.constants import CLASS_NAMES, INFERENCE_PRECISIONS
from conchshell.data.image import DEFAULT_MAX_PIXELS, image_from_pil, load_image
from conchshell.errors import ConchShellError, ConfigError
from conchshell.export import load_generator_export
from conchshell.models.codec import AudioCodec
from conchshell.models.factory import build_codec, build_frontend
from conchshell.models.frontend import ImageFrontend
from conchshell.models.generator import ConchShellGenerator, freeze_for_inference
from conchshell.utils.precision import (autocast_for, bf16_supported, bf16_unsupported_reason, check_precision,
                                         frontend_precision, synthesis_precision, use_ieee_fp32)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CROSSFADE_SECONDS = 0.5


@dataclass(frozen=True)
class Generation:
    """One generated piece and what it was conditioned on."""

    waveform: np.ndarray  # float32 [T], within [-1, 1]
    sample_rate: int
    class_id: int  # the class the generator was given
    predicted_class_id: int  # the TCNN's prediction for the image
    seconds: float  # wall time of this generation

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.class_id]

    @property
    def predicted_class_name(self) -> str:
        return CLASS_NAMES[self.predicted_class_id]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None/"auto" -> CUDA when available, else CPU; "cuda" without CUDA is a ConfigError.
    On CUDA, fp32 is made IEEE fp32 (:func:`use_ieee_fp32`), so fp32 output is the same
    reference on every device."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu or cuda") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        use_ieee_fp32()
    return resolved


def class_id_of(value: int | str) -> int:
    """A class name (``"coast"``) or id (0..5) -> id; ConfigError for anything else."""
    if isinstance(value, str):
        if value not in CLASS_NAMES:
            raise ConfigError(f"unknown class {value!r}: expected one of {', '.join(CLASS_NAMES)}")
        return CLASS_NAMES.index(value)
    if isinstance(value, bool) or not 0 <= int(value) < len(CLASS_NAMES):
        raise ConfigError(f"class id {value!r} is not in 0..{len(CLASS_NAMES) - 1}")
    return int(value)


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch generators (CPU and CUDA)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _locate(name: str | None, export_path: Path) -> str | None:
    """A config's weight-file name resolved against the export's folder, cwd, the repo root.

    The export's folder comes first so a packaged model (weights/demo/ names ``tcnn.pt``)
    never picks up a same-named file from wherever the user happens to run it."""
    if name is None or Path(name).is_absolute():
        return name
    for base in (export_path.parent, Path.cwd(), REPO_ROOT):
        if (base / name).is_file():
            return str(base / name)
    return name  # not found anywhere: require_file will name it and say how to get it


def resolve_weight_paths(config: Config, export_path: str | os.PathLike) -> Config:
    """Copy of ``config`` whose TCNN/I3D/codec file names point at files that exist (when any do)."""
    export_path = Path(export_path)
    image = dataclasses.replace(
        config.image,
        tcnn_checkpoint=_locate(config.image.tcnn_checkpoint, export_path),
        i3d_checkpoint=_locate(config.image.i3d_checkpoint, export_path),
    )
    codec = dataclasses.replace(config.codec, checkpoint=_locate(config.codec.checkpoint, export_path))
    return dataclasses.replace(config, image=image, codec=codec)


class ImageToMusic:
    """Frozen frontend + generator + codec, ready to turn pictures into pieces."""

    def __init__(self, generator: ConchShellGenerator, frontend: ImageFrontend, codec: AudioCodec,
                 config: Config, device: str | torch.device | None = None,
                 meta: dict[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 precision: str = "fp32") -> None:
        self.device = resolve_device(device)
        check_precision(precision, "ImageToMusic", INFERENCE_PRECISIONS)
        if precision != "fp32" and not bf16_supported(self.device):
            raise ConfigError(f"precision {precision}: {bf16_unsupported_reason(self.device)}; use fp32")
        # bf16 autocast covers the frontend, the generator and the decoder ("mixed": the frontend
        # only); the nearest-code search always runs in fp32 (in bf16 it flips codes).
        self.precision = precision
        self.generator = generator.eval().requires_grad_(False).to(self.device)
        self.frontend = frontend.eval().to(self.device)
        self.codec = codec.eval().requires_grad_(False).to(self.device)
        self.config = config
        self.meta = dict(meta or {})
        self.max_pixels = max_pixels

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        max_pixels: int = DEFAULT_MAX_PIXELS, precision: str = "fp32") -> "ImageToMusic":
        """Load a generator export (``G-step=N.pt``) and every frozen network its config names."""
        check_precision(precision, "ImageToMusic", INFERENCE_PRECISIONS)
        generator, config, meta = load_generator_export(path)
        config = resolve_weight_paths(config, path)
        # This generator is ours alone, so it can be frozen in place (same outputs, faster).
        generator = freeze_for_inference(generator, synthesis_precision(precision))
        return cls(generator, build_frontend(config), build_codec(config), config, device,
                   {**meta, "checkpoint": str(path)}, max_pixels, precision)

    @property
    def sample_rate(self) -> int:
        return self.config.data.sample_rate

    @property
    def clip_samples(self) -> int:
        return self.config.clip_samples

    def prepare(self, image: str | os.PathLike | Image.Image | torch.Tensor) -> torch.Tensor:
        """A path, PIL image or already-normalised tensor [3,224,224] -> model input [3,224,224]."""
        if isinstance(image, torch.Tensor):
            if image.shape != (3, 224, 224):
                raise ValueError(f"an image tensor must be normalised [3,224,224], got {tuple(image.shape)}")
            return image.float()
        if isinstance(image, Image.Image):
            return image_from_pil(image)
        return load_image(image, max_pixels=self.max_pixels)

    @torch.inference_mode()
    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images [B,3,224,224] -> (I3D features [B,2048], TCNN class ids [B]) on the device.

        Models that share this frontend (e.g. a trained generator and its untrained twin) can
        share these too: see :meth:`generate_from_features`.
        """
        with autocast_for(self.device, frontend_precision(self.precision)):
            return self.frontend(images.to(self.device))

    @torch.inference_mode()
    def generate_batch(self, images: torch.Tensor, class_ids: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised images [B,3,224,224] -> (audio [B,T] float32 CPU, used class ids, predicted ids).

        ``class_ids`` overrides the TCNN's prediction as the generator's conditioning.
        """
        return self.generate_from_features(*self.image_features(images), class_ids)

    @torch.inference_mode()
    def generate_from_features(self, features: torch.Tensor, predicted: torch.Tensor,
                               class_ids: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`generate_batch` after the frontend, from :meth:`image_features`' output."""
        features, predicted = features.to(self.device), predicted.to(self.device)
        used = predicted if class_ids is None else class_ids.to(self.device).long()
        with autocast_for(self.device, synthesis_precision(self.precision)):
            latent = self.generator(features, used)
        codes = self.codec.quantize(latent.float())
        with autocast_for(self.device, synthesis_precision(self.precision)):
            audio = self.codec.decode(codes, self.clip_samples)[:, 0]
        audio = audio.float().cpu()
        if not torch.isfinite(audio).all():
            raise ConchShellError(f"{self.meta.get('checkpoint', 'the generator')} produced non-finite "
                                  "samples: the export is broken (retrain or use another step)")
        return audio.clamp(-1.0, 1.0), used.cpu(), predicted.cpu()

    def run(self, image: str | os.PathLike | Image.Image | torch.Tensor,
            class_override: int | str | None = None) -> Generation:
        """Generate for one image and report the class used and predicted, and the time taken."""
        start = time.perf_counter()
        pixels = self.prepare(image).unsqueeze(0)
        override = None if class_override is None else torch.tensor([class_id_of(class_override)])
        audio, used, predicted = self.generate_batch(pixels, override)
        return Generation(audio[0].numpy().astype(np.float32, copy=False), self.sample_rate,
                          int(used[0]), int(predicted[0]), time.perf_counter() - start)

    def generate(self, image: str | os.PathLike | Image.Image | torch.Tensor,
                 class_override: int | str | None = None) -> tuple[np.ndarray, int]:
        """(waveform float32 [clip_samples] in [-1, 1], sample rate) for one image."""
        result = self.run(image, class_override)
        return result.waveform, result.sample_rate

    @torch.inference_mode()
    def reconstruct(self, audio: np.ndarray) -> np.ndarray:
        """codec(audio): encode, nearest codes, decode, at ``sample_rate``: the quality ceiling."""
        signal = torch.as_tensor(np.asarray(audio, dtype=np.float32), device=self.device).view(1, 1, -1)
        codes = self.codec.quantize(self.codec.encode(signal))
        decoded = self.codec.decode(codes, signal.shape[-1])[0, 0].float().cpu().numpy()
        if decoded.shape[0] < signal.shape[-1]:  # the codec drops a remainder shorter than one hop
            decoded = np.pad(decoded, (0, signal.shape[-1] - decoded.shape[0]))
        return np.clip(decoded, -1.0, 1.0).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- output files


def join_with_crossfade(pieces: Sequence[np.ndarray], sample_rate: int,
                        crossfade_seconds: float = DEFAULT_CROSSFADE_SECONDS) -> np.ndarray:
    """Concatenate pieces, overlapping neighbours by an equal-power crossfade.

    Over the overlap the outgoing piece is weighted by cos(pi/2 t) and the incoming one by
    sin(pi/2 t), t from 0 to 1, so cos^2 + sin^2 = 1 keeps the loudness of uncorrelated
    music constant through the join (a linear fade dips by 3 dB in the middle). The overlap
    is capped at half the shortest piece so no piece is swallowed. The result is clipped
    to [-1, 1] because correlated material can peak above 1 in the overlap.
    """
    if not pieces:
        raise ValueError("need at least one piece to join")
    if crossfade_seconds < 0:
        raise ValueError(f"crossfade must be >= 0 seconds, got {crossfade_seconds}")
    pieces = [np.asarray(p, dtype=np.float32).reshape(-1) for p in pieces]
    overlap = min(int(round(crossfade_seconds * sample_rate)), min(len(p) for p in pieces) // 2)
    if len(pieces) == 1 or overlap == 0:
        return np.clip(np.concatenate(pieces), -1.0, 1.0)
    t = (np.arange(overlap, dtype=np.float64) + 0.5) / overlap
    fade_out, fade_in = np.cos(0.5 * np.pi * t), np.sin(0.5 * np.pi * t)
    total = sum(len(p) for p in pieces) - overlap * (len(pieces) - 1)
    out = np.zeros(total, dtype=np.float64)
    position = 0
    for index, piece in enumerate(pieces):
        piece = piece.astype(np.float64)
        if index > 0:
            piece[:overlap] *= fade_in
        if index < len(pieces) - 1:
            piece[-overlap:] *= fade_out
        out[position:position + len(piece)] += piece
        position += len(piece) - overlap
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and prove a file can be written there, else ConchShellError.

    Checked before any generation so a long run never ends in a permission error.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".conchshell-write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConchShellError(f"cannot write to output folder {directory}: {exc.strerror or exc}") from exc
    return directory


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    A crash or error mid-write therefore never leaves a partial file under the final name.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temp
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise ConchShellError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_wav(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int) -> Path:
    """Write mono 16-bit PCM atomically (samples clipped to [-1, 1] first)."""
    path = Path(path)
    samples = np.clip(np.asarray(waveform, dtype=np.float32).reshape(-1), -1.0, 1.0)
    with atomic_output(path) as temp:
        sf.write(str(temp), samples, int(sample_rate), subtype="PCM_16", format="WAV")
    return path


def save_spectrogram_png(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int,
                         title: str = "") -> Path:
    """Save a log-mel spectrogram picture (80 mels, 1024-point FFT, hop 256) as PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    from conchshell.nn.spectral import LogMelSpectrogram

    mel = LogMelSpectrogram(sample_rate=sample_rate, n_fft=1024, hop_length=256, win_length=1024,
                            n_mels=80, fmax=sample_rate / 2.0)
    with torch.no_grad():
        log_mel = mel(torch.as_tensor(np.asarray(waveform, dtype=np.float32)).view(1, -1))[0].numpy()
    seconds = len(waveform) / sample_rate
    figure, axis = plt.subplots(figsize=(8, 3), dpi=100)
    try:
        shown = axis.imshow(log_mel, origin="lower", aspect="auto", cmap="magma",
                            extent=(0.0, seconds, 0, log_mel.shape[0]))
        axis.set_xlabel("time (s)")
        axis.set_ylabel("mel band")
        if title:
            axis.set_title(title)
        figure.colorbar(shown, ax=axis, label="log10 magnitude")
        figure.tight_layout()
        with atomic_output(path) as temp:
            figure.savefig(temp, format="png")
    finally:
        plt.close(figure)
    return Path(path)
