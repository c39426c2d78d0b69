"""Validate a dataset and write the CSV manifest that training reads.

    python scripts/prepare_dataset.py ROOT_OR_MANIFEST [--out manifest.csv] [--seed 0] [--check-decode]

ROOT_OR_MANIFEST is a BOPD dataset folder (with Label/Label.xlsx), a Label.xlsx, or a CSV
manifest (header image,audio,class,split). Every problem of the dataset is printed at
once, one line each (``<kind>: <file>: <detail> (row N)``), and the script exits 1 if
there is any. Otherwise it writes the manifest with a split for every row (85 % train /
15 % val, stratified by class, augmented copies kept together, deterministic by --seed)
and prints how many items each class has in each split.

--check-decode decodes every image and audio file fully (slower) instead of checking
headers only; it also finds truncated JPEG data and NaN samples.

Exit codes: 0 written, 1 dataset has problems, 2 the input cannot be read at all.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conchshell.constants import CLASS_NAMES  # noqa: E402
from conchshell.data.manifest import SPLITS, Record, write_manifest_csv  # noqa: E402
from conchshell.data.validate import validate_dataset  # noqa: E402
from conchshell.errors import ConchShellError  # noqa: E402


def default_output(source: Path) -> Path:
    """``manifest.csv`` in the dataset's root folder."""
    if source.is_dir():
        return source / "manifest.csv"
    if source.suffix.lower() == ".xlsx" and source.parent.name == "Label":
        return source.parent.parent / "manifest.csv"
    return source.parent / "manifest.csv"


def summary_table(records: list[Record]) -> str:
    """Items per class and split, with totals, as aligned text."""
    counts = {(c, s): 0 for c in range(len(CLASS_NAMES)) for s in SPLITS}
    for record in records:
        counts[(record.class_id, record.split)] += 1
    header = ["class", *SPLITS, "total"]
    rows = []
    for class_id, name in enumerate(CLASS_NAMES):
        per_split = [counts[(class_id, s)] for s in SPLITS]
        rows.append([name, *map(str, per_split), str(sum(per_split))])
    totals = [sum(counts[(c, s)] for c in range(len(CLASS_NAMES))) for s in SPLITS]
    rows.append(["total", *map(str, totals), str(sum(totals))])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(header), *(fmt(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="BOPD root folder, Label.xlsx or CSV manifest")
    parser.add_argument("--out", type=Path, default=None, help="CSV to write (default: manifest.csv in the dataset root)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    parser.add_argument("--check-decode", action="store_true", help="decode every file fully, not only its header")
    args = parser.parse_args(argv)

    try:
        report = validate_dataset(args.dataset, check_decode=args.check_decode, seed=args.seed)
    except ConchShellError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    for line in report.lines():
        print(line, file=sys.stderr)
    if not report.ok:
        print(f"{report.source}: {len(report.problems)} problem(s); no manifest written", file=sys.stderr)
        return 1

    out = args.out if args.out is not None else default_output(args.dataset)
    try:
        write_manifest_csv(report.records, out)
    except OSError as exc:
        print(f"error: cannot write {out}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(report.records)} items, seed {args.seed})")
    print(summary_table(report.records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
