"""Package a trained demo pipeline into weights/demo/: the files inference.py needs, nothing else.

    python scripts/package_demo.py --tcnn runs/demo/tcnn --codec runs/demo/vqvae --gan runs/demo/gan

From each stage's output folder it takes the best export (``TCNN-best.pt``,
``codec-best.pt``, ``G-best.pt``; or the file given instead of the folder) and writes::

    weights/demo/tcnn.pt          TCNN-6 weights (weights-only torch file)
    weights/demo/codec.pt         the 16 kHz VQ-VAE codec
    weights/demo/generator.pt     the generator export; its config names tcnn.pt and codec.pt
    weights/demo/config.yaml      that config (the GAN run's, with those two paths)
    weights/demo/SHA256SUMS       sha256sum -c compatible checksums of the three weight files
    weights/demo/training_curves.png   the three runs' metrics.jsonl, one panel per stage
    weights/demo/runs/<stage>.yaml     each run's resolved config.yaml, as train.py saved it
                                       (<stage>.phaseN.yaml: the runs it started from)

A run started with ``train.init_from`` continues the run that wrote that checkpoint: its
curve is drawn after that run's, and both configs are kept.

The I3D is not stored: the config's ``image.i3d_seed`` rebuilds the same frozen network.
Every export is loaded strictly before anything is written, the three files are checked to
fit ``--limit-mb`` together, and files are written atomically, so a failed run leaves the
previous package intact.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conchshell.errors import ConchShellError  # noqa: E402
from conchshell.utils.files import file_sha256  # noqa: E402

WEIGHT_FILES = {"tcnn": ("TCNN-best.pt", "tcnn.pt"), "codec": ("codec-best.pt", "codec.pt"),
                "gan": ("G-best.pt", "generator.pt")}
# (run, metrics.jsonl key, label) per panel; validation keys are plotted with markers.
CURVES = {
    "tcnn": [("tcnn/cross_entropy", "train cross-entropy"), ("val/cross_entropy", "val cross-entropy")],
    "codec": [("vqvae/loss", "train loss (all levels)"), ("val/reconstruction", "val reconstruction")],
    "gan": [("g/mel", "train mel L1"), ("val/mel_l1", "val mel L1"), ("d/loss", "D hinge loss"),
            ("g/adversarial", "G hinge loss")],
}
TITLES = {"tcnn": "TCNN stage", "codec": "VQ-VAE stage (16 kHz codec)", "gan": "GAN stage"}


def export_path(source: Path, best_name: str) -> Path:
    path = source / best_name if source.is_dir() else source
    if not path.is_file():
        raise ConchShellError(f"export not found: {path}")
    return path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConchShellError(f"{path}:{number}: not a JSON line: {exc}") from None
    return rows


def start_step(checkpoint: Path) -> int:
    """The step a ``train.init_from`` checkpoint was written at (from its name, else its contents)."""
    match = re.search(r"step=(\d+)", checkpoint.name)
    if match:
        return int(match.group(1))
    from conchshell.training.checkpointing import CheckpointManager

    return int(CheckpointManager.load(checkpoint)["step"])


def run_phases(folder: Path) -> list[tuple[Path, int]]:
    """The train.py runs behind a stage folder, oldest first, each with the step it starts at:
    a run started with ``train.init_from`` continues the run that wrote that checkpoint."""
    import yaml

    phases = [(folder, 0)]
    while (phases[0][0] / "config.yaml").is_file():
        config = yaml.safe_load((phases[0][0] / "config.yaml").read_text()) or {}
        init_from = (config.get("train") or {}).get("init_from")
        if not init_from:
            break
        source = Path(init_from)
        if not source.is_absolute() and not source.exists():
            source = ROOT / source  # train.py's commands run from the repository root
        if any(source.parent.resolve() == earlier.resolve() for earlier, _ in phases):
            break
        offset = start_step(source)
        phases = [(source.parent, 0)] + [(later, start + offset) for later, start in phases]
    return phases


def curve_points(run: str, phases: list[tuple[Path, int]]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per metrics.jsonl key of the run's panel, across its :func:`run_phases`."""
    ends = [start for _, start in phases[1:]] + [None]
    points: dict[str, list[tuple[int, float]]] = {}
    for (phase, start), end in zip(phases, ends):
        for row in read_metrics(phase):
            step = start + row["step"]
            if end is not None and step > end:
                continue  # past the checkpoint the next phase started from
            for key, _ in CURVES[run]:
                if key in row:
                    points.setdefault(key, []).append((step, row[key]))
    return points


