"""Score generated music against references: PESQ, STOI, spectral distances, register, class consistency.

    python scripts/evaluate.py --generated DIR --reference DIR [--untrained DIR] [--out DIR]
        [--checkpoint G.pt] [--data MANIFEST | --labels CSV] [--classifier PATH]
    python scripts/evaluate.py --checkpoint G.pt --data MANIFEST [--split val] [--limit N]
        [--untrained-baseline] [--seed N] [--out DIR]

Directory mode pairs ``--generated`` and ``--reference`` files by file name (.wav/.flac);
``--untrained`` is a folder of clips with the same names, scored as the untrained baseline.
Checkpoint mode first generates one clip per image of the manifest's split (the image's
paired piece, centre window, peak-normalised, is the reference), writes them to
``OUT/generated``, ``OUT/reference`` and ``OUT/codec`` plus ``OUT/labels.csv``, then scores
those files exactly as directory mode would, so ``--generated OUT/generated --reference
OUT/reference --labels OUT/labels.csv`` (plus ``--untrained OUT/untrained`` for the baseline,
and ``--classifier OUT/audio_classifier.pt`` for class consistency) reproduces the numbers.
``--untrained-baseline`` also generates with an untrained generator of the checkpoint's
architecture (fresh weights drawn after ``torch.manual_seed(--seed)``, same frontend, TCNN
class, codec and ``--class-source``) into ``OUT/untrained``: the floor the trained model
must clearly beat, scored as the system "untrained_generator".

All audio is read as stored (no normalisation), mixed to mono, resampled to 16 kHz when
needed (soxr HQ) and trimmed to the shorter of each pair. Scores (see
conchshell.evaluation.metrics): wide-band PESQ and STOI, as in the paper's Table 2;
log-mel L1 and multi-resolution STFT distance; the same scores for every other system:
the untrained generator when given, and with a checkpoint codec(reference) vs reference,
the ceiling the generator can reach through its codec; register agreement: the
correlation over items between each clip's and its reference's mean spectral pitch (MIDI
semitones) and their mean absolute difference (``reference_register`` and ``register``
columns per item); class consistency: an audio
classifier trained on the reference clips of the manifest's train split (or
``--classifier``) predicts each clip's class (every system's, and the reference's),
compared with the image's class (``--labels`` CSV ``name,class``, or the manifest) and with
chance (1/6). Without labels the target is the classifier's prediction for the reference
clip (agreement). ``--classifier-domain codec`` trains that classifier on the checkpoint
codec's reconstructions of the train clips instead: a generator can only make audio its
codec can decode, and a classifier that has only heard clean recordings may mistake any
codec's artefacts for a class (the codec-ceiling row shows how well each classifier
recognises the classes through the codec).

PESQ cannot score clips it finds no "utterance" in (often music or silence): such items
are counted and listed, never crash the run and never enter the mean; the table shows
valid/total. Writes OUT/metrics.json, OUT/metrics.csv (one row per system and metric)
and OUT/items.csv (per item; the other systems' columns are prefixed ``untrained_`` and
``ceiling_``). Exit status 1 when some item could not be read or generated, or lacks its
``--untrained`` clip (the report is still written), 0 otherwise.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conchshell.constants import CLASS_NAMES, CLIP_SECONDS, INFERENCE_PRECISIONS  # noqa: E402
from conchshell.data.audio import load_audio  # noqa: E402
from conchshell.errors import ConchShellError, DataError  # noqa: E402
from conchshell.utils.host_memory import keep_freed_memory  # noqa: E402

EVAL_RATE = 16_000
AUDIO_SUFFIXES = (".wav", ".flac")
METRICS = ("pesq", "stoi", "mel_l1", "mrstft", "register")


@dataclass(frozen=True)
class System:
    """How one scored system is named in the table, on disk and in items.csv."""

    title: str  # row of the printed table
    folder: str  # checkpoint mode writes its clips to OUT/<folder>; directory mode reads --<folder> DIR
    prefix: str  # of its per-item columns in items.csv


# Every system scored against the references, in report order. "generated" is always there;
# the others only when some item has a clip for them (EvalItem.others).
SYSTEMS = {
    "generated": System("generated", "generated", ""),
    "untrained_generator": System("untrained generator", "untrained", "untrained_"),
    "codec_ceiling": System("codec ceiling", "codec", "ceiling_"),
}


@dataclass
class EvalItem:
    name: str
    reference: Path
    generated: Path
    others: dict[str, Path] = field(default_factory=dict)  # SYSTEMS key -> clip, besides "generated"
    target: int | None = None  # class id the clip should sound like, when known


# ----------------------------------------------------------------------------- inputs


def read_clip(path: Path, sample_rate: int = EVAL_RATE) -> np.ndarray:
    """A file as stored: mono (channel mean) float32 at ``sample_rate``; no level change."""
    return load_audio(path, sample_rate, normalize=False)


def pair_directories(generated: Path, reference: Path, others: dict[str, Path] | None = None
                     ) -> tuple[list[EvalItem], dict[str, list[str]], list[dict]]:
    """Items whose file name is in both ``generated`` and ``reference``, each with its clip from
    the folder of every system in ``others`` (SYSTEMS key -> folder).

    Also returns the names that were left unpaired, and an error for each item that one of
    ``others`` lacks (the item is still scored for the systems it has).
    """
    others = others or {}
    flags = [(generated, "--generated"), (reference, "--reference"),
             *((folder, f"--{SYSTEMS[system].folder}") for system, folder in others.items())]
    for folder, what in flags:
        if not folder.is_dir():
            raise DataError(f"{what} folder not found: {folder}")

    def listing(folder: Path) -> dict[str, Path]:
        return {p.name: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES}

    gen, ref = listing(generated), listing(reference)
    names = sorted(set(gen) & set(ref))
    if not names:
        raise DataError(f"no file name is in both {generated} and {reference} ({', '.join(AUDIO_SUFFIXES)} files)")
    listings = {system: listing(folder) for system, folder in others.items()}
    items = [EvalItem(name, ref[name], gen[name], {system: files[name] for system, files in listings.items()
                                                   if name in files}) for name in names]
    unpaired = {"generated_only": sorted(set(gen) - set(ref)), "reference_only": sorted(set(ref) - set(gen))}
    errors = []
    for system, files in listings.items():
        unpaired[f"{SYSTEMS[system].folder}_only"] = sorted(set(files) - set(names))
        errors += [{"item": name, "error": f"no {SYSTEMS[system].title} clip of this name in {others[system]}"}
                   for name in names if name not in files]
    return items, unpaired, errors


def read_labels(path: Path) -> dict[str, int]:
    """``name,class`` CSV -> {file name or stem: class id}."""
    from conchshell.data.manifest import parse_class

    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    labels: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"name", "class"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected a CSV with the columns name,class")
        for row_number, row in enumerate(reader, start=2):
            class_id = parse_class(row["class"])
            if class_id is None:
                raise DataError(f"{path}: unknown class {row['class']!r} (row {row_number}); "
                                f"expected one of {', '.join(CLASS_NAMES)}")
            labels[row["name"]] = class_id
    return labels


def manifest_labels(records: list) -> dict[str, int]:
    """{image stem: class} from manifest records (inference.py names a wav after its image)."""
    return {record.image.stem: record.class_id for record in records}


def attach_targets(items: list[EvalItem], labels: dict[str, int]) -> int:
    """Give each item its class from ``labels`` (by file name, then stem); returns how many got one."""
    found = 0
    for item in items:
        stem = Path(item.name).stem
        item.target = labels.get(item.name, labels.get(stem))
        found += item.target is not None
    return found


# ----------------------------------------------------------------------------- classifier


def classifier_from_manifest(records: list, clip_seconds: float, out_dir: Path,
                             codec_model: Any | None = None) -> tuple[Any, dict[str, Any]]:
    """Train the class-consistency classifier on the train split's reference pieces and save it.

    With ``codec_model`` (an ImageToMusic) it trains on the codec's reconstructions of those
    pieces instead: the "codec domain", the only audio a generator behind that codec can make.
    """
    from conchshell.data.manifest import select_split
    from conchshell.evaluation import fit_audio_classifier, reference_windows, save_audio_classifier

    clip_samples = round(clip_seconds * EVAL_RATE)
    pieces: dict[Path, int] = {}
    for record in select_split(records, "train"):
        pieces.setdefault(record.audio, record.class_id)  # many images share one piece
    if not pieces:
        raise DataError("the manifest has no train split to train the audio classifier on")
    if codec_model is not None and codec_model.sample_rate != EVAL_RATE:
        raise DataError(f"--classifier-domain codec needs a {EVAL_RATE} Hz model, this one makes "
                        f"{codec_model.sample_rate} Hz audio")
    clips, labels = [], []
    for audio_path, class_id in sorted(pieces.items()):
        for window in reference_windows(load_audio(audio_path, EVAL_RATE), clip_samples):
            clips.append(window if codec_model is None else codec_model.reconstruct(window).astype(np.float32))
            labels.append(class_id)
    model, accuracy = fit_audio_classifier(np.stack(clips), labels)
    path = save_audio_classifier(model, out_dir / "audio_classifier.pt", accuracy, len(clips))
    domain = "reference" if codec_model is None else "codec"
    return model, {"path": str(path), "trained_on": "manifest train split", "domain": domain,
                   "num_train_clips": len(clips), "num_train_pieces": len(pieces), "train_accuracy": accuracy}


def load_classifier(path: Path) -> tuple[Any, dict[str, Any]]:
    from conchshell.evaluation import load_audio_classifier
    from conchshell.utils.checkpoint import read_weights

    model = load_audio_classifier(path)
    data = read_weights(path)
    return model, {"path": str(path), "trained_on": "given", "train_accuracy": data.get("train_accuracy"),
                   "num_train_clips": data.get("num_train_clips")}


# ----------------------------------------------------------------------------- generation


def untrained_twin(model: Any, seed: int) -> Any:
    """``model`` with its generator replaced by a freshly initialised one of the same architecture.

    Same frontend (so the same TCNN class) and codec: only the training differs, which makes
    it the baseline the trained generator has to beat. Seeded here, so its weights do not
    depend on what was built before it.
    """
    import torch

    from conchshell.inference import ImageToMusic
    from conchshell.models.generator import build_generator, freeze_for_inference
    from conchshell.utils.precision import synthesis_precision

    torch.manual_seed(seed)
    # hparams is the export's generator_hparams as rebuilt by load_generator_export.
    generator = freeze_for_inference(build_generator(**model.generator.hparams),
                                     synthesis_precision(model.precision))
    meta = {"checkpoint": f"the untrained generator (architecture of {model.meta.get('checkpoint')}, seed {seed})"}
    return ImageToMusic(generator, model.frontend, model.codec, model.config, model.device, meta, model.max_pixels,
                        model.precision)


def generate_clips(models: dict[str, Any], records: list, out_dir: Path, class_source: str
                   ) -> tuple[list[EvalItem], list[dict]]:
    """Generate with every model (SYSTEMS key -> ImageToMusic), and write each system's wavs,
    the reference wavs and labels.csv under ``out_dir``.

    ``models["generated"]`` is the trained model: its codec gives the codec ceiling and its
    TCNN the labels' ``tcnn_prediction``. The models share its frontend (the untrained
    baseline is built behind it), so each image goes through TCNN and I3D once.
    """
    import torch
    from tqdm import tqdm

    from conchshell.data.audio import center_crop_or_pad, load_audio
    from conchshell.inference import ensure_writable_dir, write_wav

    trained = models["generated"]
    if any(model.frontend is not trained.frontend for model in models.values()):
        raise ValueError("every evaluated model must share the trained model's frontend")
    folders = {kind: ensure_writable_dir(out_dir / SYSTEMS[kind].folder) for kind in (*models, "codec_ceiling")}
    folders["reference"] = ensure_writable_dir(out_dir / "reference")
    items: list[EvalItem] = []
    errors: list[dict] = []
    label_rows = []
    for index, record in enumerate(tqdm(records, unit="clip", dynamic_ncols=True, desc="generating")):
        name = f"{index:05d}_{record.image.stem}.wav"
        override = torch.tensor([record.class_id]) if class_source == "label" else None
        try:
            conditioning = trained.image_features(trained.prepare(record.image).unsqueeze(0))
            audio = {system: model.generate_from_features(*conditioning, override)[0][0].numpy()
                     for system, model in models.items()}
            predicted = int(conditioning[1][0])
            reference = center_crop_or_pad(load_audio(record.audio, trained.sample_rate), trained.clip_samples)
            clips = {**audio, "codec_ceiling": trained.reconstruct(reference), "reference": reference}
            paths = {kind: write_wav(folders[kind] / name, clip, trained.sample_rate) for kind, clip in clips.items()}
        except ConchShellError as exc:
            errors.append({"item": str(record.image), "error": str(exc)})
            continue
        label_rows.append((name, CLASS_NAMES[record.class_id], CLASS_NAMES[predicted]))
        items.append(EvalItem(name, paths.pop("reference"), paths.pop("generated"), paths, record.class_id))
    with open(out_dir / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("name", "class", "tcnn_prediction"))
        writer.writerows(label_rows)
    return items, errors


def codec_reconstructions(model: Any, items: list[EvalItem], out_dir: Path) -> list[dict]:
    """Write codec(reference) for directory mode under ``out_dir/codec``."""
    from conchshell.inference import ensure_writable_dir, write_wav

    folder = ensure_writable_dir(out_dir / SYSTEMS["codec_ceiling"].folder)
    errors = []
    for item in items:
        try:
            reference = read_clip(item.reference, model.sample_rate)
            item.others["codec_ceiling"] = write_wav(folder / item.name, model.reconstruct(reference),
                                                     model.sample_rate)
        except ConchShellError as exc:
            errors.append({"item": item.name, "error": str(exc)})
    return errors


# ----------------------------------------------------------------------------- scoring


class SystemScores:
    """The signal metrics (METRICS) for one system (one of SYSTEMS) against references."""

    def __init__(self) -> None:
        from conchshell.evaluation import PESQ, STOI, MelDistance, MultiResolutionSTFT, RegisterAgreement

        self.metrics = {"pesq": PESQ(), "stoi": STOI(), "mel_l1": MelDistance(EVAL_RATE),
                        "mrstft": MultiResolutionSTFT(), "register": RegisterAgreement(EVAL_RATE)}

    def update(self, name: str, reference: np.ndarray, estimate: np.ndarray) -> dict[str, float | None]:
        row: dict[str, Any] = {}
        for key, metric in self.metrics.items():
            if key in ("pesq", "stoi"):
                row[key] = metric.update(reference, estimate, EVAL_RATE, item=name)
            else:
                row[key] = metric.update(reference, estimate, item=name)
        pesq_failures = self.metrics["pesq"].failures
        row["pesq_error"] = pesq_failures[-1][1] if pesq_failures and pesq_failures[-1][0] == name else ""
        return row

    def compute(self) -> dict[str, dict[str, Any]]:
        return {key: metric.compute() for key, metric in self.metrics.items()}

    def failures(self) -> dict[str, list[list[str]]]:
        return {key: [list(f) for f in metric.failures] for key, metric in self.metrics.items() if metric.failures}


def score_items(items: list[EvalItem], classifier: Any | None) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """Score every item; returns (summary per system, per-item rows, items that could not be read)."""
    from tqdm import tqdm

    from conchshell.evaluation import ClassConsistency, spectral_pitch

    present = [system for system in SYSTEMS if system == "generated" or any(system in item.others for item in items)]
    systems = {system: SystemScores() for system in present}
    consistency = {kind: ClassConsistency() for kind in (*present, "reference")}
    use_labels = any(item.target is not None for item in items)
    rows, errors = [], []
    for item in tqdm(items, unit="clip", dynamic_ncols=True, desc="scoring"):
        try:
            reference = read_clip(item.reference)
            clips = {"generated": read_clip(item.generated),
                     **{system: read_clip(path) for system, path in item.others.items()}}
        except ConchShellError as exc:
            errors.append({"item": item.name, "error": str(exc)})
            continue
        row: dict[str, Any] = {"name": item.name, "reference_register": spectral_pitch(reference, EVAL_RATE)}
        for system, clip in clips.items():
            for key, value in systems[system].update(item.name, reference, clip).items():
                row[SYSTEMS[system].prefix + key] = value
        if classifier is not None:
            predictions = {kind: int(classifier.predict(clip.reshape(1, -1))[0])
                           for kind, clip in {**clips, "reference": reference}.items()}
            target = item.target if use_labels else predictions["reference"]
            if target is not None:
                for kind, predicted in predictions.items():
                    consistency[kind].update([predicted], [target])
                row["class_target"] = CLASS_NAMES[target]
            row.update({f"class_{kind}": CLASS_NAMES[p] for kind, p in predictions.items()})
        rows.append(row)
    summary: dict[str, Any] = {system: scores.compute() for system, scores in systems.items()}
    if classifier is not None:
        for kind, metric in consistency.items():
            summary.setdefault(kind, {})["class_consistency"] = metric.compute()
    failures = {system: scores.failures() for system, scores in systems.items()}
    return {"systems": summary, "failures": failures,
            "class_target": None if classifier is None else ("label" if use_labels else "reference_prediction")
            }, rows, errors


# ----------------------------------------------------------------------------- reports


def _cell(result: dict[str, Any] | None, digits: int, counts: bool) -> str:
    if not result:
        return "-"
    mean = result.get("mean", result.get("accuracy"))
    text = "n/a" if mean is None else f"{mean:.{digits}f}"
    if counts:
        valid = result.get("n_valid", result.get("n_correct"))
        text += f" ({valid}/{result['n_total']})"
    return text


def _register_cell(result: dict[str, Any] | None) -> str:
    if not result:
        return "-"
    r = "n/a" if result["r"] is None else f"{result['r']:.3f}"
    mae = "n/a" if result["mean"] is None else f"{result['mean']:.1f} st"
    return f"{r} ({mae})"


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table in the spirit of the paper's Table 2, one row per system."""
    header = ["system", "PESQ (valid/n)", "STOI (valid/n)", "mel L1", "MR-STFT", "register r (MAE)",
              "class acc (correct/n)"]
    lines = []
    titles = {**{system: spec.title for system, spec in SYSTEMS.items()}, "reference": "reference"}
    for system, scores in report["systems"].items():
        lines.append([titles.get(system, system), _cell(scores.get("pesq"), 3, True), _cell(scores.get("stoi"), 3, True),
                      _cell(scores.get("mel_l1"), 3, False), _cell(scores.get("mrstft"), 3, False),
                      _register_cell(scores.get("register")), _cell(scores.get("class_consistency"), 3, True)])
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header] + lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    notes = []
    for system, scores in report["systems"].items():
        pesq = scores.get("pesq")
        if pesq and pesq["n_failed"]:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in pesq["failure_reasons"].items())
            notes.append(f"PESQ could not score {pesq['n_failed']} of {pesq['n_total']} {titles[system]} clips "
                         f"({reasons}); they are not in the mean")
    if report.get("class_target"):
        target = "the image's class" if report["class_target"] == "label" else "the reference clip's predicted class"
        notes.append(f"class acc: audio classifier's prediction vs {target}; chance = {1 / len(CLASS_NAMES):.3f}")
    notes.append("register r (MAE): correlation over items of the clip's and its reference's mean spectral pitch "
                 "(n/a: one side never varies), and their mean absolute difference in semitones")
    return "\n".join(text + notes)


