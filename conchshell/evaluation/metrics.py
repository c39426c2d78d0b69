"""Objective metrics for generated music, accumulated per item and reduced across ranks.

Every metric follows one pattern: ``update(...)`` scores one item and adds it to a small
float64 state tensor of sums; ``reduce()`` returns that state summed over all ranks
(``all_reduce(SUM)`` when a process group with more than one rank exists, a copy
otherwise); ``compute()`` turns the reduced sums into the result. Sums and counts, never
per-rank means, are what travel between ranks, so the mean is exact whatever the number
of items per rank. ``compute()`` never mutates the local state, so calling it twice gives
the same answer; under DDP every rank must call it (it is a collective).

Items a metric cannot score are counted, listed in ``failures`` (this rank's items,
``(item, reason)``), and kept out of the mean: the result reports ``n_valid`` of
``n_total``. PESQ in particular raises ``NoUtterancesError`` (and, for silent input,
other errors) on music it finds no "speech" in; that must never crash an evaluation or
silently become a score.

- :class:`PESQ`: ITU-T P.862.2 wide-band MOS-LQO (``pesq`` package) at 16 kHz;
  other rates are resampled to 16 kHz with soxr (HQ) first.
- :class:`STOI`: short-time objective intelligibility (``pystoi``; it resamples to
  10 kHz itself). A silent reference, one with too little non-silent audio (pystoi
  warns and returns 1e-5) and a non-finite score are failures.
- :class:`MelDistance`: L1 between log10-mel spectrograms (the paper's mel loss features).
- :class:`MultiResolutionSTFT`: spectral convergence + log-magnitude L1 over three STFTs.
- :class:`RegisterAgreement`: does a clip sit as high or low on the keyboard as its
  reference? Each clip's register is the power-weighted mean pitch of its spectrum (MIDI
  semitones, :func:`spectral_pitch`); the result is the Pearson correlation between
  estimate and reference registers over the items, and their mean absolute difference.
  A graded view of class consistency on a corpus whose classes differ by register first.
- :class:`ClassConsistency`: accuracy of predicted vs target classes, with the confusion
  matrix and chance level 1 / num_classes.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from conchshell.constants import NUM_CLASSES
from conchshell.errors import ConchShellError
from conchshell.nn.spectral import LogMelSpectrogram, MultiResolutionSTFTDistance

PESQ_RATE = 16_000
SILENCE_PEAK = 1e-6  # a reference whose peak is below this is silence: nothing to be intelligible


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` summed over every rank (just a copy without a multi-rank group)."""
    result = tensor.detach().clone()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return result
    home = result.device
    if dist.get_backend() == "nccl" and home.type != "cuda":
        # NCCL reduces GPU tensors only; metric states live on the CPU.
        result = result.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result.to(home)


def as_signal(audio: Any) -> np.ndarray:
    """Mono float64 1-D numpy array from a numpy array or tensor of shape [T], [1,T] or [1,1,T]."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().float().cpu().numpy()
    signal = np.asarray(audio, dtype=np.float64)
    if signal.ndim > 1:
        if signal.size != signal.shape[-1]:
            raise ValueError(f"expected one mono signal, got shape {signal.shape}")
        signal = signal.reshape(-1)
    return signal


def align(reference: Any, estimate: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both signals trimmed to the shorter length (metrics compare sample by sample)."""
    reference, estimate = as_signal(reference), as_signal(estimate)
    length = min(len(reference), len(estimate))
    return reference[:length], estimate[:length]


