"""A disk cache of what the frozen networks compute, so training never recomputes them.

Two kinds of entries, each in its own folder named by a *fingerprint* of the models and
settings that produced them:

- **image features** (:class:`FeatureCache`): the :class:`~conchshell.models.frontend.ImageFrontend`
  outputs of one image: I3D features float32 [2048] and the TCNN's predicted class
  (int64 scalar);
- **clip latents** (:class:`LatentCache`): the continuous codec latent float32
  [emb_width, latent_length] of one piece at the config's codec level, taken from the
  *deterministic centre crop at gain 1*. That is exactly the validation item of
  :class:`~conchshell.data.dataset.ImageMusicDataset`; training items use a random crop and
  a random gain, so these latents are only valid for validation and evaluation.

Entries are keyed by the **content** of the input file (sha256 of its bytes), so renaming
or moving a file still finds its entry and two identical files share one. The folder is
keyed by the **models**: the fingerprint hashes the frozen networks' weights (the tensors
themselves, so seeded demo networks and checkpoint files are treated alike) together with
every setting that changes the output. Changing a model therefore lands in a new, empty
folder instead of silently serving stale features.

Layout::

    ROOT/frontend-<hash>/cache.json              settings that produced the fingerprint
    ROOT/frontend-<hash>/items/ab/ab12...ef.pt   one torch file per input content
    ROOT/codec-<hash>/...                        the same for latents

One small file per entry keeps every write independent: each is written to a temporary
name and renamed into place, so a run killed at any moment leaves only complete entries
(plus, at worst, an ignored temp file), and a second run simply skips what exists. Files
are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from conchshell.config import Config
from conchshell.constants import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD
from conchshell.data.audio import center_crop_or_pad, load_audio
from conchshell.data.image import load_image
from conchshell.errors import CheckpointError, ConchShellError
from conchshell.utils.checkpoint import read_weights
from conchshell.utils.files import atomic_write, file_sha256

# Bump when the meaning of a stored entry changes (frontend or codec maths, entry layout),
# so caches written by older code are not mistaken for current ones.
FORMAT_VERSION = 1
FEATURE_DIM = 2048
META_NAME = "cache.json"
ITEMS_DIR = "items"


# ----------------------------------------------------------------------------- hashing


def module_checksum(module: nn.Module) -> str:
    """Hex sha256 over every state-dict entry: name, dtype, shape and raw bytes.

    Hashing tensors rather than checkpoint files makes a seeded network and the same
    weights loaded from any file format give one checksum.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """``<kind>-<hash>`` of a settings dict from :func:`frontend_settings` or :func:`codec_settings`."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return f"{settings['kind']}-{hashlib.sha256(canonical.encode()).hexdigest()[:20]}"


def frontend_settings(config: Config, frontend: nn.Module | None = None) -> dict[str, Any]:
    """Everything that decides the frontend's output for a given image file.

    Builds the frontend from ``config`` unless one is passed (pass it when you have it:
    building loads or seeds both networks).
    """
    if frontend is None:
        from conchshell.models.factory import build_frontend  # models are heavy; import on use

        frontend = build_frontend(config)
    return {
        "kind": "frontend",
        "format": FORMAT_VERSION,
        "tcnn": config.image.tcnn,
        "tcnn_weights": module_checksum(frontend.tcnn),
        "grouping": config.image.grouping,
        "i3d_weights": module_checksum(frontend.i3d),
        # The image transform runs before the networks, so it is part of the "model" too.
        "image_size": IMAGE_SIZE,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
    }


def codec_settings(config: Config, codec: nn.Module | None = None) -> dict[str, Any]:
    """Everything that decides the stored latent of a given audio file."""
    if codec is None:
        from conchshell.models.factory import build_codec

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the seeded-codec notice is for training runs
            codec = build_codec(config)
    from conchshell.models.factory import codec_hparams

    return {
        "kind": "codec",
        "format": FORMAT_VERSION,
        "codec_weights": module_checksum(codec.vqvae),
        "codec_hparams": {k: list(v) if isinstance(v, tuple) else v for k, v in codec_hparams(config).items()},
        "level": config.codec.level,
        "data_rate": config.data.sample_rate,
        "codec_rate": config.codec_rate,
        "resample": config.codec.resample,
        "clip_samples": config.clip_samples,
        "crop": "centre",
        "gain": 1.0,
    }


def frontend_fingerprint(config: Config, frontend: nn.Module | None = None) -> str:
    """Folder name of the image features of ``config``'s frozen TCNN + I3D: ``frontend-<hash>``."""
    return settings_fingerprint(frontend_settings(config, frontend))


