"""Measure ConchShell against the machine's own limit: inference per component, GAN training
steps, and the frozen-feature cache.

    python scripts/benchmark.py [--device cpu|cuda] [--json out.json] [--levels deep,low,high,tiny]
                                [--batch-sizes 1,4] [--repeats N] [--quick]

In one run, after warm-up, with median/min/max over repeats:

* the ceiling: large fp32 and bf16 matmul rates (FLOP/s), and a large copy's bandwidth;
* image -> wav inference for each level, per component (TCNN time features, TCNN class,
  I3D, generator, quantise, decode), per batch size, in fp32 and bf16 autocast: seconds,
  real-time factor (seconds per second of audio), peak memory, and achieved FLOP/s as a
  fraction of the ceiling of the same precision. FLOPs are counted (conv + matmul,
  2 per MAC) by running each component once under torch's FLOP counter, which doubles
  as its first warm-up run (rewritten convolutions count as the plain ones). The audio of
  bf16, of ``mixed`` (a bf16 frontend, the rest fp32) and of fp32 with every rewritten
  form plain, frontend included, are each compared with the fp32 audio;
* one GAN training step for each level, run by the trainer itself
  (``GanStage.train_step``: D update, then G update with the straight-through wave/mel
  terms) on cached-feature batches: samples/s and ceiling fraction, for each batch size of
  ``--train-batch`` up to the first that does not fit in memory (the fastest is marked);
* the frozen-feature cache: frontend compute per image vs loading a cached tensor.

Every timing also records ``cpu_steal_fraction``, the share of CPU time the hypervisor gave
to other guests while it ran (``/proc/stat``; the run's own is in ``meta``): on a shared VM
a row with much steal is slow because of the machine, not the code.

Every network without a checkpoint file uses the factory's seeded weights, so the run needs
no downloads; speed does not depend on the weights' values. The frontend (TCNN + I3D) is the
same network for every level, so it is measured once per batch size and precision and its
numbers are shared by every level's chain. Chain totals are the sums of component medians.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conchshell.config import Config, config_to_dict, load_config  # noqa: E402
from conchshell.constants import IMAGE_SIZE, NUM_CLASSES, PRECISIONS  # noqa: E402
from conchshell.data.feature_cache import FeatureCache  # noqa: E402
from conchshell.evaluation.metrics import PESQ, STOI, PerceptualMetric  # noqa: E402
from conchshell.models.codec import AudioCodec  # noqa: E402
from conchshell.models.factory import (  # noqa: E402
    build_codec,
    build_frontend,
    build_generator_from_config,
)
from conchshell.models.frontend import ImageFrontend  # noqa: E402
from conchshell.models.generator import freeze_for_inference  # noqa: E402
from conchshell.nn.direct import direct_convolutions  # noqa: E402
from conchshell.nn.fft_conv import spectra_bytes  # noqa: E402
from conchshell.nn.spectral import LogMelSpectrogram, mel_l1  # noqa: E402
from conchshell.training.distributed import DistInfo  # noqa: E402
from conchshell.training.stages.gan import GanStage, log_mel_for  # noqa: E402
from conchshell.utils.host_memory import keep_freed_memory  # noqa: E402
from conchshell.utils.precision import (  # noqa: E402
    autocast_for,
    bf16_supported,
    bf16_unsupported_reason,
    use_ieee_fp32,
)
from conchshell.utils.benchmark import (  # noqa: E402
    CpuSteal,
    Timing,
    copy_bandwidth,
    count_flops,
    format_bytes,
    matmul_ceiling,
    time_call,
)

ROOT = Path(__file__).resolve().parents[1]
LEVEL_CONFIGS = {
    "deep": "conchshell.yaml",
    "low": "baseline2_low.yaml",
    "high": "baseline1_high.yaml",
    "tiny": "tiny.yaml",
}
COMPONENTS = ("tcnn_time_features", "tcnn_class", "i3d", "generator", "quantise", "decode")
FRONTEND_COMPONENTS = COMPONENTS[:3]
SYNTHESIS_COMPONENTS = COMPONENTS[3:]
EMULATED_BF16_CEILING_SIZE = 512


# --------------------------------------------------------------------------- setup
def offline_config(level: str) -> Config:
    """The level's config with every pretrained file replaced by the factory's seeded weights."""
    config = load_config(ROOT / "configs" / LEVEL_CONFIGS[level])
    config.image.tcnn_checkpoint = None
    config.image.i3d_checkpoint = None
    config.codec.checkpoint = None
    return config


def build_quietly(build: Callable[[Config], Any], config: Config) -> Any:
    with warnings.catch_warnings():
        # The seeded codec warns that it is untrained: expected here, speed is all we need.
        warnings.filterwarnings("ignore", message="codec.checkpoint is null")
        return build(config)


def seeded_generator(config: Config) -> torch.nn.Module:
    """The level's generator with weights that depend only on the config."""
    torch.manual_seed(0)
    return build_quietly(build_generator_from_config, config)