def resample(signal: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    if source_rate == target_rate:
        return signal
    import soxr

    return soxr.resample(signal, source_rate, target_rate, quality="HQ")


class MeanMetric:
    """Mean (and standard deviation) of a per-item score over the items that could be scored.

    State: ``[sum, sum of squares, n_valid, n_total]`` in float64.
    """

    name = "metric"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.state = torch.zeros(4, dtype=torch.float64)
        self.failures: list[tuple[str, str]] = []

    def record(self, value: float | None, item: str = "", reason: str = "") -> float | None:
        """Add one item's score; ``None`` or a non-finite value counts as a failure."""
        self.state[3] += 1
        if value is None or not math.isfinite(value):
            self.failures.append((item, reason or f"non-finite score {value}"))
            return None
        self.state[0] += value
        self.state[1] += value * value
        self.state[2] += 1
        return float(value)

    def reduce(self) -> torch.Tensor:
        return sum_across_ranks(self.state)

    def compute(self) -> dict[str, Any]:
        """``{"mean", "std", "n_valid", "n_total", "n_failed", "failure_reasons"}`` over all ranks.

        ``mean``/``std`` are None when no item was valid. ``failure_reasons`` counts this
        rank's failures by reason.
        """
        return self._summarise(self.reduce())

    def _summarise(self, state: torch.Tensor) -> dict[str, Any]:
        total, squares, n_valid, n_total = state.tolist()
        mean = total / n_valid if n_valid else None
        std = math.sqrt(max(squares / n_valid - mean * mean, 0.0)) if n_valid else None
        reasons = Counter(reason for _, reason in self.failures)
        return {"mean": mean, "std": std, "n_valid": int(n_valid), "n_total": int(n_total),
                "n_failed": int(n_total - n_valid), "failure_reasons": dict(reasons)}


class PerceptualMetric(MeanMetric):
    """A metric from an external scorer that may refuse an item (with a reason) instead of scoring it."""

    def score(self, reference: Any, estimate: Any, sample_rate: int) -> tuple[float | None, str]:
        raise NotImplementedError

    def update(self, reference: Any, estimate: Any, sample_rate: int, item: str = "") -> float | None:
        value, reason = self.score(reference, estimate, sample_rate)
        return self.record(value, item, reason)


class PESQ(PerceptualMetric):
    """Wide-band PESQ (P.862.2) of ``estimate`` against ``reference``."""

    name = "pesq"

    def __init__(self, mode: str = "wb") -> None:
        if mode not in ("wb", "nb"):
            raise ValueError(f"PESQ mode must be 'wb' or 'nb', got {mode!r}")
        try:
            import pesq  # noqa: F401  (optional dependency: fail at construction, not mid-run)
        except ImportError as exc:
            raise ConchShellError("PESQ needs the pesq package: pip install pesq (or pip install .[eval])") from exc
        self.mode = mode
        super().__init__()

    def score(self, reference: Any, estimate: Any, sample_rate: int) -> tuple[float | None, str]:
        """(score, "") or (None, reason) for one pair; never raises on bad audio."""
        import pesq

        reference, estimate = align(reference, estimate)
        reference = resample(reference, sample_rate, PESQ_RATE)
        estimate = resample(estimate, sample_rate, PESQ_RATE)
        try:
            with warnings.catch_warnings():
                # Silent input divides by a zero peak inside pesq; the error that follows is what we report.
                warnings.simplefilter("ignore", RuntimeWarning)
                value = float(pesq.pesq(PESQ_RATE, reference, estimate, self.mode))
        except pesq.NoUtterancesError:
            return None, "no utterances detected"
        except pesq.BufferTooShortError:
            return None, "clip too short"
        except pesq.PesqError as exc:
            return None, f"pesq error: {type(exc).__name__}"
        except (ValueError, ArithmeticError) as exc:
            # pesq turns an all-zero (silent) signal into NaN levels and fails converting them.
            return None, f"unscorable signal ({exc})"
        if not math.isfinite(value):
            return None, "non-finite score"
        return value, ""

class STOI(PerceptualMetric):
    """STOI (or extended STOI) of ``estimate`` against ``reference``."""

    name = "stoi"

    def __init__(self, extended: bool = False) -> None:
        try:
            import pystoi  # noqa: F401
        except ImportError as exc:
            raise ConchShellError("STOI needs the pystoi package: pip install pystoi (or pip install .[eval])") from exc
        self.extended = extended
        super().__init__()

    def score(self, reference: Any, estimate: Any, sample_rate: int) -> tuple[float | None, str]:
        from pystoi import stoi

        reference, estimate = align(reference, estimate)
        if not reference.size or np.max(np.abs(reference)) <= SILENCE_PEAK:
            # pystoi returns a number (0 or 1e-5) for a silent reference; it means nothing.
            return None, "silent reference"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = float(stoi(reference, estimate, sample_rate, extended=self.extended))
        if any("Not enough STFT frames" in str(w.message) for w in caught):
            return None, "reference has too little non-silent audio"
        if not math.isfinite(value):
            return None, "non-finite score"
        return value, ""

class MelDistance(MeanMetric):
    """Mean |log10 mel(estimate) - log10 mel(reference)|; defaults are the paper's mel loss."""

    name = "mel_l1"

    def __init__(self, sample_rate: int = 16_000, n_fft: int = 2048, hop_length: int = 300,
                 win_length: int = 1200, n_mels: int = 128, fmin: float = 0.0,
                 fmax: float | None = 8000.0) -> None:
        self.sample_rate = sample_rate
        fmax = min(fmax or sample_rate / 2, sample_rate / 2)
        self.mel = LogMelSpectrogram(sample_rate, n_fft, hop_length, win_length, n_mels, fmin, fmax)
        super().__init__()

    @torch.no_grad()
    def update(self, reference: Any, estimate: Any, item: str = "") -> float | None:
        reference, estimate = align(reference, estimate)
        x = torch.from_numpy(np.stack([reference, estimate])).float()
        mels = self.mel(x)
        return self.record(float((mels[1] - mels[0]).abs().mean()), item)


class MultiResolutionSTFT(MeanMetric):
    """Spectral convergence + log-magnitude distance averaged over three STFT resolutions."""

    name = "mrstft"

    def __init__(self) -> None:
        self.distance = MultiResolutionSTFTDistance()
        super().__init__()

    @torch.no_grad()
    def update(self, reference: Any, estimate: Any, item: str = "") -> float | None:
        reference, estimate = align(reference, estimate)
        value = self.distance(torch.from_numpy(estimate).float().view(1, -1),
                              torch.from_numpy(reference).float().view(1, -1), reduction="none")
        return self.record(float(value[0]), item)


PITCH_FMIN, PITCH_FMAX = 27.5, 8000.0  # A0 (the piano's lowest key) .. the demo's Nyquist
PITCH_N_FFT, PITCH_HOP = 2048, 512
# A spread of registers below a hundredth of a semitone is no variation (and, from sums of
# squares of values near 60, partly rounding): the correlation is then undefined.
MIN_REGISTER_SPREAD = 0.01


def spectral_pitch(audio: Any, sample_rate: int) -> float | None:
    """Register of a clip: the mean MIDI pitch ``69 + 12 log2(f / 440)`` of its STFT bins
    between 27.5 Hz and 8 kHz, weighted by their time-averaged power. Partials lift it above
    the played notes, equally for every clip, so it orders clips by register. None for silence."""
    signal = as_signal(audio)
    peak = float(np.abs(signal).max()) if signal.size else 0.0
    if peak < SILENCE_PEAK or signal.size < PITCH_N_FFT:
        return None
    x = torch.from_numpy(signal / peak).float()
    power = torch.stft(x, PITCH_N_FFT, PITCH_HOP, window=torch.hann_window(PITCH_N_FFT),
                       return_complex=True).abs().pow(2).mean(dim=-1).double()
    frequencies = torch.fft.rfftfreq(PITCH_N_FFT, 1.0 / sample_rate).double()
    band = (frequencies >= PITCH_FMIN) & (frequencies <= min(PITCH_FMAX, sample_rate / 2))
    weights = power[band]
    if float(weights.sum()) <= 0.0:
        return None
    pitches = 69.0 + 12.0 * torch.log2(frequencies[band] / 440.0)
    return float((pitches * weights).sum() / weights.sum())


class RegisterAgreement(MeanMetric):
    """Mean |register(estimate) - register(reference)| in semitones, and the Pearson
    correlation of the two registers over the items (:func:`spectral_pitch`).

    State: MeanMetric's four sums of the absolute difference, then ``[sum x, sum y,
    sum x^2, sum y^2, sum xy]`` of the valid items' reference (x) and estimate (y) registers.
    """

    name = "register"

    def __init__(self, sample_rate: int = 16_000) -> None:
        self.sample_rate = sample_rate
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self.moments = torch.zeros(5, dtype=torch.float64)

    def update(self, reference: Any, estimate: Any, item: str = "") -> float | None:
        """Add one item; returns the estimate's register (None if either clip is silent)."""
        x = spectral_pitch(reference, self.sample_rate)
        y = spectral_pitch(estimate, self.sample_rate)
        if x is None or y is None:
            self.record(None, item, "silent clip")
            return None
        self.record(abs(y - x), item)
        self.moments += torch.tensor([x, y, x * x, y * y, x * y], dtype=torch.float64)
        return y

    def reduce(self) -> torch.Tensor:
        return sum_across_ranks(torch.cat([self.state, self.moments]))

    def compute(self) -> dict[str, Any]:
        """MeanMetric's result (the mean absolute difference) plus ``r``: the Pearson
        correlation, None with fewer than two items or when either side never varies."""
        reduced = self.reduce()
        result = self._summarise(reduced[:4])
        n = float(reduced[2])
        sx, sy, sxx, syy, sxy = reduced[4:].tolist()
        r = None
        if n >= 2:
            var_x, var_y = sxx / n - (sx / n) ** 2, syy / n - (sy / n) ** 2
            if var_x > MIN_REGISTER_SPREAD ** 2 and var_y > MIN_REGISTER_SPREAD ** 2:
                r = max(-1.0, min(1.0, (sxy / n - sx * sy / n ** 2) / math.sqrt(var_x * var_y)))
        return {**result, "r": r}


class ClassConsistency:
    """How often the class predicted from a clip equals its target class.

    State: a ``[num_classes, num_classes]`` confusion matrix (rows: target, columns:
    prediction) in float64, summed across ranks by :meth:`reduce`.
    """

    name = "class_consistency"

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)

    def update(self, predicted: Sequence[int] | torch.Tensor, target: Sequence[int] | torch.Tensor) -> None:
        predicted = torch.as_tensor(predicted, dtype=torch.long).reshape(-1).cpu()
        target = torch.as_tensor(target, dtype=torch.long).reshape(-1).cpu()
        if predicted.shape != target.shape:
            raise ValueError(f"{predicted.numel()} predictions for {target.numel()} targets")
        for ids, what in ((predicted, "prediction"), (target, "target")):
            if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.num_classes):
                raise ValueError(f"{what} class ids must be in 0..{self.num_classes - 1}")
        flat = target * self.num_classes + predicted
        self.confusion += torch.bincount(flat, minlength=self.num_classes ** 2).view(
            self.num_classes, self.num_classes).double()

    def reduce(self) -> torch.Tensor:
        return sum_across_ranks(self.confusion)

    def compute(self) -> dict[str, Any]:
        """``{"accuracy", "chance", "n_correct", "n_total", "confusion"}`` over all ranks."""
        confusion = self.reduce()
        total = float(confusion.sum())
        correct = float(confusion.diagonal().sum())
        return {"accuracy": correct / total if total else None, "chance": 1.0 / self.num_classes,
                "n_correct": int(correct), "n_total": int(total),
                "confusion": confusion.long().tolist()}
