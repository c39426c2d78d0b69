"""Metric classes against direct pesq/pystoi calls, failure accounting, and cross-rank sums."""
from __future__ import annotations

import json

import numpy as np
import pesq
import pytest
import soxr
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pystoi import stoi

from conchshell.evaluation import (PESQ, STOI, ClassConsistency, MelDistance, MultiResolutionSTFT,
                                   RegisterAgreement, fit_audio_classifier, load_audio_classifier,
                                   save_audio_classifier, spectral_pitch)
from conchshell.errors import CheckpointError
from conchshell.nn.spectral import LogMelSpectrogram, MultiResolutionSTFTDistance, mel_l1
from conchshell.utils.checkpoint import read_weights

RATE = 16_000


def phrase(seed: int, seconds: float = 2.0, rate: int = RATE) -> np.ndarray:
    """Notes separated by short rests, with a little noise: PESQ finds 'utterances' in it."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 180.0 * 2 ** (rng.integers(0, 12, size=t.size // 4000 + 1) / 12)[(t * rate).astype(int) // 4000]
    gate = ((t * 4) % 1.0 < 0.8).astype(np.float64)
    return (0.5 * np.sin(2 * np.pi * pitch * t) * gate + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def noisy(x: np.ndarray, seed: int, level: float = 0.05) -> np.ndarray:
    return (x + level * np.random.default_rng(seed).standard_normal(x.size)).astype(np.float32)


def test_pesq_and_stoi_match_the_packages():
    metric_pesq, metric_stoi = PESQ(), STOI()
    expected_pesq, expected_stoi = [], []
    for seed in range(3):
        ref, deg = phrase(seed), noisy(phrase(seed), seed + 10)
        assert metric_pesq.update(ref, deg, RATE, item=str(seed)) == pytest.approx(pesq.pesq(RATE, ref, deg, "wb"), abs=1e-4)
        assert metric_stoi.update(ref, deg, RATE) == pytest.approx(stoi(ref, deg, RATE), abs=1e-6)
        expected_pesq.append(pesq.pesq(RATE, ref, deg, "wb"))
        expected_stoi.append(stoi(ref, deg, RATE))
    result = metric_pesq.compute()
    assert result["mean"] == pytest.approx(np.mean(expected_pesq), abs=1e-4)
    assert result["std"] == pytest.approx(np.std(expected_pesq), abs=1e-4)
    assert (result["n_valid"], result["n_total"], result["n_failed"]) == (3, 3, 0)
    assert metric_stoi.compute()["mean"] == pytest.approx(np.mean(expected_stoi), abs=1e-6)
    assert metric_pesq.compute() == result  # compute() does not consume the state


def test_pesq_resamples_other_rates_to_16k():
    ref, deg = phrase(1, rate=22_050), noisy(phrase(1, rate=22_050), 4)
    direct = pesq.pesq(RATE, soxr.resample(ref.astype(np.float64), 22_050, RATE, quality="HQ"),
                       soxr.resample(deg.astype(np.float64), 22_050, RATE, quality="HQ"), "wb")
    assert PESQ().update(ref, deg, 22_050) == pytest.approx(direct, abs=1e-4)


def test_unscorable_items_are_counted_not_averaged():
    metric = PESQ()
    good = metric.update(phrase(0), noisy(phrase(0), 1), RATE, item="good")
    assert metric.update(phrase(0), np.zeros(2 * RATE, np.float32), RATE, item="silent output") is None
    assert metric.update(np.zeros(RATE), np.zeros(RATE), RATE, item="all silence") is None
    result = metric.compute()
    assert (result["n_valid"], result["n_total"], result["n_failed"]) == (1, 3, 2)
    assert result["mean"] == pytest.approx(good)
    assert [item for item, _ in metric.failures] == ["silent output", "all silence"]
    assert "no utterances detected" in result["failure_reasons"]

    empty = PESQ()
    empty.update(np.zeros(RATE), np.zeros(RATE), RATE)
    assert empty.compute()["mean"] is None and empty.compute()["n_valid"] == 0


def test_stoi_silent_reference_is_a_failure():
    metric = STOI()
    assert metric.update(np.zeros(RATE), phrase(0)[:RATE], RATE, item="x") is None
    assert metric.update(phrase(0), np.zeros(2 * RATE), RATE, item="silent output") == pytest.approx(0.0, abs=1e-3)
    assert metric.compute()["n_failed"] == 1 and metric.failures == [("x", "silent reference")]


def test_spectral_distances_match_conchshell_nn_spectral():
    ref, deg = phrase(2), noisy(phrase(2), 3, 0.1)
    mel = MelDistance(RATE)
    value = mel.update(ref, deg)
    direct = mel_l1(torch.from_numpy(deg)[None], torch.from_numpy(ref)[None], LogMelSpectrogram())
    assert value == pytest.approx(float(direct), rel=1e-5)
    assert mel.update(ref, ref) == 0.0
    mrstft = MultiResolutionSTFT()
    expected = MultiResolutionSTFTDistance()(torch.from_numpy(deg)[None], torch.from_numpy(ref)[None])
    assert mrstft.update(ref, deg) == pytest.approx(float(expected), rel=1e-5)
    assert mrstft.compute()["n_valid"] == 1


def test_class_consistency_accuracy_and_confusion():
    metric = ClassConsistency(num_classes=6)
    metric.update([0, 1, 2, 2], [0, 1, 3, 2])
    metric.update(torch.tensor([5]), torch.tensor([4]))
    result = metric.compute()
    assert result["accuracy"] == pytest.approx(3 / 5) and result["chance"] == pytest.approx(1 / 6)
    assert (result["n_correct"], result["n_total"]) == (3, 5)
    assert result["confusion"][3][2] == 1 and result["confusion"][4][5] == 1
    with pytest.raises(ValueError):
        metric.update([6], [0])


def tone(midi: float, seconds: float = 1.0, partials: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    return sum(0.5 ** k * np.sin(2 * np.pi * f0 * (k + 1) * t) for k in range(partials)).astype(np.float32)


def test_spectral_pitch_reads_a_pure_tone_and_orders_registers():
    # A bin-centred sine: all its power sits at its own pitch (Hann leakage is symmetric in
    # frequency, so the log-frequency mean moves by a small fraction of a semitone).
    f0 = 40 * RATE / 2048  # bin 40, 312.5 Hz
    sine = np.sin(2 * np.pi * f0 * np.arange(RATE) / RATE).astype(np.float32)
    assert spectral_pitch(sine, RATE) == pytest.approx(69 + 12 * np.log2(f0 / 440), abs=0.05)
    # Level does not matter; partials lift every clip alike, so the order of registers stays.
    assert spectral_pitch(0.01 * sine, RATE) == pytest.approx(spectral_pitch(sine, RATE), abs=1e-6)
    piano_like = [spectral_pitch(tone(m, partials=4), RATE) for m in (43, 52, 58, 65, 72, 80)]
    assert piano_like == sorted(piano_like) and piano_like[0] > 43
    assert spectral_pitch(np.zeros(RATE), RATE) is None


def test_register_agreement_correlation_and_distance():
    metric = RegisterAgreement(RATE)
    references = [tone(m, partials=3) for m in (48, 60, 72)]
    estimates = [tone(m + 2, partials=3) for m in (48, 60, 72)]  # each two semitones sharp
    for index, (reference, estimate) in enumerate(zip(references, estimates)):
        returned = metric.update(reference, estimate, item=f"i{index}")
        assert returned == pytest.approx(spectral_pitch(estimate, RATE))
    assert metric.update(references[0], np.zeros(RATE), item="silent") is None
    result = metric.compute()
    assert result["r"] == pytest.approx(1.0, abs=1e-3)
    assert result["mean"] == pytest.approx(2.0, abs=0.3)
    assert (result["n_valid"], result["n_total"], result["failure_reasons"]) == (3, 4, {"silent clip": 1})
    # The same output whatever the image (an untrained generator): no correlation to report.
    constant = RegisterAgreement(RATE)
    for reference in references:
        constant.update(reference, estimates[1])
    assert constant.compute()["r"] is None
    # Registers that run the wrong way correlate negatively.
    reversed_order = RegisterAgreement(RATE)
    for reference, estimate in zip(references, reversed(estimates)):
        reversed_order.update(reference, estimate)
    assert reversed_order.compute()["r"] == pytest.approx(-1.0, abs=0.02)


def _rank_worker(rank: int, world_size: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        mel = MelDistance(RATE)
        # Uneven work per rank: rank 0 scores two items, rank 1 one item and one failure.
        for value in ([1.0, 2.0] if rank == 0 else [4.0, None]):
            mel.record(value, item=f"r{rank}")
        consistency = ClassConsistency()
        consistency.update([rank, 1], [rank, 0])
        register = RegisterAgreement(RATE)
        for midi in ([48, 60] if rank == 0 else [72]):
            register.update(tone(midi, partials=3), tone(midi + 1, partials=3))
        result = {"mel": mel.compute(), "consistency": consistency.compute(), "register": register.compute()}
        with open(f"{folder}/rank{rank}.json", "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def test_reduce_sums_counts_across_ranks(tmp_path):
    # spawn, not fork: a forked child can deadlock in the OpenMP pool its parent already used.
    context = mp.get_context("spawn")
    processes = [context.Process(target=_rank_worker, args=(rank, 2, str(tmp_path))) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    for process in processes:
        if process.is_alive():
            process.terminate()
    assert [p.exitcode for p in processes] == [0, 0]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        mel, consistency = result["mel"], result["consistency"]
        # Mean of all valid items (1, 2, 4), not the mean of the per-rank means (1.5, 4).
        assert mel["mean"] == pytest.approx(7 / 3)
        assert (mel["n_valid"], mel["n_total"]) == (3, 4)
        assert (consistency["n_correct"], consistency["n_total"]) == (2, 4)
        # One item on rank 1 alone has no spread; the correlation is over all three items.
        assert result["register"]["n_valid"] == 3 and result["register"]["r"] == pytest.approx(1.0, abs=1e-3)


def test_audio_classifier_learns_saves_and_loads(tmp_path):
    clips, labels = [], []
    for class_id in range(3):
        for k in range(4):
            t = np.arange(RATE) / RATE
            tone = np.sin(2 * np.pi * 150 * 2 ** class_id * (1 + 0.02 * k) * t) * (0.3 + 0.2 * k)
            clips.append(tone.astype(np.float32))
            labels.append(class_id)
    model, accuracy = fit_audio_classifier(np.stack(clips), labels)
    assert accuracy == 1.0
    # Level does not matter: clips are peak-normalised before features.
    assert model.predict(np.stack(clips) * 0.1).tolist() == labels
    path = save_audio_classifier(model, tmp_path / "clf.pt", accuracy, len(clips))
    assert read_weights(path)["format"] == "conchshell-audio-classifier-v1"  # weights_only loadable
    loaded = load_audio_classifier(path)
    torch.testing.assert_close(loaded(torch.from_numpy(np.stack(clips))), model(torch.from_numpy(np.stack(clips))))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ConchShell audio classifier"):
        load_audio_classifier(tmp_path / "other.pt")
