"""Objective evaluation of generated music: PESQ, STOI, spectral distances, register, class consistency."""
from conchshell.evaluation.audio_classifier import (
    AudioClassifier,
    ClassifierHparams,
    fit_audio_classifier,
    load_audio_classifier,
    reference_windows,
    save_audio_classifier,
)
from conchshell.evaluation.metrics import (
    PESQ,
    STOI,
    ClassConsistency,
    MeanMetric,
    MelDistance,
    MultiResolutionSTFT,
    RegisterAgreement,
    align,
    spectral_pitch,
    sum_across_ranks,
)

__all__ = [
    "PESQ",
    "STOI",
    "AudioClassifier",
    "ClassConsistency",
    "ClassifierHparams",
    "MeanMetric",
    "MelDistance",
    "MultiResolutionSTFT",
    "RegisterAgreement",
    "align",
    "fit_audio_classifier",
    "load_audio_classifier",
    "reference_windows",
    "save_audio_classifier",
    "spectral_pitch",
    "sum_across_ranks",
]
