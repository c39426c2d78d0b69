"""Precompute the frozen networks' outputs once, so training never recomputes them.

    python scripts/extract_features.py --config configs/conchshell.yaml [--manifest M] [--out DIR]
        [--latents [--latent-split val|all]] [--batch-size 8] [--device auto|cpu|cuda] [key=value ...]

For every image of the manifest (all splits) this stores the frozen frontend's outputs
(I3D features [2048] and the TCNN's predicted class) in DIR (default: the config's
``data.feature_cache``). Train with ``data.feature_cache=DIR`` to use them; images the
cache lacks are computed on the fly.

--latents also stores the codec latent of each piece at the config's codec level, taken
from the deterministic centre crop at gain 1. Training crops at random and applies a
random gain, so these latents are only valid for validation and evaluation; by default
only pieces of validation rows are encoded (--latent-split all encodes every piece).

Entries are keyed by file content and stored under a fingerprint of the frozen weights
and settings (see conchshell/data/feature_cache.py): renamed files are still found, a
changed model gets a fresh folder, and a re-run (e.g. after an interruption) computes
only what is missing.

Unreadable files are listed on stderr, one line each, after everything else has been
stored. Exit codes: 0 all stored, 1 some files could not be read (the rest is cached),
2 nothing could be done (bad config, manifest or weights).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conchshell.config import Config, load_config  # noqa: E402
from conchshell.data.feature_cache import (  # noqa: E402
    ExtractionReport,
    FeatureCache,
    LatentCache,
    codec_settings,
    extract_clip_latents,
    extract_image_features,
    frontend_settings,
    settings_fingerprint,
)
from conchshell.data.manifest import read_manifest  # noqa: E402
from conchshell.errors import ConchShellError, ConfigError  # noqa: E402
from conchshell.inference import resolve_device  # noqa: E402
from conchshell.models.factory import build_codec, build_frontend  # noqa: E402
from conchshell.utils.host_memory import keep_freed_memory  # noqa: E402


def printer(label: str, every_seconds: float = 10.0):
    """A progress callback that prints at most every ``every_seconds`` (and at the end)."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= every_seconds:
            last[0] = now
            print(f"{label}: {done}/{total} processed", flush=True)

    return report


def summarise(label: str, cache_dir: Path, report: ExtractionReport) -> None:
    print(
        f"{label}: {report.total} distinct file(s), {report.reused} already cached, "
        f"{report.computed} computed, {len(report.failures)} failed -> {cache_dir}",
        flush=True,
    )


def extract_features(config: Config, paths: list[Path], out: Path, batch_size: int, device: torch.device) -> ExtractionReport:
    frontend = build_frontend(config)
    settings = frontend_settings(config, frontend)
    cache = FeatureCache(out, settings_fingerprint(settings))
    if not cache.exists():
        cache.write_meta(settings)
    report = extract_image_features(
        frontend, cache, paths, batch_size=batch_size, device=device,
        num_workers=config.data.num_workers, progress=printer("features"),
    )
    summarise("features", cache.directory, report)
    return report


def extract_latents(config: Config, paths: list[Path], out: Path, batch_size: int, device: torch.device) -> ExtractionReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seeded-codec notice; the fingerprint tells them apart
        codec = build_codec(config)
    settings = codec_settings(config, codec)
    cache = LatentCache(out, settings_fingerprint(settings))
    if not cache.exists():
        cache.write_meta(settings)
    report = extract_clip_latents(
        codec, cache, paths, sample_rate=config.data.sample_rate, clip_samples=config.clip_samples,
        batch_size=batch_size, device=device, num_workers=config.data.num_workers, progress=printer("latents"),
    )
    summarise("latents", cache.directory, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="experiment config (YAML)")
    parser.add_argument("--manifest", type=Path, default=None, help="dataset manifest (default: data.manifest)")
    parser.add_argument("--out", type=Path, default=None, help="cache folder (default: data.feature_cache)")
    parser.add_argument("--latents", action="store_true", help="also store validation codec latents of the pieces")
    parser.add_argument("--latent-split", choices=("val", "all"), default="val", help="pieces to encode (default: val)")
    parser.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("overrides", nargs="*", help="config overrides, dotted.key=value")
    args = parser.parse_args(argv)
    keep_freed_memory()

    try:
        config = load_config(args.config, args.overrides)
        out = args.out if args.out is not None else config.data.feature_cache
        if out is None:
            raise ConfigError("no cache folder: pass --out DIR or set data.feature_cache in the config")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
        device = resolve_device(args.device)
        manifest = args.manifest if args.manifest is not None else Path(config.data.manifest)
        records = read_manifest(manifest, seed=config.data.split_seed)
        out = Path(out)
        print(f"{len(records)} rows from {manifest}; cache {out}; device {device}", flush=True)
        failures = extract_features(config, [r.image for r in records], out, args.batch_size, device).failures
        if args.latents:
            pieces = [r.audio for r in records if args.latent_split == "all" or r.split == "val"]
            if not pieces:
                print("latents: the manifest has no validation rows (use --latent-split all)", file=sys.stderr)
            failures += extract_latents(config, pieces, out, args.batch_size, device).failures
    except ConchShellError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    for file, reason in failures:
        print(f"unreadable: {file}: {reason}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} file(s) could not be read; everything else is cached", file=sys.stderr)
        return 1
    if config.data.feature_cache is None or Path(config.data.feature_cache) != out:
        print(f"train with data.feature_cache={out} to use this cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