def seeded_images(batch: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device)


def seeded_classes(batch: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(batch) % NUM_CLASSES).to(device)


@dataclass
class Measured:
    """One measured piece of work: its timing and counted FLOPs."""

    timing: Timing
    flops: int

    def summary(self) -> dict[str, Any]:
        """Timing and FLOP rate; ceiling fractions are added once the run's ceiling is known."""
        data = self.timing.to_dict()
        data.pop("extra")
        data.update(flops=self.flops, flops_per_s=self.flops / self.timing.median,
                    best_flops_per_s=self.flops / self.timing.min)
        return data


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int,
            with_grad: bool = False) -> Measured:
    """Count FLOPs in a first (untimed, warm-up) call, then time ``repeats`` calls."""
    flops, _ = count_flops(fn, with_grad=with_grad)
    return Measured(time_call(fn, device, repeats, warmup), flops)


# ----------------------------------------------------------------------- inference
def frozen_call(fn: Callable[[], Any], device: torch.device, precision: str) -> Callable[[], Any]:
    """``fn`` as inference runs it: no autograd bookkeeping, fp32 or bf16 autocast.

    Callers keep the nearest-code search (quantise) in fp32 whatever ``precision`` says:
    under bf16 autocast it flips codes, as :class:`conchshell.inference.ImageToMusic` avoids.
    """
    def wrapped() -> Any:
        with torch.inference_mode(), autocast_for(device, precision):
            return fn()
    return wrapped


def measure_frontend(frontend: ImageFrontend, batch: int, precision: str,
                     device: torch.device, repeats: int, warmup: int
                     ) -> tuple[dict[str, Measured], torch.Tensor, torch.Tensor]:
    """TCNN time features -> I3D, and the TCNN class; also returns (features, class ids)."""
    images = seeded_images(batch, device)

    def run(fn: Callable[[], Any]) -> Callable[[], Any]:
        return frozen_call(fn, device, precision)

    time_features = measure(run(lambda: frontend.block_frames(images)), device, repeats, warmup)
    frames = time_features.timing.extra.pop("result")
    tcnn_class = measure(run(lambda: frontend.predict_class(images)), device, repeats, warmup)
    i3d = measure(run(lambda: frontend.embed(frames)), device, repeats, warmup)
    measured = {"tcnn_time_features": time_features, "tcnn_class": tcnn_class, "i3d": i3d}
    return measured, i3d.timing.extra.pop("result"), tcnn_class.timing.extra.pop("result")


def measure_generation(generator: torch.nn.Module, codec: AudioCodec, features: torch.Tensor,
                       class_ids: torch.Tensor, num_samples: int, precision: str,
                       device: torch.device, repeats: int, warmup: int
                       ) -> tuple[dict[str, Measured], torch.Tensor, torch.Tensor]:
    """Generator -> quantise -> decode on given features; also returns the codes and the audio."""

    def run(fn: Callable[[], Any]) -> Callable[[], Any]:
        return frozen_call(fn, device, precision)

    gen = measure(run(lambda: generator(features, class_ids)), device, repeats, warmup)
    latent = gen.timing.extra.pop("result")
    quantise = measure(frozen_call(lambda: codec.quantize(latent.float()), device, "fp32"), device, repeats, warmup)
    codes = quantise.timing.extra.pop("result")
    decode = measure(run(lambda: codec.decode(codes, num_samples)), device, repeats, warmup)
    audio = decode.timing.extra.pop("result")
    return {"generator": gen, "quantise": quantise, "decode": decode}, codes, audio


def chain_summary(components: dict[str, dict[str, Any]], batch: int, clip_seconds: float,
                  ceiling: float, bound_rate: float) -> dict[str, Any]:
    """Totals of one image -> wav chain: sums of the component medians and FLOPs."""
    seconds = sum(c["median_s"] for c in components.values())
    flops = sum(c["flops"] for c in components.values())
    flop_bound = flops / bound_rate
    return {
        "seconds": seconds,
        "real_time_factor": seconds / (batch * clip_seconds),
        "pieces_per_s": batch / seconds,
        "flops": flops,
        "flops_per_s": flops / seconds,
        "ceiling_fraction": flops / seconds / ceiling,
        # The target: time relative to all FLOPs at the machine's fastest matmul rate.
        "flop_bound_s": flop_bound,
        "x_flop_bound": seconds / flop_bound,
        "peak_memory_bytes": max((c["peak_memory_bytes"] or 0) for c in components.values()),
    }


