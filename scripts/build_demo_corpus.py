"""Build the offline demo corpus: drawn ocean scenes paired with real piano excerpts.

    python scripts/build_demo_corpus.py --out dataset/demo [--clips-per-class N]
        [--images-per-class M] [--seed S] [--tiny]
    python scripts/build_demo_corpus.py --examples examples/     # held-out scenes only

Writes the BOPD layout (Img/, Wav/piano/, Label/Label.xlsx) plus manifest.csv and
clips.csv under --out; see dataset/README.md for the layout and the pairing rule.
The same arguments always give byte-identical files. ``--examples DIR`` draws only one
held-out scene per class (``DIR/<class>.jpg``, never a corpus image): the pictures the
README's first command turns into music.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conchshell.data.demo import DEFAULT, TINY, build_demo_corpus, draw_example_scenes  # noqa: E402
from conchshell.errors import ConchShellError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dataset" / "demo", help="output folder (default: dataset/demo)")
    parser.add_argument("--tiny", action="store_true", help=f"tiny preset for tests: {TINY.clips_per_class} clips, {TINY.images_per_class} images per class")
    parser.add_argument("--clips-per-class", type=int, help=f"piano clips per class (default {DEFAULT.clips_per_class})")
    parser.add_argument("--images-per-class", type=int, help=f"scenes per class (default {DEFAULT.images_per_class})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--examples", type=Path, metavar="DIR",
                        help="only draw one held-out example scene per class into DIR")
    args = parser.parse_args(argv)
    if args.examples is not None:
        try:
            paths = draw_example_scenes(args.examples, seed=args.seed)
        except OSError as exc:
            print(f"error: cannot write example scenes to {args.examples}: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {len(paths)} example scenes to {args.examples}")
        return 0
    preset = TINY if args.tiny else DEFAULT
    clips = args.clips_per_class if args.clips_per_class is not None else preset.clips_per_class
    images = args.images_per_class if args.images_per_class is not None else preset.images_per_class
    start = time.perf_counter()
    try:
        manifest = build_demo_corpus(args.out, clips_per_class=clips, images_per_class=images, seed=args.seed)
    except (ConchShellError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {manifest} ({clips} clips, {images} images per class) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