def codec_fingerprint(config: Config, codec: nn.Module | None = None) -> str:
    """Folder name of the clip latents of ``config``'s codec and clip settings: ``codec-<hash>``."""
    return settings_fingerprint(codec_settings(config, codec))


# ----------------------------------------------------------------------------- storage


class ContentCache:
    """Entries (dicts of tensors) keyed by the sha256 of an input file, in ``root/fingerprint``.

    Subclasses define what an entry holds (:meth:`_valid`) and the typed get/put.
    Instances are plain data (picklable), so a Dataset holding one works in DataLoader
    workers.
    """

    kind: ClassVar[str] = "content"

    def __init__(self, root: str | os.PathLike, fingerprint: str) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.directory = self.root / fingerprint
        # (path, size, mtime, inode) -> digest: a dataset asks for the same files every epoch.
        self._digests: dict[tuple[str, int, int, int], str] = {}
        self._warned_corrupt = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {self.fingerprint!r})"

    def exists(self) -> bool:
        return (self.directory / META_NAME).is_file()

    def digest(self, path: str | os.PathLike) -> str:
        """Content key of ``path`` (sha256 of its bytes), memoised while the file is unchanged."""
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        cached = self._digests.get(key)
        if cached is None:
            cached = self._digests[key] = file_sha256(path)
        return cached

    def item_path(self, digest: str) -> Path:
        return self.directory / ITEMS_DIR / digest[:2] / f"{digest}.pt"

    def has_digest(self, digest: str) -> bool:
        return self.item_path(digest).is_file()

    def __contains__(self, path: object) -> bool:
        try:
            return self.has_digest(self.digest(path))  # type: ignore[arg-type]
        except (OSError, TypeError):
            return False

    def __len__(self) -> int:
        items = self.directory / ITEMS_DIR
        return sum(1 for _ in items.glob("*/*.pt")) if items.is_dir() else 0

    def write_meta(self, settings: dict[str, Any]) -> None:
        """Record what produced this folder (written once, before any entry)."""
        meta = {"fingerprint": self.fingerprint, "kind": self.kind, "format": FORMAT_VERSION, "settings": settings}
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        atomic_write(self.directory / META_NAME, lambda handle: handle.write(text.encode()))

    def read_meta(self) -> dict[str, Any]:
        return json.loads((self.directory / META_NAME).read_text())

    def load_digest(self, digest: str) -> dict[str, Tensor] | None:
        """The entry stored under ``digest``, or None when absent or unreadable."""
        path = self.item_path(digest)
        if not path.is_file():
            return None
        try:
            entry = read_weights(path)
        except CheckpointError as exc:
            self._warn_corrupt(f"{exc}")
            return None
        if not isinstance(entry, dict) or not self._valid(entry):
            self._warn_corrupt(f"cache entry {path} does not hold a valid {self.kind} entry")
            return None
        return entry

    def store_digest(self, digest: str, entry: dict[str, Tensor]) -> None:
        if not self._valid(entry):
            raise ValueError(f"not a valid {self.kind} entry: { {k: (v.dtype, tuple(v.shape)) for k, v in entry.items()} }")
        # clone(): a row of a batch is a view, and torch.save would write the whole batch's storage.
        entry = {k: v.detach().to("cpu").contiguous().clone() for k, v in entry.items()}
        atomic_write(self.item_path(digest), lambda handle: torch.save(entry, handle))

    def _valid(self, entry: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _warn_corrupt(self, message: str) -> None:
        # Once per instance: a dataset would otherwise repeat it for every item and epoch.
        if not self._warned_corrupt:
            self._warned_corrupt = True
            warnings.warn(f"{message}; treating it as missing (delete it and re-run scripts/extract_features.py)")


class FeatureCache(ContentCache):
    """Frozen image features: ``get(image) -> (features float32 [2048], pred_class int64 [])``."""

    kind: ClassVar[str] = "frontend"

    def get(self, image_path: str | os.PathLike) -> tuple[Tensor, Tensor] | None:
        try:
            entry = self.load_digest(self.digest(image_path))
        except OSError:
            return None
        return None if entry is None else (entry["features"], entry["pred_class"])

    def put(self, image_path: str | os.PathLike, features: Tensor, pred_class: Tensor | int, digest: str | None = None) -> None:
        """Store the frontend outputs of one image (``digest`` saves re-hashing a known file)."""
        pred = torch.as_tensor(pred_class, dtype=torch.int64).reshape(())
        self.store_digest(digest or self.digest(image_path), {"features": features.float().reshape(-1), "pred_class": pred})

    def _valid(self, entry: dict[str, Any]) -> bool:
        features, pred = entry.get("features"), entry.get("pred_class")
        return (
            isinstance(features, Tensor) and features.dtype == torch.float32 and tuple(features.shape) == (FEATURE_DIM,)
            and isinstance(pred, Tensor) and pred.dtype == torch.int64 and pred.ndim == 0
        )


class LatentCache(ContentCache):
    """Validation latents of clips: ``get(audio) -> float32 [emb_width, latent_length]``."""

    kind: ClassVar[str] = "codec"

    def get(self, audio_path: str | os.PathLike) -> Tensor | None:
        try:
            entry = self.load_digest(self.digest(audio_path))
        except OSError:
            return None
        return None if entry is None else entry["latent"]

    def put(self, audio_path: str | os.PathLike, latent: Tensor, digest: str | None = None) -> None:
        self.store_digest(digest or self.digest(audio_path), {"latent": latent.float()})

    def _valid(self, entry: dict[str, Any]) -> bool:
        latent = entry.get("latent")
        return isinstance(latent, Tensor) and latent.dtype == torch.float32 and latent.ndim == 2


# ----------------------------------------------------------------------------- opening


def open_for_config(config: Config, frontend: nn.Module | None = None) -> FeatureCache | None:
    """The feature cache of ``config``'s frozen frontend, or None (compute on the fly).

    None without a word when ``data.feature_cache`` is unset; None with a one-line warning
    when it is set but holds nothing for these models (e.g. the TCNN was retrained since
    extraction). Pass the already built ``frontend`` to avoid building it twice.
    """
    if config.data.feature_cache is None:
        return None
    cache = FeatureCache(config.data.feature_cache, frontend_fingerprint(config, frontend))
    return cache if _usable(cache) else None


def open_latents_for_config(config: Config, codec: nn.Module | None = None) -> LatentCache | None:
    """The validation-latent cache of ``config``'s codec, or None (see :func:`open_for_config`)."""
    if config.data.feature_cache is None:
        return None
    cache = LatentCache(config.data.feature_cache, codec_fingerprint(config, codec))
    return cache if _usable(cache) else None


def _usable(cache: ContentCache) -> bool:
    if cache.exists():
        return True
    others = sorted(p.name for p in cache.root.glob(f"{cache.kind}-*") if (p / META_NAME).is_file()) if cache.root.is_dir() else []
    if others:
        warnings.warn(
            f"feature cache {cache.root} holds {cache.kind} entries for other models ({', '.join(others)}), "
            f"not {cache.fingerprint}: computing on the fly (re-run scripts/extract_features.py)",
            stacklevel=3,
        )
    else:
        warnings.warn(
            f"feature cache {cache.root} has no {cache.kind} entries ({cache.fingerprint}): computing on the fly "
            "(run scripts/extract_features.py)",
            stacklevel=3,
        )
    return False


# ----------------------------------------------------------------------------- extraction


@dataclass
class ExtractionReport:
    """What one extraction pass did. ``failures`` are (file, one-line reason) pairs."""

    total: int = 0  # distinct input contents
    reused: int = 0  # already in the cache
    computed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


Progress = Callable[[int, int], None]  # (done, to_do)


def extract_image_features(
    frontend: nn.Module,
    cache: FeatureCache,
    image_paths: Iterable[str | os.PathLike],
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: Progress | None = None,
) -> ExtractionReport:
    """Run ``frontend`` once per distinct image content that ``cache`` lacks, and store it.

    Unreadable images are recorded in the report and skipped; everything else is stored
    batch by batch as it is computed, so an interrupted run keeps its work.
    """
    report, todo = _plan(cache, image_paths)
    frontend = frontend.to(device).eval()

    def compute(batch: Tensor) -> list[dict[str, Tensor]]:
        features, classes = frontend(batch.to(device))
        return [{"features": f.float(), "pred_class": c.to(torch.int64)} for f, c in zip(features.cpu(), classes.cpu())]

    _run(todo, load_image, compute, cache, report, batch_size, num_workers, progress)
    return report


def extract_clip_latents(
    codec: nn.Module,
    cache: LatentCache,
    audio_paths: Iterable[str | os.PathLike],
    *,
    sample_rate: int,
    clip_samples: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: Progress | None = None,
) -> ExtractionReport:
    """Encode the centre crop (gain 1) of each distinct clip that ``cache`` lacks, and store it."""
    report, todo = _plan(cache, audio_paths)
    codec = codec.to(device).eval()

    def compute(batch: Tensor) -> list[dict[str, Tensor]]:
        return [{"latent": latent} for latent in codec.encode(batch.to(device)).float().cpu()]

    load = functools.partial(load_validation_clip, sample_rate=sample_rate, clip_samples=clip_samples)
    _run(todo, load, compute, cache, report, batch_size, num_workers, progress)
    return report


def load_validation_clip(path: str | os.PathLike, *, sample_rate: int, clip_samples: int) -> Tensor:
    """The clip a validation item holds: centre crop (or zero-pad) at gain 1, float32 [1, T]."""
    clip = center_crop_or_pad(load_audio(path, sample_rate), clip_samples)
    return torch.from_numpy(clip).unsqueeze(0)


def _plan(cache: ContentCache, paths: Iterable[str | os.PathLike]) -> tuple[ExtractionReport, list[tuple[str, Path]]]:
    """Hash every input once; the (digest, path) of each distinct content still to compute."""
    report = ExtractionReport()
    seen: set[str] = set()
    todo: list[tuple[str, Path]] = []
    for path in dict.fromkeys(Path(p) for p in paths):
        try:
            digest = cache.digest(path)
        except OSError as exc:
            report.failures.append((str(path), f"cannot read: {exc.strerror or exc}"))
            continue
        if digest in seen:
            continue
        seen.add(digest)
        report.total += 1
        if cache.has_digest(digest):
            report.reused += 1
        else:
            todo.append((digest, path))
    return report, todo


class _Inputs(Dataset):
    """Decodes inputs in DataLoader workers; a broken file becomes an error string, not a crash."""

    def __init__(self, todo: Sequence[tuple[str, Path]], load: Callable[[Path], Tensor]) -> None:
        self.todo = todo
        self.load = load

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, index: int) -> tuple[str, Path, Tensor | None, str | None]:
        digest, path = self.todo[index]
        try:
            return digest, path, self.load(path), None
        except ConchShellError as exc:
            return digest, path, None, str(exc)
        except OSError as exc:
            return digest, path, None, f"cannot read {path}: {exc}"