def perceptual_mean(metric: PerceptualMetric, reference: torch.Tensor, other: torch.Tensor,
                    sample_rate: int) -> float | None:
    """Mean of ``metric`` over the batch's clips ``[B, 1, N]`` (None if it scores none)."""
    for item, (ref, est) in enumerate(zip(reference[:, 0].numpy(), other[:, 0].numpy())):
        metric.update(ref, est, sample_rate, item=str(item))
    return metric.compute()["mean"]


def audio_difference(reference: torch.Tensor, other: torch.Tensor, mel: LogMelSpectrogram,
                     reference_codes: torch.Tensor, other_codes: torch.Tensor, sample_rate: int) -> dict[str, Any]:
    """How far ``other`` is from ``reference`` (``[B, 1, N]`` clips): max |diff|, log-mel L1,
    the signal-to-error ratio in dB (None for identical audio: JSON has no infinity), how
    many latent frames the two chains put on different codes (where the audio differences
    concentrate), and what a listener would notice: wide-band PESQ (4.64 for identical
    audio) and STOI (1), as ``scripts/evaluate.py`` scores them, with ``reference`` as the clean
    signal (None where a clip cannot be scored, e.g. too short for PESQ)."""
    reference, other = reference.float().cpu(), other.float().cpu()
    error_energy = (reference - other).pow(2).sum().item()
    return {
        "pesq": perceptual_mean(PESQ(), reference, other, sample_rate),
        "stoi": perceptual_mean(STOI(), reference, other, sample_rate),
        "frames_on_other_codes": int((reference_codes != other_codes).sum().item()),
        "frames": reference_codes.numel(),
        "max_abs_diff": (reference - other).abs().max().item(),
        "mel_l1": mel_l1(other, reference, mel).item(),
        "snr_db": 10 * math.log10(reference.pow(2).sum().item() / error_energy) if error_energy else None,
        "reference_peak": reference.abs().max().item(),
    }


def mixed_row(bf16: dict[str, Any], fp32: dict[str, Any]) -> dict[str, Any]:
    """The chain of ``--precision mixed``, from components measured in this run: the bf16
    row's frontend, the fp32 row's generator, quantise and decoder."""
    components = {name: {**c, "precision": "bf16"} for name, c in bf16["components"].items()}
    for name in SYNTHESIS_COMPONENTS:
        components[name] = {**fp32["components"][name], "precision": "fp32"}
    return {**bf16, "precision": "mixed", "components": components}


def generated_audio(generator: torch.nn.Module, codec: AudioCodec, features: torch.Tensor,
                    class_ids: torch.Tensor, num_samples: int, device: torch.device,
                    generator_precision: str, decoder_precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, audio) of generator -> fp32 nearest codes -> decoder, each network at its own
    precision, as :meth:`conchshell.inference.ImageToMusic.generate_from_features` runs them
    (before it clamps); ``--precision mixed`` is (fp32, fp32) on the bf16 frontend's features."""
    with torch.inference_mode():
        with autocast_for(device, generator_precision):
            latent = generator(features, class_ids)
        codes = codec.quantize(latent.float())
        with autocast_for(device, decoder_precision):
            return codes, codec.decode(codes, num_samples)


