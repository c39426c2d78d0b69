"""inference.py and conchshell.ImageToMusic on a tiny generator export.

The tiny config runs the real pipeline (TCNN -> pseudo-video -> I3D -> generator -> codec)
with seeded stand-ins for the frozen networks and 0.5 s clips, so every check here
exercises the same code as the paper's model. Bad-input cases fail before any network is
built, so they cost milliseconds.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import conchshell
from conchshell.config import load_config
from conchshell.constants import CLASS_NAMES
from conchshell.errors import CheckpointError, ConchShellError, ConfigError
from conchshell.export import save_generator_export
from conchshell.inference import ImageToMusic, join_with_crossfade, write_wav
from conchshell.models.factory import build_generator_from_config
from conchshell.nn.direct import direct_convolutions
from conchshell.nn.fft_conv import FFTConv1d

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("inference_cli", ROOT / "inference.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


@pytest.fixture(scope="module")
def tiny_config():
    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_config) -> Path:
    path = tmp_path_factory.mktemp("export") / "G-step=3.pt"
    save_generator_export(path, build_generator_from_config(tiny_config), tiny_config, step=3)
    return path


@pytest.fixture(scope="module")
def model(export) -> ImageToMusic:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # seeded-codec notice of the tiny config
        return ImageToMusic.from_checkpoint(export, device="cpu")


def make_image(path: Path, color=(30, 120, 200), size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def preloaded(model, monkeypatch):
    """Let the CLI reuse the module's loaded model (loading is covered by the single-image test)."""
    monkeypatch.setattr(ImageToMusic, "from_checkpoint", classmethod(lambda cls, path, **options: model))


def read_wav(path: Path) -> tuple[np.ndarray, int, str]:
    info = sf.info(str(path))
    data, rate = sf.read(str(path), dtype="float32")
    return data, rate, info.subtype


# ----------------------------------------------------------------------------- Python API


def test_python_api_generates_clip_of_config_length(model, tiny_config, tmp_path):
    assert conchshell.ImageToMusic is ImageToMusic
    image = make_image(tmp_path / "sea.png")
    waveform, rate = model.generate(image)
    assert rate == tiny_config.data.sample_rate == 16000
    assert waveform.dtype == np.float32 and waveform.shape == (tiny_config.clip_samples,)
    assert np.all(np.abs(waveform) <= 1.0) and np.abs(waveform).max() > 0
    # A PIL image in memory is prepared exactly as its file: one preprocessing path.
    with Image.open(image) as pil:
        assert model.prepare(pil.copy()).equal(model.prepare(image))


@pytest.mark.needs_bf16_kernels
@pytest.mark.parametrize("precision, synthesis_dtype", [("bf16", torch.bfloat16), ("mixed", torch.float32)])
def test_bf16_and_mixed_run_the_image_networks_in_bf16_and_the_code_search_in_fp32(
        model, tiny_config, tmp_path, precision, synthesis_dtype):
    # bf16 also runs the generator and the decoder in bf16; mixed keeps both in fp32.
    fast = ImageToMusic(model.generator, model.frontend, model.codec, model.config, "cpu", precision=precision)
    seen = {}

    def recorder(name):
        def record(module, args, out):
            seen[name] = out.dtype
        return record

    hooks = [model.generator.register_forward_hook(recorder("generator")),
             model.codec.vqvae.decoders[model.codec.level].out.register_forward_hook(recorder("decoder")),
             model.frontend.register_forward_hook(
                 lambda module, args, out: seen.update(frontend_autocast=torch.is_autocast_enabled("cpu")))]
    original = model.codec.quantize

    def quantize(latent):
        seen["quantize"] = latent.dtype
        return original(latent)

    model.codec.quantize = quantize
    try:
        waveform, rate = fast.generate(make_image(tmp_path / "sea.png"))
    finally:
        for hook in hooks:
            hook.remove()
        del model.codec.quantize
    assert seen == {"generator": synthesis_dtype, "quantize": torch.float32, "decoder": synthesis_dtype,
                    "frontend_autocast": True}
    assert waveform.dtype == np.float32 and waveform.shape == (tiny_config.clip_samples,) and np.isfinite(waveform).all()
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        ImageToMusic(model.generator, model.frontend, model.codec, model.config, "cpu", precision="fp16")
    assert cli.parse_args(["--precision", precision]).precision == precision
    assert cli.parse_args([]).precision == "fp32"


