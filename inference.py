"""Turn pictures into 8-second piano pieces with a trained ConchShell generator.

    python inference.py        # the shipped demo model on examples/: generated/*.wav + *.png
    python inference.py --img_path beach.jpg --checkpoint G-step=100000.pt [--out beach.wav]
    python inference.py --img_path photos/ --checkpoint G.pt --out wavs/         # one wav per image
    python inference.py --img_path a.jpg b.jpg c.jpg --checkpoint G.pt --soundtrack show.wav

One image: writes ``--out`` (default ``<image name>.wav`` in the current folder; an
existing folder as ``--out`` receives ``<image name>.wav``). A folder (its top-level
images, in natural name order) or several files: one ``<image name>.wav`` each into the
folder ``--out`` (default ``generated/``). ``--soundtrack FILE`` also joins the pieces, in
the order given, with an equal-power crossfade (``--crossfade`` seconds, default 0.5), for
a slideshow or a short video; with several images and a soundtrack, single pieces are
only written when ``--out`` is given.

With no ``--img_path`` the example scenes in ``examples/`` are used, and without
``--checkpoint`` the demo model shipped in ``weights/demo/`` (trained on the offline demo
corpus, see weights/demo/README.md); leaving out ``--img_path`` also turns
``--spectrogram`` on.

Wavs are mono 16-bit PCM at the checkpoint's rate and length (16 kHz and 8 s for the
paper's model), written atomically: an error never leaves a partial file. A bad image in
a folder is reported and skipped; the others are still generated, the bad ones are listed
at the end and the exit status is 1 (the soundtrack is then not written).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

from conchshell.constants import CLASS_NAMES, INFERENCE_PRECISIONS
from conchshell.data.manifest import IMAGE_EXTENSIONS
from conchshell.errors import ConchShellError
from conchshell.utils.host_memory import keep_freed_memory

ROOT = Path(__file__).resolve().parent
EXAMPLE_IMAGES = ROOT / "examples"
DEMO_CHECKPOINT = ROOT / "weights" / "demo" / "generator.pt"
IMAGE_SUFFIXES = frozenset(ext.lower() for ext in IMAGE_EXTENSIONS) | {".tif", ".tiff", ".gif"}


def natural_key(path: Path) -> list:
    """Sort ``img2`` before ``img10``, as a person numbering slides expects."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def collect_images(inputs: list[Path]) -> tuple[list[Path], list[tuple[Path, str]], bool]:
    """(images to run, (path, problem) for inputs that cannot be, whether this is a batch).

    A folder contributes its top-level files with an image extension; explicitly named
    files are tried whatever their extension (PIL decides whether they are images).
    """
    images: list[Path] = []
    problems: list[tuple[Path, str]] = []
    batch = len(inputs) > 1
    for path in inputs:
        if path.is_dir():
            batch = True
            found = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                           key=natural_key)
            if not found:
                problems.append((path, f"folder {path} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})"))
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            problems.append((path, f"image file not found: {path}"))
    return images, problems, batch


def unique_wav_names(images: list[Path]) -> list[str]:
    """``<stem>.wav`` per image; a repeated stem (same name in two folders) gets ``-2``, ``-3``..."""
    seen: dict[str, int] = {}
    names = []
    for image in images:
        count = seen.get(image.stem, 0) + 1
        seen[image.stem] = count
        names.append(f"{image.stem}.wav" if count == 1 else f"{image.stem}-{count}.wav")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--img_path", "--img-path", dest="img_path", type=Path, nargs="+",
                        help="image file(s) or a folder of images (default: the example scenes in examples/)")
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT,
                        help="generator export G-step=N.pt (default: the demo model, weights/demo/generator.pt)")
    parser.add_argument("--out", type=Path, help="output wav (one image) or folder (several)")
    parser.add_argument("--soundtrack", type=Path, help="also join all pieces into this wav, crossfaded")
    parser.add_argument("--crossfade", type=float, default=0.5, help="soundtrack crossfade in seconds (default 0.5)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--class", dest="class_name", choices=CLASS_NAMES,
                        help="condition on this class instead of the TCNN's prediction")
    parser.add_argument("--spectrogram", action=argparse.BooleanOptionalAction, default=None,
                        help="also save <wav name>.png, a log-mel picture (default: on only without --img_path)")
    parser.add_argument("--seed", type=int, default=0, help="seed for torch/numpy/python (default 0)")
    parser.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="fp32",
                        help="fp32 (default); bf16: autocast for the image networks, the generator and "
                             "the decoder (the code search stays fp32), fastest, but the generator's "
                             "rounding moves some frames to another code; mixed: bf16 for the image "
                             "networks only, audio that scores as fp32's (README, Performance)")
    args = parser.parse_args(argv)
    if args.crossfade < 0:
        parser.error("--crossfade must be >= 0")
    if args.spectrogram is None:
        args.spectrogram = args.img_path is None
    if args.img_path is None:
        args.img_path = [EXAMPLE_IMAGES]
    return args


