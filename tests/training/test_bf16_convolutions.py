"""Every bf16 convolution and matrix product the shipped configs run, in a training step and
in image -> audio inference, against a float64 recomputation from the same inputs: bf16
rounding, never a wrong kernel (oneDNN's AMX kernel computes some narrow 1-D shapes wrongly; see
``conchshell.nn.conv``)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conchshell.config import load_config
from conchshell.models.factory import build_codec, build_frontend, build_generator_from_config
from conchshell.models.generator import freeze_for_inference
from conchshell.training.stages import build_stage
from conchshell.utils.precision import autocast_for

from .conftest import REPO
from .test_stages import CPU, synthetic_batch

FORWARD_OPS = {"convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
               "mm", "bmm", "addmm", "baddbmm", "linear", "matmul"}
# bf16 results of bf16 inputs: about 0.003 of the result's norm; a wrong kernel gave 0.3-1.2.
TOLERANCE = 0.02


def _relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    return float((result.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def _double(values: tuple) -> list:
    return [v.double() if isinstance(v, torch.Tensor) else v for v in values]


class Bf16ConvolutionAudit(TorchDispatchMode):
    """Recomputes every bf16 convolution (forward and backward) and matrix product in float64
    and records the shapes whose result is off by more than bf16 rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.checked = 0
        self.wrong: dict[str, float] = {}

    def _record(self, name: str, args: tuple, results: tuple, references: tuple) -> None:
        self.checked += 1
        for result, reference in zip(results, references):
            if result is not None and (error := _relative_error(result, reference)) > TOLERANCE:
                shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                self.wrong[f"{name} {shapes} {[a for a in args if not isinstance(a, torch.Tensor)]}"] = error

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in FORWARD_OPS and out.dtype == torch.bfloat16:
            self._record(name, args, (out,), (func(*_double(args), **(kwargs or {})),))
        elif name == "convolution_backward" and args[1].dtype == torch.bfloat16:
            self._record(name, args, tuple(out), tuple(func(*_double(args))))
        return out


# The paper-scale configs take minutes (their float64 recomputation most): run with -m heavy.
CONFIGS = ["tiny", "demo", *(pytest.param(name, marks=pytest.mark.heavy)
                             for name in ("conchshell", "baseline1_high", "baseline2_low"))]


def _config(name: str):
    return load_config(REPO / f"configs/{name}.yaml",
                       ["train.device=cpu", "train.precision=bf16", "image.tcnn_checkpoint=null",
                        "image.i3d_checkpoint=null", "codec.checkpoint=null"])


@pytest.mark.needs_bf16_kernels
@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_training_step_convolutions_are_bf16_exact(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seeded codec's "untrained" warning, the probe's
        torch.manual_seed(0)
        stage = build_stage(_config(name), CPU)
        batch = synthetic_batch(stage.config)
        stage.train_step([batch])  # probes the narrow shapes, outside the audit
    audit = Bf16ConvolutionAudit()
    with audit:
        stage.train_step([batch])
    assert audit.checked > 50
    assert not audit.wrong, audit.wrong


@pytest.mark.needs_bf16_kernels
@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_inference_convolutions_are_bf16_exact(name):
    config = _config(name)
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frontend = build_frontend(config).eval()
        generator = freeze_for_inference(build_generator_from_config(config), "bf16")
        codec = build_codec(config).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def generate() -> None:
        with autocast_for(cpu, "bf16"):
            features, classes = frontend(images)
            latent = generator(features, classes)
        codes = codec.quantize(latent.float())
        with autocast_for(cpu, "bf16"):
            codec.decode(codes, config.clip_samples)

    with torch.inference_mode():
        generate()
        audit = Bf16ConvolutionAudit()
        with audit:
            generate()
    assert audit.checked > 50
    assert not audit.wrong, audit.wrong