def run_inference(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    frontends: dict[str, ImageFrontend] = {}
    frontend_results: dict[tuple[str, int, str], tuple[dict[str, Any], torch.Tensor, torch.Tensor]] = {}
    for level in args.levels:
        config = offline_config(level)
        image_key = json.dumps(config_to_dict(config)["image"], sort_keys=True)
        if image_key not in frontends:
            frontends[image_key] = build_frontend(config).to(device)
        frontend = frontends[image_key]
        # Frozen for each precision as ImageToMusic.from_checkpoint freezes it (the same seeded
        # weights in each, so the bf16 and fp32 audio are comparable); also, torch's FLOP
        # counter fails on trainable parameters under inference_mode (its module tracker hooks
        # their gradients).
        generators = {precision: freeze_for_inference(seeded_generator(config), precision).to(device)
                      for precision in args.precisions}
        codec = build_quietly(build_codec, config).to(device).eval()
        mel = log_mel_for(config)
        for batch in args.batch_sizes:
            outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # precision -> (codes, audio)
            for precision in args.precisions:
                key = (image_key, batch, precision)
                shared = key in frontend_results
                if not shared:
                    measured, features, class_ids = measure_frontend(
                        frontend, batch, precision, device, args.repeats, args.warmup)
                    summaries = {n: m.summary() for n, m in measured.items()}
                    frontend_results[key] = (summaries, features, class_ids)
                front, features, class_ids = frontend_results[key]
                back, codes, audio = measure_generation(generators[precision], codec, features, class_ids,
                                                        config.clip_samples, precision, device, args.repeats,
                                                        args.warmup)
                components = {n: dict(front[n], shared=shared) for n in FRONTEND_COMPONENTS}
                components.update({n: m.summary() for n, m in back.items()})
                # Kept between calls, so not in the measured peak: the FFT layers' kernel spectra.
                components["generator"]["fft_spectra_bytes"] = spectra_bytes(generators[precision])
                rows.append({
                    "level": level,
                    "config": LEVEL_CONFIGS[level],
                    "batch_size": batch,
                    "precision": precision,
                    "clip_seconds": config.data.clip_seconds,
                    "components": components,
                })
                outputs[precision] = codes, audio
                print_progress(f"{level} b{batch} {precision}", components)
            if {"fp32", "bf16"} <= set(outputs):
                by_precision = {row["precision"]: row for row in rows[-2:]}
                rows.append(mixed_row(by_precision["bf16"], by_precision["fp32"]))
                _, features, class_ids = frontend_results[(image_key, batch, "bf16")]
                others = {"bf16": outputs["bf16"],
                          "mixed": generated_audio(generators["fp32"], codec, features, class_ids,
                                                   config.clip_samples, device, "fp32", "fp32")}
                # The faster forms' own effect: the same fp32 chain, image to wav, with every
                # rewritten form plain (the TCNN frames' composed filters, I3D's repeated-frame
                # stem and pools, the generator's FFT convolutions, the decoder's phase grid).
                with direct_convolutions(), torch.inference_mode():
                    features, class_ids = frontend(seeded_images(batch, device))
                    others["fp32_direct"] = generated_audio(generators["fp32"], codec, features, class_ids,
                                                            config.clip_samples, device, "fp32", "fp32")
                reference_codes, reference_audio = outputs["fp32"]
                for precision, (codes, audio) in others.items():
                    comparisons.append({"level": level, "batch_size": batch, "precision": precision,
                                        **audio_difference(reference_audio, audio, mel, reference_codes, codes,
                                                           config.data.sample_rate)})
        del generators, codec
    return {"inference": rows, "bf16_vs_fp32_audio": comparisons}


# ------------------------------------------------------------------------ training
def gan_training_step(config: Config, device: torch.device, precision: str, batch: int) -> Callable[[], Any]:
    """One step of the trainer's own GAN stage (GanStage.train_step), single process.

    The batch carries cached frontend outputs (``features``/``pred_class``), as training with
    the feature cache does; the frontend's cost is measured separately (feature cache section).
    """
    config.train.precision = precision
    dist_info = DistInfo(rank=0, local_rank=0, world_size=1, is_main=True, device=device, backend=None)
    stage = build_quietly(lambda c: GanStage(c, dist_info), config)
    generator = torch.Generator().manual_seed(batch)
    items = {
        "features": torch.randn(batch, 2048, generator=generator),
        "pred_class": seeded_classes(batch, torch.device("cpu")),
        "class_id": seeded_classes(batch, torch.device("cpu")),
        "audio": 0.1 * torch.randn(batch, 1, config.clip_samples, generator=generator),
    }
    items = {key: value.to(device) for key, value in items.items()}
    return lambda: stage.train_step([items])


def release_memory(device: torch.device) -> None:
    """Collect the last row's cycles and hand its freed blocks back, so the next row starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_training_step(config: Config, device: torch.device, precision: str, batch: int,
                          args: argparse.Namespace) -> dict[str, Any]:
    step = gan_training_step(config, device, precision, batch)
    summary = measure(step, device, args.train_repeats, args.train_warmup, with_grad=True).summary()
    return {**summary, "samples_per_s": batch / summary["median_s"]}


def run_training(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """One row per level, precision and batch size. Batch sizes are tried in the given order
    until one does not fit in memory (a row marked ``out_of_memory``; larger ones are skipped);
    the fastest fitting batch per level and precision is marked ``best_batch``."""
    rows = []
    for level in args.train_levels:
        config = offline_config(level)
        # As the trainer runs it: fp32 where bf16 has no kernels (GanStage falls back, and says so).
        requested = args.train_precisions or [config.train.precision]
        for precision in dict.fromkeys(p if bf16_supported(device) else "fp32" for p in requested):
            fitting: list[dict[str, Any]] = []
            for batch in args.train_batch or [config.train.batch_size]:
                row = {"level": level, "config": LEVEL_CONFIGS[level], "batch_size": batch, "precision": precision}
                try:
                    row.update(measure_training_step(config, device, precision, batch, args))
                except torch.OutOfMemoryError:
                    row["out_of_memory"] = True
                # After every row, outside the except block (a traceback pins the step's tensors):
                # the stage sits in reference cycles (its optimisers), so without a collection its
                # weights and Adam state would still hold memory when the next batch size is tried.
                release_memory(device)
                if row.get("out_of_memory"):
                    rows.append(row)
                    print(f"[train {level} b{batch} {precision}] out of memory: larger batches skipped",
                          file=sys.stderr, flush=True)
                    break
                fitting.append(row)
                rows.append(row)
                print_progress(f"train {level} b{batch} {precision}", {"step": row})
            if fitting:
                max(fitting, key=lambda r: r["samples_per_s"])["best_batch"] = True
    return rows


def fitting_rows(training: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in training if not row.get("out_of_memory")]


# -------------------------------------------------------------------- feature cache
def run_feature_cache(args: argparse.Namespace, device: torch.device, inference: list[dict[str, Any]],
                      training: list[dict[str, Any]]) -> dict[str, Any]:
    """Per training sample: computing frozen features vs reading them from the feature cache.

    The cache side is the project's FeatureCache.get on real JPEG files: sha256 of the image
    file plus a weights-only load of its entry, with a fresh cache object per timed run (no
    memoised digests) and a warm page cache, as in every epoch after the first. Image
    decoding is left out of both sides (the cached path never decodes, so this understates
    the gain slightly).
    """
    front = next((r for r in inference if r["batch_size"] == 1 and r["precision"] == "fp32"), None)
    if front is not None:
        compute_s = sum(front["components"][n]["median_s"] for n in FRONTEND_COMPONENTS)
        source = "inference fp32 batch 1 (sum of frontend components)"
    else:
        config = offline_config(args.levels[0] if args.levels else "tiny")
        frontend = build_frontend(config).to(device)
        images = seeded_images(1, device)

        def compute() -> Any:
            with torch.inference_mode():
                return frontend(images)
        compute_s = time_call(compute, device, args.repeats, args.warmup).median
        source = "frontend fp32 batch 1"
    with tempfile.TemporaryDirectory() as folder:
        pixels = torch.Generator().manual_seed(0)
        paths = []
        writer = FeatureCache(folder, "benchmark")
        for index in range(args.cache_files):
            path = Path(folder) / f"{index:05d}.jpg"
            image = torch.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), generator=pixels, dtype=torch.uint8)
            Image.fromarray(image.numpy()).save(path, quality=90)
            writer.put(path, torch.randn(2048, generator=pixels), index % NUM_CLASSES)
            paths.append(path)

        def load_all() -> None:
            cache = FeatureCache(folder, "benchmark")
            for path in paths:
                features, _ = cache.get(path)
                features.to(device)
        load = time_call(load_all, device, args.repeats, warmup=1)
    load_s = load.median / len(paths)
    result: dict[str, Any] = {
        "frontend_s_per_image": compute_s,
        "frontend_source": source,
        "cache_load_s_per_image": load_s,
        "cache_load_timing_s_per_image": [s / len(paths) for s in load.seconds],
        "speedup_features": compute_s / load_s,
        "epoch": [],
    }
    for row in fitting_rows(training):
        step_per_sample = row["median_s"] / row["batch_size"]
        without = step_per_sample + compute_s
        with_cache = step_per_sample + load_s
        result["epoch"].append({
            "level": row["level"], "precision": row["precision"],
            "s_per_sample_computing_features": without,
            "s_per_sample_cached_features": with_cache,
            "epoch_speedup": without / with_cache,
        })
    return result


# ------------------------------------------------------------------------ ceilings
def apply_ceilings(inference: list[dict[str, Any]], training: list[dict[str, Any]],
                   rates: dict[str, float]) -> None:
    """Add ceiling fractions and FLOP-bound ratios to every row, in place.

    ceiling_fraction compares with the matmul ceiling of the row's own precision;
    x_flop_bound is time / (FLOPs / the fastest matmul rate), the issue's target measure:
    the bf16 rate where bf16 has kernels, the fp32 rate where it is emulated.
    """
    bound_rate = max(rates["fp32"], rates["bf16"])
    for row in inference:
        # A mixed chain's total is compared with the bf16 ceiling, each component with its own.
        ceiling = rates["bf16" if row["precision"] == "mixed" else row["precision"]]
        for component in row["components"].values():
            own = rates[component.get("precision", row["precision"])]
            component["ceiling_fraction"] = component["flops_per_s"] / own
        row["total"] = chain_summary(row["components"], row["batch_size"], row["clip_seconds"],
                                     ceiling, bound_rate)
    for row in fitting_rows(training):
        row["ceiling_fraction"] = row["flops_per_s"] / rates[row["precision"]]
        row["flop_bound_s"] = row["flops"] / bound_rate
        row["x_flop_bound"] = row["median_s"] / row["flop_bound_s"]


def measure_ceilings(device: torch.device, size: int) -> dict[str, dict[str, Any]]:
    """The matmul rate per precision, and the copy bandwidth (``copy``). Where bf16 has no
    kernels its matmul is read at a size it finishes quickly (512: a 2048 one takes about
    20 s at the 1 GFLOP/s of the scalar fallback)."""
    bf16_size = size if bf16_supported(device) else min(size, EMULATED_BF16_CEILING_SIZE)
    return {"fp32": matmul_ceiling(device, torch.float32, size),
            "bf16": matmul_ceiling(device, torch.bfloat16, bf16_size),
            "copy": copy_bandwidth(device)}


def best_ceilings(*measurements: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Best matmul rate per precision over the measurements (start, middle and end of the
    run): on a shared machine the lower readings are the contended ones, not the hardware's
    limit."""
    return {name: max(m[name]["flops_per_s"] for m in measurements) for name in ("fp32", "bf16")}


# ----------------------------------------------------------------------- reporting
def print_progress(head: str, parts: dict[str, dict[str, Any]]) -> None:
    text = ", ".join(f"{n} {p['median_s'] * 1e3:.1f} ms {p['flops_per_s'] / 1e9:.1f} GFLOP/s"
                     for n, p in parts.items())
    print(f"[{head}] {text}", file=sys.stderr, flush=True)


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f}" if seconds < 100 else f"{seconds * 1e3:9.0f}"


