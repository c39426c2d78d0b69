"""Draw the README figures of the demo corpus and check that its classes are separable.

    python scripts/make_demo_figures.py [--corpus dataset/demo] [--out docs/images]

Writes three PNGs under --out:
- demo_scenes.png: a contact sheet, six scenes per class (the first train images);
- demo_mel.png: the log-mel spectrogram of the first clip of each class;
- demo_traits.png: every clip's mean pitch against its notes per second.

It also prints, per class, the traits stored in clips.csv and the leave-one-out accuracy
of a nearest-centroid classifier on (a) those traits and (b) two features measured on the
audio alone (log spectral centroid, onsets per second), as evidence that the image class
is recoverable from the music.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import soundfile  # noqa: E402
from PIL import Image  # noqa: E402

from conchshell.constants import CLASS_NAMES, SAMPLE_RATE  # noqa: E402
from conchshell.data.demo import CLASS_TRAITS  # noqa: E402
from conchshell.errors import ConchShellError, DataError  # noqa: E402

N_FFT, HOP, N_MELS = 1024, 256, 96


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: not found; build the corpus first (scripts/build_demo_corpus.py)")
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _save_small_png(fig: plt.Figure, path: Path, dpi: int) -> int:
    """Save a figure as a 256-colour PNG: the README images must stay small."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    image.save(path, optimize=True)
    return path.stat().st_size


def contact_sheet(corpus: Path, manifest: list[dict[str, str]], out: Path, per_class: int = 6) -> int:
    fig, axes = plt.subplots(len(CLASS_NAMES), per_class, figsize=(per_class * 1.6, len(CLASS_NAMES) * 1.25))
    for r, name in enumerate(CLASS_NAMES):
        images = [row["image"] for row in manifest if row["class"] == name and row["split"] == "train"][:per_class]
        for k in range(per_class):
            ax = axes[r, k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(images):
                ax.imshow(Image.open(corpus / images[k]))
            if k == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle("Demo corpus: procedurally drawn scenes (320x240), six per class", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97), pad=0.3, h_pad=0.2, w_pad=0.2)
    return _save_small_png(fig, out, dpi=110)