def write_reports(out_dir: Path, report: dict[str, Any], rows: list[dict]) -> list[Path]:
    """metrics.json (everything), metrics.csv (summary rows) and items.csv (per item)."""
    from conchshell.inference import atomic_output

    def clean(value: Any) -> Any:  # JSON has no NaN/inf
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    paths = [out_dir / "metrics.json", out_dir / "metrics.csv", out_dir / "items.csv"]
    with atomic_output(paths[0]) as temp:
        temp.write_text(json.dumps(clean(report), indent=2) + "\n", encoding="utf-8")
    with atomic_output(paths[1]) as temp, open(temp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("system", "metric", "mean", "std", "n_valid", "n_total", "n_failed"))
        for system, scores in report["systems"].items():
            for key in METRICS:
                if key in scores:
                    r = scores[key]
                    writer.writerow((system, key, r["mean"], r["std"], r["n_valid"], r["n_total"], r["n_failed"]))
            if "register" in scores:
                writer.writerow((system, "register_r", scores["register"]["r"], "", scores["register"]["n_valid"],
                                 scores["register"]["n_total"], ""))
            if "class_consistency" in scores:
                r = scores["class_consistency"]
                writer.writerow((system, "class_accuracy", r["accuracy"], "", r["n_correct"], r["n_total"], ""))
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with atomic_output(paths[2]) as temp, open(temp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or ["name"], restval="")
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    return paths


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--generated", type=Path, help="folder of generated clips (directory mode)")
    parser.add_argument("--reference", type=Path, help="folder of reference clips with the same file names")
    parser.add_argument("--untrained", type=Path, help="directory mode: folder of the untrained generator's clips "
                        "with the same file names (checkpoint mode's OUT/untrained)")
    parser.add_argument("--checkpoint", type=Path, help="generator export: generates (with --data), "
                        "and gives the codec for the reconstruction ceiling")
    parser.add_argument("--data", type=Path, help="dataset manifest (CSV or Label.xlsx)")
    parser.add_argument("--split", choices=("train", "val"), default="val", help="split to generate for (default val)")
    parser.add_argument("--limit", type=int, help="score only the first N items of the split")
    parser.add_argument("--labels", type=Path, help="directory mode: CSV name,class giving each clip's image class")
    parser.add_argument("--classifier", type=Path, help="audio classifier file (default: train one on --data's train split)")
    parser.add_argument("--classifier-domain", choices=("reference", "codec"), default="reference",
                        help="train the audio classifier on the train split's reference clips (default) or on "
                             "the checkpoint codec's reconstructions of them")
    parser.add_argument("--class-source", choices=("tcnn", "label"), default="tcnn",
                        help="checkpoint mode: condition on the TCNN's prediction (as inference does) or the label")
    parser.add_argument("--untrained-baseline", action="store_true",
                        help="checkpoint mode: also score an untrained generator of the checkpoint's architecture")
    parser.add_argument("--out", type=Path, default=Path("eval"), help="output folder (default eval/)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (checkpoint mode)")
    parser.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="fp32",
                        help="checkpoint mode: the precision generation runs at, as inference.py --precision "
                             "(default fp32)")
    parser.add_argument("--seed", type=int, default=0, help="also initialises the untrained generator (default 0)")
    args = parser.parse_args(argv)
    directory_mode = args.generated is not None or args.reference is not None
    if directory_mode and (args.generated is None or args.reference is None):
        parser.error("directory mode needs both --generated and --reference")
    if not directory_mode and (args.checkpoint is None or args.data is None):
        parser.error("give --generated and --reference, or --checkpoint and --data")
    if directory_mode and args.untrained_baseline:
        parser.error("--untrained-baseline needs checkpoint mode; in directory mode give --untrained DIR")
    if not directory_mode and args.untrained is not None:
        parser.error("--untrained DIR is for directory mode; in checkpoint mode use --untrained-baseline")
    if args.classifier_domain == "codec" and (args.checkpoint is None or args.data is None or args.classifier):
        parser.error("--classifier-domain codec trains a classifier: it needs --checkpoint and --data, "
                     "and no --classifier")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    from conchshell.data.manifest import read_manifest, select_split
    from conchshell.inference import ImageToMusic, ensure_writable_dir, seed_all

    out_dir = ensure_writable_dir(args.out)
    seed_all(args.seed)
    directory_mode = args.generated is not None
    model = None
    if args.checkpoint is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the seeded smoke-test codec's notice
            model = ImageToMusic.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision)
    records = read_manifest(args.data, seed=model.config.data.split_seed if model else 0) if args.data else None

    report: dict[str, Any] = {"mode": "directories" if directory_mode else "checkpoint", "sample_rate": EVAL_RATE,
                              "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                              "precision": args.precision if args.checkpoint else None,
                              "data": str(args.data) if args.data else None}
    errors: list[dict] = []
    if directory_mode:
        others = {} if args.untrained is None else {"untrained_generator": args.untrained}
        items, unpaired, errors = pair_directories(args.generated, args.reference, others)
        report.update(generated_dir=str(args.generated), reference_dir=str(args.reference),
                      untrained_dir=None if args.untrained is None else str(args.untrained), unpaired=unpaired)
        labels = read_labels(args.labels) if args.labels else (manifest_labels(records) if records else {})
        report["n_labelled"] = attach_targets(items, labels)
        if model is not None:
            errors += codec_reconstructions(model, items, out_dir)
    else:
        split_records = select_split(records, args.split)[: args.limit]
        if not split_records:
            raise DataError(f"{args.data} has no {args.split} items")
        report.update(split=args.split, class_source=args.class_source)
        models = {"generated": model}
        if args.untrained_baseline:
            models["untrained_generator"] = untrained_twin(model, args.seed)
            report["untrained_baseline"] = {"seed": args.seed, "generator_hparams": model.generator.hparams}
        items, errors = generate_clips(models, split_records, out_dir, args.class_source)

    classifier, classifier_info = None, None
    if args.classifier is not None:
        classifier, classifier_info = load_classifier(args.classifier)
    elif records is not None:
        clip_seconds = model.config.data.clip_seconds if model else CLIP_SECONDS
        codec_model = model if args.classifier_domain == "codec" else None
        classifier, classifier_info = classifier_from_manifest(records, clip_seconds, out_dir, codec_model)
    report["classifier"] = classifier_info

    scores, rows, read_errors = score_items(items, classifier)
    errors += read_errors
    report.update(scores, n_items=len(rows), errors=errors)
    paths = write_reports(out_dir, report, rows)
    print(format_table(report))
    if classifier is None:
        print("class consistency: skipped (give --data MANIFEST to train the audio classifier, or --classifier)")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    if errors:
        print(f"error: {len(errors)} item(s) could not be evaluated:", file=sys.stderr)
        for error in errors:
            print(f"  {error['item']}: {error['error']}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    try:
        return run(args)
    except ConchShellError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