def _steal(fraction: float | None) -> str:
    return "steal n/a" if fraction is None else f"steal {100 * fraction:.1f}%"


def max_steal(rows: list[dict[str, Any]]) -> float | None:
    """The highest stolen CPU share among measurements (None if none was reported)."""
    known = [r["cpu_steal_fraction"] for r in rows if r.get("cpu_steal_fraction") is not None]
    return max(known) if known else None


def print_inference_row(row: dict[str, Any]) -> None:
    head = f"{row['level']:5} b{row['batch_size']:<2} {row['precision']:5}"
    for name, c in row["components"].items():
        shared = "*" if c.get("shared") else " "
        print(f"{head} {name:19}{shared}{_ms(c['median_s'])} [{_ms(c['min_s']).strip()}-{_ms(c['max_s']).strip()}]"
              f" {c['flops'] / 1e9:9.2f} {c['flops_per_s'] / 1e9:8.1f} {100 * c['ceiling_fraction']:6.1f}%"
              f" {format_bytes(c['peak_memory_bytes']):>9}")
    t = row["total"]
    print(f"{head} {'TOTAL':20}{_ms(t['seconds'])} RTF {t['real_time_factor']:.3f}"
          f" {t['flops'] / 1e9:9.2f} {t['flops_per_s'] / 1e9:8.1f} {100 * t['ceiling_fraction']:6.1f}%"
          f" {format_bytes(t['peak_memory_bytes']):>9}  {t['x_flop_bound']:.2f}x FLOP-bound"
          f"  {_steal(max_steal(list(row['components'].values())))}")


