"""The benchmark's helpers, and a smoke run of scripts/benchmark.py on the tiny config."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import conchshell.utils.benchmark as benchmark_utils
from conchshell.utils.benchmark import (
    CpuSteal,
    PeakMemory,
    copy_bandwidth,
    count_flops,
    matmul_ceiling,
    parse_steal_ticks,
    time_call,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_time_call_runs_warmup_then_repeats_and_keeps_last_result():
    calls = []

    def work():
        calls.append(len(calls))
        time.sleep(0.002)
        return len(calls)

    timing = time_call(work, CPU, repeats=3, warmup=2)
    # Two warm-ups, one untimed run measuring memory, three timed runs.
    assert len(calls) == 6 and len(timing.seconds) == 3
    assert timing.extra["result"] == 6
    assert 0.002 <= timing.min <= timing.median <= timing.max
    with pytest.raises(ValueError):
        time_call(work, CPU, repeats=0)


def test_steal_ticks_are_read_from_the_aggregate_cpu_line_without_guest_columns():
    # user nice system idle iowait irq softirq steal guest guest_nice
    text = "cpu  100 5 40 800 10 1 2 42 30 0\ncpu0 50 2 20 400 5 0 1 21 15 0\nintr 1 2\n"
    assert parse_steal_ticks(text) == (42, 1000)
    assert parse_steal_ticks("cpu0 1 2 3 4 5 6 7 8\n") is None  # no aggregate line first
    assert parse_steal_ticks("cpu  1 2 3 4 5 6 7\n") is None  # kernel without a steal column


def test_cpu_steal_is_the_stolen_share_of_the_ticks_that_passed(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    monkeypatch.setattr(benchmark_utils, "_PROC_STAT", stat)
    stat.write_text("cpu  100 0 0 900 0 0 0 0\n")
    with CpuSteal() as steal:
        stat.write_text("cpu  250 0 0 1000 0 0 0 50\n")  # 300 ticks passed, 50 stolen
    assert steal.fraction == pytest.approx(50 / 300)
    with CpuSteal() as unchanged:
        pass
    assert unchanged.fraction is None  # no tick passed: nothing to divide
    stat.unlink()
    with CpuSteal() as missing:
        pass
    assert missing.fraction is None


def test_time_call_records_the_steal_of_its_timed_repeats_where_the_system_reports_it():
    timing = time_call(lambda: time.sleep(0.02), CPU, repeats=2, warmup=0)
    if Path("/proc/stat").exists():
        assert 0 <= timing.cpu_steal_fraction <= 1
    assert "cpu_steal_fraction" in timing.to_dict()


def test_peak_memory_sees_a_large_torch_allocation_even_where_freed_memory_is_kept():
    # A larger block was allocated and freed before, with freed memory kept in the process
    # (as every entry point runs): PeakMemory must hand it back first to see the rise.
    probe = (
        "import torch\n"
        "from conchshell.utils.benchmark import PeakMemory\n"
        "from conchshell.utils.host_memory import keep_freed_memory\n"
        "keep_freed_memory()\n"
        "block = torch.ones(128 * 1024 * 1024 // 4)\n"
        "del block\n"
        "with PeakMemory(torch.device('cpu')) as memory:\n"
        "    block = torch.ones(64 * 1024 * 1024 // 4)\n"
        "    del block\n"
        "print(memory.kind, memory.peak_bytes)\n"
    )
    kind, peak = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.split()
    assert kind in ("cpu_vmhwm", "cpu_maxrss")
    assert int(peak) >= 60 * 1024 * 1024


def test_count_flops_counts_matmuls_with_and_without_grad():
    a, b = torch.randn(32, 16), torch.randn(16, 8)
    flops, result = count_flops(lambda: a @ b)
    assert flops == 2 * 32 * 16 * 8 and result.shape == (32, 8)
    weight = torch.randn(16, 8, requires_grad=True)
    # Forward plus the weight gradient's matmul: two matmuls of the same size.
    flops, _ = count_flops(lambda: (a @ weight).sum().backward(), with_grad=True)
    assert flops == 2 * (2 * 32 * 16 * 8)


@pytest.mark.parametrize("groups", [1, 8])
def test_count_flops_charges_grouped_conv_backward_one_forward_per_gradient(groups):
    # torch's own formula charges a grouped conv's weight gradient `groups` times over.
    conv = torch.nn.Conv1d(16, 16, 5, groups=groups, padding=2)
    x = torch.randn(2, 16, 50, requires_grad=True)
    forward, _ = count_flops(lambda: conv(x))
    assert forward == 2 * 2 * 50 * 16 * (16 // groups) * 5
    step, _ = count_flops(lambda: conv(x).sum().backward(), with_grad=True)
    assert step == 3 * forward  # forward + input gradient + weight gradient
    frozen_input = x.detach()
    step, _ = count_flops(lambda: conv(frozen_input).sum().backward(), with_grad=True)
    assert step == 2 * forward


def test_matmul_ceiling_reports_a_positive_rate():
    ceiling = matmul_ceiling(CPU, torch.float32, size=128, repeats=2, warmup=1)
    assert ceiling["flops"] == 2 * 128**3 and len(ceiling["seconds"]) == 2
    assert ceiling["flops_per_s"] >= ceiling["median_flops_per_s"] > 0


def test_copy_bandwidth_counts_the_bytes_read_and_written():
    reading = copy_bandwidth(CPU, num_bytes=2**20, repeats=3, warmup=1)
    assert reading["bytes"] == 2**20 and len(reading["seconds"]) == 3
    assert reading["bytes_per_s"] == pytest.approx(2 * 2**20 / min(reading["seconds"]))
    assert reading["bytes_per_s"] >= reading["median_bytes_per_s"] > 0


def test_audio_difference_is_zero_for_identical_audio_and_grows_with_noise():
    script = load_script()
    config = script.offline_config("tiny")
    mel = script.log_mel_for(config)
    audio = torch.sin(torch.linspace(0, 400, config.clip_samples)).view(1, 1, -1)
    codes = torch.arange(12).view(2, 6)
    rate = config.data.sample_rate
    same = script.audio_difference(audio, audio.clone(), mel, codes, codes.clone(), rate)
    assert same["max_abs_diff"] == 0 and same["mel_l1"] == 0 and same["snr_db"] is None
    assert same["frames_on_other_codes"] == 0 and same["frames"] == 12
    assert same["pesq"] == pytest.approx(4.64, abs=0.01) and same["stoi"] == pytest.approx(1.0)
    moved = codes.clone()
    moved[1, 2:4] += 1
    noisy = script.audio_difference(audio, audio + 0.1 * torch.randn_like(audio), mel, codes, moved, rate)
    assert noisy["max_abs_diff"] > 0.1 and noisy["mel_l1"] > 0 and noisy["frames_on_other_codes"] == 2
    # sine power 1/2 against noise power 0.01: 10 log10(50) = 17 dB
    assert noisy["snr_db"] == pytest.approx(17.0, abs=0.3)
    assert noisy["pesq"] < 2 and noisy["stoi"] < 0.5


@pytest.mark.filterwarnings("ignore:codec.checkpoint is null")
def test_smoke_run_on_tiny_writes_complete_json(tmp_path, capsys, as_if_bf16_kernels):
    script = load_script()
    out = tmp_path / "bench.json"
    code = script.main([
        "--levels", "tiny", "--batch-sizes", "1", "--precisions", "fp32", "--repeats", "1",
        "--warmup", "0", "--train-levels", "tiny", "--train-precisions", "fp32,bf16",
        "--train-repeats", "1", "--ceiling-size", "256", "--cache-files", "4", "--json", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "Inference" in printed and "GAN training step" in printed and "Feature cache" in printed

    assert set(report["ceiling"]["used"]) == {"fp32", "bf16"}
    assert "cpu_steal_fraction" in report["meta"] and "steal" in printed
    assert all(m["copy"]["bytes_per_s"] > 0 for m in report["ceiling"]["measurements"])
    assert all(rate > 0 for rate in report["ceiling"]["used"].values())

    (row,) = report["inference"]
    assert (row["level"], row["batch_size"], row["precision"]) == ("tiny", 1, "fp32")
    assert list(row["components"]) == list(script.COMPONENTS)
    for component in row["components"].values():
        assert len(component["seconds"]) == 1 and component["median_s"] > 0
        assert component["flops"] >= 0 and 0 <= component["ceiling_fraction"]
    # The frontend's FLOPs are real work: TCNN-6 time features + I3D are > 100 GFLOP per image.
    assert row["components"]["tcnn_time_features"]["flops"] > 50e9
    assert row["components"]["i3d"]["flops"] > 50e9
    total = row["total"]
    assert total["seconds"] == pytest.approx(sum(c["median_s"] for c in row["components"].values()))
    assert total["real_time_factor"] == pytest.approx(total["seconds"] / 0.5)
    assert total["x_flop_bound"] > 0

    assert [(r["level"], r["precision"]) for r in report["training"]] == [("tiny", "fp32"), ("tiny", "bf16")]
    for step in report["training"]:
        assert step["batch_size"] == 2 and step["flops"] > 0
        assert step["samples_per_s"] == pytest.approx(2 / step["median_s"])
        assert "cpu_steal_fraction" in step

    cache = report["feature_cache"]
    assert cache["frontend_s_per_image"] > cache["cache_load_s_per_image"] > 0
    assert [e["level"] for e in cache["epoch"]] == ["tiny", "tiny"]
    assert all(e["epoch_speedup"] > 1 for e in cache["epoch"])


@pytest.mark.filterwarnings("ignore:codec.checkpoint is null")
def test_without_bf16_kernels_the_run_is_fp32_and_bounded_by_the_fp32_rate(tmp_path, capsys, as_if_no_bf16_kernels):
    script = load_script()
    out = tmp_path / "bench.json"
    assert script.main(["--levels", "tiny", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
                        "--train-levels", "tiny", "--train-precisions", "bf16", "--train-repeats", "1",
                        "--ceiling-size", "1024", "--cache-files", "2", "--json", str(out)]) == 0
    assert "this CPU has no bf16 kernels" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["meta"]["bf16_kernels"] is False
    assert [row["precision"] for row in report["inference"]] == ["fp32"]
    assert [row["precision"] for row in report["training"]] == ["fp32"]
    # The bf16 ceiling is still read, at the small size the scalar fallback finishes quickly.
    assert all(m["bf16"]["size"] == script.EMULATED_BF16_CEILING_SIZE for m in report["ceiling"]["measurements"])


def test_the_flop_bound_is_taken_at_the_fastest_matmul_rate():
    script = load_script()
    for rates, bound_rate in (({"fp32": 2e10, "bf16": 4e10}, 4e10), ({"fp32": 1.3e11, "bf16": 1e9}, 1.3e11)):
        step = {"precision": "fp32", "flops": 1e12, "median_s": 20.0, "flops_per_s": 5e10}
        script.apply_ceilings([], [step], rates)
        assert step["flop_bound_s"] == pytest.approx(1e12 / bound_rate)
        assert step["x_flop_bound"] == pytest.approx(20.0 / (1e12 / bound_rate))
        assert step["ceiling_fraction"] == pytest.approx(5e10 / rates["fp32"])


@pytest.mark.filterwarnings("ignore:codec.checkpoint is null")
def test_training_batch_sweep_stops_at_the_first_batch_that_does_not_fit(tmp_path, capsys, monkeypatch):
    script = load_script()
    real_step = script.gan_training_step

    def step_that_fits_up_to_two(config, device, precision, batch):
        if batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(config, device, precision, batch)

    monkeypatch.setattr(script, "gan_training_step", step_that_fits_up_to_two)
    released = []
    monkeypatch.setattr(script, "release_memory", released.append)
    out = tmp_path / "bench.json"
    assert script.main(["--levels", "", "--train-levels", "tiny", "--train-batch", "1,2,4,8",
                        "--train-repeats", "1", "--ceiling-size", "256", "--cache-files", "2",
                        "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["training"]
    assert [(r["batch_size"], r.get("out_of_memory", False)) for r in rows] == [(1, False), (2, False), (4, True)]
    # After every row, fitting ones too: a stage left in its reference cycles would still hold
    # its weights and optimiser state when the next batch size is tried.
    assert len(released) == len(rows)
    fitting = rows[:2]
    best = max(fitting, key=lambda r: r["samples_per_s"])
    assert [r.get("best_batch", False) for r in fitting] == [r is best for r in fitting]
    assert all(r["ceiling_fraction"] > 0 for r in fitting) and "ceiling_fraction" not in rows[2]
    printed = capsys.readouterr().out
    assert "tiny  b4  fp32 out of memory" in printed and "best batch" in printed



def test_each_precision_gets_a_generator_with_the_same_seeded_weights():
    # The bf16-vs-fp32 audio comparison is only meaningful between identical networks.
    script = load_script()
    config = script.offline_config("tiny")
    torch.manual_seed(123)
    first = script.seeded_generator(config).state_dict()
    torch.randn(10)
    second = script.seeded_generator(config).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_mixed_chain_takes_the_fp32_rows_synthesis_and_its_own_ceiling_per_component():
    script = load_script()

    def row(precision, seconds):
        component = {"median_s": seconds, "flops": 1e9, "flops_per_s": 1e9 / seconds, "peak_memory_bytes": 0}
        return {"level": "tiny", "batch_size": 1, "precision": precision, "clip_seconds": 0.5,
                "components": {name: dict(component) for name in script.COMPONENTS}}

    bf16, fp32 = row("bf16", 0.1), row("fp32", 0.3)
    mixed = script.mixed_row(bf16, fp32)
    assert mixed["precision"] == "mixed" and bf16["precision"] == "bf16"
    assert [mixed["components"][n]["median_s"] for n in script.COMPONENTS] == [0.1, 0.1, 0.1, 0.3, 0.3, 0.3]
    script.apply_ceilings([mixed], [], {"fp32": 2e10, "bf16": 4e10})
    assert mixed["components"]["generator"]["ceiling_fraction"] == pytest.approx(1e9 / 0.3 / 2e10)
    assert mixed["components"]["i3d"]["ceiling_fraction"] == pytest.approx(1e9 / 0.1 / 4e10)
    assert mixed["total"]["seconds"] == pytest.approx(3 * 0.3 + 3 * 0.1)


@pytest.mark.filterwarnings("ignore:codec.checkpoint is null")
def test_mixed_audio_is_what_inference_generates_with_mixed_precision(as_if_bf16_kernels):
    from conchshell.inference import ImageToMusic
    from conchshell.models.generator import freeze_for_inference

    script = load_script()
    config = script.offline_config("tiny")
    generator = freeze_for_inference(script.seeded_generator(config), "fp32")
    codec = script.build_quietly(script.build_codec, config).eval()
    model = ImageToMusic(generator, script.build_frontend(config), codec, config, "cpu", precision="mixed")
    features, class_ids = torch.rand(2, 2048), torch.tensor([0, 3])
    codes, audio = script.generated_audio(generator, codec, features, class_ids, config.clip_samples, CPU,
                                          "fp32", "fp32")
    expected, _, _ = model.generate_from_features(features, class_ids)
    assert codes.shape[0] == 2 and codes.dtype == torch.long
    torch.testing.assert_close(audio[:, 0].float().clamp(-1, 1), expected)


@pytest.mark.needs_bf16_kernels
@pytest.mark.filterwarnings("ignore:codec.checkpoint is null")
def test_bf16_mixed_and_the_fp32_floor_are_each_compared_with_the_fp32_audio():
    script = load_script()
    args = script.parse_args(["--levels", "tiny", "--batch-sizes", "1", "--precisions", "fp32,bf16",
                              "--repeats", "1", "--warmup", "0"])
    result = script.run_inference(args, CPU)
    assert [r["precision"] for r in result["inference"]] == ["fp32", "bf16", "mixed"]
    comparisons = result["bf16_vs_fp32_audio"]
    assert [c["precision"] for c in comparisons] == ["bf16", "mixed", "fp32_direct"]
    assert all(c["max_abs_diff"] >= 0 and c["mel_l1"] >= 0 and c["reference_peak"] > 0 for c in comparisons)
    assert all(0 <= c["frames_on_other_codes"] <= c["frames"] for c in comparisons)
    # The floor's direct convolutions are float32 too: far closer than the bf16 chain.
    floor, bf16 = comparisons[2], comparisons[0]
    assert floor["mel_l1"] < bf16["mel_l1"] / 10
    assert floor["pesq"] >= bf16["pesq"] and floor["stoi"] >= bf16["stoi"]
    for row in result["inference"]:
        assert row["components"]["generator"]["fft_spectra_bytes"] > 0