def _run(
    todo: Sequence[tuple[str, Path]],
    load: Callable[[Path], Tensor],
    compute: Callable[[Tensor], list[dict[str, Tensor]]],
    cache: ContentCache,
    report: ExtractionReport,
    batch_size: int,
    num_workers: int,
    progress: Progress | None,
) -> None:
    if not todo:
        return
    loader = DataLoader(
        _Inputs(todo, load), batch_size=max(1, batch_size), num_workers=num_workers, collate_fn=list,
    )
    done = 0
    with torch.inference_mode():
        for batch in loader:
            good = [(digest, tensor) for digest, _, tensor, _ in batch if tensor is not None]
            report.failures.extend((str(path), error) for _, path, tensor, error in batch if tensor is None)
            if good:
                entries = compute(torch.stack([tensor for _, tensor in good]))
                for (digest, _), entry in zip(good, entries):
                    cache.store_digest(digest, entry)
                report.computed += len(good)
            done += len(batch)
            if progress is not None:
                progress(done, len(todo))


# ----------------------------------------------------------------------------- batching


CACHED_KEYS: tuple[str, ...] = ("features", "pred_class")


def collate_cached(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` for dataset items, some of which may carry cached features.

    Keeps ``features``/``pred_class`` only when *every* item has them, so a batch either
    brings all its features or none (the trainer then computes the whole batch), instead
    of ``default_collate`` failing or silently dropping them on a mixed batch.
    """
    from torch.utils.data import default_collate

    complete = all(all(key in item for key in CACHED_KEYS) for item in batch)
    trimmed = batch if complete else [{k: v for k, v in item.items() if k not in CACHED_KEYS} for item in batch]
    return default_collate(trimmed)