def output_paths(args: argparse.Namespace, images: list[Path], batch: bool) -> list[Path | None]:
    """Where each image's wav goes (None: not written on its own, only into the soundtrack)."""
    if not batch:
        out = args.out if args.out is not None else (None if args.soundtrack else Path(f"{images[0].stem}.wav"))
        if out is not None and out.is_dir():
            out = out / f"{images[0].stem}.wav"
        return [out]
    if args.out is None and args.soundtrack is not None:
        return [None] * len(images)
    folder = args.out if args.out is not None else Path("generated")
    return [folder / name for name in unique_wav_names(images)]


def run(args: argparse.Namespace) -> int:
    from conchshell.inference import (ImageToMusic, ensure_writable_dir, join_with_crossfade,
                                      save_spectrogram_png, seed_all, write_wav)
    from conchshell.data.image import load_image

    images, failures, batch = collect_images(args.img_path)
    total_inputs = len(images) + len(failures)
    if not batch and failures:
        raise ConchShellError(failures[0][1])
    if not images:
        raise ConchShellError("; ".join(problem for _, problem in failures) or "no images given")
    if not batch:
        # Decode the one image before loading any network: a bad file fails in milliseconds.
        load_image(images[0])
    outs = output_paths(args, images, batch)
    for folder in {p.parent for p in outs if p is not None} | ({args.soundtrack.parent} if args.soundtrack else set()):
        ensure_writable_dir(folder)

    seed_all(args.seed)
    with warnings.catch_warnings():
        # The seeded stand-in codec of smoke-test configs warns on every build; say it once here.
        warnings.simplefilter("ignore", UserWarning)
        model = ImageToMusic.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision)
    if model.config.codec.checkpoint is None:
        print("note: this checkpoint's config uses a seeded, untrained codec (smoke-test model)", file=sys.stderr)

    from tqdm import tqdm

    pieces = []
    bar = tqdm(list(zip(images, outs)), unit="image", disable=not batch, dynamic_ncols=True)
    say = bar.write if batch else print
    for image, out in bar:
        try:
            result = model.run(image, class_override=args.class_name)
            if out is not None:
                write_wav(out, result.waveform, result.sample_rate)
                if args.spectrogram:
                    save_spectrogram_png(out.with_suffix(".png"), result.waveform, result.sample_rate,
                                         title=f"{image.name}: {result.class_name}")
        except ConchShellError as exc:
            if not batch:
                raise
            failures.append((image, str(exc)))
            continue
        pieces.append(result.waveform)
        source = "given" if args.class_name else "predicted"
        note = f"; TCNN predicted {result.predicted_class_name}" if args.class_name else ""
        say(f"{image} -> {out if out is not None else '(soundtrack)'}  class: {result.class_name} "
            f"({source}{note})  {result.seconds:.2f} s")
    bar.close()

    if failures:
        print(f"error: {len(failures)} of {total_inputs} input(s) failed:", file=sys.stderr)
        for _, problem in failures:
            print(f"  {problem}", file=sys.stderr)
        if args.soundtrack is not None:
            print(f"  soundtrack {args.soundtrack} not written: it would be missing pieces", file=sys.stderr)
        return 1
    written = [out for out in outs if out is not None]
    if batch and written:
        kinds = "wavs and spectrogram PNGs" if args.spectrogram else "wavs"
        print(f"{len(written)} {kinds} in {', '.join(sorted({str(p.parent.resolve()) for p in written}))}")
    if args.soundtrack is not None:
        track = join_with_crossfade(pieces, model.sample_rate, args.crossfade)
        write_wav(args.soundtrack, track, model.sample_rate)
        if args.spectrogram:
            save_spectrogram_png(args.soundtrack.with_suffix(".png"), track, model.sample_rate, "soundtrack")
        print(f"soundtrack: {args.soundtrack} ({len(pieces)} pieces, {len(track) / model.sample_rate:.2f} s, "
              f"{args.crossfade:g} s crossfades)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    keep_freed_memory()
    try:
        status = run(args)
    except ConchShellError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if status == 0:
        print(f"done in {time.perf_counter() - start:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
