"""Real piano music for the demo corpus: score excerpts chosen and shaped by class traits.

The image -> music relation of the demo corpus is a deterministic, measurable rule. Every
scene class owns a target set of musical traits (:data:`CLASS_TRAITS`):

=============  =====  ===============  =========  ==================  ========
class          mode   register centre  tempo      note density        velocity
=============  =====  ===============  =========  ==================  ========
coast          major  MIDI 58 (A#3)    80 bpm     4 - 9 notes/s       76
island         major  MIDI 72 (C5)     100 bpm    5 - 11 notes/s      84
sand_beach     major  MIDI 65 (F4)     63 bpm     3 - 7 notes/s       64
coral_reef     major  MIDI 80 (G#5)    126 bpm    8 - 16 notes/s      92
deep           minor  MIDI 43 (G2)     54 bpm     2 - 6 notes/s       56
ocean_wave     minor  MIDI 52 (E3)     144 bpm    9 - 20 notes/s      108
=============  =====  ===============  =========  ==================  ========

A clip of a class is made like this:

1. Walk the music21 corpus pieces in a seeded order (:func:`candidate_order`).
2. Play the piece at the class tempo (the score's own tempo marks are ignored) and cut
   8-second windows that start on a beat, in a seeded order.
3. Keep the first window whose *measured* mode (Krumhansl-Schmuckler key estimate on the
   duration-weighted pitch classes, :func:`estimate_key`) equals the class mode and whose
   note density falls in the class band; otherwise try the next window, then the next piece.
4. Transpose it so its mean pitch lands on the class register centre (octave-fold the few
   notes that would leave the piano's range), and give every note the class velocity
   with a small seeded jitter.
5. Render it as solo piano (General MIDI program 0) with TinySoundFont and the TimGM6mb
   soundfont, 16 kHz mono, exactly 128000 samples, peak-normalised.

The traits are then measured again on the rendered notes (:func:`measure_traits`) and
stored per clip, so an evaluation can ask whether generated audio carries its class:
register alone separates the six classes (centres 6+ semitones apart), and mode, tempo and
density separate them a second time.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from conchshell.constants import CLIP_SECONDS, SAMPLE_RATE
from conchshell.errors import DataError

PIANO_LOW, PIANO_HIGH = 21, 108  # A0 .. C8, the 88 keys
PITCH_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


@dataclass(frozen=True)
class ClassTraits:
    """Musical targets a scene class is paired with (see the module docstring)."""

    mode: str  # "major" or "minor"
    register_centre: float  # target mean MIDI pitch of a clip
    tempo_bpm: float  # quarter notes per minute
    density: tuple[float, float]  # allowed notes per second, [low, high)
    velocity: int  # MIDI velocity before jitter


CLASS_TRAITS: dict[str, ClassTraits] = {
    "coast": ClassTraits("major", 58.0, 80.0, (4.0, 9.0), 76),
    "island": ClassTraits("major", 72.0, 100.0, (5.0, 11.0), 84),
    "sand_beach": ClassTraits("major", 65.0, 63.0, (3.0, 7.0), 64),
    "coral_reef": ClassTraits("major", 80.0, 126.0, (8.0, 16.0), 92),
    "deep": ClassTraits("minor", 43.0, 54.0, (2.0, 6.0), 56),
    "ocean_wave": ClassTraits("minor", 52.0, 144.0, (9.0, 20.0), 108),
}

# Longer keyboard pieces, songs and string-quartet movements that enrich the chorales.
# Each parses in 0.5-2 s, so they are mixed in sparingly (see `candidate_order`).
FEATURED_WORKS: tuple[str, ...] = (
    "bach/bwv846.mxl",
    "mozart/k545/movement1_exposition.mxl",
    "joplin/maple_leaf_rag.mxl",
    "schumann_clara/polonaise_op1n1.mxl",
    "schumann_clara/polonaise_op1n2.mxl",
    "schumann_clara/polonaise_op1n3.mxl",
    "schumann_clara/polonaise_op1n4.mxl",
    "chopin/mazurka06-2.krn",
    "cpebach/h186.mxl",
    "schubert/Lindenbaum.xml",
    "handel/rinaldo/Lascia_chio_pianga.mxl",
    "liliuokalani/aloha_oe.mxl",
    "haydn/opus1no1/movement1.mxl",
    "haydn/opus1no1/movement3.mxl",
    "mozart/k155/movement1.mxl",
    "mozart/k156/movement1.mxl",
    "mozart/k80/movement1.mxl",
    "beethoven/opus18no1/movement3.mxl",
)
FEATURED_EVERY = 3  # every third candidate comes from FEATURED_WORKS


# Krumhansl-Kessler key profiles (probe-tone ratings), index 0 = tonic.
_MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


@dataclass(frozen=True)
class ScoreNote:
    """One pitched note of a score, in quarter lengths from the start of the piece."""

    offset: float
    duration: float
    pitch: int


@dataclass(frozen=True)
class NoteEvent:
    """One note to play, in seconds from the start of the clip."""

    start: float
    end: float
    pitch: int
    velocity: int


@dataclass(frozen=True)
class ClipTraits:
    """Traits measured on the notes a clip actually plays."""

    mean_pitch: float
    notes_per_second: float
    mode: str
    tonic: str
    key_correlation: float


@dataclass(frozen=True)
class ClipPlan:
    """Everything needed to render a clip and to document where it came from."""

    class_name: str
    source: str  # corpus-relative path, e.g. "bach/bwv10.7.mxl"
    start_quarter: float
    transpose: int
    tempo_bpm: float
    events: tuple[NoteEvent, ...]
    traits: ClipTraits


def corpus_root() -> Path:
    """Folder of the installed music21 corpus."""
    import music21

    return Path(music21.__file__).parent / "corpus"


def chorale_paths() -> list[str]:
    """All Bach chorale scores of the installed music21 corpus, corpus-relative, sorted."""
    folder = corpus_root() / "bach"
    if not folder.is_dir():
        raise DataError(f"{folder}: music21 corpus not found (install the full `music21` wheel)")
    # Only the single-work .mxl files: the .krn/.xml duplicates and the -inst/-a variants
    # would let one chorale appear several times.
    names = sorted(p.name for p in folder.glob("bwv*.mxl") if "-" not in p.name)
    return [f"bach/{name}" for name in names if name != "bwv846.mxl"]


def candidate_order(rng: np.random.Generator) -> list[str]:
    """Seeded order in which pieces are tried: chorales, with a featured work every third."""
    all_chorales = chorale_paths()
    chorales = [all_chorales[i] for i in rng.permutation(len(all_chorales))]
    featured = [FEATURED_WORKS[i] for i in rng.permutation(len(FEATURED_WORKS))]
    order: list[str] = []
    while chorales or featured:
        take_featured = featured and (len(order) % FEATURED_EVERY == FEATURED_EVERY - 1 or not chorales)
        order.append(featured.pop(0) if take_featured else chorales.pop(0))
    return order


def load_score_notes(source: str) -> list[ScoreNote]:
    """Parse a corpus score into its pitched notes (ties merged, grace notes dropped)."""
    from music21 import chord, converter

    path = corpus_root() / source
    if not path.is_file():
        raise DataError(f"{path}: score not found in the music21 corpus")
    with warnings.catch_warnings():
        # Old encodings trigger harmless music21 warnings about measure attributes.
        warnings.simplefilter("ignore")
        # storePickle=False: music21 would otherwise cache a pickle outside the output folder.
        score = converter.parse(str(path), forceSource=True, storePickle=False)
        score.stripTies(inPlace=True)
        notes: list[ScoreNote] = []
        for element in score.flatten().notes:
            duration = float(element.quarterLength)
            if duration <= 0:
                continue
            pitches = element.pitches if isinstance(element, chord.Chord) else (element.pitch,)
            # In a flattened stream .offset is the absolute position in the piece.
            notes.extend(ScoreNote(float(element.offset), duration, int(p.midi)) for p in pitches)
    # Unisons between voices would strike one key twice at once.
    unique = {(n.offset, n.pitch): n for n in notes}
    return sorted(unique.values(), key=lambda n: (n.offset, n.pitch, n.duration))


def estimate_key(pitches: Sequence[int], weights: Sequence[float]) -> tuple[str, str, float]:
    """Krumhansl-Schmuckler key estimate: (tonic name, "major"/"minor", correlation)."""
    histogram = np.zeros(12)
    np.add.at(histogram, np.asarray(pitches, dtype=np.int64) % 12, np.asarray(weights, dtype=np.float64))
    best = ("C", "major", -2.0)
    for mode, profile in (("major", _MAJOR_PROFILE), ("minor", _MINOR_PROFILE)):
        for tonic in range(12):
            r = float(np.corrcoef(histogram, np.roll(profile, tonic))[0, 1]) if histogram.std() > 0 else 0.0
            if r > best[2] + 1e-12:
                best = (PITCH_NAMES[tonic], mode, r)
    return best


def measure_traits(events: Sequence[NoteEvent], seconds: float = CLIP_SECONDS) -> ClipTraits:
    """Mean pitch, notes per second and key of the notes that start inside the clip."""
    inside = [e for e in events if e.start < seconds]
    if not inside:
        raise DataError("a clip has no notes")
    pitches = [e.pitch for e in inside]
    durations = [min(e.end, seconds) - e.start for e in inside]
    tonic, mode, r = estimate_key(pitches, durations)
    return ClipTraits(
        mean_pitch=float(np.mean(pitches)),
        notes_per_second=len(inside) / seconds,
        mode=mode,
        tonic=tonic,
        key_correlation=r,
    )


def _window(notes: Sequence[ScoreNote], start_q: float, span_q: float, seconds_per_q: float) -> list[NoteEvent]:
    """Notes sounding in [start_q, start_q + span_q), as clip-relative events (velocity 0)."""
    events = []
    for n in notes:
        # Notes already sounding at the window start are dropped: a clip starts on attacks.
        if not start_q <= n.offset < start_q + span_q:
            continue
        events.append(NoteEvent((n.offset - start_q) * seconds_per_q, (n.offset + n.duration - start_q) * seconds_per_q, n.pitch, 0))
    return events


def _covers(events: Sequence[NoteEvent], seconds: float) -> bool:
    """True if the notes leave no silent gap longer than one second inside the clip."""
    edge = 0.0
    for e in sorted(events, key=lambda e: e.start):
        if e.start - edge > 1.0:
            return False
        edge = max(edge, e.end)
    return seconds - edge <= 1.0


def _fold_into_piano(pitch: int) -> int:
    while pitch < PIANO_LOW:
        pitch += 12
    while pitch > PIANO_HIGH:
        pitch -= 12
    return pitch


def _shape(events: Sequence[NoteEvent], transpose: int, traits: ClassTraits, rng: np.random.Generator) -> list[NoteEvent]:
    """Transpose, set velocities (class level, seeded jitter, beat accents), clean overlaps."""
    seconds_per_beat = 60.0 / traits.tempo_bpm
    shaped = []
    for e in events:
        on_beat = abs(e.start / seconds_per_beat - round(e.start / seconds_per_beat)) < 1e-6
        velocity = traits.velocity + int(rng.integers(-8, 9)) + (6 if on_beat else 0)
        shaped.append(NoteEvent(e.start, e.end, _fold_into_piano(e.pitch + transpose), int(np.clip(velocity, 1, 127))))
    shaped.sort(key=lambda e: (e.start, e.pitch))
    # A key struck again before its previous note ends would have that note's release cut
    # the new one short; end the earlier note where the new one begins instead.
    cleaned: list[NoteEvent] = []
    last_by_pitch: dict[int, int] = {}
    for e in shaped:
        if e.pitch in last_by_pitch:
            i = last_by_pitch[e.pitch]
            prev = cleaned[i]
            if e.start <= prev.start:
                continue  # the same key struck twice at once after octave folding
            if prev.end > e.start:
                cleaned[i] = NoteEvent(prev.start, e.start, prev.pitch, prev.velocity)
        last_by_pitch[e.pitch] = len(cleaned)
        cleaned.append(e)
    return cleaned


def plan_clip(
    class_name: str, source: str, notes: Sequence[ScoreNote], rng: np.random.Generator, seconds: float = CLIP_SECONDS
) -> ClipPlan | None:
    """First window of `notes` (in seeded order) that fits the class rule, or None."""
    traits = CLASS_TRAITS[class_name]
    seconds_per_q = 60.0 / traits.tempo_bpm
    span_q = seconds / seconds_per_q
    if not notes:
        return None
    last_start = math.floor(max(n.offset + n.duration for n in notes) - span_q)
    if last_start < 0:
        return None
    for start_q in rng.permutation(last_start + 1).tolist():
        events = _window(notes, float(start_q), span_q, seconds_per_q)
        if len(events) < 4 or not _covers(events, seconds):
            continue
        raw = measure_traits(events, seconds)
        low, high = traits.density
        if raw.mode != traits.mode or not (low <= raw.notes_per_second < high):
            continue
        transpose = int(round(traits.register_centre - raw.mean_pitch))
        shaped = _shape(events, transpose, traits, rng)
        measured = measure_traits(shaped, seconds)
        if measured.mode != traits.mode or not (low <= measured.notes_per_second < high):
            continue  # octave folding or overlap cleaning changed the balance; rare
        return ClipPlan(class_name, source, float(start_q), transpose, traits.tempo_bpm, tuple(shaped), measured)
    return None


def plan_class_clips(
    class_name: str,
    count: int,
    rng: np.random.Generator,
    used_sources: set[str],
    score_cache: dict[str, list[ScoreNote]],
) -> list[ClipPlan]:
    """`count` clips for one class, each from a different piece not in `used_sources`.

    `used_sources` is updated, so successive classes never share a piece. `score_cache`
    holds parsed scores for the duration of one build (nothing is cached on disk).
    """
    plans: list[ClipPlan] = []
    for source in candidate_order(rng):
        if len(plans) == count:
            break
        if source in used_sources:
            continue
        if source not in score_cache:
            score_cache[source] = load_score_notes(source)
        plan = plan_clip(class_name, source, score_cache[source], rng)
        if plan is not None:
            plans.append(plan)
            used_sources.add(source)
    if len(plans) < count:
        raise DataError(f"only {len(plans)} of {count} {class_name} clips found in the music21 corpus; ask for fewer")
    return plans


def soundfont_path() -> Path:
    """The General-MIDI soundfont (TimGM6mb.sf2) that ships inside the pretty_midi package."""
    import importlib.util

    spec = importlib.util.find_spec("pretty_midi")
    if spec is None or spec.origin is None:
        raise DataError("pretty_midi is not installed; it provides the TimGM6mb.sf2 soundfont")
    path = Path(spec.origin).parent / "TimGM6mb.sf2"
    if not path.is_file():
        raise DataError(f"{path}: soundfont missing from the pretty_midi package")
    return path


class PianoRenderer:
    """Offline solo-piano synthesis with TinySoundFont (General MIDI program 0)."""

    def __init__(self, soundfont: Path | None = None, sample_rate: int = SAMPLE_RATE) -> None:
        import tinysoundfont

        self.sample_rate = sample_rate
        self._synth = tinysoundfont.Synth(samplerate=sample_rate)
        self._sfid = self._synth.sfload(str(soundfont or soundfont_path()))

    def render(self, events: Sequence[NoteEvent], num_samples: int) -> np.ndarray:
        """Mono float32 waveform of exactly `num_samples`, peak-normalised to 0.95."""
        synth = self._synth
        # Silence at once (no release tail), so no voice of the previous clip rings into
        # this one and a clip sounds the same whatever was rendered before it.
        synth.sounds_off()
        synth.program_select(0, self._sfid, 0, 0)
        chunks: list[np.ndarray] = []
        done = 0
        for sample, is_on, event in self._timeline(events, num_samples):
            if sample > done:
                chunks.append(self._generate(sample - done))
                done = sample
            if is_on:
                synth.noteon(0, event.pitch, event.velocity)
            else:
                synth.noteoff(0, event.pitch)
        if done < num_samples:
            chunks.append(self._generate(num_samples - done))
        wave = np.concatenate(chunks)[:num_samples]
        # A 20 ms fade keeps notes still ringing at the cut from ending in a click.
        fade = min(num_samples, int(0.02 * self.sample_rate))
        wave[num_samples - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        peak = float(np.abs(wave).max())
        if peak <= 0:
            raise DataError("rendered clip is silent")
        return (wave * (0.95 / peak)).astype(np.float32)

    def _generate(self, frames: int) -> np.ndarray:
        stereo = np.frombuffer(self._synth.generate(frames), dtype=np.float32).reshape(-1, 2)
        return stereo.mean(axis=1)

    def _timeline(self, events: Sequence[NoteEvent], num_samples: int) -> Iterator[tuple[int, bool, NoteEvent]]:
        """(sample, is_note_on, event) in time order; releases before attacks at a tie."""
        timeline = []
        for e in events:
            on = int(round(e.start * self.sample_rate))
            if on >= num_samples:
                continue
            off = min(int(round(e.end * self.sample_rate)), num_samples)
            timeline.append((on, 1, e.pitch, e))
            timeline.append((max(off, on + 1), 0, e.pitch, e))
        timeline.sort(key=lambda t: (t[0], t[1], t[2]))
        for sample, is_on, _, event in timeline:
            yield sample, bool(is_on), event