def print_training_row(row: dict[str, Any]) -> None:
    head = f"{row['level']:5} b{row['batch_size']:<2} {row['precision']:4}"
    if row.get("out_of_memory"):
        print(f"{head} out of memory")
        return
    print(f"{head} {_ms(row['median_s'])}"
          f" [{_ms(row['min_s']).strip()}-{_ms(row['max_s']).strip()}] {row['samples_per_s']:8.3f}"
          f" {row['flops'] / 1e9:9.1f} {row['flops_per_s'] / 1e9:8.1f} {100 * row['ceiling_fraction']:6.1f}%"
          f" {format_bytes(row['peak_memory_bytes']):>9} {row['x_flop_bound']:6.2f}x  {_steal(row['cpu_steal_fraction'])}"
          + ("  best batch" if row.get("best_batch") else ""))


def print_report(report: dict[str, Any]) -> None:
    meta = report["meta"]
    print(f"# ConchShell benchmark: {meta['device_name']} ({meta['threads']} threads), torch {meta['torch']}")
    print(f"load average at start/end: {meta['load_average_start']} / {meta['load_average_end']}; "
          f"CPU time stolen by the hypervisor over the run: {_steal(meta['cpu_steal_fraction'])}"
          " (each row gives its own: compare runs with little)")
    for name, rate in report["ceiling"]["used"].items():
        readings = ", ".join(f"{m[name]['flops_per_s'] / 1e9:.1f} ({_steal(m[name]['cpu_steal_fraction'])})"
                             for m in report["ceiling"]["measurements"])
        size = report["ceiling"]["measurements"][0][name]["size"]
        print(f"ceiling {name}: {rate / 1e9:.1f} GFLOP/s "
              f"({size}^3 matmul; best of the readings at start, middle, end: {readings})")
    copies = ", ".join(f"{m['copy']['bytes_per_s'] / 1e9:.1f} ({_steal(m['copy']['cpu_steal_fraction'])})"
                       for m in report["ceiling"]["measurements"])
    print(f"copy bandwidth (read + written, {format_bytes(report['ceiling']['measurements'][0]['copy']['bytes'])}"
          f" buffer; the memory-bound passes' limit, it moves with other guests' traffic): {copies} GB/s")
    if report["inference"]:
        print("\n## Inference (ms: median [min-max]; GFLOP counted; GFLOP/s; % of same-precision ceiling; "
              "peak memory; * = frontend shared across levels)")
        for row in report["inference"]:
            print_inference_row(row)
    if report["bf16_vs_fp32_audio"]:
        print("\n## bf16, mixed (bf16 frontend, the rest fp32) and fp32_direct (fp32, every rewritten conv in its "
              "plain form, image to wav: the faster forms' own effect) vs fp32 audio")
        for c in report["bf16_vs_fp32_audio"]:
            print(f"{c['level']:5} b{c['batch_size']:<2} {c['precision']:11} max|diff| {c['max_abs_diff']:.4g} "
                  f"(fp32 peak {c['reference_peak']:.4g})  mel L1 {c['mel_l1']:.4g}  "
                  f"SNR {'inf' if c['snr_db'] is None else format(c['snr_db'], '.1f')} dB  "
                  f"frames on other codes {c['frames_on_other_codes']} of {c['frames']}  "
                  f"PESQ {_score(c['pesq'])}  STOI {_score(c['stoi'])}")
    if report["training"]:
        print("\n## GAN training step (ms median [min-max]; samples/s; GFLOP; GFLOP/s; % ceiling; "
              "peak memory; x FLOP-bound at the fastest matmul rate)")
        for row in report["training"]:
            print_training_row(row)
    cache = report.get("feature_cache")
    if cache:
        print(f"\n## Feature cache: frontend {cache['frontend_s_per_image'] * 1e3:.1f} ms/image vs cached load "
              f"{cache['cache_load_s_per_image'] * 1e3:.3f} ms/image ({cache['speedup_features']:.0f}x)")
        for e in cache["epoch"]:
            print(f"{e['level']:5} {e['precision']:4} epoch time per sample {e['s_per_sample_computing_features']:.3f} s"
                  f" -> {e['s_per_sample_cached_features']:.3f} s ({e['epoch_speedup']:.2f}x)")