def test_from_checkpoint_freezes_its_own_generator_for_the_precision_with_the_same_audio(model, export,
                                                                                         as_if_bf16_kernels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = ImageToMusic.from_checkpoint(export, device="cpu", precision="bf16")
        with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
            ImageToMusic.from_checkpoint(export, device="cpu", precision="fp16")
    layers = [m for m in loaded.generator.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))]
    fft_layers = [m for m in layers if isinstance(m, FFTConv1d) and m.applies()]
    assert fft_layers and all(m.weight.dtype == torch.float32 for m in fft_layers)
    assert all(m.weight.dtype == torch.bfloat16 for m in layers if m not in fft_layers)
    # The same export, unfrozen for bf16 (fp32 weights cast by autocast on every call): same
    # samples when the frozen one's FFT layers run as plain convolutions too.
    autocast_only = ImageToMusic(model.generator, model.frontend, model.codec, model.config, "cpu", precision="bf16")
    features, class_ids = torch.rand(1, 2048, generator=torch.Generator().manual_seed(0)), torch.tensor([2])
    with direct_convolutions():
        assert torch.equal(loaded.generate_from_features(features, class_ids)[0],
                           autocast_only.generate_from_features(features, class_ids)[0])
    # "mixed" keeps the generator it freezes in fp32.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mixed = ImageToMusic.from_checkpoint(export, device="cpu", precision="mixed")
    assert all(m.weight.dtype == torch.float32 for m in mixed.generator.modules()
               if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear)))


def test_bf16_on_a_cpu_without_bf16_kernels_is_one_error_naming_the_cpu(model, as_if_no_bf16_kernels):
    for precision in ("bf16", "mixed"):
        with pytest.raises(ConfigError, match=f"precision {precision}: this CPU has no bf16 kernels .*; use fp32"):
            ImageToMusic(model.generator, model.frontend, model.codec, model.config, "cpu", precision=precision)
    ImageToMusic(model.generator, model.frontend, model.codec, model.config, "cpu", precision="fp32")


def test_class_override_reaches_generator_and_prediction_is_kept(model, tmp_path):
    image = make_image(tmp_path / "sea.jpg")
    given = []
    hook = model.generator.register_forward_hook(lambda module, args, out: given.append(args[1].tolist()))
    try:
        forced = model.run(image, class_override="deep")
    finally:
        hook.remove()
    # (The untrained tiny generator barely depends on its class, so the check is on its input.)
    assert given == [[CLASS_NAMES.index("deep")]] and forced.class_name == "deep"
    assert 0 <= forced.predicted_class_id < len(CLASS_NAMES)
    with pytest.raises(ConchShellError, match="unknown class"):
        model.run(image, class_override="lagoon")


def test_missing_frozen_network_names_file_and_remedy(tmp_path, tiny_config):
    config = dataclasses.replace(tiny_config, image=dataclasses.replace(tiny_config.image,
                                                                        tcnn_checkpoint="nowhere/TCNN-best.pt"))
    path = save_generator_export(tmp_path / "G.pt", build_generator_from_config(config), config, step=1)
    with pytest.raises(CheckpointError, match=r"nowhere/TCNN-best\.pt.*train\.stage=tcnn"):
        ImageToMusic.from_checkpoint(path, device="cpu")
    code = cli.main(["--img_path", str(make_image(tmp_path / "a.png")), "--checkpoint", str(path),
                     "--out", str(tmp_path / "a.wav")])
    assert code == 1 and not (tmp_path / "a.wav").exists()


# ----------------------------------------------------------------------------- CLI, good input


def test_cli_single_image_writes_16bit_mono_wav(export, tiny_config, tmp_path, capsys):
    image = make_image(tmp_path / "beach.jpg")
    out = tmp_path / "out" / "beach.wav"
    assert cli.main(["--img_path", str(image), "--checkpoint", str(export), "--out", str(out),
                     "--device", "cpu", "--seed", "3"]) == 0
    data, rate, subtype = read_wav(out)
    assert rate == tiny_config.data.sample_rate and data.shape == (tiny_config.clip_samples,)
    assert subtype == "PCM_16"
    printed = capsys.readouterr().out
    assert "class:" in printed and "(predicted)" in printed and " s" in printed
    assert [p.name for p in out.parent.iterdir()] == ["beach.wav"]  # no temp files left behind