def _stft_power(wave: np.ndarray) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(wave, N_FFT // 2), N_FFT)[::HOP]
    return np.abs(np.fft.rfft(frames * np.hanning(N_FFT), axis=1)) ** 2  # [frames, bins]


def mel_figure(corpus: Path, clips: list[dict[str, str]], out: Path) -> int:
    import librosa

    mel = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=0.0, fmax=SAMPLE_RATE / 2)
    fig, axes = plt.subplots(2, 3, figsize=(10, 5), sharex=True, sharey=True)
    for ax, name in zip(axes.flat, CLASS_NAMES):
        clip = next(c for c in clips if c["class"] == name)
        wave, _ = soundfile.read(str(corpus / clip["clip"]), dtype="float32")
        log_mel = 10 * np.log10(np.maximum(_stft_power(wave) @ mel.T, 1e-10)).T
        ax.imshow(log_mel, origin="lower", aspect="auto", cmap="magma", vmin=log_mel.max() - 80, extent=(0, len(wave) / SAMPLE_RATE, 0, N_MELS))
        ax.set_title(f"{name}: {clip['mode']}, {float(clip['tempo_bpm']):.0f} bpm\nmean pitch {float(clip['mean_pitch']):.1f}, {float(clip['notes_per_second']):.1f} notes/s", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("seconds")
    for ax in axes[:, 0]:
        ax.set_ylabel("mel bin")
    fig.suptitle("Demo corpus: log-mel spectrograms, first clip of each class (solo piano, 16 kHz)", fontsize=10)
    fig.tight_layout()
    return _save_small_png(fig, out, dpi=90)


def traits_figure(clips: list[dict[str, str]], out: Path) -> int:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in CLASS_NAMES:
        rows = [c for c in clips if c["class"] == name]
        marker = "o" if CLASS_TRAITS[name].mode == "major" else "^"
        ax.scatter([float(c["mean_pitch"]) for c in rows], [float(c["notes_per_second"]) for c in rows], label=f"{name} ({CLASS_TRAITS[name].mode})", marker=marker, s=22)
    ax.set_xlabel("mean MIDI pitch of the clip")
    ax.set_ylabel("notes per second")
    ax.set_title("Musical traits of every clip (o major, ^ minor)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_small_png(fig, out, dpi=100)


def audio_features(path: Path) -> tuple[float, float, float]:
    """(log2 spectral centroid, log2 dominant frequency, onsets per second) from the waveform alone."""
    wave, rate = soundfile.read(str(path), dtype="float32")
    power = _stft_power(wave)
    freqs = np.fft.rfftfreq(N_FFT, 1 / rate)
    centroid = float((power * freqs).sum() / power.sum())
    # Register: the strongest partial of each frame between A0 and C7, weighted by energy.
    band = (freqs >= 27.5) & (freqs <= 2100)
    strongest = freqs[band][np.argmax(power[:, band], axis=1)]
    energy = power[:, band].sum(axis=1)
    register = float(np.sum(np.log2(strongest) * energy) / energy.sum())
    flux = np.maximum(np.diff(np.log1p(1e3 * power), axis=0), 0).sum(axis=1)
    peaks = (flux[1:-1] > flux[:-2]) & (flux[1:-1] >= flux[2:]) & (flux[1:-1] > flux.mean() + 0.5 * flux.std())
    return float(np.log2(centroid)), register, float(peaks.sum() / (len(wave) / rate))


def loo_nearest_centroid(features: np.ndarray, labels: list[str]) -> float:
    """Leave-one-out accuracy of a nearest-class-mean classifier.

    Features are scaled by their pooled within-class spread, so a trait that is tight
    inside each class (register) counts for more than a loose one (density).
    """
    within = np.sqrt(np.mean([features[[l == n for l in labels]].var(0) for n in CLASS_NAMES], axis=0))
    z = features / np.maximum(within, 1e-9)
    correct = 0
    for i in range(len(labels)):
        means = {n: z[[j for j in range(len(labels)) if j != i and labels[j] == n]].mean(0) for n in CLASS_NAMES}
        correct += min(means, key=lambda n: float(np.sum((z[i] - means[n]) ** 2))) == labels[i]
    return correct / len(labels)


def report(corpus: Path, clips: list[dict[str, str]]) -> None:
    print(f"{'class':<11} {'n':>3} {'mean pitch':>16} {'notes/s':>14} {'mode':>7} {'tempo':>6} {'centroid Hz':>12} {'peak Hz':>8} {'onsets/s':>9}")
    audio = np.array([audio_features(corpus / c["clip"]) for c in clips])
    for name in CLASS_NAMES:
        idx = [i for i, c in enumerate(clips) if c["class"] == name]
        pitch = np.array([float(clips[i]["mean_pitch"]) for i in idx])
        rate = np.array([float(clips[i]["notes_per_second"]) for i in idx])
        modes = sorted({clips[i]["mode"] for i in idx})
        print(
            f"{name:<11} {len(idx):>3} {pitch.mean():>9.2f} +- {pitch.std():4.2f} {rate.mean():>7.2f} +- {rate.std():4.2f}"
            f" {'/'.join(modes):>7} {float(clips[idx[0]]['tempo_bpm']):>6.0f} {np.mean(2 ** audio[idx, 0]):>12.0f} {np.mean(2 ** audio[idx, 1]):>8.0f} {audio[idx, 2].mean():>9.2f}"
        )
    labels = [c["class"] for c in clips]
    traits = np.array([[float(c["mean_pitch"]), float(c["notes_per_second"])] for c in clips])
    print(f"leave-one-out nearest-centroid accuracy, traits (mean pitch, notes/s): {loo_nearest_centroid(traits, labels):.3f}")
    print(f"leave-one-out nearest-centroid accuracy, mean pitch alone: {loo_nearest_centroid(traits[:, :1], labels):.3f}")
    print(f"leave-one-out nearest-centroid accuracy, audio only (centroid, peak, onsets/s): {loo_nearest_centroid(audio, labels):.3f}")
    print(f"chance: {1 / len(CLASS_NAMES):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "dataset" / "demo", help="built demo corpus (default: dataset/demo)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="folder for the PNGs (default: docs/images)")
    args = parser.parse_args(argv)
    try:
        manifest = _rows(args.corpus / "manifest.csv")
        clips = _rows(args.corpus / "clips.csv")
        args.out.mkdir(parents=True, exist_ok=True)
        for name, size in (
            ("demo_scenes.png", contact_sheet(args.corpus, manifest, args.out / "demo_scenes.png")),
            ("demo_mel.png", mel_figure(args.corpus, clips, args.out / "demo_mel.png")),
            ("demo_traits.png", traits_figure(clips, args.out / "demo_traits.png")),
        ):
            print(f"wrote {args.out / name} ({size / 1024:.0f} KB)")
        report(args.corpus, clips)
    except (ConchShellError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