# ---------------------------------------------------------------------------- main
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _csv(kind: Callable[[str], Any], allowed: tuple[Any, ...] | None = None) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [kind(part.strip()) for part in text.split(",") if part.strip()]
        if allowed is not None:
            bad = [item for item in items if item not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(map(str, allowed))}")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", type=Path, help="write the full results here")
    levels = tuple(LEVEL_CONFIGS)
    parser.add_argument("--levels", type=_csv(str, levels), default=["deep", "low", "high"],
                        help="inference levels (default deep,low,high)")
    parser.add_argument("--batch-sizes", type=_csv(int), default=None, help="inference batch sizes (default 1,4)")
    parser.add_argument("--precisions", type=_csv(str, PRECISIONS), default=None,
                        help="inference precisions (default fp32,bf16; fp32 alone where bf16 has no kernels)")
    parser.add_argument("--repeats", type=int, default=None, help="timed inference repeats (default 3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs after the FLOP-counting run (default 1)")
    parser.add_argument("--train-levels", type=_csv(str, levels), default=["deep", "low", "high", "tiny"])
    parser.add_argument("--train-precisions", type=_csv(str, PRECISIONS), default=None,
                        help="training precisions (default: each config's train.precision, "
                             "bf16 for the paper's levels, fp32 for tiny; fp32 where bf16 has no kernels)")
    parser.add_argument("--train-batch", type=_csv(int), default=None,
                        help="training batch sizes, e.g. 2,4,8,16 on a GPU: tried in order until one "
                             "does not fit in memory; the fastest is marked (default: the config's)")
    parser.add_argument("--train-repeats", type=int, default=None,
                        help="timed training steps (default 3: a median on a noisy machine)")
    parser.add_argument("--train-warmup", type=int, default=None,
                        help="untimed steps after the FLOP-counting step (default 1, 0 with --quick: the "
                             "allocator settles over the first steps)")
    parser.add_argument("--cache-files", type=int, default=64, help="cached items read per timed cache run")
    parser.add_argument("--ceiling-size", type=int, default=None,
                        help="matmul size for the ceiling (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="batch 1, one repeat, no extra warm-up")
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch_sizes = args.batch_sizes or ([1] if quick else [1, 4])
    def default(value: int | None, normal: int, in_quick: int) -> int:
        return value if value is not None else (in_quick if quick else normal)

    args.repeats = default(args.repeats, 3, 1)
    args.warmup = default(args.warmup, 1, 0)
    args.train_repeats = default(args.train_repeats, 3, 1)
    args.train_warmup = default(args.train_warmup, 1, 0)
    if args.repeats < 1 or args.train_repeats < 1 or min(args.warmup, args.train_warmup) < 0 \
            or min(args.batch_sizes) < 1 or min(args.train_batch or [1]) < 1:
        parser.error("repeats and batch sizes must be >= 1 and warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        use_ieee_fp32()
    bf16_kernels = bf16_supported(device)
    if args.precisions is None:
        args.precisions = list(PRECISIONS) if bf16_kernels else ["fp32"]
    if not bf16_kernels:
        print(f"[bf16] {bf16_unsupported_reason(device)}: inference in {','.join(args.precisions)}, "
              f"training in fp32, the FLOP bound at the fp32 rate", file=sys.stderr, flush=True)
    keeps_freed_memory = keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = os.getloadavg()
    with CpuSteal() as run_steal:
        size = args.ceiling_size or (8192 if device.type == "cuda" else 2048)
        first = measure_ceilings(device, size)
        print(f"[ceiling] fp32 {first['fp32']['flops_per_s'] / 1e9:.1f} GFLOP/s, "
              f"bf16 {first['bf16']['flops_per_s'] / 1e9:.1f} GFLOP/s", file=sys.stderr, flush=True)
        inference = run_inference(args, device) if args.levels else {"inference": [], "bf16_vs_fp32_audio": []}
        # A reading between the parts as well: on a shared VM one reading in three or four came
        # out at half the rate, and a run with two low readings would flatter every fraction.
        middle = measure_ceilings(device, size)
        training = run_training(args, device) if args.train_levels else []
        cache = run_feature_cache(args, device, inference["inference"], training)
        last = measure_ceilings(device, size)
        readings = [first, middle, last]
        rates = best_ceilings(*readings)
        apply_ceilings(inference["inference"], training, rates)
    report = {
        "meta": {
            "device": args.device,
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            # As the entry points run: freed CPU memory kept for reuse (conchshell.utils.host_memory).
            "keep_freed_memory": keeps_freed_memory,
            # False: bf16 runs through torch's scalar fallbacks here (about 100x slower than fp32).
            "bf16_kernels": bf16_kernels,
            "flop_bound_precision": max(("fp32", "bf16"), key=rates.get),
            # fp32 rows are IEEE fp32, as on the CPU: CUDA's TF32 switched off (use_ieee_fp32).
            "cuda_tf32": (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
                         if device.type == "cuda" else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            # Other work on the machine slows every figure: check these before comparing runs.
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "cpu_steal_fraction": run_steal.fraction,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "notes": "Seeded weights (no checkpoints). Chain totals = sum of component medians. "
                     "ceiling = best matmul rate of the readings at the start, after inference "
                     "and at the end of the run; "
                     "ceiling_fraction is against the same precision's ceiling; x_flop_bound "
                     "is time / (FLOPs / the fastest matmul rate: bf16's where it has kernels, "
                     "else fp32's). CPU peak memory = rise of the process "
                     "high-water RSS during the timed runs.",
        },
        "ceiling": {"used": rates, "measurements": readings},
        **inference,
        "training": training,
        "feature_cache": cache,
    }
    report["meta"]["wall_s"] = time.perf_counter() - started
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