def test_cli_soundtrack_joins_pieces_with_crossfade(export, tiny_config, tmp_path, preloaded):
    first, second = make_image(tmp_path / "img2.png"), make_image(tmp_path / "img10.png", (200, 180, 60))
    track = tmp_path / "show.wav"
    code = cli.main(["--img_path", str(first), str(second), "--checkpoint", str(export), "--out",
                     str(tmp_path / "pieces"), "--soundtrack", str(track), "--spectrogram", "--class", "deep"])
    assert code == 0
    clip = tiny_config.clip_samples
    overlap = min(int(0.5 * tiny_config.data.sample_rate), clip // 2)
    data, rate, _ = read_wav(track)
    assert data.shape == (2 * clip - overlap,) and rate == 16000
    for name in ("img2", "img10"):
        assert read_wav(tmp_path / "pieces" / f"{name}.wav")[0].shape == (clip,)
        assert (tmp_path / "pieces" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert track.with_suffix(".png").is_file()


def test_folder_mode_keeps_good_images_and_lists_bad_ones(export, tmp_path, capsys, preloaded):
    folder = tmp_path / "photos"
    make_image(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "wavs"
    code = cli.main(["--img_path", str(folder), "--checkpoint", str(export), "--out", str(out),
                     "--soundtrack", str(tmp_path / "track.wav")])
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["good.wav"]
    err = capsys.readouterr().err
    assert "1 of 2 input(s) failed" in err and "broken.jpg" in err
    assert not (tmp_path / "track.wav").exists()  # a soundtrack with a hole is not written


# ----------------------------------------------------------------------------- CLI, bad input


def _truncated_jpeg(path: Path) -> Path:
    make_image(path, size=(200, 150))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _bomb_png(path: Path) -> Path:
    # 9000 x 8000 = 72 MP, above the 67 MP limit; a 1-bit image keeps the file small.
    Image.new("1", (9000, 8000)).save(path)
    return path


BAD_INPUTS = {
    "missing path": (lambda d: d / "nope.jpg", "image file not found"),
    "folder without images": (lambda d: (d / "empty").mkdir() or d / "empty", "contains no images"),
    "not an image": (lambda d: (d / "x.jpg").write_text("hello") and d / "x.jpg", "not an image"),
    "truncated image": (lambda d: _truncated_jpeg(d / "cut.jpg"), "(?i)truncated"),
    "decompression bomb": (lambda d: _bomb_png(d / "huge.png"), "decompression bomb"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_no_wav(case, export, tmp_path, capsys):
    make_input, message = BAD_INPUTS[case]
    image = make_input(tmp_path)
    out = tmp_path / "out.wav"
    assert cli.main(["--img_path", str(image), "--checkpoint", str(export), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0])
    assert not out.exists()


def test_unwritable_output_fails_before_generating(export, tmp_path, capsys):
    image = make_image(tmp_path / "a.png")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert cli.main(["--img_path", str(image), "--checkpoint", str(export), "--out", str(blocker / "a.wav")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to output folder") and "class:" not in err


def test_missing_checkpoint_and_real_exit_status(tmp_path):
    image = make_image(tmp_path / "a.png")
    result = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--img_path", str(image),
                             "--checkpoint", str(tmp_path / "G-missing.pt"), "--out", str(tmp_path / "a.wav")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: ") and "G-missing.pt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "a.wav").exists()


# ----------------------------------------------------------------------------- output helpers


def test_equal_power_crossfade_weights():
    rate, n = 1000, 2000
    ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)
    out_curve = join_with_crossfade([ones, zeros], rate, 0.5)[1500:2000]
    in_curve = join_with_crossfade([zeros, ones], rate, 0.5)[1500:2000]
    assert join_with_crossfade([ones, zeros, ones], rate, 0.5).shape == (3 * n - 2 * 500,)
    np.testing.assert_allclose(out_curve ** 2 + in_curve ** 2, 1.0, atol=1e-6)
    assert out_curve[0] > 0.99 and out_curve[-1] < 0.01 and np.all(np.diff(out_curve) < 0)
    # The overlap never exceeds half the shortest piece.
    assert join_with_crossfade([ones[:100], ones[:100]], rate, 0.5).shape == (150,)


def test_wav_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "x.wav"

    def failing_write(path, *args, **kwargs):
        Path(path).write_bytes(b"RIFF half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sf, "write", failing_write)
    with pytest.raises(ConchShellError, match="No space left"):
        write_wav(target, np.zeros(16), 16000)
    assert list(tmp_path.iterdir()) == []


def test_no_arguments_means_the_demo_model_on_the_examples_with_spectrograms():
    args = cli.parse_args([])
    assert args.img_path == [ROOT / "examples"] and args.checkpoint == ROOT / "weights" / "demo" / "generator.pt"
    assert args.spectrogram is True
    assert cli.parse_args(["--no-spectrogram"]).spectrogram is False
    assert cli.parse_args(["--img_path", "a.jpg"]).spectrogram is False
    assert cli.parse_args(["--img_path", "a.jpg", "--spectrogram"]).spectrogram is True


@pytest.mark.cuda
def test_cuda_generates_the_cpu_audio_in_ieee_fp32_and_runs_bf16(export, tmp_path):
    image = make_image(tmp_path / "sea.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        on_gpu = ImageToMusic.from_checkpoint(export, device="cuda")
        on_cpu = ImageToMusic.from_checkpoint(export, device="cpu")
    # fp32 on CUDA is IEEE fp32 (no TF32 in cuDNN's convolutions): the CPU's audio, to rounding.
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    gpu_wave, _ = on_gpu.generate(image)
    cpu_wave, _ = on_cpu.generate(image)
    assert np.abs(gpu_wave - cpu_wave).max() < 1e-3 * max(np.abs(cpu_wave).max(), 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bf16 = ImageToMusic.from_checkpoint(export, device="cuda", precision="bf16")
    wave, _ = bf16.generate(image)
    assert wave.shape == cpu_wave.shape and np.isfinite(wave).all()