def plot_curves(runs: dict[str, list[tuple[Path, int]]], out: Path) -> Path:
    """One panel per run (its :func:`run_phases`), a dotted line where each later phase starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conchshell.utils.files import atomic_write

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6))
    for axis, (run, phases) in zip(axes, runs.items()):
        points = curve_points(run, phases)
        for key, label in CURVES[run]:
            if points.get(key):
                steps, values = zip(*points[key])
                style = dict(marker="o", markersize=3) if key.startswith("val/") else dict(alpha=0.8)
                axis.plot(steps, values, label=label, **style)
        for _, start in phases[1:]:
            axis.axvline(start, color="grey", linestyle=":", linewidth=1)
            axis.annotate("init_from", (start, 0.02), xycoords=("data", "axes fraction"),
                          fontsize=7, rotation=90, va="bottom", ha="right", color="grey")
        axis.set_title(TITLES[run])
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)
    return out


def package(tcnn: Path, codec: Path, gan: Path, out_dir: Path, limit_mb: float) -> list[Path]:
    import torch
    import yaml

    from conchshell.config import config_to_dict
    from conchshell.export import load_generator_export, save_generator_export
    from conchshell.models.factory import build_codec, build_frontend
    from conchshell.utils.files import atomic_write

    sources = {run: export_path(path, WEIGHT_FILES[run][0]) for run, path in
               {"tcnn": tcnn, "codec": codec, "gan": gan}.items()}
    generator, config, meta = load_generator_export(sources["gan"])
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, feature_cache=None),
        train=dataclasses.replace(config.train, init_from=None),  # runs/*.yaml keep the record
        image=dataclasses.replace(config.image, tcnn_checkpoint=str(sources["tcnn"])),
        codec=dataclasses.replace(config.codec, checkpoint=str(sources["codec"])),
    )
    # Strict loads of what inference will build, before anything is written.
    build_frontend(config)
    build_codec(config)

    shipped = dataclasses.replace(
        config,
        image=dataclasses.replace(config.image, tcnn_checkpoint=WEIGHT_FILES["tcnn"][1]),
        codec=dataclasses.replace(config.codec, checkpoint=WEIGHT_FILES["codec"][1]),
    )
    staging = out_dir / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(sources["tcnn"], staging / WEIGHT_FILES["tcnn"][1])
    shutil.copyfile(sources["codec"], staging / WEIGHT_FILES["codec"][1])
    save_generator_export(staging / WEIGHT_FILES["gan"][1], generator, shipped, int(meta.get("step") or 0))
    weights = [staging / name for _, name in WEIGHT_FILES.values()]
    total_mb = sum(p.stat().st_size for p in weights) / 1e6
    if total_mb > limit_mb:
        shutil.rmtree(staging)
        raise ConchShellError(f"the demo weights take {total_mb:.2f} MB, over the {limit_mb:g} MB limit")
    for path in weights:  # prove they are weights-only files
        torch.load(path, map_location="cpu", weights_only=True)

    written = []
    for path in weights:
        target = out_dir / path.name
        path.replace(target)
        written.append(target)
    shutil.rmtree(staging)
    sums = "".join(f"{file_sha256(p)}  {p.name}\n" for p in written)
    atomic_write(out_dir / "SHA256SUMS", lambda handle: handle.write(sums.encode()))
    text = yaml.safe_dump(config_to_dict(shipped), sort_keys=False, default_flow_style=False)
    atomic_write(out_dir / "config.yaml", lambda handle: handle.write(text.encode()))
    runs = {run: path if path.is_dir() else path.parent for run, path in {"tcnn": tcnn, "codec": codec, "gan": gan}.items()}
    phases_of = {run: run_phases(folder) for run, folder in runs.items()}
    curves = plot_curves(phases_of, out_dir / "training_curves.png")
    run_configs = []
    for run, run_phase_list in phases_of.items():
        phases = [phase for phase, _ in run_phase_list]
        for number, phase in enumerate(phases, 1):
            if (phase / "config.yaml").is_file():
                target = out_dir / "runs" / (f"{run}.yaml" if number == len(phases) else f"{run}.phase{number}.yaml")
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(phase / "config.yaml", target)
                run_configs.append(target)
    print(f"packaged {', '.join(p.name for p in written)} ({total_mb:.2f} MB of {limit_mb:g} MB) into {out_dir}")
    return [*written, out_dir / "SHA256SUMS", out_dir / "config.yaml", curves, *run_configs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcnn", type=Path, default=ROOT / "runs/demo/tcnn", help="tcnn stage folder or TCNN export")
    parser.add_argument("--codec", type=Path, default=ROOT / "runs/demo/vqvae", help="vqvae stage folder or codec export")
    parser.add_argument("--gan", type=Path, default=ROOT / "runs/demo/gan", help="gan stage folder or G export")
    parser.add_argument("--out", type=Path, default=ROOT / "weights/demo", help="package folder (default weights/demo)")
    parser.add_argument("--limit-mb", type=float, default=25.0, help="size limit of the three weight files (MB)")
    args = parser.parse_args(argv)
    try:
        package(args.tcnn, args.codec, args.gan, args.out, args.limit_mb)
    except ConchShellError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
